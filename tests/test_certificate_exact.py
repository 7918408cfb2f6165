"""Certificates that mean what they say: optimal for the float64 costs of the given parameters.

The near-tie instances have blocks of features whose within-block costs differ only in the 7th
significant digit, under feature norms large enough that float32 cost products cannot tell the
alternatives apart (their rounding is ~1e-4 here). Every solver must still return the optimum of
the float64 cost matrix, computed independently here in numpy from the parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from sae_match_lens import fold
from sae_match_lens.matching import match, match_features
from sae_match_lens.solvers.costs import StackedFeatures
from sae_match_lens.solvers.sparse import solve_sparse


def near_tie_vectors(n_blocks: int = 30, size: int = 6, dim: int = 16, seed: int = 0,
                     spread: float = 3e-4) -> tuple[np.ndarray, np.ndarray]:
    """Float32 feature vectors A, B [n_blocks · size, dim]: within a block every pair costs
    ``1 + O(spread²)`` (about 1 + 1e-7), across blocks far more."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_blocks, dim)) * 30.0
    offset = np.zeros(dim)
    offset[0] = 1.0

    def tiny() -> np.ndarray:
        t = rng.normal(size=(n_blocks, size, dim))
        t[..., 0] = 0.0  # orthogonal to the offset: only second-order differences
        return t * spread

    A = (centers[:, None] + offset + tiny()).reshape(-1, dim)
    B = (centers[:, None] + tiny()).reshape(-1, dim)[rng.permutation(n_blocks * size)]
    return A.astype(np.float32), B.astype(np.float32)


def stacked(x: np.ndarray) -> StackedFeatures:
    t = torch.from_numpy(x)
    return StackedFeatures(t, t.double().pow(2).sum(dim=1))


