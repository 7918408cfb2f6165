"""The optimality certificate of an assignment, against the float64 costs of the features.

The cost certified is the real number ``C_ij`` of :mod:`sae_match_lens.solvers.costs` (``‖x_i − y_j‖²``
of the stacked folded parameters, plus float64 offsets that are 0 for ``mse``). Given an
assignment that is optimal on a graph ``G`` of edges whose float64 costs ``ĉ`` are known
(:mod:`sae_match_lens.solvers.sparse`; the dense route builds ``G`` from its float32 solution):

1. **Duals.** Prices ``(u, v)`` with reduced costs ``ĉ_ij − u_i − v_j ≥ 0`` on ``G`` and ``= 0``
   on matched edges come from shortest paths on the residual graph (Bellman–Ford, vectorised,
   from both sides and averaged, which keeps the prices central; float64; a node is relaxed
   again only when its distance drops by more than ``2⁻⁴⁰ (|d| + |w|)`` through an edge of
   weight ``w``, so rounding noise cannot keep it going).
2. **Every other edge.** An edge outside ``G`` is proven (``C_ij − u_i − v_j ≥ 0``) by a
   rigorous lower bound of ``C_ij``: a screening floor (:mod:`sae_match_lens.solvers.screen`) or a float32
   entry minus its error bound (:func:`~sae_match_lens.solvers.costs.float32_error`). Edges that no
   bound proves get their float64 cost from direct differences (:func:`check_rows`); those whose
   reduced cost is negative beyond rounding are *known violations*, and the caller re-solves with
   them in ``G`` — it never stops "within tolerance" while one is known.
3. **Gap** (:func:`dual_gap`). Lowering each ``u_i`` by the worst rigorous lower bound of its
   reduced costs makes the duals feasible for the real costs, so ``Σu' + Σv`` bounds the optimum
   from below, and ``gap = Σ(ĉ + err)_matched − (Σu' + Σv)`` bounds ``total − optimum``.

**Rounding analysis.** Let ``ε = 2⁻⁵³`` and ``g64 = 2(K + 6)ε`` (``K`` the stacked width).
(a) A float64 edge cost is within ``err = g64 (|ĉ| + 2|o_i| + 2|o_j|)`` of ``C``
(:func:`~sae_match_lens.solvers.costs.edge_error`). (b) A computed reduced cost ``fl(fl(ĉ − u) − v)`` is
within ``err + 3ε (|ĉ| + |u| + |v|)`` of ``C − u − v``, so that lower bound (``low``) is rigorous.
(c) Comparisons of floors with duals (:func:`floor_pads`) widen the duals by
``g64 (ν² + |o| + |u| + |floor|)`` per side: the floors bound ``c_i + c_j − 2x·y`` with the stored
constants, which differ from ``C`` by the float64 rounding of the norms, and the comparisons round.
(d) Sums are taken with ``math.fsum`` (correctly rounded) after one rounding per term, so
``gap`` gets ``4ε Σ|terms|``. With those, ``gap`` is an upper bound on ``total − optimum`` for the
real costs. ``certified`` means: no violation is known and ``gap ≤ tol`` with
``tol = n (4 g64 + 8 · 2⁻⁴⁰) S + 8ε Σ|terms|``, ``S`` the largest ``|ĉ|``, ``|u|`` or ``|v|`` —
what rounding and the shortest-path tolerance can leave over ``n`` nodes (about ``1e-11 · n S``
for ``K ≤ 10⁴``). A violation is *known* when ``ĉ − u − v < −(err + (3ε + 4·2⁻⁴⁰)(|ĉ| + |u| + |v|))``:
negative beyond rounding and beyond what the shortest-path tolerance may leave.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .costs import ExactScales, StackedFeatures, edge_costs, edge_error, exact_rows, float32_error

__all__ = ["SP_TOL", "EdgeCheck", "EdgeSet", "Problem", "check_rows", "dual_gap", "duals",
           "floor_pads", "graph_worst", "problem_errors", "recheck", "reduced", "suspect_rows"]

_EPS = 2.0**-53
SP_TOL = 2.0**-40
"""Relative tolerance of the shortest-path relaxation (see the module doc)."""


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

class Problem(NamedTuple):
    """The square problem the solver sees: left/right nodes, sparse edges, a zero-cost block."""

    n_left: int
    """Nodes on each side."""
    e_left: np.ndarray
    """Left end of each edge."""
    e_right: np.ndarray
    """Right end of each edge."""
    e_cost: np.ndarray
    """Cost of each edge (float64)."""
    block_left: np.ndarray
    """Left nodes of the complete zero-cost block (dummies), possibly empty."""
    block_right: np.ndarray
    """Right nodes of that block."""


class EdgeCheck(NamedTuple):
    """Edges outside the graph whose float64 costs a check computed."""

    rows: np.ndarray
    """Source rows."""
    cols: np.ndarray
    """Target columns."""
    cost: np.ndarray
    """Float64 costs (``min(ĉ, λ)`` on the dense route with ``max_cost``)."""
    red: np.ndarray
    """Computed reduced costs ``ĉ − u − v``."""
    known: np.ndarray
    """Known violations (negative beyond rounding)."""
    worst: np.ndarray
    """Per source row: ``min(0, lowest rigorous lower bound of a reduced cost)`` [n_a]."""


def _relax(n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Shortest distances from a virtual source joined to every node at 0 (vectorised
    Bellman–Ford on the nodes that changed). Raises on a negative cycle."""
    order = np.argsort(src, kind="stable")
    src, dst, w = src[order], dst[order], w[order]
    start = np.searchsorted(src, np.arange(n + 1))
    dist = np.zeros(n)
    active = np.arange(n)
    for _ in range(n + 1):
        counts = start[active + 1] - start[active]
        total = int(counts.sum())
        if total == 0:
            return dist
        base = np.repeat(start[active] - np.cumsum(counts) + counts, counts)
        e = base + np.arange(total)
        cand = dist[src[e]] + w[e]
        better = cand < dist[dst[e]]
        if not better.any():
            return dist
        e, cand = e[better], cand[better]
        d_old = dist[dst[e]]
        big = cand < d_old - SP_TOL * (np.abs(d_old) + np.abs(w[e]))  # beyond rounding noise
        new = dist.copy()
        np.minimum.at(new, dst[e], cand)
        changed = np.unique(dst[e][big])
        dist = new
        if len(changed) == 0:
            return dist
        active = changed
    raise RuntimeError("negative cycle in the residual graph: the sparse solver's assignment is "
                       "not optimal on its own edges.")


