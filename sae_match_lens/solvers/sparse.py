"""Certified-optimal sparse matching for SAEs too wide for a dense cost matrix (16k-1M features).

The dense route (:mod:`sae_match_lens.matching`) holds the whole ``n_a × n_b`` cost matrix; at 65k
features that is 16 GiB, at 1M 4 TiB. This route never holds more than one block of rows:

1. **Screening pass** (:mod:`sae_match_lens.solvers.screen`): row blocks of a lower bound ``L ≤ C`` (the
   cost itself with ``screen_dims=None``, or a narrower product) are computed on ``device`` and
   reduced there to each row's ``k`` and each column's ``max(4, k // 4)`` cheapest entries, plus
   floors that bound every pruned edge of each row and column.
2. **Sparse solve.** Float64 costs of the candidate edges are computed (only those), the edges of
   one complete greedy pairing are added (a perfect matching then exists), and
   ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (LAPJVsp) solves the assignment
   restricted to them, by cost scaling (:func:`_staged_lapjvsp`: near-ties would otherwise start
   price wars of range/gap steps). Its output is checked (every edge exists, one-to-one, right
   size).
3. **Certificate** (:mod:`sae_match_lens.solvers.certificate`): dual prices from the residual graph;
   rows whose floors prove every pruned edge has a non-negative reduced cost need no further
   work; the rest are checked exactly, violating edges join the graph and the problem is
   re-solved (at most ``max_rounds`` repairs). ``gap`` bounds ``total − optimum``.

**Rigour.** Every cost the solver compares and every cost in the result is a float64 cost of the
stacked features from direct differences (:mod:`sae_match_lens.solvers.costs`); the screen and float32
rows are only filters with rigorous error bounds. "Certified" means what
:mod:`sae_match_lens.solvers.certificate` proves: no edge is known to violate the duals, and
``gap`` — an upper bound on ``total − optimum`` for the real-valued costs — is within the
written rounding tolerance (about ``1e-11 · n · max cost``). Known violations are always added and
re-solved while rounds remain (``max_rounds``); when they run out, ``certified`` is False and
``gap`` still bounds the distance to the optimum. :func:`~sae_match_lens.solvers.dense.certify_dense`
applies the same certificate and repairs to a dense float32 solution (lapjv, scipy).

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

from .certificate import (
    EdgeSet,
    Problem,
    dual_gap,
    duals,
    floor_pads,
    graph_worst,
    problem_errors,
    recheck,
    suspect_rows,
)
from .costs import (
    ExactScales,
    StackedFeatures,
    edge_costs,
    edge_error,
    exact_scales,
    ieee_products,
    listed_costs,
)
from .screen import (
    LOW_PRECISION,
    Precision,
    Screen,
    block_rows_for,
    coordinate_order,
    make_screen,
    screen_dims_auto,
    screen_pass,
)

__all__ = ["EdgeSet", "Precision", "SparseSolution", "build_problem", "margins", "matched_costs",
           "matched_errors", "pruned_pad", "solve_problem", "solve_sparse", "sparse_bytes"]

logger = logging.getLogger(__name__)


class SparseSolution(NamedTuple):
    """An assignment found on candidate edges, with its optimality certificate."""

    rows: np.ndarray
    """Source features that have a partner (int64, ascending)."""
    cols: np.ndarray
    """Their partners in the target (int64)."""
    cost: np.ndarray
    """Float64 cost of each pair (module doc of :mod:`sae_match_lens.solvers.costs`)."""
    margin: np.ndarray
    """Per source row [n_a]: a lower bound of (cheapest other partner − assigned cost), where a
    row is assigned when its pair costs less than ``max_cost``; for unassigned rows of
    (second cheapest − cheapest). Exact where the rival is a candidate edge, otherwise the row
    floor (the bound of every pruned edge) stands in for it."""
    certified: bool
    """True when no violation is known and ``gap`` is within rounding (see the module doc)."""
    gap: float
    """Upper bound on ``total − optimum`` for the float64 costs (inf when not bounded)."""
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


def build_problem(g: EdgeSet, max_cost: float | None) -> tuple[Problem, np.ndarray, np.ndarray]:
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


_TINY = float(np.finfo(np.float64).smallest_subnormal)


def _weights(cost: np.ndarray) -> np.ndarray:
    """Edge weights for LAPJVsp, which drops zero weights: exact zeros become the smallest
    subnormal (a shift by a constant would round every cost)."""
    return np.where(cost == 0.0, _TINY, cost)


def solve_problem(prob: Problem, extra_l: np.ndarray, extra_r: np.ndarray, n_a: int,
                   n_b: int, padded: bool) -> tuple[np.ndarray, np.ndarray]:
    """Optimal perfect matching of the square problem: ``match_right[l]`` and the cost of it."""
    n = prob.n_left
    if padded:  # unequal widths, no max_cost: solve the real rectangle, pad with block edges
        graph = sp.csr_matrix((_weights(prob.e_cost), (prob.e_left, prob.e_right)),
                              shape=(n_a, n_b))
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
        match_right = _staged_lapjvsp(n, left, right,
                                      np.concatenate([prob.e_cost, np.zeros(len(extra_l))]))
    return match_right, matched_costs(prob, match_right)


def _staged_lapjvsp(n: int, left: np.ndarray, right: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Optimal perfect matching of a square sparse problem with LAPJVsp, by cost scaling.

    LAPJVsp's augmenting row reduction is a price war: rows that must give way to a far edge
    bid their columns up by their best-to-second gap at a time, so near-ties (gaps ~1e-7) under
    a large cost range take range/gap steps (hours on a 180-row problem). So the problem is
    solved on costs rounded to a grid of 2⁻²⁰ and 2⁻⁴⁰ of the largest cost, then exactly, each
    stage on the reduced costs of the previous stage's duals: a stage's price wars are then
    bounded by the previous grid over its own."""
    scale = float(np.abs(cost).max(initial=0.0))
    red = cost.copy()
    for bits in (20, 40, None):
        if bits is None or scale == 0.0:
            w = red
        else:
            q = math.ldexp(1.0, math.frexp(scale)[1] - bits)
            w = np.round(red / q) * q
        graph = sp.csr_matrix((_weights(w), (left, right)), shape=(n, n))
        r_idx, c_idx = min_weight_full_bipartite_matching(graph)
        match_right = np.full(n, -1, dtype=np.int64)
        match_right[r_idx] = c_idx
        if bits is None or scale == 0.0:
            return match_right
        stage = Problem(n, left, right, w, np.empty(0, np.int64), np.empty(0, np.int64))
        du, dv = duals(stage, match_right, matched_costs(stage, match_right))
        red = red - du[left] - dv[right]
    return match_right


