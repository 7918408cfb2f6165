"""The optimality certificate of an assignment found on candidate edges only.

Given an optimal matching of the candidate graph (:mod:`sae_match_lens.sparse`):

1. **Duals.** Prices ``(u, v)`` with reduced costs ``r_ij = C_ij − u_i − v_j ≥ 0`` on every
   candidate edge and ``= 0`` on matched edges come from shortest paths on the residual graph
   (Bellman–Ford, vectorised, from both sides and averaged, which keeps the prices central).
   Then ``Σu + Σv`` equals the matching's cost.
2. **Certificate.** If every *pruned* edge also has ``r_ij ≥ 0`` the duals are feasible for the
   full problem, so ``Σu + Σv`` bounds every assignment from below: the matching is optimal.
   With the screening floors (:mod:`sae_match_lens.screen`), a pruned edge can violate only if
   ``v_j > row_floor_i − u_i`` *and* ``u_i > col_floor_j − v_j``; rows with no such column are
   proven without touching the matrix again (a sort and a binary search). The remaining rows are
   checked exactly (their suspect edges, or their whole row), and the violating edges are
   returned for the next solve.
3. **Gap.** ``gap = Σ_i max(0, −min_j r_ij)``: lowering each ``u_i`` by its worst violation makes
   the duals feasible, so ``gap`` bounds ``total − optimum``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .costs import StackedFeatures, edge_costs, exact_rows

if TYPE_CHECKING:
    from .sparse import EdgeSet

__all__ = ["Problem", "duals", "graph_violation", "recheck", "suspect_rows"]


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
        new = dist.copy()
        np.minimum.at(new, dst[e], cand)
        tol = 1e-12 * (1.0 + np.abs(dist))
        changed = np.flatnonzero(new < dist - tol)
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


def suspect_rows(u: np.ndarray, v: np.ndarray, row_floor: np.ndarray,
                  col_floor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows that may hold a pruned edge with negative reduced cost, and for each the number of
    columns to check (those with ``v_j > row_floor_i − u_i``, by decreasing ``v``)."""
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


def graph_violation(prob: Problem, u: np.ndarray, v: np.ndarray) -> float:
    """Sum over left nodes of the worst negative reduced cost among the problem's own edges."""
    red = prob.e_cost - u[prob.e_left] - v[prob.e_right]
    worst = np.zeros(prob.n_left)
    np.minimum.at(worst, prob.e_left, red)
    total = float(-worst.sum())
    if len(prob.block_left):
        total += max(0.0, float(u[prob.block_left].max() + v[prob.block_right].max())) * len(
            prob.block_left)
    return max(0.0, total)


def recheck(a: StackedFeatures, b: StackedFeatures, g: EdgeSet, suspects: np.ndarray,
             count: np.ndarray, order: np.ndarray, u: np.ndarray, v: np.ndarray,
             col_floor: np.ndarray, row_floor: np.ndarray, k: int, block_rows: int,
             dev: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Exact reduced costs of the suspect rows' pruned edges; returns violating edges (the
    ``k`` worst per row), and ``Σ_i max(0, −min_j r_ij)`` over the suspects. Rows with few
    suspect columns have just those edges computed; others get their whole row, and their
    ``row_floor`` is raised to the cheapest edge still pruned."""
    n_b = g.n_b
    few = count[suspects] <= max(64, n_b // 32)
    add_r, add_c, add_w = [], [], []
    neg = 0.0
    sr = suspects[few]
    if len(sr):
        cnt = count[sr]
        rr = np.repeat(sr, cnt)
        pos = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        cc = order[pos]
        keep = col_floor[cc] - v[cc] < u[rr]
        rr, cc = g.missing(rr[keep], cc[keep])
        w = edge_costs(a, b, rr, cc, dev)
        red = w - u[rr] - v[cc]
        bad = red < 0
        worst = np.zeros(len(u))
        np.minimum.at(worst, rr[bad], red[bad])
        neg += float(-worst.sum())
        rr, cc, w, red = rr[bad], cc[bad], w[bad], red[bad]
        o = np.lexsort((red, rr))
        rr, cc, w = rr[o], cc[o], w[o]
        rank = np.arange(len(rr)) - np.searchsorted(rr, rr, side="left")
        sel = rank < k
        add_r.append(rr[sel]), add_c.append(cc[sel]), add_w.append(w[sel])
    full = suspects[~few]
    chunk = max(1, min(block_rows, (1 << 28) // (8 * n_b)))  # float64 rows: ≤ 256 MiB a chunk
    for s0 in range(0, len(full), chunk):
        idx = full[s0:s0 + chunk]
        C = exact_rows(a, b, torch.from_numpy(idx), block_rows=chunk, device=dev).double()
        red = C - torch.from_numpy(u[idx])[:, None] - torch.from_numpy(v)[None, :]
        red_np = red.numpy()
        gk = g.keys
        lo = np.searchsorted(gk, idx.astype(np.int64) * n_b)
        hi = np.searchsorted(gk, (idx.astype(np.int64) + 1) * n_b)
        present = np.zeros_like(red_np, dtype=bool)
        for t in range(len(idx)):
            present[t, gk[lo[t]:hi[t]] % n_b] = True
        red_np[present] = np.inf
        worst = np.minimum(red_np.min(axis=1), 0.0)
        neg += float(-worst.sum())
        kk = min(k, n_b)
        vals, cols = torch.topk(torch.from_numpy(red_np), kk, dim=1, largest=False)
        vals_np, cols_np = vals.numpy(), cols.numpy()
        ok = vals_np < 0
        rr = np.repeat(idx, kk).reshape(len(idx), kk)[ok]
        cc = cols_np[ok]
        add_r.append(rr), add_c.append(cc), add_w.append(C.numpy()[np.nonzero(ok)[0], cc])
        Cp = C.numpy()
        Cp[present] = np.inf
        Cp[np.nonzero(ok)[0], cc] = np.inf
        row_floor[idx] = Cp.min(axis=1)
    cat = np.concatenate
    return (cat(add_r) if add_r else np.empty(0, np.int64),
            cat(add_c) if add_c else np.empty(0, np.int64),
            cat(add_w) if add_w else np.empty(0), neg)
