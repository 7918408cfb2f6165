"""Certified sparse matching: equal to the dense optimum, rigorous bounds, clear refusals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from sae_match_lens import matching
from sae_match_lens.matching import match, match_features
from sae_match_lens.solvers.costs import StackedFeatures, cost_blocks
from sae_match_lens.solvers.sparse import solve_sparse

CUDA = torch.cuda.is_available()


def stacked(x: torch.Tensor) -> StackedFeatures:
    """Stacked features with the ``mse`` constants (``C_ij = ‖x_i − y_j‖²``)."""
    x = x.to(torch.float32).contiguous()
    return StackedFeatures(x, x.double().pow(2).sum(dim=1))


def cost_matrix(a: StackedFeatures, b: StackedFeatures) -> np.ndarray:
    return torch.cat([blk for _, _, blk in cost_blocks(a, b)]).double().numpy()


def dense_objective(a: StackedFeatures, b: StackedFeatures, max_cost: float | None = None) -> float:
    """Optimum of the dense route's problem: Σ min(C, λ) over a full rectangular assignment."""
    C = cost_matrix(a, b)
    if max_cost is not None:
        C = np.minimum(C, max_cost)
    rows, cols = linear_sum_assignment(C)
    return float(C[rows, cols].sum())


def sparse_objective(result: matching.MatchResult, n_a: int, n_b: int) -> float:
    """The same objective for a result (unmatched slots cost ``max_cost``)."""
    total = result.total_cost
    if result.max_cost is not None:
        total += result.max_cost * (min(n_a, n_b) - int(result.matched.sum()))
    return total