def matched_costs(prob: Problem, match_right: np.ndarray) -> np.ndarray:
    """Cost of every matched edge, looked up among the problem's edges (never trusted blindly)."""
    n = prob.n_left
    if (match_right < 0).any() or len(np.unique(match_right)) != n:
        raise RuntimeError("the sparse solver returned an assignment that is not one-to-one.")
    in_block = np.zeros(n, dtype=bool)
    in_block[prob.block_left] = True
    block_r = np.zeros(n, dtype=bool)
    block_r[prob.block_right] = True
    keys = prob.e_left.astype(np.int64) * n + prob.e_right
    order = np.argsort(keys)
    want = np.arange(n, dtype=np.int64) * n + match_right
    pos = np.searchsorted(keys[order], want).clip(max=max(0, len(keys) - 1))
    found = keys[order][pos] == want if len(keys) else np.zeros(n, dtype=bool)
    mcost = np.where(found, prob.e_cost[order][pos], 0.0) if len(keys) else np.zeros(n)
    bad = ~found & ~(in_block & block_r[match_right])
    if bad.any():
        raise RuntimeError(f"the sparse solver used {int(bad.sum())} edges that do not exist.")
    return mcost


def solve_sparse(
    a: StackedFeatures,
    b: StackedFeatures,
    *,
    k: int = 16,
    max_cost: float | None = None,
    certify: bool = True,
    max_rounds: int = 16,
    screen_dims: int | Literal["auto"] | None = "auto",
    precision: Precision = "float32",
    block_rows: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    label: str = "match",
) -> SparseSolution:
    """Exact assignment on top-``k`` candidate edges, with a certificate of global optimality.

    Args:
        a: stacked source features (:func:`~sae_match_lens.solvers.costs.stack_features`);
            a chain of SAEs stacks each SAE once and calls this per adjacent pair.
        b: stacked target features, likewise.
        k: candidates kept per row (columns keep ``max(4, k // 4)``).
        max_cost: pairs costing ≥ this are no better than leaving the row unmatched (dummy
            edges at ``max_cost / 2`` on each side; see the module doc).
        certify: recheck suspect rows exactly and repair until certified; ``False`` stops after
            one solve (``certified`` is still True when no row is suspect).
        max_rounds: repair rounds (re-solves with added edges) at most.
        screen_dims: coordinates used by the screening pass (``None``: all, exact float32
            screen; ``"auto"``: chosen by :func:`~sae_match_lens.solvers.screen.screen_dims_auto`).
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
    screens: dict[int, Screen] = {}  # the probe's screens: the chosen one is not built again
    if screen_dims == "auto":
        m = (screen_dims_auto(a, b, k, order=order, screens=screens, device=dev)
             if precision == "float32" else K)
    elif screen_dims is None:
        m = K
    else:
        m = min(int(screen_dims), K)
    stats["screen_dims"] = m
    stats["t_width"] = time.perf_counter() - t0
    screen = screens.pop(m, None)
    screens.clear()  # a screen of another width is freed before this one is built
    if screen is None:
        screen = make_screen(a, b, m, precision, dev, order=order)
    row_idx, col_idx, row_floor, col_floor = screen_pass(screen, n_a, n_b, k, block_rows,
                                                          progress, label)
    del screen
    stats["t_screen"] = time.perf_counter() - t0 - stats["t_width"]
    g = EdgeSet(n_a, n_b)
    scales = exact_scales(a, b)
    g.add(np.repeat(np.arange(n_a), row_idx.shape[1]), row_idx.numpy().ravel(),
          listed_costs(a, b, row_idx, dev, scales).numpy().ravel())
    # columns' candidates: most are already some row's candidate
    r_new, c_new = g.missing(col_idx.numpy().ravel(), np.repeat(np.arange(n_b), col_idx.shape[1]))
    g.add(r_new, c_new, edge_costs(a, b, r_new, c_new, dev, scales))
    if max_cost is None:
        pr, pc = _complete_pairing(g)
        r_new, c_new = g.missing(pr, pc)
        g.add(r_new, c_new, edge_costs(a, b, r_new, c_new, dev, scales))
    stats["t_candidates"] = time.perf_counter() - t0 - stats["t_screen"] - stats["t_width"]
    padded = max_cost is None and n_a != n_b
    rounds, n_known, unresolved = 0, 0, False
    for rounds in range(max_rounds + 1):
        t1 = time.perf_counter()
        prob, extra_l, extra_r = build_problem(g, max_cost)
        match_right, mcost = solve_problem(prob, extra_l, extra_r, n_a, n_b, padded)
        u, v = duals(prob, match_right, mcost)
        u_r, v_r = u[:n_a], v[:n_b]
        pad_a, pad_b = floor_pads(scales, u_r, v_r, row_floor, col_floor)
        suspects, count, col_order = suspect_rows(u_r + pad_a, v_r + pad_b, row_floor, col_floor)
        outside, n_known = np.zeros(n_a), 0
        stats.setdefault("suspects", []).append(len(suspects))
        stats.setdefault("t_solve", []).append(time.perf_counter() - t1)
        logger.info("%s: round %d, %d edges, %d suspect rows", label, rounds, len(g.keys),
                    len(suspects))
        if len(suspects) == 0:
            break
        if not certify:  # the suspects' pruned edges are bounded by their row floors only
            vmax = float((v_r + pad_b).max())
            outside[suspects] = np.minimum(0.0, row_floor[suspects] - u_r[suspects]
                                           - pad_a[suspects] - vmax)
            unresolved = True
            break
        t2 = time.perf_counter()
        add_r, add_c, add_w, outside, n_known = recheck(
            a, b, g, suspects, count, col_order, u_r, v_r, pad_a, pad_b, col_floor, row_floor,
            k, block_rows, dev, scales)
        stats.setdefault("t_recheck", []).append(time.perf_counter() - t2)
        if n_known == 0 or rounds == max_rounds:
            break
        g.add(add_r, add_c, add_w)  # known violations: always re-solve while rounds remain
    worst = graph_worst(prob, u, v, problem_errors(prob, scales, n_a, n_b))
    worst[:n_a] = np.minimum(worst[:n_a], outside)
    gap, tol = dual_gap(mcost, matched_errors(scales, match_right, mcost, n_a, n_b), u, v,
                        worst, scales.g64)
    certified = n_known == 0 and not unresolved and gap <= tol
    if n_known:
        logger.info("%s: %d known violations left after %d rounds (max_rounds)", label, n_known,
                    rounds)
    rows = np.flatnonzero(match_right[:n_a] < n_b)
    cols = match_right[rows]
    cost = g.cost[np.searchsorted(g.keys, rows.astype(np.int64) * n_b + cols)]
    floor = row_floor - pruned_pad(scales, row_floor)
    margin = margins(g.rows, g.cols, g.cost, floor, rows, cols, cost, max_cost)
    stats["t_total"] = time.perf_counter() - t0
    stats["edges"] = len(g.keys)
    return SparseSolution(rows, cols, cost, margin, bool(certified), float(gap), rounds, stats)


def matched_errors(scales: ExactScales, match_right: np.ndarray, mcost: np.ndarray, n_a: int,
                    n_b: int) -> np.ndarray:
    """Error bounds of the matched edges' costs (dummy and padding edges are exact)."""
    left = np.arange(len(match_right))
    real = (left < n_a) & (match_right < n_b)
    err = np.zeros(len(mcost))
    err[real] = edge_error(scales, left[real], match_right[real], mcost[real])
    return err


