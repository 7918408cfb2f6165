"""The float64 certificate of a dense float32 solution (lapjv, scipy), with repairs.

The dense route (:mod:`sae_match_lens.matching`) holds the ``n_a × n_b`` float32 cost matrix
and lets lapjv or scipy *find* an assignment on it. Float32 cannot separate alternatives whose
costs differ below its rounding (about ``K · 2⁻²⁴`` of the squared norms), so that assignment
is only a start. :func:`certify_dense` proves or repairs it against the float64 costs
(:mod:`sae_match_lens.solvers.costs`), with the machinery of the sparse route:

1. ``G`` holds the float32 solution's pairs with float64 costs (scipy: also each row's ``t``
   cheapest float32 entries). Round 0 takes lapjv's column prices (row prices recomputed from
   the float64 costs of the pairs); later rounds solve exactly on ``G`` (LAPJVsp, float64) and
   take shortest-path duals (:mod:`sae_match_lens.solvers.certificate`).
2. One pass over the float32 matrix proves every entry whose float32 value minus its rigorous
   error bound has a non-negative reduced cost; the rest get float64 costs from direct
   differences (usually a few per row: the near-ties). Those join ``G``; if any is a known
   violation (or lapjv's prices leave a gap above rounding), ``G`` is re-solved, at most
   ``max_rounds`` times. So a near-tie float32 got wrong is found and fixed, never certified.

The problem is the dense route's: a full (rectangular, zero-padded) assignment on
``min(C, λ)`` with ``max_cost=λ``. For that, :func:`encode_max_cost` clamps the float32 matrix so
that the pass can tell entries proven ``≥ λ`` (clamped cost exactly ``λ``) from the others.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch

from .certificate import (
    EdgeCheck,
    EdgeSet,
    check_rows,
    dual_gap,
    duals,
    floor_pads,
    graph_worst,
    problem_errors,
)
from .costs import ExactScales, StackedFeatures, edge_costs, float32_error, float32_error_max
from .sparse import (
    build_problem,
    margins,
    matched_costs,
    matched_errors,
    solve_problem,
)

__all__ = ["DenseCertificate", "certify_dense", "encode_max_cost", "square_assignment"]

logger = logging.getLogger(__name__)


class DenseCertificate(NamedTuple):
    """A dense route's assignment after its float64 certificate (and repairs)."""

    rows: np.ndarray
    """Source features paired with a real target feature (int64, ascending)."""
    cols: np.ndarray
    """Their partners."""
    cost: np.ndarray
    """Float64 cost of each pair (not clamped at ``max_cost``)."""
    margin: np.ndarray
    """Lower bounds of the margins [n_a] (:func:`~sae_match_lens.solvers.sparse.margins`)."""
    certified: bool
    """No violation known and the gap within rounding (:mod:`sae_match_lens.solvers.certificate`)."""
    gap: float
    """Upper bound on ``total − optimum`` for the float64 costs."""
    rounds: int
    """Repair rounds used (0: the float32 solution was certified as it was)."""


def square_assignment(rows: np.ndarray, cols: np.ndarray, n_a: int, n_b: int) -> np.ndarray:
    """A rectangular assignment as the zero-padded square one: ``match_right[l]`` for ``l < n``
    (padding rows take the unused columns; unmatched rows the padding columns)."""
    n = max(n_a, n_b)
    match_right = np.full(n, -1, dtype=np.int64)
    match_right[rows] = cols
    free_cols = np.setdiff1d(np.arange(n), match_right[match_right >= 0])
    match_right[match_right < 0] = free_cols
    return match_right


def encode_max_cost(C_RN: torch.Tensor, max_cost: float, scales: ExactScales,
                    block_rows: int = 1024) -> None:
    """Clamp the float32 real block ``C_RN`` [n_a, n_b] at ``λ = max_cost`` in place, in the
    encoding :func:`~sae_match_lens.solvers.certificate.check_rows` reads: entries whose float32 value
    minus its largest error bound is ≥ λ (so ``min(C, λ) = λ`` exactly) become ``fl32(λ)``; the
    other entries ≥ ``fl32(λ)`` become the next float32 above it (``min(C, λ)`` is then in
    ``[fl32(λ) − err, λ]``); the rest stay as they are."""
    lam32 = np.float32(max_cost)
    band = float(np.nextafter(lam32, np.float32(np.inf)))
    e_max = float(float32_error_max(scales, np.arange(C_RN.shape[0])).max(initial=0.0))
    thr = np.float32(max_cost + e_max)
    if float(thr) < max_cost + e_max:
        thr = np.nextafter(thr, np.float32(np.inf))
    for r0 in range(0, C_RN.shape[0], block_rows):
        x = C_RN[r0:r0 + block_rows]
        sure = x >= float(thr)
        x[(x >= float(lam32)) & ~sure] = band
        x[sure] = float(lam32)