def planted(n_a: int, n_b: int, dim: int, noise: float, seed: int, cluster: int = 1):
    """A and B with B's first min(n_a, n_b) features noisy, permuted copies of A's."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(math.ceil(max(n_a, n_b) / cluster), dim, generator=gen)
    base = centers.repeat_interleave(cluster, dim=0)[: max(n_a, n_b)]
    A = base[:n_a] + 0.5 * torch.randn(n_a, dim, generator=gen)
    B_rows = torch.randn(n_b, dim, generator=gen) * 1.1
    m = min(n_a, n_b)
    B_rows[:m] = A[:m] + noise * torch.randn(m, dim, generator=gen)
    B = B_rows[torch.randperm(n_b, generator=gen)]
    return stacked(A), stacked(B)


def run_sparse(a, b, **kwargs):
    kwargs.setdefault("progress", False)
    return match_features(a, b, solver="sparse", **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certified_sparse_result_equals_the_dense_optimum_on_random_instances(seed):
    a, b = planted(400, 400, 16, noise=1.5, seed=seed)
    result = run_sparse(a, b, k=6)
    reference = match_features(a, b, solver="scipy", progress=False)
    assert result.certified and result.solver == "sparse"
    assert result.total_cost == pytest.approx(reference.total_cost, rel=1e-6)
    assert torch.equal(result.permutation.indices, reference.permutation.indices)


def test_certified_sparse_result_equals_the_dense_optimum_on_clustered_features():
    a, b = planted(2000, 2000, 24, noise=0.4, seed=3, cluster=8)
    result = run_sparse(a, b, k=8)
    reference = match_features(a, b, solver="lapjv", progress=False)
    assert result.certified
    assert result.gap <= 1e-5 * result.total_cost + 1e-3
    assert result.total_cost == pytest.approx(reference.total_cost, rel=1e-6)
    assert torch.equal(result.permutation.indices, reference.permutation.indices)


def test_small_k_forces_repair_rounds_that_reach_the_optimum():
    a, b = planted(300, 300, 12, noise=3.0, seed=4)
    sol = solve_sparse(a, b, k=2, max_rounds=30, screen_dims=None, progress=False)
    assert sol.rounds >= 1
    assert sol.certified
    assert float(sol.cost.sum()) == pytest.approx(dense_objective(a, b), rel=1e-6)


def test_an_exhausted_round_limit_reports_an_honest_gap():
    a, b = planted(300, 300, 12, noise=3.0, seed=4)
    sol = solve_sparse(a, b, k=1, max_rounds=0, screen_dims=None, progress=False)
    excess = float(sol.cost.sum()) - dense_objective(a, b)
    assert excess >= -1e-3
    if sol.certified:  # certified means optimal for the float64 costs, up to rounding
        assert sol.gap <= 1e-9 * float(sol.cost.sum())
    assert sol.gap >= excess - 1e-9 * float(sol.cost.sum())  # the gap bounds the distance


@pytest.mark.parametrize("shape", [(250, 400), (400, 250)])
def test_rectangular_sparse_result_equals_the_dense_optimum(shape):
    a, b = planted(*shape, dim=16, noise=1.0, seed=5)
    result = run_sparse(a, b, k=4)
    reference = match_features(a, b, solver="scipy", progress=False)
    assert result.certified
    assert result.total_cost == pytest.approx(reference.total_cost, rel=1e-6)
    assert torch.equal(result.permutation.indices, reference.permutation.indices)
    assert int(result.matched.sum()) == min(shape)


@pytest.mark.parametrize("shape", [(300, 300), (200, 320), (320, 200)])
def test_max_cost_leaves_the_same_features_unmatched_as_the_dense_route(shape):
    a, b = planted(*shape, dim=16, noise=1.0, seed=6)
    C = cost_matrix(a, b)
    lam = float(np.quantile(C.min(axis=1), 0.7))
    result = run_sparse(a, b, k=4, max_cost=lam)
    reference = match_features(a, b, solver="scipy", max_cost=lam, progress=False)
    assert result.certified
    assert 0 < int(result.matched.sum()) < min(shape)
    assert sparse_objective(result, *shape) == pytest.approx(dense_objective(a, b, lam), rel=1e-6)
    assert torch.equal(result.permutation.indices, reference.permutation.indices)


@pytest.mark.parametrize(("n_a", "n_b", "max_cost"), [(6, 6, None), (7, 7, None), (5, 7, None),
                                                      (7, 5, None), (6, 6, 6.0), (5, 7, 5.0)])
def test_sparse_matching_agrees_with_brute_force_on_tiny_instances(n_a, n_b, max_cost):
    gen = torch.Generator().manual_seed(n_a * 10 + n_b)
    a = stacked(torch.randn(n_a, 3, generator=gen))
    b = stacked(torch.randn(n_b, 3, generator=gen))
    C = np.minimum(cost_matrix(a, b), max_cost if max_cost is not None else np.inf)
    if n_a <= n_b:
        best = min(sum(C[i, p[i]] for i in range(n_a))
                   for p in itertools.permutations(range(n_b), n_a))
    else:
        best = min(sum(C[p[j], j] for j in range(n_b))
                   for p in itertools.permutations(range(n_a), n_b))
    result = run_sparse(a, b, k=1, max_cost=max_cost, max_rounds=10)
    assert result.certified
    assert sparse_objective(result, n_a, n_b) == pytest.approx(best, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(("screen_dims", "precision"), [(4, "float32"), (12, "float32"),
                                                         (None, "bfloat16"), (8, "float16")])
def test_screened_and_low_precision_passes_still_certify_the_optimum(screen_dims, precision):
    a, b = planted(500, 500, 32, noise=0.6, seed=7, cluster=4)
    result = run_sparse(a, b, k=6, screen_dims=screen_dims, precision=precision, max_rounds=10)
    reference = match_features(a, b, solver="lapjv", progress=False)
    assert result.certified
    assert result.total_cost == pytest.approx(reference.total_cost, rel=1e-6)
    assert torch.equal(result.permutation.indices, reference.permutation.indices)


def test_certify_false_returns_a_flag_that_is_correct():
    for noise, k in [(0.3, 8), (3.0, 1)]:
        a, b = planted(300, 300, 12, noise=noise, seed=8)
        result = run_sparse(a, b, k=k, certify=False)
        optimum = dense_objective(a, b)
        assert result.gap >= 0
        if result.certified:
            assert result.total_cost == pytest.approx(optimum, rel=1e-6)
        assert result.total_cost - optimum <= result.gap + 1e-3


def test_memory_guard_refuses_an_impossible_size_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(matching, "available_bytes", lambda: 2**30)
    huge = StackedFeatures(torch.zeros(1_000_000, 1), torch.zeros(1_000_000, dtype=torch.float64))
    with pytest.raises(MemoryError, match=r"GiB.*available.*block_rows"):
        match_features(huge, huge, solver="sparse", progress=False)
    wide = StackedFeatures(huge.matrix_FK[:40000], huge.const_F[:40000])
    with pytest.raises(MemoryError, match=r"solver='sparse'"):
        match_features(wide, wide, solver="lapjv", progress=False)


def test_auto_solver_goes_sparse_when_the_dense_matrix_does_not_fit_comfortably(monkeypatch):
    a, b = planted(300, 300, 8, noise=0.5, seed=9)
    assert match_features(a, b, progress=False).solver == "lapjv"
    monkeypatch.setattr(matching, "available_bytes", lambda: 300 * 300 * 4 * 3 // 2)
    monkeypatch.setattr(matching, "sparse_bytes", lambda *args: 0)
    result = match_features(a, b, progress=False)
    assert result.solver == "sparse" and result.certified


def test_match_on_saes_gives_the_dense_result_through_the_sparse_route():
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    gen = torch.Generator().manual_seed(10)

    def sae(w_enc: torch.Tensor, w_dec: torch.Tensor, b_enc: torch.Tensor, theta: torch.Tensor):
        model = JumpReLUSAE(JumpReLUSAEConfig(d_in=w_enc.shape[0], d_sae=w_enc.shape[1]))
        model.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        with torch.no_grad():
            model.W_enc.copy_(w_enc), model.W_dec.copy_(w_dec)
            model.b_enc.copy_(b_enc), model.threshold.copy_(theta)
        return model

    d, f = 16, 120
    w_enc = torch.randn(d, f, generator=gen)
    theta = torch.rand(f, generator=gen) + 0.5
    sae_a = sae(w_enc, w_enc.T.clone(), torch.randn(f, generator=gen), theta)
    perm = torch.randperm(f, generator=gen)
    s = torch.exp(torch.randn(f, generator=gen))  # per-feature rescaling, removed by folding
    noisy = w_enc[:, perm] + 0.2 * torch.randn(d, f, generator=gen)
    sae_b = sae(noisy / s, (noisy.T * s[:, None]).contiguous(), sae_a.b_enc[perm] / s,
                theta[perm] / s)
    result = match(sae_a, sae_b, solver="sparse", k=4, progress=False)
    reference = match(sae_a, sae_b, solver="scipy", progress=False)
    assert result.certified
    assert torch.equal(result.permutation.indices, reference.permutation.indices)
    assert result.permutation.metadata["options"]["solver"] == "sparse"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_gpu_path_gives_the_cpu_result(precision):
    a, b = planted(800, 800, 32, noise=0.6, seed=11, cluster=4)
    cpu = run_sparse(a, b, k=8, screen_dims=12)
    gpu = run_sparse(a, b, k=8, screen_dims=12, precision=precision, device="cuda")
    assert gpu.certified
    assert torch.equal(gpu.permutation.indices, cpu.permutation.indices)


@pytest.mark.parametrize("family", ["jumprelu", "topk"])
def test_trained_saes_with_uncertain_matches_certify_the_dense_optimum(family):
    """The shipped suite's SAEs match far less distinctly than synthetic pairs: most rows need
    an exact recheck and repairs add edges; the result must still be the dense optimum."""
    from sae_match_lens import load_default_suite

    _, saes = load_default_suite(family)
    result = match(saes[4], saes[5], solver="sparse", k=8, progress=False)
    reference = match(saes[4], saes[5], solver="lapjv", progress=False)
    assert result.certified and result.gap <= 1e-5 * reference.total_cost
    assert result.total_cost == pytest.approx(reference.total_cost, rel=1e-6)
    assert torch.equal(result.permutation.indices, reference.permutation.indices)


def test_auto_width_route_certifies_the_dense_optimum_with_near_ties():
    """The auto-width probe's screen, reused by the screening pass, grouped column lists over
    blocks with leftover rows (200 = 12 groups of 16 + 8), clusters of 8 siblings and exact
    ties (duplicated rows of A and columns of B): the certified total must be the optimum of
    the float64 costs (brute force: scipy on the full matrix of direct differences)."""
    gen = torch.Generator().manual_seed(11)
    n, K = 4096, 512
    A = torch.randn(n // 8, K, generator=gen).repeat_interleave(8, dim=0)
    A += 0.3 * torch.randn(n, K, generator=gen)
    A[1::101] = A[0:-1:101][: len(A[1::101])]  # exact duplicate rows
    B = A[torch.randperm(n, generator=gen)] + 0.3 * torch.randn(n, K, generator=gen)
    B[1::97] = B[0:-1:97][: len(B[1::97])]  # exact duplicate columns
    a, b = stacked(A), stacked(B)
    sol = solve_sparse(a, b, block_rows=200, progress=False)
    assert sol.stats["screen_dims"] < K  # the screened route, not the exact pass
    assert sol.certified
    A64, B64 = A.double(), B.double()
    # float64 costs by expansion: within ~1e-13 of the direct differences the certificate speaks
    # of, far inside the 1e-9 relative tolerance below (and seconds instead of minutes)
    C = ((A64 ** 2).sum(1)[:, None] + (B64 ** 2).sum(1)[None] - 2 * A64 @ B64.T).numpy()
    rows, cols = linear_sum_assignment(C)
    best = math.fsum(C[rows, cols].tolist())
    total = math.fsum(sol.cost.tolist())
    assert best - 1e-9 * best <= total <= best + sol.gap + 1e-9 * best