def pruned_pad(scales: ExactScales, row_floor: np.ndarray) -> np.ndarray:
    """What a row floor (a bound of ``c_i + c_j − 2x·y`` with the stored constants) must be
    lowered by to bound the float64-defined cost of every column (certificate doc, (c))."""
    g = scales.g64
    tail = float((g * (scales.norm_b ** 2 + np.abs(scales.offset_b))).max(initial=0.0))
    rf = np.where(np.isfinite(row_floor), np.abs(row_floor), 0.0)
    return g * (scales.norm_a ** 2 + np.abs(scales.offset_a) + rf) + tail


def margins(e_rows: np.ndarray, e_cols: np.ndarray, e_cost: np.ndarray, floor: np.ndarray,
             rows: np.ndarray, cols: np.ndarray, cost: np.ndarray,
             max_cost: float | None) -> np.ndarray:
    """Lower bounds of the margins [n_a] from edges with known float64 costs and, per row, a
    lower bound ``floor`` of every other edge. A pair is assigned when it costs less than
    ``max_cost``; assigned rows get ``min(cheapest other edge, floor) − cost``, the others
    ``max(0, min(second cheapest edge, floor) − cheapest edge)``."""
    n_a = len(floor)
    ok = cost < max_cost if max_cost is not None else np.ones(len(rows), dtype=bool)
    assigned = np.full(n_a, -1, dtype=np.int64)
    assigned[rows[ok]] = cols[ok]
    own = np.full(n_a, np.nan)
    own[rows[ok]] = cost[ok]
    order = np.lexsort((e_cost, e_rows))
    r, c, w = e_rows[order], e_cols[order], e_cost[order]

    def first_two(rr: np.ndarray, ww: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = np.searchsorted(rr, np.arange(n_a), side="left")
        hi = np.searchsorted(rr, np.arange(n_a), side="right")
        c1, c2 = np.full(n_a, np.inf), np.full(n_a, np.inf)
        c1[hi > lo] = ww[lo[hi > lo]]
        c2[hi > lo + 1] = ww[lo[hi > lo + 1] + 1]
        return c1, c2

    other = c != assigned[r]
    alt, _ = first_two(r[other], w[other])
    margin = np.minimum(alt, floor) - own
    c1, c2 = first_two(r, w)
    second = np.minimum(c2, floor)
    with np.errstate(invalid="ignore"):
        spread = np.where(np.isfinite(c1), np.maximum(0.0, second - c1), 0.0)
    return np.where(assigned >= 0, margin, spread)
