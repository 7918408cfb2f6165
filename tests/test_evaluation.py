"""evaluate_substitution: the table, its metrics, streaming and routes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sae_match_lens.evaluation import (
    DEFAULT_VARIANTS,
    RESULT_COLUMNS,
    Variant,
    evaluate_substitution,
)
from sae_match_lens.lens.hooks import Substitution
from sae_match_lens.permutation import Permutation
from tests.helpers_tl import layer_saes, planted_copy, random_jumprelu_sae, tiny_model, tiny_tokens

METRICS = ["explained_variance", "delta_ce", "kl", "coactivation", "ce_clean", "ce_substituted",
           "mse", "n_tokens"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens():
    return tiny_tokens(n_seq=5)


@pytest.fixture(scope="module")
def saes():
    return layer_saes()


@pytest.fixture(scope="module")
def table(model, saes, tokens):
    return evaluate_substitution(model, saes, tokens, batch_size=2, progress=False)


def test_table_has_one_row_per_pair_and_variant_with_all_columns(table, tokens):
    assert list(table.columns) == list(RESULT_COLUMNS)
    assert len(table) == 3 * len(DEFAULT_VARIANTS)
    assert set(zip(table.layer_a, table.layer_b, strict=True)) == {(0, 1), (1, 2), (2, 3)}
    assert set(table.variant) == set(DEFAULT_VARIANTS)
    assert (table.n_tokens == tokens.shape[0] * (tokens.shape[1] - 1)).all()
    assert table.hook_b[table.layer_b == 2].eq("blocks.2.hook_resid_post").all()
    uses_perm = table.permutation.notna()
    assert table.coactivation[uses_perm].between(0, 1).all()
    assert table.coactivation[~uses_perm].isna().all()
    assert table[["explained_variance", "delta_ce", "kl"]].notna().all().all()
    assert (table.kl > 0).all()


def test_sae_b_reconstruction_explained_variance_equals_a_direct_computation(model, saes, tokens,
                                                                              table):
    sae = saes[2]
    _, cache = model.run_with_cache(tokens, names_filter=[sae.cfg.metadata.hook_name])
    x = cache[sae.cfg.metadata.hook_name][:, 1:].reshape(-1, 32).double()
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x.float())).double()
    expected = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    row = table[(table.layer_b == 2) & (table.variant == "sae_b_reconstruction")]
    assert row.explained_variance.item() == pytest.approx(float(expected), abs=1e-5)


def test_delta_ce_and_kl_equal_a_direct_computation(model, saes, tokens, table):
    sae = saes[1]
    hook = sae.cfg.metadata.hook_name

    def splice(x, *, hook):  # position 0 (BOS) keeps its true state, as evaluation's default
        out = sae.decode(sae.encode(x))
        out[:, 0] = x[:, 0]
        return out

    with torch.no_grad():
        clean = model(tokens, return_type="loss", loss_per_token=True)[:, 1:]
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
        spliced = model.loss_fn(logits, tokens, per_token=True)[:, 1:]
        logp_clean = torch.log_softmax(model(tokens)[:, 1:-1], -1)  # the predictions CE scores
        logp = torch.log_softmax(logits[:, 1:-1], -1)
    kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1).mean()
    row = table[(table.layer_b == 1) & (table.variant == "sae_b_reconstruction")]
    assert row.delta_ce.item() == pytest.approx(float((spliced - clean).mean()), abs=1e-5)
    assert row.kl.item() == pytest.approx(float(kl), abs=1e-6)


def test_identity_on_adjacent_equal_hooks_has_full_variance_and_no_loss(model, tokens):
    saes = {"post1": random_jumprelu_sae("blocks.1.hook_resid_post", seed=1),
            "pre2": random_jumprelu_sae("blocks.2.hook_resid_pre", seed=2)}
    for route in ("skip", "hooks"):
        table = evaluate_substitution(model, saes, tokens, variants=["identity"], route=route,
                                      progress=False)
        row = table.iloc[0]
        assert (row.layer_a, row.layer_b) == ("post1", "pre2")
        assert row.explained_variance == pytest.approx(1.0, abs=1e-12)
        assert row.delta_ce == pytest.approx(0.0, abs=1e-6)
        assert row.kl == pytest.approx(0.0, abs=1e-6)


def test_streaming_with_batch_size_one_equals_one_big_batch(model, saes, tokens, table):
    variants = ["folded", "hybrid", "sae_b_reconstruction", "random_permutation"]
    small = evaluate_substitution(model, saes, tokens, pairs=[(0, 1)], variants=variants,
                                  batch_size=1, progress=False)
    big = evaluate_substitution(model, saes, tokens, pairs=[(0, 1)], variants=variants,
                                batch_size=len(tokens), progress=False)
    pd.testing.assert_frame_equal(small, big, rtol=1e-5, atol=1e-6)
    earlier = table[(table.layer_a == 0) & table.variant.isin(variants)].reset_index(drop=True)
    pd.testing.assert_frame_equal(small, earlier, rtol=1e-5, atol=1e-6)


def test_skip_and_hook_routes_give_the_same_table(model, saes, tokens, table):
    hooked = evaluate_substitution(model, saes, tokens, batch_size=5, route="hooks",
                                   progress=False)
    pd.testing.assert_frame_equal(hooked[METRICS], table[METRICS], rtol=1e-4, atol=1e-5)


def test_token_batches_can_come_from_an_iterable(model, saes, tokens):
    args = {"pairs": [(1, 3)], "variants": ["error_preserving"], "progress": False}
    from_iter = evaluate_substitution(model, saes, iter(tokens.split(2)), **args)
    from_tensor = evaluate_substitution(model, saes, tokens, batch_size=2, **args)
    pd.testing.assert_frame_equal(from_iter, from_tensor)


def test_a_planted_permutation_beats_the_random_baseline(model, tokens):
    sae_a = random_jumprelu_sae("blocks.1.hook_resid_post", seed=1)
    sae_b, planted = planted_copy(sae_a, "blocks.2.hook_resid_pre")
    table = evaluate_substitution(
        model, [sae_a, sae_b], tokens, permutations={(1, 2): planted},  # keys: model layers
        variants=["folded", "raw", "random_permutation", "sae_a_reconstruction"], progress=False,
    ).set_index("variant")
    assert table.coactivation["folded"] == pytest.approx(1.0)
    assert table.coactivation["random_permutation"] < 0.9
    assert table.explained_variance["folded"] == pytest.approx(
        table.explained_variance["sae_a_reconstruction"], abs=1e-5)
    assert table.kl["random_permutation"] > table.kl["folded"]
    assert table.explained_variance["raw"] < table.explained_variance["folded"] - 0.1
    assert table.n_matched["folded"] == 64


def test_custom_variants_and_match_results_are_accepted(model, saes, tokens):
    from sae_match_lens.matching import match

    result = match(saes[0], saes[1], progress=False)
    custom = Variant("hybrid_q90", Substitution("hybrid", quantile=0.9))
    table = evaluate_substitution(model, saes, tokens, pairs=[(0, 1)], variants=[custom, "hybrid"],
                                  permutations={(0, 1): result}, progress=False)
    assert list(table.variant) == ["hybrid_q90", "hybrid"]
    bare = evaluate_substitution(model, saes, tokens, pairs=[(0, 1)], variants=["hybrid"],
                                 permutations={(0, 1): result.permutation}, progress=False)
    assert bare.delta_ce.item() == pytest.approx(table.delta_ce.iloc[1], abs=1e-5)


def test_bad_arguments_are_clear_errors(model, saes, tokens):
    with pytest.raises(ValueError, match="unknown variant 'fold'"):
        evaluate_substitution(model, saes, tokens, variants=["fold"], progress=False)
    with pytest.raises(KeyError, match="does not name two SAEs"):
        evaluate_substitution(model, saes, tokens, pairs=[(0, 7)], progress=False)
    with pytest.raises(ValueError, match="pos >= 3"):
        evaluate_substitution(model, saes, tokens[:, :2], variants=["identity"], progress=False)
    with pytest.raises(ValueError, match="comes after SAE B's hook"):
        evaluate_substitution(model, saes, tokens, pairs=[(2, 1)], variants=["identity"],
                              progress=False)
    wrong = {(0, 1): Permutation.identity(10)}
    with pytest.raises(ValueError, match="source side has 10 features"):
        evaluate_substitution(model, saes, tokens, pairs=[(0, 1)], variants=["folded"],
                              permutations=wrong, progress=False)


def test_a_list_of_saes_is_tabled_at_the_model_layers_of_its_hooks(model, tokens):
    sae_a = random_jumprelu_sae("blocks.1.hook_resid_post", seed=1)
    sae_b = random_jumprelu_sae("blocks.3.hook_resid_post", seed=2)
    table = evaluate_substitution(model, [sae_a, sae_b], tokens, variants=["identity"],
                                  progress=False)
    assert (table.layer_a.tolist(), table.layer_b.tolist()) == ([1], [3])
    keyed = evaluate_substitution(model, {"a": sae_a, "b": sae_b}, tokens, variants=["identity"],
                                  progress=False)
    assert (keyed.layer_a.tolist(), keyed.layer_b.tolist()) == (["a"], ["b"])
    hookless = random_jumprelu_sae("resid_at_one", seed=3)
    with pytest.raises(ValueError, match=r"resid_at_one.*pass a mapping"):
        evaluate_substitution(model, [hookless, sae_b], tokens, progress=False)


def test_flat_evaluation_knobs_warn_and_equal_eval_options(model, saes, tokens, table):
    """0.2's flat knobs (batch_size=, seed=, bos=, ...) go into EvalOptions with a warning."""
    import pandas as pd

    from sae_match_lens.evaluation import EvalOptions

    with_options = evaluate_substitution(model, saes, tokens, progress=False,
                                         options=EvalOptions(batch_size=2))
    pd.testing.assert_frame_equal(with_options, table)
    flat = dict(batch_size=3, seed=4, bos="substitute", check_model=False)
    with pytest.warns(DeprecationWarning, match=r"batch_size= → options\.batch_size"):
        old = evaluate_substitution(model, saes, tokens, pairs=[(0, 1)], progress=False, **flat)
    new = evaluate_substitution(model, saes, tokens, pairs=[(0, 1)], progress=False,
                                options=EvalOptions(**flat))
    pd.testing.assert_frame_equal(old, new)
    with pytest.raises(TypeError, match="EvalOptions"):
        evaluate_substitution(model, saes, tokens, options={"batch_size": 2})  # type: ignore[arg-type]
