"""Certified-optimal sparse matching for SAEs too wide for a dense cost matrix (16k-1M features).

The dense route (:mod:`sae_match_lens.matching`) holds the whole ``n_a × n_b`` cost matrix; at 65k
features that is 16 GiB, at 1M 4 TiB. This route never holds more than one block of rows:

1. **Screening pass** (:mod:`sae_match_lens.screen`): row blocks of a lower bound ``L ≤ C`` (the
   cost itself with ``screen_dims=None``, or a narrower product) are computed on ``device`` and
   reduced there to each row's ``k`` and each column's ``max(4, k // 4)`` cheapest entries, plus
   floors that bound every pruned edge of each row and column.
2. **Sparse solve.** Float32 costs of the candidate edges are computed (only those), the edges of
   one complete greedy pairing are added (a perfect matching then exists), and
   ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (LAPJVsp) solves the assignment
   restricted to them. Its output is checked (every edge exists, one-to-one, right size).
3. **Certificate** (:mod:`sae_match_lens.certificate`): dual prices from the residual graph;
   rows whose floors prove every pruned edge has a non-negative reduced cost need no further
   work; the rest are checked exactly, violating edges join the graph and the problem is
   re-solved (at most ``max_rounds`` repairs). ``gap`` bounds ``total − optimum``.

**Rigour.** Bounds hold for the exact real-valued costs of the stacked float32 features; the
costs the solver compares are float32 computations of them (as in the dense route), so
"certified" means optimal up to that rounding: the gap is compared with
``1e-5 · max(1, |total|) + 1e-6 · n``, the dense route's tolerance. A screen is only a filter:
candidate costs are always recomputed in float32.

**Unmatched features** (``max_cost=λ``). As in the dense route, a pair costing ≥ λ is no better
than leaving its row unmatched: the problem is ``min Σ_M (C_ij − λ)`` over partial matchings.
It is solved exactly as a perfect matching on an augmented graph: a dummy column per row and a
dummy row per column at cost ``λ/2`` each (so an unmatched row *and* its would-be partner
together cost λ), and dummy rows × dummy columns at cost 0. That last block is complete; the
solver receives only the transposes of the real candidate edges (enough for an optimal perfect
matching), and the duals see the whole block through one hub node of the shortest-path graph.
Unequal widths without ``max_cost`` pad the short side with zero-cost dummies (as lapjv does).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from .certificate import Problem, duals, graph_violation, recheck, suspect_rows
from .costs import StackedFeatures, edge_costs, ieee_products, listed_costs
from .screen import (
    LOW_PRECISION,
    Precision,
    block_rows_for,
    coordinate_order,
    make_screen,
    screen_dims_auto,
    screen_pass,
)

__all__ = ["EdgeSet", "Precision", "SparseSolution", "solve_sparse", "sparse_bytes"]

logger = logging.getLogger(__name__)


class SparseSolution(NamedTuple):
    """An assignment found on candidate edges, with its optimality certificate."""

    rows: np.ndarray
    """Source features that have a partner (int64, ascending)."""
    cols: np.ndarray
    """Their partners in the target (int64)."""
    cost: np.ndarray
    """Float32 cost of each pair (float64 array)."""
    best2: np.ndarray
    """Cheapest two candidate costs of every source row [n_a, 2] (inf where fewer exist)."""
    argbest: np.ndarray
    """The candidate column of each row's cheapest cost [n_a] (-1 where none)."""
    certified: bool
    """True when the duals were proven feasible on the whole cost matrix."""
    gap: float
    """Upper bound on ``total − optimum`` (inf when it could not be bounded)."""
    rounds: int
    """Repair rounds used (0: certified on the first solve)."""
    stats: dict[str, Any]
    """Timings and counts for logs and benchmarks."""


def sparse_bytes(n_a: int, n_b: int, k: int, block_rows: int | None, width: int = 0,
                 screen_dims: int | Literal["auto"] | None = "auto") -> int:
    """Rough peak host memory of :func:`solve_sparse` beyond the stacked features (bytes):
    block buffers, the screening operands (for stacked ``width``; ``"auto"`` never screens wider
    than half of it) and the candidate graph."""
    edges = (n_a + n_b) * (2 * k + 4)
    rows = min(block_rows or block_rows_for(n_b), n_a)
    if screen_dims is None:
        screen = width
    elif screen_dims == "auto":
        screen = width // 2
    else:
        screen = min(int(screen_dims), width)
    return (3 * rows * n_b * 4 + (n_a + n_b) * (screen + 4) * 4 + edges * 80
            + (n_a + n_b) * 200)