def float64_costs(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The reference: squared distances of the float32 parameters, in numpy float64."""
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    return ((A64[:, None, :] - B64[None, :, :]) ** 2).sum(axis=-1)


def optimum(C: np.ndarray, max_cost: float | None = None) -> float:
    """Σ min(C, λ) over the best full (rectangular) assignment: the problem every route solves."""
    if max_cost is not None:
        C = np.minimum(C, max_cost)
    rows, cols = linear_sum_assignment(C)
    return float(C[rows, cols].sum())


def objective(result, C: np.ndarray) -> float:
    """The result's float64 objective, from the reference matrix (unmatched slots cost λ)."""
    idx = result.permutation.indices.numpy()
    ok = idx >= 0
    total = float(C[np.flatnonzero(ok), idx[ok]].sum())
    if result.max_cost is not None:
        total += result.max_cost * (min(C.shape) - int(ok.sum()))
    return total


@pytest.mark.parametrize("solver", ["lapjv", "sparse", "auto", "scipy"])
@pytest.mark.parametrize("seed", [0, 1])
def test_near_ties_give_the_float64_optimum_and_a_true_certificate(solver, seed):
    A, B = near_tie_vectors(seed=seed)
    C = float64_costs(A, B)
    result = match_features(stacked(A), stacked(B), solver=solver, progress=False)
    best = optimum(C)
    assert result.certified
    assert objective(result, C) == pytest.approx(best, rel=1e-12)
    assert 0.0 <= result.gap <= 1e-10 * best


@pytest.mark.parametrize("solver", ["lapjv", "sparse"])
def test_costs_and_total_are_the_float64_costs_of_the_assignment(solver):
    A, B = near_tie_vectors(seed=2)
    C = float64_costs(A, B)
    result = match_features(stacked(A), stacked(B), solver=solver, progress=False)
    idx = result.permutation.indices.numpy()
    assert result.cost_F.dtype == torch.float64
    np.testing.assert_allclose(result.cost_F.numpy(), C[np.arange(len(A)), idx], rtol=1e-13)
    assert result.total_cost == pytest.approx(float(C[np.arange(len(A)), idx].sum()), rel=1e-13)


@pytest.mark.parametrize("solver", ["lapjv", "sparse"])
@pytest.mark.parametrize("shape", [(180, 150), (150, 180)])
def test_near_ties_on_rectangular_problems_give_the_float64_optimum(solver, shape):
    A, B = near_tie_vectors(seed=3)
    A, B = A[: shape[0]], B[: shape[1]]
    C = float64_costs(A, B)
    result = match_features(stacked(A), stacked(B), solver=solver, progress=False)
    assert result.certified
    assert objective(result, C) == pytest.approx(optimum(C), rel=1e-12)


@pytest.mark.parametrize("solver", ["lapjv", "sparse"])
def test_near_ties_with_max_cost_give_the_float64_optimum(solver):
    A, B = near_tie_vectors(seed=4)
    C = float64_costs(A, B)
    lam = float(np.quantile(C.min(axis=1), 0.5))  # about half of the rows stay unmatched
    result = match_features(stacked(A), stacked(B), solver=solver, max_cost=lam,
                            progress=False)
    assert result.certified
    assert 0 < int(result.matched.sum()) < len(A)
    assert objective(result, C) == pytest.approx(optimum(C, lam), rel=1e-12)


def test_match_on_saes_with_near_ties_gives_the_float64_optimum_of_the_folded_parameters():
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    A, B = near_tie_vectors(n_blocks=20, size=6, dim=16, seed=5)
    gen = torch.Generator().manual_seed(5)

    def sae(vectors: np.ndarray) -> JumpReLUSAE:
        """Decoder rows and encoder columns from the near-tie vectors; thresholds are powers of
        two, so that folding is exact and the test's fold() gives the very parameters match()
        compares (any rounding of them would move the costs by more than the ties)."""
        f = len(vectors)
        model = JumpReLUSAE(JumpReLUSAEConfig(d_in=8, d_sae=f))
        model.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        theta = 2.0 ** torch.randint(-1, 3, (f,), generator=gen).float()
        v = torch.from_numpy(vectors)
        with torch.no_grad():
            model.W_dec.copy_(v[:, :8] / theta[:, None])
            model.W_enc.copy_((v[:, 8:] * theta[:, None]).T)
            model.b_enc.copy_(torch.randn(f, generator=gen) * 1e-4 * theta)
            model.threshold.copy_(theta)
        return model

    sae_a, sae_b = sae(A), sae(B)

    def folded(model: JumpReLUSAE) -> np.ndarray:
        f = fold(model)
        return np.concatenate([f.W_dec.detach().double().numpy(),
                               f.W_enc.detach().double().numpy().T,
                               f.b_enc.detach().double().numpy()[:, None]], axis=1)

    Fa, Fb = folded(sae_a), folded(sae_b)
    C = ((Fa[:, None, :] - Fb[None, :, :]) ** 2).sum(axis=-1)
    best = optimum(C)
    for solver in ("auto", "lapjv", "sparse"):
        result = match(sae_a, sae_b, solver=solver, progress=False)
        assert result.certified, solver
        assert objective(result, C) == pytest.approx(best, rel=1e-12), solver


def test_an_exhausted_sparse_round_limit_is_reported_with_a_gap_that_bounds_the_excess():
    A, B = near_tie_vectors(seed=6)
    C = float64_costs(A, B)
    sol = solve_sparse(stacked(A), stacked(B), k=1, max_rounds=0, screen_dims=None,
                       progress=False)
    total = float(C[sol.rows, sol.cols].sum())
    excess = total - optimum(C)
    assert excess > 0  # one candidate per row cannot hold the optimum of tied blocks
    assert not sol.certified
    assert sol.gap >= excess


def test_an_exhausted_dense_round_limit_is_reported_with_a_gap_that_bounds_the_excess():
    A, B = near_tie_vectors(seed=7)
    C = float64_costs(A, B)
    result = match_features(stacked(A), stacked(B), solver="lapjv", max_rounds=0,
                            progress=False)
    excess = objective(result, C) - optimum(C)
    assert excess > 0  # float32 lapjv cannot separate the tied alternatives
    assert not result.certified
    assert result.gap >= excess


@pytest.mark.parametrize(("solver", "k"), [("sparse", 1), ("sparse", 3), ("lapjv", 16)])
def test_margins_are_lower_bounds_of_the_float64_margins(solver, k):
    A, B = near_tie_vectors(seed=8)
    A = A + np.random.default_rng(8).normal(size=A.shape).astype(np.float32) * 0.05
    C = float64_costs(A, B)
    result = match_features(stacked(A), stacked(B), solver=solver, k=k, max_rounds=20,
                            progress=False)
    idx = result.permutation.indices.numpy()
    rows = np.arange(len(A))
    others = C.copy()
    others[rows, idx] = np.inf
    true_margin = others.min(axis=1) - C[rows, idx]
    margin = result.margin_F.double().numpy()
    assert (margin <= true_margin + 1e-12 * C.max()).all()
    exact = np.isclose(margin, true_margin, rtol=0, atol=1e-9 * C.max())
    assert exact.mean() >= (0.5 if k == 1 else 0.9)  # exact where the rival is a candidate