def certify_dense(C: torch.Tensor, a: StackedFeatures, b: StackedFeatures,
                  match_right: np.ndarray, v_init: np.ndarray | None, *, scales: ExactScales,
                  max_cost: float | None, max_rounds: int, dev: torch.device,
                  top_idx: torch.Tensor, label: str = "match") -> DenseCertificate:
    """Certify (or repair, then certify) a dense float32 solution against float64 costs.

    Args:
        C: the float32 matrix the solver saw (its real block ``C[:n_a, :n_b]`` is read; with
            ``max_cost`` it must be in the :func:`encode_max_cost` encoding).
        a: the stacked features it was computed from.
        b: the stacked features it was computed from.
        match_right: the solver's square (zero-padded) assignment (:func:`square_assignment`).
        v_init: the solver's column prices [n] (lapjv), or ``None`` (scipy: no prices).
        scales: :func:`~sae_match_lens.solvers.costs.exact_scales` of ``a`` and ``b``.
        max_cost: the clamp ``λ`` of the problem, or ``None``.
        max_rounds: re-solves on float64 costs at most.
        dev: where float64 costs are computed.
        top_idx: each row's ``t`` cheapest float32 columns before clamping [n_a, t].
        label: name used in logs.
    """
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    padded = n_a != n_b
    lam = None if max_cost is None else float(max_cost)
    top_r = np.repeat(np.arange(n_a), top_idx.shape[1])
    top_c = top_idx.numpy().ravel()
    top_w = edge_costs(a, b, top_r, top_c, dev, scales)

    def clamped(w: np.ndarray) -> np.ndarray:
        return w if lam is None else np.minimum(w, lam)

    g = EdgeSet(n_a, n_b)
    pr = np.flatnonzero(match_right[:n_a] < n_b)
    pc = match_right[pr]
    g.add(pr, pc, clamped(edge_costs(a, b, pr, pc, dev, scales)))
    g.add(top_r, top_c, clamped(top_w))  # each row's cheapest columns: a repair round solved
    # on G alone then has prices for every column a row is likely to want (with the assignment
    # alone, one round's duals violated ~20% of a 2048² matrix on unrelated SAEs)
    empty = np.empty(0, dtype=np.int64)
    rounds, n_known = 0, 0
    for rounds in range(max_rounds + 1):
        prob = build_problem(g, None)[0]
        given = rounds == 0 and v_init is not None
        if given:  # the solver's prices, made exact on its own pairs
            mcost = matched_costs(prob, match_right)
            v = np.asarray(v_init, dtype=np.float64).copy()
            u = mcost - v[match_right]
        else:
            match_right, mcost = solve_problem(prob, empty, empty, n_a, n_b, padded)
            u, v = duals(prob, match_right, mcost)
        chk = _check_matrix(C, a, b, scales, u[:n_a], v[:n_b], g, dev, max_cost)
        n_known = int(chk.known.sum())
        worst = graph_worst(prob, u, v, problem_errors(prob, scales, n_a, n_b))
        worst[:n_a] = np.minimum(worst[:n_a], chk.worst)
        gap, tol = dual_gap(mcost, matched_errors(scales, match_right, mcost, n_a, n_b), u, v,
                            worst, scales.g64)
        logger.info("%s: float64 certificate round %d, %d edges, %d rechecked, %d violations, "
                    "gap %.3g", label, rounds, len(g.keys), len(chk.rows), n_known, gap)
        if (n_known == 0 and (gap <= tol or not given)) or rounds == max_rounds:
            break
        g.add(chk.rows, chk.cols, chk.cost)  # the near-ties, with their float64 costs
    rows = np.flatnonzero(match_right[:n_a] < n_b)
    cols = match_right[rows]
    cost = edge_costs(a, b, rows, cols, dev, scales)
    margin = _margins(C, a, b, scales, top_r, top_c, top_w, rows, cols, cost, dev, max_cost)
    return DenseCertificate(rows, cols, cost, margin, n_known == 0 and gap <= tol, gap, rounds)