class EdgeSet:
    """Real candidate edges (deduplicated, exact costs), keyed by ``row * n_b + col``."""

    def __init__(self, n_a: int, n_b: int) -> None:
        self.n_a, self.n_b = n_a, n_b
        self.keys = np.empty(0, dtype=np.int64)
        self.cost = np.empty(0, dtype=np.float64)

    def missing(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = np.unique(rows.astype(np.int64) * self.n_b + cols)
        keys = keys[~np.isin(keys, self.keys, assume_unique=True)]
        return keys // self.n_b, keys % self.n_b

    def add(self, rows: np.ndarray, cols: np.ndarray, cost: np.ndarray) -> None:
        keys = rows.astype(np.int64) * self.n_b + cols
        allk = np.concatenate([self.keys, keys])
        allc = np.concatenate([self.cost, cost])
        order = np.argsort(allk, kind="stable")
        allk, allc = allk[order], allc[order]
        first = np.ones(len(allk), dtype=bool)
        first[1:] = allk[1:] != allk[:-1]
        self.keys, self.cost = allk[first], allc[first]

    @property
    def rows(self) -> np.ndarray:
        return self.keys // self.n_b

    @property
    def cols(self) -> np.ndarray:
        return self.keys % self.n_b


def _complete_pairing(g: EdgeSet) -> tuple[np.ndarray, np.ndarray]:
    """Edges that make a full matching possible: greedy proposals, then leftovers in order."""
    rows, cols, cost = g.rows, g.cols, g.cost
    free_r = np.ones(g.n_a, dtype=bool)
    free_c = np.ones(g.n_b, dtype=bool)
    for _ in range(8):
        ok = free_r[rows] & free_c[cols]
        if not ok.any():
            break
        r, c, w = rows[ok], cols[ok], cost[ok]
        order = np.lexsort((w, r))
        r, c, w = r[order], c[order], w[order]
        first = np.ones(len(r), dtype=bool)
        first[1:] = r[1:] != r[:-1]
        r, c, w = r[first], c[first], w[first]  # each free row proposes its cheapest free column
        order = np.lexsort((w, c))
        r, c = r[order], c[order]
        first = np.ones(len(c), dtype=bool)
        first[1:] = c[1:] != c[:-1]
        free_r[r[first]] = False  # each column accepts its cheapest proposer
        free_c[c[first]] = False
    left_r, left_c = np.flatnonzero(free_r), np.flatnonzero(free_c)
    n = min(len(left_r), len(left_c))
    return left_r[:n], left_c[:n]


def _build_problem(g: EdgeSet, max_cost: float | None) -> tuple[Problem, np.ndarray, np.ndarray]:
    """Square problem and the extra solver-only edges (dummy × dummy transposes)."""
    n_a, n_b = g.n_a, g.n_b
    empty = np.empty(0, dtype=np.int64)
    if max_cost is not None:
        half = 0.5 * float(max_cost)
        n = n_a + n_b
        ar_a, ar_b = np.arange(n_a), np.arange(n_b)
        e_left = np.concatenate([g.rows, ar_a, n_a + ar_b])
        e_right = np.concatenate([g.cols, n_b + ar_a, ar_b])
        e_cost = np.concatenate([g.cost, np.full(n_a, half), np.full(n_b, half)])
        prob = Problem(n, e_left, e_right, e_cost, n_a + ar_b, n_b + ar_a)
        return prob, n_a + g.cols, n_b + g.rows
    n = max(n_a, n_b)
    block_left = np.arange(n_a, n) if n_b > n_a else (np.arange(n_a) if n_a > n_b else empty)
    block_right = np.arange(n_b, n) if n_a > n_b else (np.arange(n_b) if n_b > n_a else empty)
    return Problem(n, g.rows, g.cols, g.cost, block_left, block_right), empty, empty


def _solve_problem(prob: Problem, extra_l: np.ndarray, extra_r: np.ndarray, n_a: int,
                   n_b: int, padded: bool) -> tuple[np.ndarray, np.ndarray]:
    """Optimal perfect matching of the square problem: ``match_right[l]`` and the cost of it."""
    n = prob.n_left
    if padded:  # unequal widths, no max_cost: solve the real rectangle, pad with block edges
        graph = sp.csr_matrix((prob.e_cost + 1.0, (prob.e_left, prob.e_right)), shape=(n_a, n_b))
        r_idx, c_idx = min_weight_full_bipartite_matching(graph)
        match_right = np.full(n, -1, dtype=np.int64)
        match_right[r_idx] = c_idx
        if n_b > n_a:
            used = np.zeros(n_b, dtype=bool)
            used[c_idx] = True
            match_right[n_a:] = np.flatnonzero(~used)
        else:
            match_right[match_right < 0] = np.arange(n_b, n)
    else:
        left = np.concatenate([prob.e_left, extra_l])
        right = np.concatenate([prob.e_right, extra_r])
        cost = np.concatenate([prob.e_cost, np.zeros(len(extra_l))]) + 1.0
        graph = sp.csr_matrix((cost, (left, right)), shape=(n, n))
        r_idx, c_idx = min_weight_full_bipartite_matching(graph)
        match_right = np.full(n, -1, dtype=np.int64)
        match_right[r_idx] = c_idx
    if (match_right < 0).any() or len(np.unique(match_right)) != n:
        raise RuntimeError("the sparse solver returned an assignment that is not one-to-one.")
    # cost of every matched edge, looked up among the problem's edges (never trusted blindly)
    in_block = np.zeros(n, dtype=bool)
    in_block[prob.block_left] = True
    block_r = np.zeros(n, dtype=bool)
    block_r[prob.block_right] = True
    keys = prob.e_left.astype(np.int64) * n + prob.e_right
    order = np.argsort(keys)
    want = np.arange(n, dtype=np.int64) * n + match_right
    pos = np.searchsorted(keys[order], want).clip(max=len(keys) - 1)
    found = keys[order][pos] == want
    mcost = np.where(found, prob.e_cost[order][pos], 0.0)
    bad = ~found & ~(in_block & block_r[match_right])
    if bad.any():
        raise RuntimeError(f"the sparse solver used {int(bad.sum())} edges that do not exist.")
    return match_right, mcost


def solve_sparse(
    a: StackedFeatures,
    b: StackedFeatures,
    *,
    k: int = 16,
    max_cost: float | None = None,
    certify: bool = True,
    max_rounds: int = 4,
    screen_dims: int | Literal["auto"] | None = "auto",
    precision: Precision = "float32",
    block_rows: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    label: str = "match",
) -> SparseSolution:
    """Exact assignment on top-``k`` candidate edges, with a certificate of global optimality.

    Args:
        a, b: stacked source and target features (:func:`~sae_match_lens.costs.stack_features`);
            a chain of SAEs stacks each SAE once and calls this per adjacent pair.
        k: candidates kept per row (columns keep ``max(4, k // 4)``).
        max_cost: pairs costing ≥ this are no better than leaving the row unmatched (dummy
            edges at ``max_cost / 2`` on each side; see the module doc).
        certify: recheck suspect rows exactly and repair until certified; ``False`` stops after
            one solve (``certified`` is still True when no row is suspect).
        max_rounds: repair rounds (re-solves with added edges) at most.
        screen_dims: coordinates used by the screening pass (``None``: all, exact float32
            screen; ``"auto"``: chosen by :func:`~sae_match_lens.screen.screen_dims_auto`).
        precision: arithmetic of the screening product (``"float32"``, or ``"bfloat16"`` /
            ``"float16"`` with a rigorous rounding allowance; slower than float32 on AVX2 CPUs).
        block_rows: rows per block of the screening pass (memory: ``block_rows · n_b · 4 · 3``;
            ``None``: about 128 MiB per block buffer).
        device: where the screening pass and exact rechecks run (e.g. ``"cuda"``); only the
            candidate lists return to the host.
        progress: show progress bars.
        label: name used in logs and bars.
    """
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if not (isinstance(max_rounds, int) and max_rounds >= 0):
        raise ValueError(f"max_rounds must be an integer >= 0, got {max_rounds!r}.")
    if precision not in ("float32", *LOW_PRECISION):
        raise ValueError(
            f"precision must be 'float32', 'bfloat16' or 'float16', got {precision!r}."
        )
    if a.matrix_FK.shape[1] != b.matrix_FK.shape[1]:
        raise ValueError(
            f"stacked feature widths differ ({a.matrix_FK.shape[1]} vs {b.matrix_FK.shape[1]})."
        )
    if block_rows is not None and not (isinstance(block_rows, int) and block_rows >= 1):
        raise ValueError(f"block_rows must be a positive integer or None, got {block_rows!r}.")
    if not (screen_dims in ("auto", None) or (isinstance(screen_dims, int) and screen_dims >= 1)):
        raise ValueError(
            f"screen_dims must be a positive integer, 'auto' or None, got {screen_dims!r}."
        )
    dev = torch.device(device) if device is not None else a.matrix_FK.device
    with ieee_products(dev):
        return _solve(a, b, k=k, max_cost=max_cost, certify=certify, max_rounds=max_rounds,
                      screen_dims=screen_dims, precision=precision,
                      block_rows=block_rows or block_rows_for(b.matrix_FK.shape[0]), dev=dev,
                      progress=progress, label=label)


def _solve(a: StackedFeatures, b: StackedFeatures, *, k: int, max_cost: float | None,
           certify: bool, max_rounds: int, screen_dims: int | Literal["auto"] | None,
           precision: Precision, block_rows: int, dev: torch.device, progress: bool,
           label: str) -> SparseSolution:
    """:func:`solve_sparse` after its arguments are checked."""
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    K = a.matrix_FK.shape[1]
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    order = coordinate_order(a, b)
    if screen_dims == "auto":
        m = screen_dims_auto(a, b, k, order=order) if precision == "float32" else K
    elif screen_dims is None:
        m = K
    else:
        m = min(int(screen_dims), K)
    stats["screen_dims"] = m
    stats["t_width"] = time.perf_counter() - t0
    screen = make_screen(a, b, m, precision, dev, order=order)
    row_idx, col_idx, row_floor, col_floor = screen_pass(screen, n_a, n_b, k, block_rows,
                                                          progress, label)
    del screen
    stats["t_screen"] = time.perf_counter() - t0 - stats["t_width"]
    g = EdgeSet(n_a, n_b)
    g.add(np.repeat(np.arange(n_a), row_idx.shape[1]), row_idx.numpy().ravel(),
          listed_costs(a, b, row_idx, dev).numpy().ravel())
    # columns' candidates: most are already some row's candidate
    r_new, c_new = g.missing(col_idx.numpy().ravel(), np.repeat(np.arange(n_b), col_idx.shape[1]))
    g.add(r_new, c_new, edge_costs(a, b, r_new, c_new, dev))
    if max_cost is None:
        pr, pc = _complete_pairing(g)
        r_new, c_new = g.missing(pr, pc)
        g.add(r_new, c_new, edge_costs(a, b, r_new, c_new, dev))
    stats["t_candidates"] = time.perf_counter() - t0 - stats["t_screen"] - stats["t_width"]
    padded = max_cost is None and n_a != n_b
    certified, gap, rounds = False, math.inf, 0
    for rounds in range(max_rounds + 1):
        t1 = time.perf_counter()
        prob, extra_l, extra_r = _build_problem(g, max_cost)
        match_right, mcost = _solve_problem(prob, extra_l, extra_r, n_a, n_b, padded)
        u, v = duals(prob, match_right, mcost)
        primal = float(mcost.sum())
        tol = 1e-5 * max(1.0, abs(primal)) + 1e-6 * max(n_a, n_b)
        in_graph_gap = graph_violation(prob, u, v)
        u_r, v_r = u[:n_a], v[:n_b]
        suspects, count, col_order = suspect_rows(u_r, v_r, row_floor, col_floor)
        stats.setdefault("suspects", []).append(len(suspects))
        stats.setdefault("t_solve", []).append(time.perf_counter() - t1)
        logger.info("%s: round %d, %d edges, %d suspect rows", label, rounds, len(g.keys),
                    len(suspects))
        if len(suspects) == 0:
            certified, gap = in_graph_gap <= tol, in_graph_gap
            break
        if not certify:
            vmax = v_r.max()
            bound = np.maximum(0.0, u_r[suspects] + vmax - row_floor[suspects])
            certified, gap = False, in_graph_gap + float(bound.sum())
            break
        t2 = time.perf_counter()
        add_r, add_c, add_w, neg = recheck(a, b, g, suspects, count, col_order, u_r, v_r, col_floor,
                                            row_floor, k, block_rows, dev)
        stats.setdefault("t_recheck", []).append(time.perf_counter() - t2)
        gap = in_graph_gap + neg
        if gap <= tol or len(add_r) == 0:
            certified = gap <= tol
            break
        if rounds == max_rounds:
            break
        g.add(add_r, add_c, add_w)
    rows_all = np.arange(n_a)
    cols_all = match_right[:n_a]
    real = cols_all < n_b
    rows, cols = rows_all[real], cols_all[real]
    key = rows.astype(np.int64) * n_b + cols
    cost = g.cost[np.searchsorted(g.keys, key)]
    best2, argbest = _best_two(g, n_a)
    stats["t_total"] = time.perf_counter() - t0
    stats["edges"] = len(g.keys)
    return SparseSolution(rows, cols, cost, best2, argbest, bool(certified), float(gap), rounds,
                          stats)


def _best_two(g: EdgeSet, n_a: int) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest two candidate costs of every row, and the column of the cheapest."""
    rows, cols, cost = g.rows, g.cols, g.cost
    order = np.lexsort((cost, rows))
    rows, cols, cost = rows[order], cols[order], cost[order]
    first = np.searchsorted(rows, np.arange(n_a), side="left")
    last = np.searchsorted(rows, np.arange(n_a), side="right")
    best2 = np.full((n_a, 2), np.inf)
    argbest = np.full(n_a, -1, dtype=np.int64)
    has1 = last > first
    best2[has1, 0] = cost[first[has1]]
    argbest[has1] = cols[first[has1]]
    has2 = last > first + 1
    best2[has2, 1] = cost[first[has2] + 1]
    return best2, argbest
