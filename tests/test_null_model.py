"""The data-free null model behind link confidences and ``max_cost="auto"`` is calibrated:
unrelated SAEs get about ``null_rate`` false links and matches, whether their directions are
isotropic, moment-matched to a real SAE, or a real SAE's in a permuted residual basis."""

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
from sae_match_lens import links, match, match_chain
from sae_match_lens.assets import load_suite_saes
from sae_match_lens.flow.linking import SCORES
from sae_match_lens.matching import null_max_cost
from sae_match_lens.nulls import (
    isotropic_sae,
    moment_matched_sae,
    null_surrogates,
    permuted_residual_sae,
)

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




# ---- the null features -------------------------------------------------------------------------

def _stack(n: int = 3000, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows ``[decoder (d) | encoder (d) | b_enc]`` with a shared mean direction, an anisotropic
    covariance, encoders aligned with decoders and log-normal norms."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.linspace(2.0, 0.1, d)
    direction = 1.5 * torch.ones(d) + spread * torch.randn(n, d, generator=gen)
    encoder = direction + 0.4 * torch.randn(n, d, generator=gen)
    norm = torch.exp(0.7 * torch.randn(n, 1, generator=gen))
    unit = direction / direction.norm(dim=1, keepdim=True)
    enc_unit = encoder / encoder.norm(dim=1, keepdim=True)
    return torch.cat([unit * norm, enc_unit / norm, torch.randn(n, 1, generator=gen)], dim=1)


def _units(x: torch.Tensor, d: int) -> torch.Tensor:
    dec, enc = x[:, :d], x[:, d:2 * d]
    return torch.cat([dec / dec.norm(dim=1, keepdim=True), enc / enc.norm(dim=1, keepdim=True)], 1)


def test_null_features_keep_norms_and_scalars_and_redraw_directions():
    x = _stack()
    z = torch.randn(x.shape[0])
    rows, null, kept_z = null_surrogates(x, [slice(0, 8), slice(8, 16)], 4000,
                                         generator=torch.Generator().manual_seed(1), scalars_F=z)
    assert null.shape == (4000, 17) and rows.shape == (4000,)
    assert torch.unique(rows[:3000]).numel() == 3000  # without replacement while rows last
    for block in (slice(0, 8), slice(8, 16)):
        torch.testing.assert_close(null[:, block].norm(dim=1), x[rows, block].norm(dim=1))
    assert torch.equal(null[:, 16], x[rows, 16]) and torch.equal(kept_z, z[rows])
    u, v = _units(x, 8), _units(null, 8)
    # the directions follow the source's mean and covariance (jointly, so each null feature's
    # encoder is aligned with its decoder as much as a real one) ...
    torch.testing.assert_close(v.mean(0), u.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(v.T), torch.cov(u.T), atol=0.02, rtol=0)
    align_real = (u[:, :8] * u[:, 8:]).sum(1).mean()
    align_null = (v[:, :8] * v[:, 8:]).sum(1).mean()
    assert abs(float(align_null - align_real)) < 0.02
    # ... but are not the sampled feature's own: a null feature is no closer to the feature it
    # was built from than to any other feature
    own = (v[:, :8] * u[rows, :8]).sum(1).mean()
    other = (v[:, :8] * u[rows.roll(1), :8]).sum(1).mean()
    assert abs(float(own - other)) < 0.02


def test_null_features_are_seeded_and_refuse_overlapping_blocks():
    x = _stack(200)
    first = null_surrogates(x, [slice(0, 8)], 50, generator=torch.Generator().manual_seed(3))
    again = null_surrogates(x, [slice(0, 8)], 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[1], again[1])
    with pytest.raises(ValueError, match="overlap"):
        null_surrogates(x, [slice(0, 8), slice(4, 12)], 5, generator=torch.Generator())


# ---- unrelated SAEs with realistic geometry -----------------------------------------------------

@pytest.fixture(scope="module")
def suite():
    return {"jumprelu": load_suite_saes("jumprelu"), "topk": load_suite_saes("topk")}


def test_a_permuted_residual_sae_computes_the_same_function_on_permuted_coordinates(suite):
    sae = suite["jumprelu"][3]
    out = permuted_residual_sae(sae, seed=4)
    x = torch.randn(32, 128) * 20
    perm = torch.argsort(out.b_dec)  # recover the permutation from b_dec (distinct values)
    order = torch.argsort(sae.b_dec)
    p = torch.empty(128, dtype=torch.int64)
    p[perm] = order  # out.b_dec[i] = sae.b_dec[p[i]]
    assert torch.equal(out.b_dec, sae.b_dec[p])
    with torch.no_grad():
        torch.testing.assert_close(out.encode(x[:, p]), sae.encode(x))
        torch.testing.assert_close(out.decode(sae.encode(x)), sae.decode(sae.encode(x))[:, p])
    assert not torch.equal(out.W_dec, sae.W_dec)  # the caller's SAE is unchanged, and differs


def test_a_moment_matched_sae_has_the_real_mean_and_covariance_but_no_partners(suite):
    sae = suite["jumprelu"][3]
    out = moment_matched_sae(sae, seed=2)
    real, fake = sae.W_dec.detach().double(), out.W_dec.detach().double()
    standard_error = (2 * torch.cov(real.T).trace() / real.shape[0]).sqrt()
    assert float((fake.mean(0) - real.mean(0)).norm()) < 2 * float(standard_error)
    ev_real = torch.linalg.eigvalsh(torch.cov(real.T))[-5:]
    ev_fake = torch.linalg.eigvalsh(torch.cov(fake.T))[-5:]
    torch.testing.assert_close(ev_fake, ev_real, rtol=0.25, atol=0)
    assert bool((out.threshold > 0).all())
    unit = fake / fake.norm(dim=1, keepdim=True)
    best = (unit @ (real / real.norm(dim=1, keepdim=True)).T).amax(1)
    assert float(best.median()) < 0.9  # no feature is a copy of a real one


def test_an_isotropic_sae_keeps_the_norms_and_biases_of_the_real_one(suite):
    sae = suite["topk"][2]
    out = isotropic_sae(sae, seed=1)
    torch.testing.assert_close(torch.sort(out.W_dec.norm(dim=1)).values,
                               torch.sort(sae.W_dec.norm(dim=1)).values)
    assert torch.equal(torch.sort(out.b_enc).values, torch.sort(sae.b_enc).values)
    dec = out.W_dec.detach()
    assert float(dec.mean(0).norm() / dec.norm(dim=1).mean()) < 0.1


# ---- calibration: kept fraction of unrelated features within [q/3, 3q] --------------------------

CONSTRUCTIONS = {"isotropic": isotropic_sae, "moment_matched": moment_matched_sae,
                 "permuted": permuted_residual_sae}
WHATS = [*SCORES, "match:mse", "match:cosine"]


def _kept(sae_a, sae_b, what: str, rate: float) -> tuple[int, int]:
    if what.startswith("match:"):
        result = match(sae_a, sae_b, metric=what.removeprefix("match:"), max_cost="auto",
                       null_rate=rate, progress=False)
        return result.permutation.n_matched, result.permutation.n_source
    lk = links(sae_a, sae_b, score=what, null_rate=rate, progress=False)
    return int((lk.top1 >= 0).sum()), int(lk.top1.numel())


def _pooled(stack, construction: str, what: str, rate: float) -> float:
    """Kept fraction over the suite's adjacent pairs ``l -> unrelated(l + 1)`` (5,120 features)."""
    build = CONSTRUCTIONS[construction]
    got = [_kept(stack[i], build(stack[i + 1], seed=i), what, rate)
           for i in range(len(stack) - 1)]
    return sum(k for k, _ in got) / sum(n for _, n in got)


@pytest.mark.parametrize("what", ["decoder_cosine", "cosine_density", "match:cosine", "match:mse"])
@pytest.mark.parametrize("construction", ["moment_matched", "permuted"])
def test_unrelated_realistic_saes_are_linked_at_about_the_nominal_rate(suite, construction, what):
    """One pair (layer 2 -> an SAE unrelated to layer 3) at q = 0.05; the random-basis null kept
    99% (decoder cosine) and 75% (match, cosine) of a moment-matched SAE's features, and without
    the one-to-one competition in the null, match(metric="mse") kept 1.3% (pooled)."""
    stack = suite["jumprelu"]
    kept, n = _kept(stack[2], CONSTRUCTIONS[construction](stack[3], seed=7), what, 0.05)
    assert 0.05 / 3 <= kept / n <= 3 * 0.05, kept / n


@pytest.mark.slow
@pytest.mark.parametrize("rate", [0.01, 0.05])
@pytest.mark.parametrize("what", WHATS)
@pytest.mark.parametrize("construction", list(CONSTRUCTIONS))
@pytest.mark.parametrize("family", ["jumprelu", "topk"])
def test_every_score_and_metric_is_calibrated_on_unrelated_saes(suite, family, construction,
                                                                 what, rate):
    fraction = _pooled(suite[family], construction, what, rate)
    assert rate / 3 <= fraction <= 3 * rate, fraction


def test_confidence_on_a_real_pair_is_no_longer_near_one_for_everything(suite):
    """The random-basis null gave 97-99% of a real adjacent pair's links a confidence >= 0.99:
    it beat chance because real dictionaries share a mean direction, not because of partners."""
    stack = suite["jumprelu"]
    lk = links(stack[2], stack[3], score="decoder_cosine", progress=False)
    top = lk.confidence[:, 0]
    assert float((top >= 0.99).float().mean()) < 0.9
    assert 0.5 < float(top.mean()) < 0.97
    same = links(stack[2], stack[2], score="decoder_cosine", progress=False)
    assert float(same.confidence[:, 0].mean()) > 0.99  # a feature's own copy beats chance


@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "topk"])
@pytest.mark.parametrize("d_sae", [1024, 2048])
def test_unrelated_aligned_saes_are_matched_at_about_the_nominal_rate(architecture, d_sae):
    sae_a, sae_b = aligned_sae(architecture, d_sae, 1), aligned_sae(architecture, d_sae, 2)
    result = match(sae_a, sae_b, max_cost="auto", progress=False)
    rate = result.permutation.n_matched / d_sae
    assert 0.01 / 3 <= rate <= 3 * 0.01, rate
    assert result.options["null_rate"] == 0.01


