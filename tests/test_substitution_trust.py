"""What the substitute writes at B, in the right units, for every architecture; BOS; SAEs with
run-time normalisation; reversed hooks on one block boundary."""

from __future__ import annotations

import pytest
import torch

from sae_match_lens.adapters import fold, folded_activation_factor
from sae_match_lens.evaluation import evaluate_substitution
from sae_match_lens.lens.hooks import Substitution, block_substitute, run_skipping, substitute
from sae_match_lens.matching import match
from sae_match_lens.permutation import Permutation
from tests.helpers import build_sae, sample_inputs
from tests.helpers_tl import D_MODEL, random_jumprelu_sae, state_at, tiny_model, tiny_tokens, written_at

NON_TRANSCODERS = ["standard", "jumprelu", "jumprelu_scalar_threshold", "gated", "topk",
                   "topk_rescaled", "abstopk"]
HOOK_A, HOOK_B = "blocks.1.hook_resid_post", "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens():
    return tiny_tokens()


@pytest.mark.parametrize("architecture", NON_TRANSCODERS)
def test_folded_activation_factor_takes_encode_into_fold_units(architecture):
    sae = build_sae(architecture, d_in=16, d_sae=48)
    x = sample_inputs(sae)
    with torch.no_grad():
        expected = fold(sae).encode(x)
        got = sae.encode(x) * folded_activation_factor(sae).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", NON_TRANSCODERS)
