"""Misuse that used to pass silently (or fail with a raw torch error) is refused with a message
that says what was expected: reversed or foreign maps given to every consumer, ``ks`` beyond the
links' ``k``, SAEs used on a model they do not belong to, mixed SAE families, bad token input."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from transformer_lens import HookedTransformer

from sae_match_lens import assets
from sae_match_lens.evaluation import evaluate_substitution
from sae_match_lens.flow.causal import causal_check
from sae_match_lens.flow.coactivation import evaluate_links
from sae_match_lens.flow.graph import flow_graph, origin_groups
from sae_match_lens.flow.linking import Transition, links
from sae_match_lens.lens.hooks import block_substitute, run_skipping, substitute
from sae_match_lens.matching import match
from sae_match_lens.metrics import (
    check_reconstruction,
    check_tokens,
    cross_entropy_sum,
    next_token_ce,
    record_states,
    unverified_saes,
)
from sae_match_lens.permutation import Permutation, ProvenanceError, check_direction
from tests.helpers import build_sae

H1, H2 = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def suite():
    model, saes = assets.load_default_suite("jumprelu")
    return model, saes, assets.load_eval_tokens()


@pytest.fixture(scope="module")
def foreign_model(suite):
    """A randomly initialised model with the default suite's configuration (same d_model, hooks
    and vocabulary), unnamed like any model built from a config: the SAEs do not belong to it."""
    model, _, _ = suite
    cfg = copy.deepcopy(model.cfg)
    cfg.model_name, cfg.seed = "custom", 1
    other = HookedTransformer(cfg, tokenizer=model.tokenizer)
    other.eval()
    return other


# -- item 2: direction and identity of maps, everywhere they are consumed ------------------------

def test_forward_links_given_to_causal_check_are_refused_as_reversed(suite):
    # the natural call links(pred, target) gave n_targets=0 and NaN rates without complaint
    model, saes, tokens = suite
    forward = links(saes[1], saes[2], k=1, progress=False)
    with pytest.raises(ProvenanceError, match=r"runs the other way") as err:
        causal_check(model, saes[1], saes[2], tokens[:2], {"forward": forward}, progress=False)
    message = str(err.value)
    assert H1 in message and H2 in message
    assert "direction='backward'" in message
    backward = links(saes[1], saes[2], k=1, direction="backward", progress=False)
    table = causal_check(model, saes[1], saes[2], tokens[:2], {"backward": backward},
                         positions=3, max_targets=5, progress=False)
    assert table.n_targets.iloc[0] > 0 and table.success_rate.notna().all()


def test_reversed_links_given_to_evaluate_links_are_refused(suite):
    # reversed links scored Jaccard 0.032 instead of 0.420 on the default suite
    model, saes, tokens = suite
    reversed_links = links(saes[2], saes[1], k=1, progress=False)
    with pytest.raises(ProvenanceError, match=r"runs the other way.*" + H2 + ".*" + H1):
        evaluate_links(model, {1: saes[1], 2: saes[2]}, tokens[:2],
                       {"reversed": {(1, 2): reversed_links}}, progress=False)


def test_a_reversed_permutation_is_refused_with_its_inverse_named_and_the_inverse_is_accepted(
        suite):
    model, saes, tokens = suite
    backwards = match(saes[2], saes[1], progress=False)
    with pytest.raises(ProvenanceError, match=r"result\.permutation\.inverse\(\)"):
        evaluate_substitution(model, {1: saes[1], 2: saes[2]}, tokens[:2],
                              permutations={(1, 2): backwards}, variants=["folded"],
                              progress=False)
    with pytest.raises(ProvenanceError, match=r"perm\.inverse\(\)"):
        run_skipping(model, tokens[:2], saes[1], saes[2], backwards.permutation)
    with pytest.raises(ProvenanceError, match="runs the other way"), \
            substitute(model, saes[1], saes[2], backwards):
        pass
    for hp in model.hook_dict.values():
        assert not hp.fwd_hooks
    assert run_skipping(model, tokens[:2], saes[1], saes[2],
                        backwards.permutation.inverse()).isfinite()


def test_reversed_transitions_and_stored_flow_links_are_refused(suite):
    _, saes, _ = suite
    tr = Transition.from_links(links(saes[2], saes[1], k=2, progress=False))
    with pytest.raises(ProvenanceError, match=r"Transition\.from_links\(links"):
        block_substitute(saes[1], saes[2], tr, substitution="folded")
    with pytest.raises(ProvenanceError, match="runs the other way"):
        tr.check_saes(saes[1], saes[2])
    stack = assets.load_suite_stack(modules=())
    stored = {(1, 2, "res"): links(stack[2].res, stack[1].res, k=1, score="decoder_cosine",
                                   progress=False)}
    with pytest.raises(ProvenanceError, match=r"links_by_key\[\(1, 2, 'res'\)\].*other way"):
        flow_graph(stack, (1, 0), links_by_key=stored, score="decoder_cosine")


def test_a_map_for_other_saes_names_both_hooks_and_hand_made_maps_are_not_checked(suite):
    _, saes, _ = suite
    lk = links(saes[1], saes[2], k=1, progress=False)
    with pytest.raises(ProvenanceError, match=r"made for source .*" + H1 + ".*" + H2
                       + r".*target SAE is not .*blocks\.3\.hook_resid_post"):
        check_direction(lk, saes[1], saes[3], what="these links")
    check_direction(lk, saes[1], saes[2], what="these links")
    check_direction(Permutation.identity(saes[1].cfg.d_sae), saes[2], saes[1], what="by hand")
    check_direction(lk.indices, saes[2], saes[1], what="an index tensor")


# -- item 5: a k the links do not hold --------------------------------------------------------

def test_evaluate_links_refuses_a_k_beyond_the_links_k(suite):
    model, saes, tokens = suite
    top1 = links(saes[1], saes[2], k=1, progress=False)
    with pytest.raises(ValueError, match=r"k=1 partner.*ks=\(1, 5\).*k=\[5\]"):
        evaluate_links(model, {1: saes[1], 2: saes[2]}, tokens[:2], {"top1": {(1, 2): top1}},
                       ks=(1, 5), progress=False)


# -- item 6: SAEs on a model they do not belong to ---------------------------------------------

def test_saes_on_a_foreign_model_are_refused_with_what_was_measured(suite, foreign_model):
    # measured: evaluate_substitution returned explained variance -7.24 without complaint
    _, saes, tokens = suite
    with pytest.raises(ValueError, match=r"explained variance there is -\d+\.\d+ on \d+ tokens"):
        evaluate_substitution(foreign_model, {1: saes[1], 2: saes[2]}, tokens[:2],
                              variants=["folded"], progress=False)
    with pytest.raises(ValueError, match=r"does not reconstruct this model's states"):
        causal_check(foreign_model, saes[1], saes[2], tokens[:2],
                     {"b": links(saes[1], saes[2], direction="backward", progress=False)},
                     progress=False)
    with pytest.raises(ValueError, match="explained variance"):
        run_skipping(foreign_model, tokens[:2], saes[1], saes[2], match(saes[1], saes[2],
                                                                        progress=False))
    with pytest.raises(ValueError, match="explained variance"), \
            substitute(foreign_model, saes[1], saes[2], match(saes[1], saes[2], progress=False)):
        foreign_model(tokens[:2], return_type="loss")
    for hp in foreign_model.hook_dict.values():
        assert not hp.fwd_hooks
    table = evaluate_substitution(foreign_model, {1: saes[1], 2: saes[2]}, tokens[:2],
                                  variants=["folded"], progress=False, check_model=False)
    assert table.explained_variance.iloc[0] < -1  # what the check protects from


def test_the_probe_matches_the_metrics_convention_and_passes_the_saes_own_model(suite):
    model, saes, tokens = suite
    states = record_states(model, [H1], tokens[:4])
    check_reconstruction([saes[1]], states, what="own model")  # EV about 0.96
    with pytest.raises(ValueError, match=r"explained variance there is 0\.9\d+ on 508 tokens"):
        check_reconstruction([saes[1]], states, what="strict", min_explained_variance=0.99)


def test_a_recorded_model_name_that_differs_is_refused_naming_both(suite):
    model, saes, tokens = suite
    named = copy.copy(model)
    named.cfg = copy.deepcopy(model.cfg)
    named.cfg.model_name = "gpt2"
    with pytest.raises(ValueError, match=r"'sae-match-lens-default-6l'.*'gpt2'"):
        causal_check(named, saes[1], saes[2], tokens[:2], {}, progress=False)
    with pytest.raises(ValueError, match=r"'sae-match-lens-default-6l'.*'gpt2'"), \
            substitute(named, saes[1], saes[2], match(saes[1], saes[2], progress=False)):
        pass
    assert unverified_saes(model, saes, what="own") == []


def test_model_names_compare_through_aliases_and_organisation_prefixes(suite):
    _, saes, _ = suite
    sae = copy.deepcopy(saes[0])
    for recorded, model_name in (("gpt2-small", "gpt2"), ("gemma-2-2b", "google/gemma-2-2b")):
        sae.cfg.metadata.model_name = recorded
        model = SimpleNamespace(cfg=SimpleNamespace(model_name=model_name))
        assert unverified_saes(model, [sae], what="alias") == []
    unnamed = SimpleNamespace(cfg=SimpleNamespace(model_name="custom"))
    assert unverified_saes(unnamed, [sae], what="unnamed") == [sae]


def test_matching_saes_of_different_families_warns(caplog):
    jumprelu, topk = build_sae("jumprelu", seed=0), build_sae("topk", seed=1)
    with caplog.at_level(logging.WARNING, logger="sae_match_lens.matching"):
        match(jumprelu, build_sae("jumprelu", seed=2), progress=False)
        assert not [r for r in caplog.records if "different rules" in r.getMessage()]
        match(jumprelu, topk, progress=False)
    warned = [r for r in caplog.records if "different rules" in r.getMessage()]
    assert len(warned) == 1
    assert "'threshold'" in warned[0].getMessage() and "'none'" in warned[0].getMessage()


# -- item 8: token input and raw tensors ------------------------------------------------------

def _bad_tokens(tokens: torch.Tensor) -> dict[str, tuple[object, type, str]]:
    too_big = tokens.clone()
    too_big[0, 3] = 4096
    negative = tokens.clone()
    negative[1, 2] = -5
    return {
        "float": (tokens.float(), TypeError, r"integer token ids.*torch\.float32"),
        "beyond the vocabulary": (too_big, ValueError, r"below the model's vocabulary size 4096"
                                                       r".*tokens\[0, 3\] = 4096"),
        "negative": (negative, ValueError, r">= 0.*tokens\[1, 2\] = -5"),
        "a list": (tokens.tolist(), TypeError, r"torch integer tensor.*got a list"),
    }


@pytest.mark.parametrize("case", ["float", "beyond the vocabulary", "negative", "a list"])
def test_bad_tokens_get_a_clear_error_at_every_entry_point(suite, case):
    model, saes, tokens = suite
    bad, error, pattern = _bad_tokens(tokens[:2].clone())[case]
    stack = assets.load_suite_stack(modules=())
    calls = {
        "evaluate_substitution": lambda: evaluate_substitution(
            model, {1: saes[1], 2: saes[2]}, bad, variants=["identity"], progress=False),
        "causal_check": lambda: causal_check(model, saes[1], saes[2], bad, {}, progress=False),
        "evaluate_links": lambda: evaluate_links(model, {1: saes[1], 2: saes[2]}, bad, {},
                                                 progress=False),
        "run_skipping": lambda: run_skipping(model, bad, saes[1], saes[2],
                                             substitution="identity"),
        "origin_groups": lambda: origin_groups(model, {1: stack[1], 2: stack[2]}, bad,
                                               layers=[2]),
    }
    for name, call in calls.items():
        with pytest.raises(error, match=pattern) as err:
            call()
        assert name in str(err.value)
    if case != "beyond the vocabulary":  # next_token_ce bounds ids by the logits' width
        with pytest.raises(error, match=pattern):
            next_token_ce(torch.zeros(2, tokens.shape[1], 4096), bad)


def test_cross_entropy_targets_beyond_the_logits_are_refused():
    log_probs = torch.zeros(2, 5, 10).log_softmax(-1)
    with pytest.raises(ValueError, match=r"cross_entropy_sum: .*vocabulary size 10.* = 12"):
        cross_entropy_sum(log_probs, torch.tensor([[1, 2, 12], [3, 4, 5]]))
    assert cross_entropy_sum(log_probs, torch.tensor([[1, 2, 9], [3, 4, 5]])) == pytest.approx(
        6 * torch.log(torch.tensor(10.0)).item())


def test_check_tokens_accepts_batches_and_checks_them_as_they_come():
    good = [torch.tensor([[0, 1, 2]]), torch.tensor([[0, 3, 4]])]
    assert len(check_tokens(good, vocab_size=5)) == 2
    lazy = check_tokens(iter([good[0], torch.tensor([[0, 9, 1]])]), vocab_size=5, what="lazy")
    assert torch.equal(next(lazy), good[0])
    with pytest.raises(ValueError, match=r"lazy: .*vocabulary size 5"):
        next(lazy)
    assert check_tokens(torch.tensor([0, 1, 2])).shape == (1, 3)


def test_match_refuses_raw_weight_tensors_with_what_it_takes(suite):
    _, saes, _ = suite
    with pytest.raises(TypeError, match=r"match\(\) takes two SAELens SAEs.*sae_a is a tensor"):
        match(saes[1].W_dec, saes[1].W_dec)


@pytest.mark.parametrize("bad", ["float", "list", "too_big", "negative"])
def test_coactivation_and_suite_metrics_refuse_bad_tokens(bad):
    from sae_match_lens.assets import compute_model_ce, compute_sae_metrics, load_default_suite
    from sae_match_lens.flow.coactivation import coactivation_stats

    model, saes = load_default_suite()
    good = torch.zeros(2, 8, dtype=torch.long)
    tokens = {"float": good.float(), "list": good.tolist(),
              "too_big": good + model.cfg.d_vocab, "negative": good - 1}[bad]
    for call in (lambda: coactivation_stats(model, saes[0], saes[1], tokens, progress=False),
                 lambda: compute_model_ce(model, tokens),
                 lambda: compute_sae_metrics(model, saes[0], tokens)):
        with pytest.raises((TypeError, ValueError), match="token"):
            call()
