"""The data-free null model behind ``max_cost="auto"`` is calibrated: unrelated SAEs whose
encoders are aligned with their decoders (as in real SAEs) get about ``null_rate`` false matches."""

from __future__ import annotations

import pytest
import torch
from sae_lens import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

import sae_match_lens.matching as matching
from sae_match_lens import match, match_chain, null_max_cost

_CLASSES = {"jumprelu": (JumpReLUSAE, JumpReLUSAEConfig), "standard": (StandardSAE, StandardSAEConfig),
            "topk": (TopKSAE, TopKSAEConfig)}


def aligned_sae(architecture: str, d_sae: int, seed: int, *, d_in: int = 128,
                encoder_noise: float = 0.3) -> object:
    """A random SAE whose encoder column i is feature i's decoder direction plus noise (scaled by
    the inverse decoder norm, as trained SAEs have), with log-normal decoder norms and thresholds.
    Two seeds give unrelated SAEs: no feature of one has a partner in the other."""
    gen = torch.Generator().manual_seed(seed)
    cls, cfg_cls = _CLASSES[architecture]
    kwargs = {"d_in": d_in, "d_sae": d_sae, **({"k": 16} if architecture == "topk" else {})}
    cfg = cfg_cls(**kwargs)
    cfg.metadata.hook_name = f"blocks.{seed}.hook_resid_post"
    sae = cls(cfg)
    direction = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    norm = torch.exp(0.5 * torch.randn(d_sae, 1, generator=gen, dtype=torch.float64))
    encoder = direction + encoder_noise * torch.randn(d_sae, d_in, generator=gen,
                                                      dtype=torch.float64) / d_in ** 0.5
    with torch.no_grad():
        sae.W_dec.copy_((direction * norm).float())
        sae.W_enc.copy_((encoder.T / norm.T).float())
        sae.b_enc.copy_((-0.1 * torch.rand(d_sae, generator=gen)).float())
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.exp(torch.randn(d_sae, generator=gen)) * 0.2)
    return sae


@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "topk"])
@pytest.mark.parametrize("d_sae", [1024, 2048])
def test_unrelated_aligned_saes_are_matched_at_about_the_nominal_rate(architecture, d_sae):
    sae_a, sae_b = aligned_sae(architecture, d_sae, 1), aligned_sae(architecture, d_sae, 2)
    result = match(sae_a, sae_b, max_cost="auto", progress=False)
    rate = result.permutation.n_matched / d_sae
    assert 0.5 * 0.01 <= rate <= 2 * 0.01, rate
    assert result.options["null_rate"] == 0.01


def test_the_null_rate_is_a_parameter_and_scales_the_false_matches():
    sae_a, sae_b = aligned_sae("jumprelu", 2048, 1), aligned_sae("jumprelu", 2048, 2)
    result = match(sae_a, sae_b, max_cost="auto", null_rate=0.05, progress=False)
    rate = result.permutation.n_matched / 2048
    assert 0.5 * 0.05 <= rate <= 2 * 0.05, rate
    assert null_max_cost(sae_a, sae_b, null_rate=0.05) > null_max_cost(sae_a, sae_b, null_rate=0.01)


def test_true_partners_stay_matched_under_the_calibrated_threshold():
    sae_a = aligned_sae("jumprelu", 1024, 1)
    sae_b = aligned_sae("jumprelu", 1024, 1)  # the same SAE: every feature has its partner
    result = match(sae_a, sae_b, max_cost="auto", progress=False)
    assert result.permutation.n_matched == 1024


def test_independent_encoder_and_decoder_rotations_would_be_too_lenient():
    """The reason for the shared rotation: rotating the encoder and the decoder independently
    breaks B's encoder-decoder alignment, so chance costs look worse than they are and far more
    than 1% of unrelated features pass (here measured against the shared null's rate)."""
    sae_a, sae_b = aligned_sae("topk", 1024, 1), aligned_sae("topk", 1024, 2)
    w = matching.CostWeights()
    features = tuple(matching.stack_features(matching.feature_view(s), w, "mse")
                     for s in (sae_a, sae_b))
    columns = matching._block_columns(w, 128, 128)
    shared = matching.null_costs(*features, columns=columns, shared_rotation=True)
    independent = matching.null_costs(*features, columns=columns, shared_rotation=False)
    lam = float(torch.quantile(shared, 0.01))
    assert float((independent < lam).double().mean()) < 0.005
    result = match(sae_a, sae_b, max_cost=float(torch.quantile(independent, 0.01)), progress=False)
    assert result.permutation.n_matched / 1024 > 0.04


def test_auto_max_cost_reuses_the_folded_features(monkeypatch):
    calls = []
    original = matching.feature_view

    def counting(sae, **kwargs):
        calls.append(sae.cfg.metadata.hook_name)
        return original(sae, **kwargs)

    monkeypatch.setattr(matching, "feature_view", counting)
    saes = [aligned_sae("jumprelu", 256, seed) for seed in (1, 2, 3)]
    match(saes[0], saes[1], max_cost="auto", progress=False)
    assert len(calls) == 2
    calls.clear()
    import sae_match_lens.chain as chain

    monkeypatch.setattr(chain, "feature_view", counting)
    match_chain(saes, max_cost="auto", progress=False)
    assert len(calls) == 3


def test_bad_null_rate_is_a_clear_error():
    sae_a, sae_b = aligned_sae("jumprelu", 64, 1), aligned_sae("jumprelu", 64, 2)
    for bad in (0, 1, -0.1, 2.0):
        with pytest.raises(ValueError, match="null_rate must be in"):
            null_max_cost(sae_a, sae_b, null_rate=bad)