@pytest.mark.parametrize("variant", ["permute", "hybrid", "error_preserving"])
def test_written_at_b_is_fold_b_decode_of_the_permuted_fold_a_code(model, tokens, architecture,
                                                                   variant):
    sae_a = build_sae(architecture, d_in=D_MODEL, d_sae=48, hook_name=HOOK_A, seed=1)
    sae_b = build_sae(architecture, d_in=D_MODEL, d_sae=48, hook_name=HOOK_B, seed=2)
    perm = Permutation.random(48, generator=torch.Generator().manual_seed(5))
    cost = torch.rand(48, generator=torch.Generator().manual_seed(6))
    spec = Substitution(variant, quantile=0.5)
    with torch.no_grad():
        h_A, h_B = state_at(model, tokens, HOOK_A), state_at(model, tokens, HOOK_B)
        fa, fb = fold(sae_a), fold(sae_b)
        f_A = fa.encode(h_A)
        if variant == "permute":
            expected = fb.decode(perm.apply(f_A))
        elif variant == "error_preserving":
            expected = h_A - fa.decode(f_A) + fb.decode(perm.apply(f_A))
        else:
            send = torch.zeros(48, dtype=torch.bool)
            send[torch.argsort(cost)[:24]] = True
            expected = (fb.decode(perm.apply(f_A * send)) + fa.decode(f_A * ~send)
                        - fa.decode(torch.zeros_like(f_A)))
        # random SAEs do not reconstruct this model's states: the model check is skipped
        with substitute(model, sae_a, sae_b, perm, substitution=spec, cost_F=cost,
                        check_model=False):
            written = written_at(model, tokens, HOOK_B)
        with substitute(model, sae_a, sae_b, perm, substitution=spec, cost_F=cost,
                        bos="substitute", check_model=False):
            written_all = written_at(model, tokens, HOOK_B)
    torch.testing.assert_close(written[:, 1:], expected[:, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(written[:, 0], h_B[:, 0])
    torch.testing.assert_close(written_all, expected, rtol=1e-4, atol=1e-4)


def test_bos_keeps_its_true_state_on_the_skip_route(model, tokens):
    hook_b = "blocks.2.hook_resid_post"  # the skip resumes at block 3, whose hooks still fire
    sae_a = random_jumprelu_sae(HOOK_A, seed=1)
    sae_b = random_jumprelu_sae(hook_b, seed=3)
    perm = Permutation.random(sae_a.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    seen = {}

    def spy(x, *, hook):
        seen["x"] = x.clone()

    with torch.no_grad():
        true_b = state_at(model, tokens, hook_b)
        with substitute(model, sae_a, sae_b, perm):
            hooked = model(tokens, return_type="loss")
        with substitute(model, sae_a, sae_b, perm, bos="substitute"):
            hooked_all = model(tokens, return_type="loss")
        model.add_hook("blocks.3.hook_resid_pre", spy)
        try:
            skipped = run_skipping(model, tokens, sae_a, sae_b, perm)
            kept_state = seen["x"]
            skipped_all = run_skipping(model, tokens, sae_a, sae_b, perm, bos="substitute")
            substituted_state = seen["x"]
        finally:
            model.reset_hooks()
    torch.testing.assert_close(kept_state[:, 0], true_b[:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(substituted_state[:, 0], true_b[:, 0], atol=1e-3)
    torch.testing.assert_close(kept_state[:, 1:], substituted_state[:, 1:])
    torch.testing.assert_close(skipped, hooked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(skipped_all, hooked_all, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(skipped, skipped_all)


def test_tokens_without_bos_are_refused_everywhere(model, tokens):
    sae_a = random_jumprelu_sae(HOOK_A, seed=1)
    sae_b = random_jumprelu_sae(HOOK_B, seed=3)
    perm = Permutation.identity(sae_a.cfg.d_sae)
    no_bos = tokens.clone()
    no_bos[:, 0] = 7
    with pytest.raises(ValueError, match="do not start with the BOS token"):
        run_skipping(model, no_bos, sae_a, sae_b, perm)
    with pytest.raises(ValueError, match="do not start with the BOS token"):
        evaluate_substitution(model, [sae_a, sae_b], no_bos, variants=["identity"], progress=False)
    with pytest.raises(ValueError, match="start with the model's BOS token"), \
            substitute(model, sae_a, sae_b, perm):
        model(no_bos)
    for hp in model.hook_dict.values():
        assert not hp.fwd_hooks
    # an explicit BOS id is honoured
    assert run_skipping(model, no_bos, sae_a, sae_b, perm, bos_token_id=7).isfinite()


def test_a_model_without_a_tokenizer_needs_an_explicit_bos_id(tokens):
    bare = tiny_model()
    bare.tokenizer = None
    sae_a = random_jumprelu_sae(HOOK_A, seed=1)
    sae_b = random_jumprelu_sae(HOOK_B, seed=3)
    perm = Permutation.identity(sae_a.cfg.d_sae)
    with pytest.raises(ValueError, match="Pass bos_token_id="):
        run_skipping(bare, tokens, sae_a, sae_b, perm)
    assert run_skipping(bare, tokens, sae_a, sae_b, perm, bos_token_id=0).isfinite()


def test_evaluation_keeps_bos_by_default_and_can_substitute_it(model, tokens):
    saes = [random_jumprelu_sae("blocks.0.hook_resid_post", seed=1),
            random_jumprelu_sae("blocks.2.hook_resid_post", seed=3)]  # block 3 reads position 0
    kept = evaluate_substitution(model, saes, tokens, variants=["folded"], progress=False)
    both = evaluate_substitution(model, saes, tokens, variants=["folded"], progress=False,
                                 bos="substitute")
    perm = match(*saes, progress=False)
    with torch.no_grad():
        with substitute(model, *saes, perm):
            hooked = model(tokens, return_type="loss", loss_per_token=True)[:, 1:].mean()
        clean = model(tokens, return_type="loss", loss_per_token=True)[:, 1:].mean()
    # position 0 is never scored, but its state feeds every later position
    assert kept.explained_variance.item() == pytest.approx(both.explained_variance.item())
    assert kept.delta_ce.item() != pytest.approx(both.delta_ce.item(), abs=1e-6)
    assert kept.delta_ce.item() == pytest.approx(float(hooked - clean), abs=1e-5)


@pytest.mark.parametrize("setting", ["constant_norm_rescale", "layer_norm",
                                     "expected_average_only_in"])
def test_saes_with_input_normalisation_are_refused_for_substitution(model, setting):
    sae_a = random_jumprelu_sae(HOOK_A, seed=1)
    sae_b = random_jumprelu_sae(HOOK_B, seed=3)
    sae_b.cfg.normalize_activations = setting
    perm = Permutation.identity(sae_a.cfg.d_sae)
    with pytest.raises(ValueError, match=rf"blocks\.3\.hook_resid_post.*{setting}"):
        block_substitute(sae_a, sae_b, perm)
    with pytest.raises(ValueError, match="normalize_activations"), substitute(model, sae_a, sae_b,
                                                                              perm):
        pass


def test_reversed_hooks_on_one_block_boundary_substitute_at_b(model, tokens):
    """A = blocks.2.hook_resid_pre fires after B = blocks.1.hook_resid_post, but both are the
    residual stream between blocks 1 and 2: the state at B is the state at A."""
    sae_a = random_jumprelu_sae("blocks.2.hook_resid_pre", seed=1)
    sae_b = random_jumprelu_sae("blocks.1.hook_resid_post", seed=3)
    perm = Permutation.random(sae_a.cfg.d_sae, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = state_at(model, tokens, "blocks.1.hook_resid_post")
        expected = fold(sae_b).decode(perm.apply(fold(sae_a).encode(h)))
        with substitute(model, sae_a, sae_b, perm):
            written = written_at(model, tokens, "blocks.2.hook_resid_pre")
            hooked = model(tokens, return_type="loss")
        skipped = run_skipping(model, tokens, sae_a, sae_b, perm)
    torch.testing.assert_close(written[:, 1:], expected[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(written[:, 0], h[:, 0])
    torch.testing.assert_close(skipped, hooked, rtol=1e-5, atol=1e-6)


def test_coactivation_counts_negative_abstopk_activations_as_firing(model, tokens):
    sae_a = build_sae("abstopk", d_in=D_MODEL, d_sae=48, hook_name=HOOK_A, seed=1)
    sae_b = build_sae("abstopk", d_in=D_MODEL, d_sae=48, hook_name=HOOK_B, seed=2)
    perm = Permutation.random(48, generator=torch.Generator().manual_seed(3))
    table = evaluate_substitution(model, [sae_a, sae_b], tokens, variants=["folded"],
                                  permutations={(1, 3): perm}, progress=False,  # model layers
                                  check_model=False)  # random SAEs: not this model's
    with torch.no_grad():
        f_a = sae_a.encode(state_at(model, tokens, HOOK_A))[:, 1:].reshape(-1, 48)
        f_b = sae_b.encode(state_at(model, tokens, HOOK_B))[:, 1:].reshape(-1, 48)
    assert bool((f_a < 0).any())  # the case `> 0` would miss
    fire_a, fire_b = f_a != 0, (f_b != 0)[:, perm.indices]
    ok = fire_a.sum(0) > 0
    expected = ((fire_a & fire_b).sum(0)[ok].double() / fire_a.sum(0)[ok].double()).mean()
    assert table.coactivation.item() == pytest.approx(float(expected))
