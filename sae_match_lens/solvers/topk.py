"""Exact top-k of separable scores with a gap, for many-to-one links
(:func:`~sae_match_lens.flow.linking.links`): for each row ``i`` of ``a``, the ``k`` largest

    s_ij = α·a_i·b_j − p_i − q_j − |g_i − h_j|

over the rows ``j`` of ``b`` (:class:`TopKProblem`), by the route :func:`solve_topk` is asked
for.

Both routes return each row's top-k, best first, equal scores by lower index.

* ``method="exact"``: every score of every pair, block by block (float32 products), each row's
  top-k of those float32 scores kept (pairs within float32 rounding of each other may come in
  either order).
* ``method="screened"`` (``"auto"`` takes it for large problems when a sampled estimate says it
  pays, :func:`~sae_match_lens.solvers.screen.row_screen_dims_auto`): a screen of width ``m``
  (:mod:`sae_match_lens.solvers.screen`) bounds every pair's score from above using ``m``
  coordinates and the norms of the rest, rigorously under float32 rounding. One pass keeps each
  row's ``keep`` best bounds (``links(candidates=)``) and a floor below the bound of every other
  column (:func:`~sae_match_lens.solvers.screen.screen_rows`). The
  candidates are scored from float32 dot products with a rigorous error bound; a row whose order
  is within that bound (near or exact ties) is rescored in float64. A row is *certified* when
  its proven k-th score beats its floor. A row that is not is *rechecked*: a second pass over
  its row of the screen lists every column whose bound reaches its proven k-th score (the true
  top-k are among them), scored the same way; a row with more than
  ``n_b / LISTED_PAIR_COST`` such columns is *recomputed* in full instead (an exact row). The
  top-k of certified and rechecked rows are proven to be the top-k of the real scores.
  The screened route reports the width and how many rows took each path, with times.

Paired blocks: for scores over two equally wide blocks (decoder and encoder vectors) the screen
works in the basis ``(u + v, u − v)`` (:class:`_Paired`), where a feature whose two vectors
point alike keeps little energy outside the first block.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from ..progress import progress_bar
from .costs import StackedFeatures, matmul_nt
from .screen import (
    LISTED_PAIR_COST,
    coordinate_order,
    make_screen,
    round_up_f32,
    row_screen_dims_auto,
    screen_rows,
    screen_rows_below,
)

__all__ = ["PAIR_ALLOWANCE", "SCREEN_FROM_N", "Method", "TopKProblem", "exact_topk",
           "score_blocks", "solve_topk"]

logger = logging.getLogger(__name__)

Method = Literal["auto", "exact", "screened"]
SCREEN_FROM_N = 4096
"""``method="auto"`` considers screening from this many features on both sides (and score
vectors at least 512 wide); below it the exact pass is cheap."""

_CHUNK = 4096
"""Rows whose norms are taken at a time (bounds the temporaries)."""


class TopKProblem(NamedTuple):
    """A top-k problem: for each row ``i`` of ``a``, the ``k`` largest scores
    ``s_ij = α·a_i·b_j − p_i − q_j − |g_i − h_j|`` over the rows ``j`` of ``b`` (float32 operands
    on one device; an absent term is ``None``; ``α`` is 1 or 2)."""

    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    p: torch.Tensor | None = None
    q: torch.Tensor | None = None
    g: torch.Tensor | None = None
    h: torch.Tensor | None = None
    pairs: int = 0
    """Width of two equally wide leading blocks (decoder, encoder) the screen may pair up
    (:func:`_cost_form`); 0: none."""

    def rows(self, idx: torch.Tensor) -> TopKProblem:
        """The problem restricted to rows ``idx`` of ``a``."""
        idx = idx.to(self.a.device)
        return self._replace(a=self.a[idx].contiguous(),
                             p=None if self.p is None else self.p[idx],
                             g=None if self.g is None else self.g[idx])

    def swapped(self) -> TopKProblem:
        """The problem of ``b``'s rows against ``a``'s (the score is symmetric in its terms)."""
        return TopKProblem(self.b, self.a, self.alpha, self.q, self.p, self.h, self.g, self.pairs)


def score_blocks(prob: TopKProblem, block_rows: int):
    """Blocks ``(r0, r1, s[r0:r1])`` of the float32 score matrix (one reused buffer)."""
    n_a, n_b = prob.a.shape[0], prob.b.shape[0]
    rows = max(1, min(block_rows, n_a))
    buf = torch.empty((rows, n_b), dtype=torch.float32, device=prob.a.device)
    gap = torch.empty_like(buf) if prob.g is not None else None
    for r0 in range(0, n_a, rows):
        r1 = min(n_a, r0 + rows)
        block = matmul_nt(prob.a[r0:r1], prob.b, buf[: r1 - r0])
        if prob.alpha != 1.0:
            block.mul_(prob.alpha)
        if prob.p is not None:
            block.sub_(prob.p[r0:r1, None])
        if prob.q is not None:
            block.sub_(prob.q[None, :])
        if gap is not None and prob.g is not None and prob.h is not None:
            diff = torch.sub(prob.g[r0:r1, None], prob.h[None, :], out=gap[: r1 - r0])
            block.sub_(diff.abs_())
        yield r0, r1, block


def exact_topk(prob: TopKProblem, k: int, *, block_rows: int, progress: bool = False,
                label: str = "links") -> tuple[torch.Tensor, torch.Tensor]:
    """Every score, block by block: the top-``k`` (CPU int64 indices, float32 scores)."""
    n_a = prob.a.shape[0]
    kk = min(k, prob.b.shape[0])
    idx = torch.empty((n_a, kk), dtype=torch.int64)
    val = torch.empty((n_a, kk), dtype=torch.float32)
    bar = progress_bar(total=n_a, desc=f"top-k links {label}", unit="row", enabled=progress, leave=False)
    for r0, r1, block in score_blocks(prob, block_rows):
        v, i = _block_topk(block, kk)
        idx[r0:r1], val[r0:r1] = i.cpu(), v.cpu()
        bar.update(r1 - r0)
    bar.close()
    return idx, val


def _best_first(val: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's entries ordered by decreasing value, equal values by increasing index."""
    by_index = torch.sort(idx, dim=1, stable=True)
    val, idx = torch.gather(val, 1, by_index.indices), by_index.values
    pos = torch.sort(val, dim=1, descending=True, stable=True).indices
    return torch.gather(val, 1, pos), torch.gather(idx, 1, pos)