def duals(prob: Problem, match_right: np.ndarray, mcost: np.ndarray) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
    """Dual prices with zero reduced cost on matched edges and ≥ 0 on all others of ``prob``."""
    n = prob.n_left
    owner = np.empty(n, dtype=np.int64)
    owner[match_right] = np.arange(n)
    price_right = np.empty(n)
    price_right[match_right] = mcost  # cost of the matched edge at each right node
    src = owner[prob.e_right]
    keep = src != prob.e_left
    src, dst = src[keep], prob.e_left[keep]
    w = prob.e_cost[keep] - price_right[prob.e_right[keep]]
    if len(prob.block_left):  # the complete zero block, through hub node n
        hub_src = owner[prob.block_right]
        src = np.concatenate([src, hub_src, np.full(len(prob.block_left), n)])
        dst = np.concatenate([dst, np.full(len(hub_src), n), prob.block_left])
        w = np.concatenate([w, -price_right[prob.block_right], np.zeros(len(prob.block_left))])
    low = _relax(n + 1, src, dst, w)[:n]
    high = -_relax(n + 1, dst, src, w)[:n]
    u = 0.5 * (low + high)
    v = np.empty(n)
    v[match_right] = mcost - u
    return u, v


def reduced(cost: np.ndarray, err: np.ndarray, u: np.ndarray,
            v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Computed reduced costs of edges, their rigorous lower bounds, and which are known
    violations (module doc, (b))."""
    red = cost - u - v
    size = np.abs(cost) + np.abs(u) + np.abs(v)
    slack = err + 3 * _EPS * size
    return red, red - slack, red < -(slack + 4 * SP_TOL * size)


def problem_errors(prob: Problem, scales: ExactScales, n_a: int, n_b: int) -> np.ndarray:
    """Error bound of every edge cost of ``prob``: real edges (left < n_a, right < n_b) by
    :func:`~sae_match_lens.solvers.costs.edge_error`, dummies (exact ``λ/2`` or 0) none."""
    real = (prob.e_left < n_a) & (prob.e_right < n_b)
    err = np.zeros(len(prob.e_cost))
    err[real] = edge_error(scales, prob.e_left[real], prob.e_right[real], prob.e_cost[real])
    return err


def graph_worst(prob: Problem, u: np.ndarray, v: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Per left node: ``min(0, lowest rigorous lower bound of a reduced cost)`` over the edges of
    ``prob`` and its zero block."""
    _, low, _ = reduced(prob.e_cost, err, u[prob.e_left], v[prob.e_right])
    worst = np.zeros(prob.n_left)
    np.minimum.at(worst, prob.e_left, low)
    if len(prob.block_left):
        vmax = float(v[prob.block_right].max())
        ub = u[prob.block_left]
        red = -ub - vmax
        low = red - 3 * _EPS * (np.abs(ub) + abs(vmax))
        worst[prob.block_left] = np.minimum(worst[prob.block_left], low)
    return worst


def floor_pads(scales: ExactScales, u: np.ndarray, v: np.ndarray, row_floor: np.ndarray,
               col_floor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Amounts to add to the real rows' and columns' duals before comparing them with floors
    (module doc, (c)): then ``floor − (u + pad_a) − (v + pad_b) ≥ 0`` proves ``C − u − v ≥ 0``."""
    g = scales.g64
    rf = np.where(np.isfinite(row_floor), np.abs(row_floor), 0.0)
    cf = np.where(np.isfinite(col_floor), np.abs(col_floor), 0.0)
    pad_a = g * (scales.norm_a ** 2 + np.abs(scales.offset_a) + np.abs(u) + rf)
    pad_b = g * (scales.norm_b ** 2 + np.abs(scales.offset_b) + np.abs(v) + cf)
    return pad_a, pad_b


def suspect_rows(u: np.ndarray, v: np.ndarray, row_floor: np.ndarray,
                  col_floor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows that may hold a pruned edge with negative reduced cost, and for each the number of
    columns to check (those with ``v_j > row_floor_i − u_i``, by decreasing ``v``). Pass duals
    widened by :func:`floor_pads`."""
    alpha = row_floor - u
    beta = col_floor - v
    order = np.argsort(-v, kind="stable")
    v_sorted = -v[order]
    prefix_min_beta = np.minimum.accumulate(beta[order])
    count = np.searchsorted(v_sorted, -alpha, side="left")  # columns with v_j > alpha_i
    has = count > 0
    flagged = np.zeros(len(u), dtype=bool)
    flagged[has] = prefix_min_beta[count[has] - 1] < u[has]
    return np.flatnonzero(flagged), count, order


def dual_gap(mcost: np.ndarray, merr: np.ndarray, u: np.ndarray, v: np.ndarray,
             worst: np.ndarray, g64: float) -> tuple[float, float]:
    """``(gap, tol)`` of module doc (3) and (d): ``gap`` bounds ``total − optimum`` for the real
    costs when ``worst`` (per left node, ≤ 0) bounds every reduced cost of its row from below."""
    primal_terms = mcost + merr
    dual_terms = u + worst
    primal = math.fsum(primal_terms.tolist())
    dual = math.fsum(dual_terms.tolist()) + math.fsum(v.tolist())
    mag = float(np.abs(primal_terms).sum() + np.abs(dual_terms).sum() + np.abs(v).sum())
    gap = max(0.0, primal - dual) + 4 * _EPS * mag
    scale = max(float(np.abs(mcost).max(initial=0.0)), float(np.abs(u).max(initial=0.0)),
                float(np.abs(v).max(initial=0.0)))
    tol = len(u) * (4 * g64 + 8 * SP_TOL) * scale + 8 * _EPS * mag
    return gap, tol


def check_rows(C_RN: torch.Tensor, rows: np.ndarray, a: StackedFeatures, b: StackedFeatures,
               scales: ExactScales, u: np.ndarray, v: np.ndarray, pad_a: np.ndarray,
               pad_b: np.ndarray, present: np.ndarray, dev: torch.device,
               max_cost: float | None = None) -> tuple[EdgeCheck, np.ndarray]:
    """Check every entry of float32 cost rows ``C_RN`` (rows ``rows`` of the real block) against
    real-node duals ``u`` [n_a], ``v`` [n_b].

    An entry is proven when its rigorous lower bound ``C32 − err32`` (``min(·, λ)`` with
    ``max_cost``) minus the widened duals is ≥ 0; the others (not in ``present``, the boolean mask
    of graph edges among these entries) get float64 costs. With ``max_cost`` the rows are in the
    encoding of :func:`~sae_match_lens.solvers.dense.encode_max_cost`: entries at ``λ32`` cost
    exactly ``λ`` (no recompute).
    Returns the computed edges and, per row, the lowest lower bound of the entries left unproven
    by nothing but their bound (``C32 − err32``; the new floor of the row's pruned edges)."""
    R, n_b = C_RN.shape
    # the big elementwise passes in torch (all threads; each op rounds once, as numpy's would)
    C = C_RN.to(torch.float64)
    err = torch.from_numpy(float32_error(scales, rows))
    sure = np.zeros_like(present)
    if max_cost is not None:
        lam32 = np.float32(max_cost)
        sure = C_RN.numpy() == lam32
        band = C_RN.numpy() == np.nextafter(lam32, np.float32(np.inf))
        C[torch.from_numpy(band)] = float(lam32)
    low32_t = C.sub_(err)
    if max_cost is not None:
        low32_t.clamp_(max=float(max_cost))
    slack = torch.sub(low32_t, torch.from_numpy(u[rows] + pad_a[rows])[:, None], out=err)
    slack -= torch.from_numpy(v + pad_b)[None, :]
    suspect_t = slack < 0
    suspect_t &= ~torch.from_numpy(present | sure)
    suspect = suspect_t.numpy()
    low32 = low32_t.numpy()
    rr, cc = np.nonzero(suspect)
    cost = edge_costs(a, b, rows[rr], cc, dev, scales)
    if max_cost is not None:
        np.minimum(cost, float(max_cost), out=cost)
        sr, sc = np.nonzero(sure & ~present)
        red_s = float(max_cost) - u[rows[sr]] - v[sc]
        neg = red_s - 3 * _EPS * (abs(max_cost) + np.abs(u[rows[sr]]) + np.abs(v[sc])) < 0
        rr, cc = np.concatenate([rr, sr[neg]]), np.concatenate([cc, sc[neg]])
        cost = np.concatenate([cost, np.full(int(neg.sum()), float(max_cost))])
    er = rows[rr]
    e = edge_error(scales, er, cc, cost)
    red, low, known = reduced(cost, e, u[er], v[cc])
    worst = np.zeros(len(u))
    np.minimum.at(worst, er, low)
    low32_t.masked_fill_(suspect_t | torch.from_numpy(present), math.inf)
    if max_cost is not None:
        low32[sure] = float(max_cost)
    floor = low32_t.amin(dim=1).numpy() if n_b else np.full(R, np.inf)
    return EdgeCheck(er, cc, cost, red, known, worst), floor


def recheck(a: StackedFeatures, b: StackedFeatures, g: EdgeSet, suspects: np.ndarray,
            count: np.ndarray, order: np.ndarray, u: np.ndarray, v: np.ndarray,
            pad_a: np.ndarray, pad_b: np.ndarray, col_floor: np.ndarray,
            row_floor: np.ndarray, k: int, block_rows: int, dev: torch.device,
            scales: ExactScales) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Float64 reduced costs of the suspect rows' pruned edges (real-node duals ``u``, ``v``).

    Returns the known violations to add (the ``k`` worst per row: rows, cols, costs), per row
    ``min(0, lowest rigorous lower bound of a rechecked reduced cost)`` [n_a], and how many known
    violations there are. Rows with few suspect columns have just those edges computed; others
    get their whole row in float32, checked by :func:`check_rows`, and their ``row_floor`` is
    raised to the lowest lower bound of the edges still pruned."""
    n_b = g.n_b
    few = count[suspects] <= max(64, n_b // 32)
    worst = np.zeros(len(u))
    add_r, add_c, add_w = [], [], []
    n_known = 0

    def collect(chk: EdgeCheck) -> np.ndarray:
        """Take the ``k`` worst known violations of each row; returns the mask of those taken."""
        nonlocal n_known
        np.minimum(worst, chk.worst, out=worst)
        n_known += int(chk.known.sum())
        cand = np.flatnonzero(chk.known)
        o = cand[np.lexsort((chk.red[cand], chk.rows[cand]))]
        rr = chk.rows[o]
        rank = np.arange(len(o)) - np.searchsorted(rr, rr, side="left")
        taken = o[rank < k]
        add_r.append(chk.rows[taken]), add_c.append(chk.cols[taken]), add_w.append(chk.cost[taken])
        mask = np.zeros(len(chk.rows), dtype=bool)
        mask[taken] = True
        return mask

    sr = suspects[few]
    if len(sr):
        cnt = count[sr]
        rr = np.repeat(sr, cnt)
        pos = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        cc = order[pos]
        keep = col_floor[cc] - (v[cc] + pad_b[cc]) < u[rr] + pad_a[rr]
        rr, cc = g.missing(rr[keep], cc[keep])
        w = edge_costs(a, b, rr, cc, dev, scales)
        red, low, known = reduced(w, edge_error(scales, rr, cc, w), u[rr], v[cc])
        row_worst = np.zeros(len(u))
        np.minimum.at(row_worst, rr, low)
        collect(EdgeCheck(rr, cc, w, red, known, row_worst))  # the rest stay under old floors
    full = suspects[~few]
    chunk = max(1, min(block_rows, (1 << 26) // (8 * n_b)))  # float64 rows: ≤ 64 MiB a chunk
    for s0 in range(0, len(full), chunk):
        idx = np.sort(full[s0:s0 + chunk])
        C32 = exact_rows(a, b, torch.from_numpy(idx), block_rows=chunk, device=dev)
        present = np.zeros(C32.shape, dtype=bool)
        gk = g.keys
        lo = np.searchsorted(gk, idx.astype(np.int64) * n_b)
        hi = np.searchsorted(gk, (idx.astype(np.int64) + 1) * n_b)
        for t in range(len(idx)):
            present[t, gk[lo[t]:hi[t]] % n_b] = True
        chk, floor = check_rows(C32, idx, a, b, scales, u, v, pad_a, pad_b, present, dev)
        taken = collect(chk)
        # computed edges that are not added stay pruned: the new floor covers their bounds
        rest = ~taken
        low = chk.cost[rest] - edge_error(scales, chk.rows[rest], chk.cols[rest], chk.cost[rest])
        np.minimum.at(floor, np.searchsorted(idx, chk.rows[rest]), low)
        row_floor[idx] = floor
    cat = np.concatenate
    return (cat(add_r) if add_r else np.empty(0, np.int64),
            cat(add_c) if add_c else np.empty(0, np.int64),
            cat(add_w) if add_w else np.empty(0), worst, n_known)
