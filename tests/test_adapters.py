import copy

import pytest
import torch
from helpers import ALL_ARCHITECTURES, build_sae, sample_inputs
from sae_lens.saes.matching_pursuit_sae import MatchingPursuitSAE, MatchingPursuitSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

from sae_match_lens import fold
from sae_match_lens.adapters import (
    describe_sae,
    feature_view,
    fold_scales,
    rescale,
    sae_identity,
    unfold,
    validate_sae,
)


def _output(sae, x):
    out = sae.decode(sae.encode(x))
    if hasattr(sae, "W_skip"):
        out = out + x @ sae.W_skip.T
    return out


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
def test_fold_leaves_reconstruction_unchanged(architecture):
    sae = build_sae(architecture)
    x = sample_inputs(sae)
    folded = fold(sae)
    assert type(folded) is type(sae)
    torch.testing.assert_close(_output(folded, x), _output(sae, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x), sae(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
def test_fold_divides_activations_by_the_fold_scales(architecture):
    sae = build_sae(architecture)
    x = sample_inputs(sae)
    acts, folded_acts = sae.encode(x), fold(sae).encode(x)
    assert (acts != 0).float().mean() > 0.05, "test inputs should make some features fire"
    s = fold_scales(sae).to(torch.float32)
    if architecture == "topk_rescaled":
        s = torch.ones_like(s)  # its encode() output is already in decoder-norm units
    torch.testing.assert_close(folded_acts * s, acts, rtol=1e-5, atol=1e-6)
    assert torch.equal(folded_acts != 0, acts != 0)


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
def test_unfold_restores_the_original_parameters(architecture):
    sae = build_sae(architecture)
    restored = unfold(fold(sae))
    for name, param in sae.named_parameters():
        value = getattr(restored, name)  # a scalar threshold comes back per feature
        torch.testing.assert_close(value, param.expand_as(value), rtol=1e-6, atol=1e-7, msg=name)
    assert not hasattr(restored, "sae_match_fold_scales")


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
def test_fold_does_not_mutate_its_input(architecture):
    sae = build_sae(architecture)
    before = copy.deepcopy(sae.state_dict())
    fold(sae)
    for name, value in sae.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("architecture", ["jumprelu", "jumprelu_scalar_threshold",
                                          "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_jumprelu_fold_puts_every_threshold_at_one_and_scales_by_theta(architecture):
    sae = build_sae(architecture)
    theta = sae.threshold.detach().expand(sae.cfg.d_sae)
    folded = fold(sae)
    torch.testing.assert_close(folded.threshold, torch.ones(sae.cfg.d_sae))
    torch.testing.assert_close(folded.W_dec, sae.W_dec * theta[:, None])
    torch.testing.assert_close(folded.W_enc, sae.W_enc / theta[None, :])
    torch.testing.assert_close(folded.b_enc, sae.b_enc / theta)
    acts = folded.encode(sample_inputs(sae))
    assert bool((acts[acts != 0] > 1).all()), "active features exceed 1 threshold unit"


def test_decoder_norm_rule_gives_unit_decoder_rows_for_relu_and_gated():
    for architecture in ("standard", "gated", "transcoder", "topk_rescaled"):
        folded = fold(build_sae(architecture))
        torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(folded.cfg.d_sae))


def test_topk_without_decoder_rescaling_keeps_its_scale():
    sae = build_sae("topk")
    assert torch.equal(fold_scales(sae), torch.ones(sae.cfg.d_sae, dtype=torch.float64))
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        rescale(sae, torch.linspace(1, 2, sae.cfg.d_sae))


def test_rescale_by_any_positive_scales_preserves_the_function():
    sae = build_sae("jumprelu")
    x = sample_inputs(sae)
    s = torch.exp(3 * torch.randn(sae.cfg.d_sae))
    torch.testing.assert_close(_output(rescale(sae, s), x), _output(sae, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feature_view(rescale(sae, s)).decoder_FO, feature_view(sae).decoder_FO,
                               rtol=1e-5, atol=1e-6)


def test_nonpositive_thresholds_are_refused_with_the_hook_name_and_count():
    sae = build_sae("jumprelu", hook_name="blocks.5.hook_resid_post")
    with torch.no_grad():
        sae.threshold[:3] = 0.0
        sae.threshold[3] = -1.0
    with pytest.raises(ValueError, match=r"blocks\.5\.hook_resid_post.*4 of 48 features"):
        fold(sae)


def test_nan_weights_are_refused_naming_the_parameter():
    sae = build_sae("standard", hook_name="blocks.2.hook_resid_post")
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.2\.hook_resid_post.*W_dec has 1 non-finite"):
        feature_view(sae)


def test_unknown_architecture_is_refused_by_name():
    cfg = MatchingPursuitSAEConfig(d_in=8, d_sae=16)
    with pytest.raises(ValueError, match="architecture 'matching_pursuit'.*Supported architectures"):
        validate_sae(MatchingPursuitSAE(cfg))


def test_training_sae_is_refused_with_a_hint():
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=8, d_sae=16))
    with pytest.raises(ValueError, match="save_inference_model"):
        fold(sae)


def test_subclass_of_a_known_class_is_refused():
    class Custom(type(build_sae("standard"))):
        pass

    sae = build_sae("standard")
    sae.__class__ = Custom
    with pytest.raises(ValueError, match="not SAELens' StandardSAE"):
        validate_sae(sae)


def test_non_sae_objects_are_refused():
    with pytest.raises(TypeError, match="expected a SAELens SAE"):
        fold(torch.nn.Linear(3, 3))


def test_unfold_without_recorded_scales_explains_what_to_do():
    sae = build_sae("jumprelu")
    with pytest.raises(ValueError, match="was not produced by sae_match_lens.fold"):
        unfold(sae)
    restored = unfold(fold(sae), scales_F=fold_scales(sae))
    torch.testing.assert_close(restored.threshold, sae.threshold)


def test_feature_view_matches_the_folded_sae():
    sae = build_sae("gated")
    view, folded = feature_view(sae), fold(sae)
    torch.testing.assert_close(view.encoder_FD, folded.W_enc.T)
    torch.testing.assert_close(view.decoder_FO, folded.W_dec)
    torch.testing.assert_close(view.bias_FB, torch.stack([folded.b_gate, folded.b_mag], dim=1))
    assert view.bias_names == ("b_gate", "b_mag") and view.folded


@pytest.mark.parametrize("architecture", ALL_ARCHITECTURES)
@pytest.mark.parametrize("folded", [True, False])
def test_feature_view_without_encoder_has_the_same_decoder_and_an_empty_encoder(architecture,
                                                                                 folded):
    sae = build_sae(architecture)
    full, lean = feature_view(sae, fold=folded), feature_view(sae, fold=folded, encoder=False)
    s = fold_scales(sae) if folded else torch.ones(sae.cfg.d_sae)
    # one rounding per entry: the float32 entry times the float32 scale (as the view documents)
    assert torch.equal(full.encoder_FD, sae.W_enc.detach().T * (1.0 / s).float()[:, None])
    assert torch.equal(full.decoder_FO, sae.W_dec.detach() * s.float()[:, None])
    torch.testing.assert_close(full.decoder_FO, (fold(sae) if folded else sae).W_dec.detach())
    assert torch.equal(lean.decoder_FO, full.decoder_FO)
    assert torch.equal(lean.bias_FB, full.bias_FB)
    assert lean.encoder_FD.shape == (sae.cfg.d_sae, 0) and lean.d_sae == sae.cfg.d_sae
    assert full.encoder_FD.is_contiguous() and full.decoder_FO.is_contiguous()


def test_a_cost_weighing_the_encoder_refuses_a_view_without_it():
    from sae_match_lens.solvers.costs import CostWeights, stack_features

    lean = feature_view(build_sae("jumprelu"), encoder=False)
    stacked = stack_features(lean, CostWeights(1.0, 0.0, 0.0), "mse")
    torch.testing.assert_close(stacked.matrix_FK, lean.decoder_FO)
    with pytest.raises(ValueError, match="encoder=True"):
        stack_features(lean, CostWeights(1.0, 1.0, 0.0), "mse")


def test_direction_signature_keeps_argsorts_order_of_tied_coordinates():
    """The signature takes each sampled vector's 3 largest-magnitude coordinates; with ties
    (here: many equal magnitudes, and a tie at the third place) it must keep the order of a
    stable descending argsort (lower index first), as signatures saved before did."""
    import hashlib

    from sae_match_lens.adapters import _sampled_rows, direction_signature

    sae = build_sae("jumprelu", d_in=16, d_sae=48)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randint(-3, 4, sae.W_dec.shape, generator=gen).float())
        sae.W_enc.copy_(torch.randint(-2, 3, sae.W_enc.shape, generator=gen).float())
        sae.W_dec[5] = torch.tensor([2.0, -2.0] * 8)  # every coordinate tied
    digest = hashlib.sha256()
    rows = _sampled_rows(sae.cfg.d_sae)
    for vectors in (sae.W_dec.detach()[rows], sae.W_enc.detach()[:, rows].T):
        v = vectors.to(torch.float64)
        order = torch.argsort(v.abs(), dim=1, descending=True, stable=True)[:, :3]
        digest.update(order.numpy().astype("int64").tobytes())
        digest.update(torch.gather(torch.sign(v), 1, order).numpy().astype("int8").tobytes())
    digest.update(b"jumprelu")
    assert direction_signature(sae) == digest.hexdigest()[:16]


def test_identity_is_stable_and_tells_different_saes_apart():
    a, b = build_sae("jumprelu", seed=0), build_sae("jumprelu", seed=1)
    assert sae_identity(a) == sae_identity(copy.deepcopy(a))
    assert sae_identity(a)["fingerprint"] != sae_identity(b)["fingerprint"]
    assert sae_identity(a)["hook_name"] == "blocks.0.hook_resid_post"
    assert "blocks.0.hook_resid_post" in describe_sae(a)