def test_the_null_rate_is_a_parameter_and_scales_the_false_matches():
    sae_a, sae_b = aligned_sae("jumprelu", 2048, 1), aligned_sae("jumprelu", 2048, 2)
    result = match(sae_a, sae_b, max_cost="auto", null_rate=0.05, progress=False)
    rate = result.permutation.n_matched / 2048
    assert 0.05 / 3 <= rate <= 3 * 0.05, rate
    assert null_max_cost(sae_a, sae_b, null_rate=0.05) > null_max_cost(sae_a, sae_b, null_rate=0.01)


def test_true_partners_stay_matched_under_the_calibrated_threshold():
    sae_a = aligned_sae("jumprelu", 1024, 1)
    sae_b = aligned_sae("jumprelu", 1024, 1)  # the same SAE: every feature has its partner
    result = match(sae_a, sae_b, max_cost="auto", progress=False)
    assert result.permutation.n_matched == 1024


def test_auto_max_cost_allows_for_one_to_one_competition(monkeypatch):
    """λ is raised from the best-by-chance quantile until a null SAE of A's size, assigned with
    that cap, keeps null_rate; above COMPETITION_MAX_N features the quantile is used."""
    sae_a, sae_b = aligned_sae("jumprelu", 512, 1), aligned_sae("jumprelu", 512, 2)
    w = matching.CostWeights()
    features = tuple(matching.stack_features(matching.feature_view(s), w, "mse")
                     for s in (sae_a, sae_b))
    best = matching.null_costs(*features, columns=matching._block_columns(w, 128, 128))
    quantile = float(torch.quantile(best, 0.05))
    lam = null_max_cost(sae_a, sae_b, null_rate=0.05)
    assert lam >= quantile
    assert lam == match(sae_a, sae_b, max_cost="auto", null_rate=0.05, progress=False).max_cost
    monkeypatch.setattr(matching, "COMPETITION_MAX_N", 256)
    assert null_max_cost(sae_a, sae_b, null_rate=0.05) == quantile


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
