"""Block substitution hooks on HookedTransformer, HookedSAETransformer and TransformerBridge."""

from __future__ import annotations

import pytest
import torch
from sae_lens import HookedSAETransformer

from sae_match_lens.adapters import fold
from sae_match_lens.lens.hooks import (
    Substitution,
    block_substitute,
    run_skipping,
    substitute,
    substitution_hooks,
)
from sae_match_lens.permutation import Permutation
from tests.helpers_tl import (
    D_SAE,
    planted_copy,
    random_jumprelu_sae,
    state_at,
    tiny_bridge,
    tiny_model,
    tiny_tokens,
    written_at,
)

HOOK_1 = "blocks.1.hook_resid_post"
HOOK_3 = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens():
    return tiny_tokens()


@pytest.fixture(scope="module")
def sae_1():
    return random_jumprelu_sae(HOOK_1, seed=1)


@pytest.fixture(scope="module")
def sae_3():
    return random_jumprelu_sae(HOOK_3, seed=3)


@pytest.fixture(scope="module")
def perm():
    return Permutation.random(D_SAE, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("transfer", ["folded", "raw"])
def test_value_written_at_b_equals_manual_encode_permute_decode(model, tokens, sae_1, sae_3,
                                                                 perm, transfer):
    with torch.no_grad():
        h_A = state_at(model, tokens, HOOK_1)
        if transfer == "folded":
            expected = fold(sae_3).decode(perm.apply(fold(sae_1).encode(h_A)))
        else:
            expected = sae_3.decode(perm.apply(sae_1.encode(h_A)))
        with substitute(model, sae_1, sae_3, perm, substitution=Substitution(transfer=transfer),
                        bos="substitute"):
            written = written_at(model, tokens, HOOK_3)
    torch.testing.assert_close(written, expected, rtol=1e-5, atol=1e-5)


def test_permutation_direction_is_a_scatter_into_target_order(model, tokens, sae_1, sae_3, perm):
    with torch.no_grad():
        f_A = sae_1.encode(state_at(model, tokens, HOOK_1))
        f_B = torch.zeros_like(f_A)
        f_B[..., perm.indices] = f_A
        with substitute(model, sae_1, sae_3, perm, substitution=Substitution(transfer="raw")):
            written = written_at(model, tokens, HOOK_3)
    torch.testing.assert_close(written[:, 1:], sae_3.decode(f_B)[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["permute", "hybrid", "error_preserving", "identity",
                                    "sae_a_reconstruction"])
@pytest.mark.parametrize("hooks", [(HOOK_1, HOOK_3), ("blocks.1.hook_resid_pre",
                                                      "blocks.2.hook_resid_pre")])
def test_hook_route_and_true_skip_route_give_the_same_loss(model, tokens, perm, method, hooks):
    sae_a = random_jumprelu_sae(hooks[0], seed=1)
    sae_b = random_jumprelu_sae(hooks[1], seed=3)
    cost = torch.linspace(0.0, 1.0, D_SAE)
    spec = Substitution(method)
    with torch.no_grad():
        with substitute(model, sae_a, sae_b, perm, substitution=spec, cost_F=cost):
            hooked = model(tokens, return_type="loss")
        skipped = run_skipping(model, tokens, sae_a, sae_b, perm, substitution=spec, cost_F=cost)
        clean = model(tokens, return_type="loss")
    torch.testing.assert_close(skipped, hooked, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(skipped, clean)


def test_sae_matched_with_itself_reproduces_its_own_splice_loss(tokens):
    hooked_sae_model = tiny_model(HookedSAETransformer)
    sae = random_jumprelu_sae(HOOK_1, seed=1)
    with torch.no_grad():
        splice = hooked_sae_model.run_with_saes(tokens, saes=[sae], return_type="loss")
        with substitute(hooked_sae_model, sae, sae, Permutation.identity(D_SAE), bos="substitute"):
            matched = hooked_sae_model(tokens, return_type="loss")
        clean = hooked_sae_model(tokens, return_type="loss")
    torch.testing.assert_close(matched, splice, rtol=1e-6, atol=1e-6)
    assert not torch.isclose(matched, clean)


def test_random_permutation_is_worse_than_the_planted_one_on_a_planted_pair(model, tokens, sae_1):
    sae_b, planted = planted_copy(sae_1, "blocks.2.hook_resid_pre")
    random = Permutation.random(D_SAE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h_B = state_at(model, tokens, "blocks.2.hook_resid_pre")
        clean = torch.log_softmax(model(tokens), -1)
        errors, kls = {}, {}
        for name, p in (("planted", planted), ("random", random)):
            with substitute(model, sae_1, sae_b, p, bos="substitute"):
                written = written_at(model, tokens, "blocks.2.hook_resid_pre")
                errors[name] = (written - h_B).pow(2).sum()
                logp = torch.log_softmax(model(tokens), -1)
            kls[name] = (clean.exp() * (clean - logp)).sum(-1).mean()
    recon_error = (sae_1.decode(sae_1.encode(h_B)) - h_B).pow(2).sum()
    torch.testing.assert_close(errors["planted"], recon_error, rtol=1e-4, atol=1e-4)
    assert errors["random"] > 2 * errors["planted"]
    assert kls["random"] > kls["planted"]


def test_error_preserving_identity_map_leaves_the_state_unchanged(model, tokens, sae_1):
    with torch.no_grad():
        h = state_at(model, tokens, HOOK_1)
        with substitute(model, sae_1, sae_1, Permutation.identity(D_SAE),
                        substitution="error_preserving"):
            written = written_at(model, tokens, HOOK_1)
    torch.testing.assert_close(written, h, rtol=1e-5, atol=1e-5)


def test_hybrid_sends_all_matched_features_at_quantile_one(model, tokens, sae_1, sae_3, perm):
    cost = torch.rand(D_SAE, generator=torch.Generator().manual_seed(0))
    h = state_at(model, tokens, HOOK_1)
    with torch.no_grad():
        full = block_substitute(sae_1, sae_3, perm, cost_F=cost,
                                substitution=Substitution("hybrid", quantile=1.0))(h)
        plain = block_substitute(sae_1, sae_3, perm)(h)
        none = block_substitute(sae_1, sae_3, perm, cost_F=cost,
                                substitution=Substitution("hybrid", quantile=0.0))(h)
        own = sae_1.decode(sae_1.encode(h)) - sae_1.b_dec + sae_3.b_dec
    torch.testing.assert_close(full, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(none, own, rtol=1e-5, atol=1e-5)


def test_tensors_move_to_the_sae_dtype_and_back(model, tokens, perm):
    sae_a = random_jumprelu_sae(HOOK_1, seed=1, dtype=torch.float64)
    sae_b = random_jumprelu_sae(HOOK_3, seed=3, dtype=torch.float64)
    with torch.no_grad():
        h_A = state_at(model, tokens, HOOK_1)
        expected = sae_b.decode(perm.apply(sae_a.encode(h_A.double()))).float()
        with substitute(model, sae_a, sae_b, perm, substitution=Substitution(transfer="raw"),
                        bos="substitute"):
            written = written_at(model, tokens, HOOK_3)
    assert written.dtype == torch.float32
    torch.testing.assert_close(written, expected, rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_after_an_exception_and_user_hooks_are_kept(model, tokens, sae_1, sae_3,
                                                                       perm):
    calls = []

    def user_hook(x, *, hook):
        calls.append(1)

    def failing(x, *, hook):
        raise RuntimeError("boom")

    hook_points = [model.hook_dict[HOOK_1], model.hook_dict[HOOK_3]]
    model.add_hook(HOOK_3, user_hook)
    try:
        with pytest.raises(RuntimeError, match="boom"), substitute(model, sae_1, sae_3, perm):
            assert len(hook_points[0].fwd_hooks) == 1
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.hook_resid_post", failing)])
        assert [len(hp.fwd_hooks) for hp in hook_points] == [0, 1]
        model(tokens)
        assert len(calls) == 1
    finally:
        model.reset_hooks()
    for hp in model.hook_dict.values():
        assert not hp.fwd_hooks


def test_hooks_compose_with_the_users_own_hooks(model, tokens, sae_1, sae_3, perm):
    hooks = substitution_hooks(model, sae_1, sae_3, perm)
    assert [name for name, _ in hooks] == ["hook_embed", HOOK_1, HOOK_3]
    with torch.no_grad():
        with substitute(model, sae_1, sae_3, perm):
            expected = written_at(model, tokens, HOOK_3)
        seen = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks)
        with substitute(model, sae_1, sae_3, perm):
            assert torch.isclose(model(tokens, return_type="loss"), seen)
    written = written_at(model, tokens, HOOK_3)
    assert not torch.allclose(written, expected)


def test_unknown_hook_name_is_a_clear_error(model, sae_3, perm):
    sae = random_jumprelu_sae("blocks.1.hook_resid_postt", seed=1)
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_postt.*not a hook point.*"
                                         r"Did you mean.*blocks\.1\.hook_resid_post"):
        substitution_hooks(model, sae, sae_3, perm)


def test_b_before_a_is_a_clear_error(model, sae_1, sae_3, perm):
    with pytest.raises(ValueError, match=r"'blocks\.3\.hook_resid_post' comes after SAE B's hook "
                                         r"'blocks\.1\.hook_resid_post'"):
        substitution_hooks(model, sae_3, sae_1, perm)


def test_mismatched_d_in_is_a_clear_error(model, sae_1, perm):
    wide = random_jumprelu_sae(HOOK_3, d_in=48, seed=3)
    with pytest.raises(ValueError, match=r"SAE 'blocks\.3\.hook_resid_post'.*d_in=48.*width 32"):
        substitution_hooks(model, sae_1, wide, perm)


def test_wrong_size_permutation_is_a_clear_error(model, sae_1, sae_3):
    with pytest.raises(ValueError, match=r"source side has 10 features but SAE "
                                         r"'blocks\.1\.hook_resid_post'.*d_sae=64.*64->64"):
        substitution_hooks(model, sae_1, sae_3, Permutation.identity(10))
    with pytest.raises(ValueError, match=r"target side has 70 features but SAE "
                                         r"'blocks\.3\.hook_resid_post'"):
        substitution_hooks(model, sae_1, sae_3, Permutation(torch.arange(D_SAE), 70))


def test_missing_permutation_or_costs_are_clear_errors(model, sae_1, sae_3, perm):
    with pytest.raises(ValueError, match="needs a permutation"):
        substitution_hooks(model, sae_1, sae_3)
    with pytest.raises(ValueError, match="needs per-feature match costs"):
        substitution_hooks(model, sae_1, sae_3, perm, substitution="hybrid")


def test_sae_without_hook_name_is_a_clear_error(model, sae_3, perm):
    sae = random_jumprelu_sae(HOOK_1, seed=1)
    sae.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match=r"no cfg\.metadata\.hook_name"):
        substitution_hooks(model, sae, sae_3, perm)


def test_true_skip_refuses_what_it_cannot_skip(model, tokens, sae_1, sae_3, perm):
    with pytest.raises(ValueError, match="cannot be skipped"):
        run_skipping(model, tokens, sae_1, sae_3, substitution="sae_b_reconstruction")
    mlp = random_jumprelu_sae("blocks.3.hook_mlp_out", seed=3)
    with pytest.raises(ValueError, match="residual hooks"):
        run_skipping(model, tokens, sae_1, mlp, perm)


def test_same_substitution_runs_on_a_transformer_bridge_built_offline(tokens, sae_1, sae_3, perm):
    bridge = tiny_bridge()
    user_calls = []
    bridge.add_hook(HOOK_3, lambda x, *, hook: user_calls.append(1))
    try:
        with torch.no_grad():
            h_A = state_at(bridge, tokens, HOOK_1)
            h_B_true = state_at(bridge, tokens, HOOK_3)
            expected = fold(sae_3).decode(perm.apply(fold(sae_1).encode(h_A)))
            clean = bridge(tokens, return_type="loss")
            # the random SAEs were not made for this random bridge: its model check is skipped
            with substitute(bridge, sae_1, sae_3, perm, check_model=False):
                written = written_at(bridge, tokens, HOOK_3)
                loss = bridge(tokens, return_type="loss")
            loss_hooks = bridge.run_with_hooks(tokens, return_type="loss",
                                               fwd_hooks=substitution_hooks(bridge, sae_1, sae_3,
                                                                            perm,
                                                                            check_model=False))
        torch.testing.assert_close(written[:, 1:], expected[:, 1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(written[:, 0], h_B_true[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, loss_hooks)
        assert not torch.isclose(loss, clean)
        assert len(user_calls) == 6
        with pytest.raises(TypeError, match="needs a HookedTransformer"):
            run_skipping(bridge, tokens, sae_1, sae_3, perm)
        with pytest.raises(ValueError, match="not a hook point"):
            substitution_hooks(bridge, random_jumprelu_sae("blocks.9.hook_resid_post"), sae_3, perm)
    finally:
        bridge.reset_hooks()


def test_substitution_names_are_the_evaluation_variants_of_the_same_name():
    from sae_match_lens.evaluation import VARIANTS
    from sae_match_lens.lens.hooks import SUBSTITUTIONS

    for name in SUBSTITUTIONS:
        assert VARIANTS[name].substitution == Substitution.of(name), name
    assert Substitution.of("raw") == Substitution("permute", "raw")
    assert Substitution.of("sae_b_reconstruction").needs_target_state
    with pytest.raises(ValueError, match=r"unknown substitution 'permuted'.*'folded', 'raw'"):
        Substitution.of("permuted")


def test_run_skipping_flat_bos_keywords_warn_and_equal_eval_options(model, tokens, sae_1, sae_3,
                                                                     perm):
    from sae_match_lens.lens.routes import EvalOptions

    with pytest.warns(DeprecationWarning, match=r"bos= → options\.bos"):
        old = run_skipping(model, tokens, sae_1, sae_3, perm, bos="substitute", check_model=False)
    new = run_skipping(model, tokens, sae_1, sae_3, perm,
                       options=EvalOptions(bos="substitute", check_model=False))
    kept = run_skipping(model, tokens, sae_1, sae_3, perm, options=EvalOptions(check_model=False))
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    assert not torch.equal(new, kept)  # bos reaches the run
    with pytest.raises(ValueError, match="bos must be one of"):
        EvalOptions(bos="drop")  # type: ignore[arg-type]