def _block_topk(block: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kk`` largest entries of each row, deterministically: equal values are taken, and
    ordered, by increasing column (``topk`` alone may take any of them). Rows whose ``kk``-th
    value ties the next one are sorted in full (stable)."""
    n_b = block.shape[1]
    v, i = block.topk(min(kk + 1, n_b), dim=1)
    if kk < n_b:
        tied = torch.nonzero(v[:, kk - 1] == v[:, kk]).flatten()
        v, i = v[:, :kk].clone(), i[:, :kk].clone()
        if len(tied):
            full = torch.sort(block[tied], dim=1, descending=True, stable=True)
            v[tied], i[tied] = full.values[:, :kk], full.indices[:, :kk]
    return _best_first(v, i)


_EPS64 = 2.0**-53


def _cost_form(prob: TopKProblem) -> tuple[StackedFeatures, StackedFeatures,
                                         tuple[torch.Tensor, torch.Tensor] | None, float, float]:
    """The problem as a screening cost ``C_ij = c_i + c_j − 2a_i·b_j + |g'_i − h'_j| = −β·s_ij −
    β·shift`` with ``β = 2/α``, constants ``c ≥ 0`` (float64) and ``g' = β·g`` (float32, exact):
    ``(a side, b side, gap, β, shift)``, so that ``s_ij = −C_ij/β − shift``."""
    beta = 2.0 / prob.alpha

    def const(t: torch.Tensor | None, n: int, dev: torch.device) -> tuple[torch.Tensor, float]:
        if t is None:
            return torch.zeros(n, dtype=torch.float64, device=dev), 0.0
        low = min(0.0, float(t.min())) if t.numel() else 0.0
        return (t.to(torch.float64) - low) * beta, low

    ca, pmin = const(prob.p, prob.a.shape[0], prob.a.device)
    cb, qmin = const(prob.q, prob.b.shape[0], prob.b.device)
    gap = None
    if prob.g is not None and prob.h is not None:
        gap = (prob.g * beta, prob.h * beta)
    if prob.pairs:
        x, y = _Paired(prob.a, prob.pairs, 1.0), _Paired(prob.b, prob.pairs, 0.5)
        return (StackedFeatures(x, ca), StackedFeatures(y, cb),  # type: ignore[arg-type]
                gap, beta, pmin + qmin)
    return (StackedFeatures(prob.a, ca), StackedFeatures(prob.b, cb), gap, beta, pmin + qmin)


PAIR_ALLOWANCE = 4 * 2.0**-24
"""Screen allowance (``make_screen(extra=)``) for paired operands: ``x·y'`` is within
``2.01·2⁻²⁴‖x‖‖y'‖`` of ``a·b`` (each sum rounds once; halving is exact), so the cost moves by at
most ``4.02·2⁻²⁴‖x‖‖y'‖``, and the screen subtracts ``extra·2ν_xν_y' ≥ 8·2⁻²⁴‖x‖‖y'‖``."""


class _Paired:
    """Screen operands in the basis of paired blocks, row blocks computed on access (no copy of
    the matrix): row ``r`` is ``[scale·(u + v), scale·(u − v), rest]`` with ``u = t[r, :d]``,
    ``v = t[r, d:2d]``. With ``scale`` 1 for the source and 0.5 for the target, ``x·y' = a·b`` up
    to the rounding of the sums (:data:`PAIR_ALLOWANCE`): ``(u+v)·(u'+v') + (u−v)·(u'−v') =
    2(u·u' + v·v')``. When the decoder and encoder vectors of a feature point alike, ``u + v``
    holds most of the energy and ``u − v`` little, so a screen over the highest-energy
    coordinates bounds the score far more tightly than in the original basis (where the energy
    is spread over both blocks)."""

    def __init__(self, t: torch.Tensor, d: int, scale: float) -> None:
        self.t, self.d, self.scale = t, d, scale
        self.shape, self.device, self.dtype = t.shape, t.device, t.dtype

    def __getitem__(self, key: Any) -> torch.Tensor:
        rows = self.t[key]
        d = self.d
        out = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
        u, v = rows[:, :d], rows[:, d: 2 * d]
        torch.add(u, v, out=out[:, :d])
        torch.sub(u, v, out=out[:, d: 2 * d])
        out[:, 2 * d:] = rows[:, 2 * d:]
        if self.scale != 1.0:
            out[:, : 2 * d].mul_(self.scale)
        return out

    def columns(self, r0: int, r1: int, cols: torch.Tensor) -> torch.Tensor:
        """Rows ``r0:r1`` at the columns ``cols`` (any order), the same values as
        ``self[r0:r1][:, cols]`` without computing the other columns."""
        rows, d = self.t[r0:r1], self.d
        cols = cols.to(rows.device)
        ordered, where = torch.sort(cols)
        out = torch.empty((rows.shape[0], len(cols)), dtype=rows.dtype, device=rows.device)
        # ascending: the u + v columns, then the u − v columns, then the rest, each contiguous
        ends = torch.searchsorted(ordered, torch.tensor([d, 2 * d], device=ordered.device))
        plus, minus = int(ends[0]), int(ends[1])
        for lo, hi, op in ((0, plus, torch.add), (plus, minus, torch.sub)):
            if hi > lo:
                at = ordered[lo:hi] % d
                op(rows[:, at], rows[:, d + at], out=out[:, lo:hi])
                if self.scale != 1.0:
                    out[:, lo:hi].mul_(self.scale)
        if len(cols) > minus:
            out[:, minus:] = rows[:, ordered[minus:]]
        if bool((where == torch.arange(len(cols), device=where.device)).all()):
            return out
        return out.index_select(1, torch.argsort(where))

    def norm_sq_upper(self, r0: int, r1: int) -> torch.Tensor:
        """Upper bounds (float64) of the squared norms of rows ``r0:r1`` as ``self[r0:r1]``
        computes them: ``‖fl(u ± v)‖ ≤ (1 + 2⁻²⁴)‖u ± v‖`` and ``‖u + v‖² + ‖u − v‖² = 2(‖u‖² +
        ‖v‖²)`` exactly; float32 norms of ``w`` coordinates widened by ``(w + 2)·2⁻²⁴``."""
        rows, d = self.t[r0:r1], self.d

        def norm_up(x: torch.Tensor) -> torch.Tensor:
            up = 1.0 + (x.shape[1] + 2) * 2.0**-24
            return (torch.linalg.vector_norm(x, dim=1).double() * up).square_()

        total = (norm_up(rows[:, :d]) + norm_up(rows[:, d: 2 * d])).mul_(
            2.0 * self.scale**2 * (1.0 + 2.0**-24) ** 2)
        if rows.shape[1] > 2 * d:
            total += norm_up(rows[:, 2 * d:])
        return total.mul_(1.0 + 2.0**-40)  # the float64 arithmetic above


def _listed_scores(prob: TopKProblem, idx: torch.Tensor) -> torch.Tensor:
    """Float64 scores of each row ``i`` against the columns ``idx[i]`` ([n_a, L], CPU): float32
    gathered in chunks and widened (no float64 copy of the features)."""
    n_a, L = idx.shape
    K = prob.a.shape[1]
    dev = prob.a.device
    out = torch.empty((n_a, L), dtype=torch.float64)
    if n_a == 0 or L == 0:
        return out
    rows = max(1, (1 << 27) // (12 * K * L))
    buf = torch.empty((min(rows, n_a) * L, K), dtype=torch.float32, device=dev)
    for r0 in range(0, n_a, rows):
        r1 = min(n_a, r0 + rows)
        ix = idx[r0:r1].to(dev).reshape(-1)
        gathered = torch.index_select(prob.b, 0, ix, out=buf[: len(ix)])
        dots = torch.bmm(gathered.view(r1 - r0, L, K).double(),
                         prob.a[r0:r1].double()[:, :, None])
        out[r0:r1] = dots[:, :, 0].cpu()
    out *= prob.alpha
    if prob.p is not None:
        out -= prob.p.cpu().double()[:, None]
    if prob.q is not None:
        out -= prob.q.cpu().double()[idx]
    if prob.g is not None and prob.h is not None:
        out -= (prob.g.cpu().double()[:, None] - prob.h.cpu().double()[idx]).abs_()
    return out


def _norm_bounds(x: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the rows' norms (float64, CPU): float32 norms of ``K`` coordinates are
    within a relative ``(K + 2)·2⁻²⁴`` of the exact ones; widened by twice that."""
    up = 1.0 + 2 * (x.shape[1] + 2) * 2.0**-24
    return torch.cat([torch.linalg.vector_norm(x[r0:r0 + _CHUNK], dim=1).cpu().double()
                      for r0 in range(0, x.shape[0], _CHUNK)]) * up


class _Bounds(NamedTuple):
    """Magnitudes bounding a score's rounding: row norms of both sides (float64, CPU) and the
    largest magnitudes of the separable terms."""

    na: torch.Tensor
    nb: torch.Tensor
    p: torch.Tensor | None
    q: float
    g: torch.Tensor | None
    h: float

    @classmethod
    def of(cls, prob: TopKProblem) -> _Bounds:
        def mag(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.abs().cpu().double()

        q, h = mag(prob.q), mag(prob.h)
        return cls(_norm_bounds(prob.a), _norm_bounds(prob.b), mag(prob.p),
                   0.0 if q is None or not len(q) else float(q.max()), mag(prob.g),
                   0.0 if h is None or not len(h) else float(h.max()))

    def error(self, prob: TopKProblem, rows: torch.Tensor, cols: torch.Tensor, gamma: float
              ) -> torch.Tensor:
        """Bound of ``|ŝ − s|`` for pairs ``(rows[i], cols[i, r])`` scored by a dot product with
        relative accumulation error ``gamma`` and float64 arithmetic for the rest ([R, L])."""
        dots = prob.alpha * self.na[rows][:, None] * self.nb[cols]
        rest = torch.zeros(len(rows), dtype=torch.float64)
        if self.p is not None:
            rest += self.p[rows]
        if self.g is not None:
            rest += self.g[rows]
        rest += self.q + self.h
        return gamma * dots + 2 * _EPS64 * (dots + rest[:, None]) * 8


_GAMMA32 = 2.0**-24


def _row_dots(gathered: torch.Tensor, lhs: torch.Tensor) -> torch.Tensor:
    """``out[r, l] = gathered[r, l] · lhs[r]`` ([R, L, K] and [R, K]). Float32 CPU tensors go
    through numpy's stacked matmul (about twice as fast as ``torch.bmm`` here, measured at
    L = 20, K = 4608 on 2 AVX2 cores); the rounding bound of a float32 dot product holds for
    any summation order."""
    if gathered.device.type == "cpu" and gathered.dtype == torch.float32 == lhs.dtype:
        return torch.from_numpy(np.matmul(gathered.numpy(), lhs.contiguous().numpy()[:, :, None])
                                [:, :, 0])
    return torch.bmm(gathered, lhs[:, :, None])[:, :, 0]


def _rank_lists(prob: TopKProblem, rows: torch.Tensor, cols: torch.Tensor, kk: int, bounds: _Bounds
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Each listed row's top-``kk`` among its listed columns (``cols`` [R, L], -1 = none; each
    row lists at least ``kk``): ``(indices [R, kk], float32 scores, a lower bound of the real
    k-th score [R] float64, rows rescored in float64)``, best first, equal real scores by lower
    index.

    Scores come from float32 dot products (error ``γ_K·α‖a‖‖b‖``, any summation order). A row
    whose order among its first ``kk + 1`` is not proven by those bounds (near or exact ties) is
    rescored in float64 from the same operands (error ``~2⁻⁵³K``), where ties fall to the lower
    index."""
    R, L = cols.shape
    K = prob.a.shape[1]
    dev = prob.a.device
    gamma = K * _GAMMA32 / (1 - K * _GAMMA32)
    valid = cols >= 0
    safe = cols.clamp(min=0)
    scores = torch.empty((R, L), dtype=torch.float64)
    chunk = max(1, (1 << 27) // (4 * K * max(L, 1)))
    buf = torch.empty((min(chunk, max(R, 1)) * L, K), dtype=torch.float32, device=dev)
    for r0 in range(0, R, chunk):
        r1 = min(R, r0 + chunk)
        ix = safe[r0:r1].to(dev).reshape(-1)
        gathered = torch.index_select(prob.b, 0, ix, out=buf[: len(ix)]).view(r1 - r0, L, K)
        scores[r0:r1] = _row_dots(gathered, prob.a[rows[r0:r1].to(dev)]).cpu().double()
    scores *= prob.alpha
    rows_cpu = rows.cpu()
    if prob.p is not None:
        scores -= prob.p.cpu().double()[rows_cpu][:, None]
    if prob.q is not None:
        scores -= prob.q.cpu().double()[safe]
    if prob.g is not None and prob.h is not None:
        scores -= (prob.g.cpu().double()[rows_cpu][:, None] - prob.h.cpu().double()[safe]).abs_()
    scores.masked_fill_(~valid, -math.inf)
    far = cols.new_full((), 1 << 62)  # after every real column in ties (only -inf scores tie it)
    scores, order_idx = _best_first(scores, torch.where(valid, cols, far))
    sorted_safe = order_idx.clamp(max=prob.b.shape[0] - 1)
    err = bounds.error(prob, rows_cpu, sorted_safe, gamma).masked_fill_(~torch.isfinite(scores), 0)
    span = min(kk + 1, L)
    head, head_err = scores[:, :span], err[:, :span]
    if span > 1:
        gaps = head[:, :-1] - head[:, 1:]
        unsure = (gaps <= head_err[:, :-1] + head_err[:, 1:]).any(dim=1)
    else:
        unsure = torch.zeros(R, dtype=torch.bool)
    idx, val = order_idx[:, :kk].clone(), scores[:, :kk].clone()
    low = (scores[:, kk - 1] - err[:, kk - 1]).clone()
    redo = torch.nonzero(unsure).flatten()
    if len(redo):
        # only columns that may reach the k-th: s + err ≥ (k-th s − err); every other one is
        # below all of the top-k in real scores, so it can be left out of the rescoring
        reach = (scores[redo] + err[redo]) >= (scores[redo, kk - 1] - err[redo, kk - 1])[:, None]
        width = int(torch.nonzero(reach.any(dim=0)).max()) + 1
        sub_idx = order_idx[redo, :width]
        sub_valid = reach[:, :width] & torch.isfinite(scores[redo, :width])
        exact = _listed_scores(prob.rows(rows[redo]), sub_idx.clamp(max=prob.b.shape[0] - 1))
        exact.masked_fill_(~sub_valid, -math.inf)
        ev, ei = _best_first(exact, torch.where(sub_valid, sub_idx, far))
        idx[redo], val[redo] = ei[:, :kk], ev[:, :kk]
        low[redo] = ev[:, kk - 1] - bounds.error(prob, rows_cpu[redo], ei[:, kk - 1:kk].clamp(
            max=prob.b.shape[0] - 1), _EPS64 * (K + 8))[:, 0]
    return idx, val.float(), low, len(redo)


def _screened_topk(prob: TopKProblem, k: int, *, m: int, keep: int, sides: tuple, block_rows: int,
                   progress: bool, label: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Top-``k`` through a width-``m`` screen keeping ``keep`` candidates per row, certified row
    by row (module doc): rows the candidates cannot prove are rechecked against every
    column the screen cannot rule out, or recomputed exactly when those are many."""
    sa, sb, gap, beta, shift, order = sides
    n_a, n_b = prob.a.shape[0], prob.b.shape[0]
    K = prob.a.shape[1]
    kk, keep = min(k, n_b), min(max(keep, k), n_b)
    t0 = time.perf_counter()
    screen = make_screen(sa, sb, m, "float32", prob.a.device, order=order,
                         extra=PAIR_ALLOWANCE if prob.pairs else 0.0)
    cand = screen_rows(screen, n_a, n_b, keep, gap=gap, block_rows=block_rows,
                       progress=progress, label=label)
    t1 = time.perf_counter()
    bounds = _Bounds.of(prob)
    idx, val, low, rescored = _rank_lists(prob, torch.arange(n_a), cand.idx, kk, bounds)
    low_np = low.numpy()
    const_max = float(sa.const_F.max()) + float(sb.const_F.max())
    floor = cand.floor
    with np.errstate(invalid="ignore"):  # inf floors: nothing pruned, certified below
        upper = -floor / beta - shift  # bounds the score of every pruned entry of the row
        slack = 2.0**-40 * (np.abs(floor) + abs(shift) + np.abs(low_np) + const_max)
        certified = np.isinf(floor) | (low_np >= upper + slack)
    bad = torch.from_numpy(np.flatnonzero(~certified))
    t2 = time.perf_counter()
    n_listed = 0
    if len(bad):
        # every column j the bound cannot put below the row's proven k-th score: s_ij ≤
        # −L_ij/β − shift, so L_ij > β(−low − shift) rules it out; the limit is rounded up
        low_bad = low_np[bad.numpy()]
        limit = beta * (-low_bad - shift)
        limit += 2.0**-30 * (np.abs(limit) + beta * (abs(shift) + np.abs(low_bad)) + const_max)
        lim32 = round_up_f32(torch.from_numpy(limit))
        on_dev = bad.to(screen.a_FS.device)  # every screen operand lives on one device
        sub = screen._replace(a_FS=screen.a_FS[on_dev], norm_a=screen.norm_a[on_dev],
                              err_a=screen.err_a[on_dev], const_a=screen.const_a[on_dev])
        sub_gap = None if gap is None else (gap[0][bad.to(gap[0].device)], gap[1])
        cap = max(keep, n_b // LISTED_PAIR_COST)
        found = screen_rows_below(sub, len(bad), n_b, lim32, max_cols=cap, gap=sub_gap,
                                  block_rows=block_rows)
        listed = np.flatnonzero((found.counts <= cap) & (found.counts >= kk))
        if len(listed):
            cols = found.cols[torch.from_numpy(listed)]
            cols = cols[:, : int(found.counts[listed].max())]
            li, lv, _, more = _rank_lists(prob, bad[listed], cols, kk, bounds)
            rescored += more
            idx[bad[listed]], val[bad[listed]] = li, lv
            n_listed = len(listed)
        full = bad[torch.from_numpy(np.setdiff1d(np.arange(len(bad)), listed))]
    else:
        full = bad
    del screen
    if len(full):
        idx_full, val_full = exact_topk(prob.rows(full), k, block_rows=block_rows)
        idx[full], val[full] = idx_full, val_full
    stats = {"route": "screened", "screen_dims": int(m), "width": int(K), "candidates": keep,
             "rows_certified": int(certified.sum()), "rows_rechecked": n_listed,
             "rows_recomputed": len(full), "rows_rescored_float64": rescored,
             "t_screen": t1 - t0, "t_scores": t2 - t1,
             "t_recompute": time.perf_counter() - t2}
    logger.info("%s: screened top-%d at width %d of %d, %d candidates per row: %d rows "
                "certified, %d rechecked against the columns the screen cannot rule out, %d "
                "recomputed exactly", label, kk, m, K, keep, stats["rows_certified"], n_listed,
                len(full))
    return idx, val, stats


def solve_topk(prob: TopKProblem, k: int, *, method: str, screen_dims: int | str, keep: int,
           block_rows: int, progress: bool, label: str
           ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The top-``k`` of ``prob`` by the route ``method`` asks for (module doc)."""
    t0 = time.perf_counter()
    n_a, n_b = prob.a.shape[0], prob.b.shape[0]
    K = prob.a.shape[1]
    keep = min(max(keep, k), n_b)
    small = min(n_a, n_b) < SCREEN_FROM_N or K < 512 or keep >= n_b
    m = K
    sides = None
    if method == "screened" or (method == "auto" and not small):
        sa, sb, gap, beta, shift = _cost_form(prob)
        order = coordinate_order(sa, sb)
        sides = (sa, sb, gap, beta, shift, order)
        if screen_dims == "auto":
            exact = (StackedFeatures(prob.a, sa.const_F), StackedFeatures(prob.b, sb.const_F))
            m = row_screen_dims_auto(sa, sb, k, keep, gap=gap, order=order, exact=exact)
        else:
            m = min(int(screen_dims), K)
    t_width = time.perf_counter() - t0
    if sides is None or (method == "auto" and m >= K):
        idx, val = exact_topk(prob, k, block_rows=block_rows, progress=progress, label=label)
        stats: dict[str, Any] = {"route": "exact", "width": int(K)}
        logger.info("%s: exact top-%d over every pair (%d x %d, width %d)", label,
                    min(k, n_b), n_a, n_b, K)
    else:
        idx, val, stats = _screened_topk(prob, k, m=m, keep=keep, sides=sides,
                                         block_rows=block_rows, progress=progress, label=label)
    stats["t_width"] = t_width
    stats["seconds"] = time.perf_counter() - t0
    return idx, val, stats