def _margins(C: torch.Tensor, a: StackedFeatures, b: StackedFeatures, scales: ExactScales,
             top_r: np.ndarray, top_c: np.ndarray, top_w: np.ndarray, rows: np.ndarray,
             cols: np.ndarray, cost: np.ndarray, dev: torch.device,
             max_cost: float | None) -> np.ndarray:
    """Margins from float64 costs: each row's cheapest float32 entries, plus every entry whose
    float32 lower bound is below the rival they give (the cheapest other one; unassigned rows:
    the second cheapest); the lowest bound of the entries left out is the floor."""
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    ok = cost < max_cost if max_cost is not None else np.ones(len(rows), dtype=bool)
    assigned = np.full(n_a, -1, dtype=np.int64)
    assigned[rows[ok]] = cols[ok]
    order = np.lexsort((top_w, top_r))
    r, c, w = top_r[order], top_c[order], top_w[order]
    other = c != assigned[r]
    lo = np.searchsorted(r[other], np.arange(n_a))
    hi = np.searchsorted(r[other], np.arange(n_a), side="right")
    thr = np.full(n_a, np.inf)
    thr[hi > lo] = w[other][lo[hi > lo]]  # assigned rows: the cheapest other listed entry
    un = assigned < 0
    lo = np.searchsorted(r, np.arange(n_a))
    hi = np.searchsorted(r, np.arange(n_a), side="right")
    two = un & (hi > lo + 1)
    thr[two] = w[lo[two] + 1]  # unassigned rows: the second cheapest listed entry
    e_r, e_c, e_w = [top_r], [top_c], [top_w]
    floor = np.full(n_a, np.inf)
    band = (None if max_cost is None
            else float(np.nextafter(np.float32(max_cost), np.float32(np.inf))))
    chunk = max(1, (1 << 25) // (8 * max(1, n_b)))
    for r0 in range(0, n_a, chunk):
        idx = np.arange(r0, min(n_a, r0 + chunk))
        C32 = C[r0:r0 + len(idx), :n_b].numpy().astype(np.float64)
        if band is not None:
            C32[np.equal(C32, band)] = float(np.float32(max_cost))  # band: ≥ fl32(λ)
        low = C32 - float32_error(scales, idx)
        listed = np.zeros(low.shape, dtype=bool)
        sel = (top_r >= r0) & (top_r < r0 + len(idx))
        listed[top_r[sel] - r0, top_c[sel]] = True
        mine = assigned[idx] >= 0
        listed[np.flatnonzero(mine), assigned[idx][mine]] = True
        rival = (low < thr[idx][:, None]) & ~listed
        rr, cc = np.nonzero(rival)
        e_r.append(idx[rr]), e_c.append(cc), e_w.append(edge_costs(a, b, idx[rr], cc, dev, scales))
        low[listed | rival] = np.inf
        floor[idx] = low.min(axis=1) if n_b else np.inf
    cat = np.concatenate
    return margins(cat(e_r), cat(e_c), cat(e_w), floor, rows, cols, cost, max_cost)


def _check_matrix(C: torch.Tensor, a: StackedFeatures, b: StackedFeatures, scales: ExactScales,
                  u: np.ndarray, v: np.ndarray, g: EdgeSet, dev: torch.device,
                  max_cost: float | None) -> EdgeCheck:
    """:func:`~sae_match_lens.solvers.certificate.check_rows` over the whole real block, by chunks."""
    n_a, n_b = len(u), len(v)
    inf_a, inf_b = np.full(n_a, np.inf), np.full(n_b, np.inf)
    pad_a, pad_b = floor_pads(scales, u, v, inf_a, inf_b)
    chunk = max(1, (1 << 25) // (8 * max(1, n_b)))  # float64 temporaries of ≤ 32 MiB
    parts: list[EdgeCheck] = []
    worst = np.zeros(n_a)
    gk = g.keys
    for r0 in range(0, n_a, chunk):
        idx = np.arange(r0, min(n_a, r0 + chunk))
        present = np.zeros((len(idx), n_b), dtype=bool)
        lo = np.searchsorted(gk, idx.astype(np.int64) * n_b)
        hi = np.searchsorted(gk, (idx.astype(np.int64) + 1) * n_b)
        for t in range(len(idx)):
            present[t, gk[lo[t]:hi[t]] % n_b] = True
        chk, _ = check_rows(C[r0:r0 + len(idx), :n_b], idx, a, b, scales, u, v, pad_a, pad_b,
                            present, dev, max_cost)
        np.minimum(worst, chk.worst, out=worst)
        parts.append(chk)
    cat = np.concatenate
    return EdgeCheck(*(cat([getattr(p, f) for p in parts]) for f in EdgeCheck._fields[:5]),
                     worst)
