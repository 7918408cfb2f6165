"""Correlation-based reference matchers and the ``ceilings="all"`` columns of evaluate_links,
against numpy's corrcoef and scipy's assignment on directly recorded activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from sae_match_lens.flow.coactivation import (
    CoactivationStats,
    best_partner,
    coactivation_stats,
    evaluate_links,
    one_to_one,
)
from sae_match_lens.flow.linking import links
from tests.helpers_tl import layer_saes, tiny_model, tiny_tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def pair_saes():
    return layer_saes()[:2]


def _acts(model, saes, tokens):
    _, cache = model.run_with_cache(tokens)
    return [sae.encode(cache[sae.cfg.metadata.hook_name][:, 1:]).reshape(-1, sae.cfg.d_sae).double()
            for sae in saes]


def _corrcoef(xa, xb):
    with np.errstate(invalid="ignore", divide="ignore"):
        full = np.corrcoef(np.concatenate([xa, xb], 1).T)
    return np.nan_to_num(full[: xa.shape[1], xa.shape[1]:])  # constant features: 0


def test_streamed_correlation_equals_numpy_corrcoef(model, pair_saes):
    tokens = tiny_tokens(n_seq=8)
    stats = coactivation_stats(model, *pair_saes, tokens, batch_size=3, correlation=True,
                               progress=False)
    with torch.no_grad():
        xa, xb = _acts(model, pair_saes, tokens)
    expected = _corrcoef(xa.numpy(), xb.numpy())
    np.testing.assert_allclose(stats.correlation().numpy(), expected, atol=1e-9)
    best = best_partner(stats, "correlation")
    fired = (xa != 0).sum(0) > 0
    rows = np.flatnonzero(fired.numpy())
    np.testing.assert_allclose(expected[rows, best[fired].numpy()], expected[rows].max(1))
    perm = one_to_one(stats, "correlation")
    r, c = linear_sum_assignment(expected, maximize=True)
    ok = perm.indices >= 0
    assert float(expected[ok.numpy()][np.arange(int(ok.sum())), perm.indices[ok].numpy()].sum()) \
        == pytest.approx(float(expected[r, c][fired.numpy()[r]].sum()))


def test_correlation_needs_activations_and_consistent_calls():
    stats = CoactivationStats()
    f = torch.ones(4, 3, dtype=torch.bool)
    stats.add(f, f)
    with pytest.raises(ValueError, match="hold no activations"):
        stats.correlation()
    with pytest.raises(ValueError, match="both SAEs on every call"):
        stats.add(f, f, torch.ones(4, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="by must be"):
        best_partner(stats, "cosine")


def test_evaluate_links_reports_correlation_references_below_the_jaccard_ceiling(model, pair_saes):
    tokens = tiny_tokens(n_seq=8)
    lk = links(*pair_saes, k=1, progress=False)
    table = evaluate_links(model, pair_saes, tokens, {"links": {(0, 1): lk}}, min_fires=1,
                           batch_size=4, ceilings="all", progress=False)
    row = table.iloc[0]
    with torch.no_grad():
        xa, xb = _acts(model, pair_saes, tokens)
    fa, fb = xa != 0, xb != 0
    both = (fa[:, :, None] & fb[:, None, :]).sum(0).double()
    union = (fa[:, :, None] | fb[:, None, :]).sum(0).double()
    jac = torch.where(union > 0, both / union.clamp_min(1), torch.zeros_like(both))
    corr = torch.as_tensor(_corrcoef(xa.numpy(), xb.numpy()))
    active = fa.sum(0) >= 1
    partner = corr.argmax(1)
    expected = jac[torch.arange(jac.shape[0]), partner][active].mean()
    assert row.reference_correlation_best_partner == pytest.approx(float(expected))
    assert row.reference_correlation_best_partner <= row.ceiling_best_partner + 1e-12
    assert 0 < row.reference_correlation_one_to_one <= 1
    plain = evaluate_links(model, pair_saes, tokens, {"links": {(0, 1): lk}}, min_fires=1,
                           batch_size=4, progress=False)
    assert np.isnan(plain.iloc[0].reference_correlation_best_partner)
    assert plain.iloc[0].jaccard == pytest.approx(row.jaccard)
    with pytest.raises(ValueError, match="ceilings must be"):
        evaluate_links(model, pair_saes, tokens, {}, ceilings="most", progress=False)


def _dense_ceilings(model, saes, tokens, pairs, min_fires):
    """Today's dense reference: the full F_A x F_B co-firing matrix, its row maxima and scipy's
    dense assignment on it, averaged over the sources firing at least ``min_fires`` times."""
    out = {}
    for a, b in pairs:
        stats = coactivation_stats(model, saes[a], saes[b], tokens, batch_size=4, progress=False)
        jac = stats.jaccard().numpy()
        active = stats.fires_a.numpy() >= min_fires
        r, c = linear_sum_assignment(jac, maximize=True)
        assigned = np.zeros(jac.shape[0])
        assigned[r] = jac[r, c]
        out[(a, b)] = (jac.max(1)[active].mean(), assigned[active].mean())
    return out


def test_sparse_ceilings_equal_the_dense_ones_on_a_tiny_model(model, pair_saes):
    tokens = tiny_tokens(n_seq=8)
    lk = links(*pair_saes, k=2, progress=False)
    table = evaluate_links(model, pair_saes, tokens, {"links": {(0, 1): lk}}, ks=(1, 2),
                           min_fires=1, batch_size=3, progress=False)
    bp, oo = _dense_ceilings(model, dict(enumerate(pair_saes)), tokens, [(0, 1)], min_fires=1)[(0, 1)]
    assert table.ceiling_best_partner.tolist() == pytest.approx([bp] * len(table), rel=1e-12)
    assert table.ceiling_one_to_one.tolist() == pytest.approx([oo] * len(table), rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["jumprelu", "topk"])
def test_sparse_ceilings_equal_the_dense_ones_on_the_default_suite(family):
    from sae_match_lens.assets import load_default_suite, load_eval_tokens

    model, saes = load_default_suite(family)
    tokens = load_eval_tokens()[:8]
    pairs = [(0, 1), (4, 5)]
    methods = {"identity": {p: torch.arange(saes[p[0]].cfg.d_sae) for p in pairs}}
    table = evaluate_links(model, dict(enumerate(saes)), tokens, methods, pairs=pairs,
                           batch_size=4, progress=False)
    expected = _dense_ceilings(model, dict(enumerate(saes)), tokens, pairs, min_fires=5)
    for _, row in table.iterrows():
        bp, oo = expected[(row.layer_a, row.layer_b)]
        assert row.ceiling_best_partner == pytest.approx(bp, rel=1e-12)
        assert row.ceiling_one_to_one == pytest.approx(oo, rel=1e-12)
    only_bp = evaluate_links(model, dict(enumerate(saes)), tokens, methods, pairs=pairs,
                             batch_size=4, ceilings="best_partner", progress=False)
    none = evaluate_links(model, dict(enumerate(saes)), tokens, methods, pairs=pairs,
                          batch_size=4, ceilings="none", progress=False)
    np.testing.assert_array_equal(only_bp.ceiling_best_partner, table.ceiling_best_partner)
    assert only_bp.ceiling_one_to_one.isna().all() and none.ceiling_best_partner.isna().all()
    np.testing.assert_array_equal(none.jaccard, table.jaccard)
