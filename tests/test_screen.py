"""Screening: the bound is below the cost, and the kept candidates and floors are exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae_match_lens.solvers.costs import StackedFeatures
from sae_match_lens.solvers.screen import (
    Screen,
    _ColumnLists,
    make_screen,
    screen_block,
    screen_dims_auto,
    screen_pass,
)


def stacked(x: torch.Tensor) -> StackedFeatures:
    x = x.to(torch.float32).contiguous()
    return StackedFeatures(x, x.double().pow(2).sum(dim=1))


def exact_costs(a: StackedFeatures, b: StackedFeatures) -> np.ndarray:
    return ((a.matrix_FK.double()[:, None, :] - b.matrix_FK.double()[None]) ** 2).sum(-1).numpy()


def matrix_screen(L: torch.Tensor) -> Screen:
    """A screen whose bound is exactly the given matrix (identity product, no constants)."""
    n_a, n_b = L.shape
    zeros_a, zeros_b = torch.zeros(n_a), torch.zeros(n_b)
    return Screen(L.float().contiguous(), torch.eye(n_b), zeros_a, zeros_b, zeros_a, zeros_b,
                  zeros_a, zeros_b, True)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("dims", [3, 16, 39, 40])
def test_screening_bound_never_exceeds_the_cost(precision, dims):
    gen = torch.Generator().manual_seed(dims)
    scales = torch.logspace(-1, 1, 300)[:, None]
    a = stacked(torch.randn(300, 40, generator=gen) * scales)
    b = stacked(torch.randn(250, 40, generator=gen) * scales[:250].flip(0))
    screen = make_screen(a, b, dims, precision, torch.device("cpu"))
    low = screen_block(screen, 0, 300).double().numpy()
    assert (low <= exact_costs(a, b)).all()


def test_screening_bound_holds_for_identical_features_with_cost_zero():
    x = stacked(torch.randn(64, 30, generator=torch.Generator().manual_seed(3)) * 100)
    screen = make_screen(x, x, 10, "float32", torch.device("cpu"))
    assert (np.diag(screen_block(screen, 0, 64).double().numpy()) <= 0).all()


@pytest.mark.parametrize(("n_a", "n_b", "k", "block_rows"), [
    (50, 40, 6, 7), (50, 40, 6, 1), (3, 40, 16, 2), (40, 5, 8, 16), (200, 300, 16, None),
    (70, 4096, 16, 32), (30, 640, 4, None),  # rows selected by chunks of 64 columns
])
def test_screen_pass_keeps_each_rows_and_columns_cheapest_entries(n_a, n_b, k, block_rows):
    L = torch.randn(n_a, n_b, generator=torch.Generator().manual_seed(n_a + n_b))
    cand = screen_pass(matrix_screen(L), n_a, n_b, k, block_rows, False, "test")
    Ln = L.numpy()
    kr, kc = min(k, n_b), min(max(4, k // 4), n_a)
    row_best = np.sort(np.argsort(Ln, axis=1)[:, :kr], axis=1)
    col_best = np.sort(np.argsort(Ln, axis=0)[:kc].T, axis=1)
    np.testing.assert_array_equal(np.sort(cand.row_idx.numpy(), axis=1), row_best)
    np.testing.assert_array_equal(np.sort(cand.col_idx.numpy(), axis=1), col_best)
    kept = np.zeros_like(Ln, dtype=bool)
    kept[np.arange(n_a)[:, None], cand.row_idx.numpy()] = True
    kept[cand.col_idx.numpy(), np.arange(n_b)[:, None]] = True
    floor = np.maximum(cand.row_floor[:, None], cand.col_floor[None, :])
    assert (Ln[~kept] >= floor[~kept]).all()
    if kr < n_b:
        np.testing.assert_allclose(cand.row_floor, np.sort(Ln, axis=1)[:, kr - 1], rtol=1e-6)
    else:
        assert np.isinf(cand.row_floor).all()


@pytest.mark.parametrize(("order", "block"), [("ties", 8), ("ties", 40), ("decreasing", 40)])
def test_column_lists_stay_exact_with_ties_and_many_blocks(order, block):
    gen = torch.Generator().manual_seed(5)
    L = torch.randint(0, 6, (90, 30), generator=gen).float()  # many equal values
    if order == "decreasing":  # every later block beats every threshold: the sorting path
        L = L - 10 * torch.arange(90.0)[:, None]
    lists = _ColumnLists(30, 4, torch.device("cpu"))
    for r0 in range(0, 90, block):
        lists.update(L[r0:r0 + block], r0)
    best = np.sort(L.numpy(), axis=0)[:4].T
    np.testing.assert_array_equal(lists.val.numpy(), best)
    np.testing.assert_array_equal(np.take_along_axis(L.numpy().T, lists.idx.numpy(), 1), best)
    assert all(len(set(r)) == 4 for r in lists.idx.numpy().tolist())  # no row kept twice


def test_auto_width_screens_large_structured_pairs_and_not_small_ones():
    gen = torch.Generator().manual_seed(6)
    n, K = 4096, 600
    A = torch.randn(n, K, generator=gen)
    B = A[torch.randperm(n, generator=gen)] + 0.3 * torch.randn(n, K, generator=gen)
    a, b = stacked(A), stacked(B)
    m = screen_dims_auto(a, b, 16)
    assert round(K / 10) <= m < K
    small = stacked(A[:1000])
    assert screen_dims_auto(small, small, 16) == K
    assert math.isfinite(m)


@pytest.mark.parametrize(("n_rows", "block"), [(333, 64), (333, 100), (333, 333), (64, 16),
                                               (500, 48)])
@pytest.mark.parametrize("order", ["ties", "decreasing", "increasing"])
def test_column_lists_read_by_row_groups_keep_the_exact_cheapest_entries(n_rows, block, order):
    """Blocks of several 16-row groups (and leftover rows), with group minima tied across
    groups ("ties"), every later block beating every list ("decreasing") or none doing so
    ("increasing"): the lists are always the exact 4 smallest entries of each column."""
    gen = torch.Generator().manual_seed(n_rows + block)
    L = torch.randint(0, 4, (n_rows, 50), generator=gen).float()
    if order == "decreasing":
        L = L - 10 * torch.arange(float(n_rows))[:, None]
    elif order == "increasing":
        L = L + 10 * torch.arange(float(n_rows))[:, None]
    lists = _ColumnLists(50, 4, torch.device("cpu"))
    for r0 in range(0, n_rows, block):
        lists.update(L[r0:r0 + block], r0)
    best = np.sort(L.numpy(), axis=0)[:4].T
    np.testing.assert_array_equal(lists.val.numpy(), best)
    np.testing.assert_array_equal(np.take_along_axis(L.numpy().T, lists.idx.numpy(), 1), best)
    assert all(len(set(r)) == 4 for r in lists.idx.numpy().tolist())


@pytest.mark.parametrize("dims", [10, 40])
def test_screening_bound_with_the_stacked_float64_norms_stays_below_the_cost(dims):
    """make_screen takes ‖x‖² from StackedFeatures.norm_sq_F when it is known; the bound must
    stay below the exact cost, also for identical features (cost 0) of large norm."""
    from sae_match_lens.solvers.costs import squared_norms

    gen = torch.Generator().manual_seed(dims)
    scales = torch.logspace(-1, 2, 200)[:, None]
    x = (torch.randn(200, 40, generator=gen) * scales).contiguous()
    y = torch.cat([x[:100], (torch.randn(100, 40, generator=gen) * scales[:100])]).contiguous()
    a, b = (StackedFeatures(t, squared_norms(t), squared_norms(t)) for t in (x, y))
    screen = make_screen(a, b, dims, "float32", torch.device("cpu"))
    low = screen_block(screen, 0, 200).double().numpy()
    assert (low <= exact_costs(a, b)).all()
    assert (np.diag(low)[:100] <= 0).all()


def test_auto_width_hands_back_the_screen_it_chose():
    gen = torch.Generator().manual_seed(6)
    n, K = 4096, 600
    A = torch.randn(n, K, generator=gen)
    B = A[torch.randperm(n, generator=gen)] + 0.3 * torch.randn(n, K, generator=gen)
    a, b = stacked(A), stacked(B)
    screens: dict = {}
    m = screen_dims_auto(a, b, 16, screens=screens)
    assert round(K / 10) <= m < K and m == screen_dims_auto(a, b, 16)
    if m in screens:
        built = make_screen(a, b, m, "float32", torch.device("cpu"))
        for got, want in zip(screens[m], built, strict=True):
            if isinstance(want, torch.Tensor):
                assert torch.equal(got, want)
