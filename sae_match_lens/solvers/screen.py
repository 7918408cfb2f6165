"""Screening: a cheap lower bound ``L ≤ C`` of the cost matrix, and the candidate edges it keeps.

The sparse solver (:mod:`sae_match_lens.solvers.sparse`) never holds the cost matrix. One pass over row
blocks of ``L`` keeps each row's ``k`` and each column's ``max(4, k // 4)`` cheapest entries;
only those candidate edges leave the device. The ``k``-th value of row ``i`` (``row_floor_i``)
and the last kept value of column ``j`` (``col_floor_j``) bound every edge that was not kept:
``C_ij ≥ L_ij ≥ max(row_floor_i, col_floor_j)``. The certificate
(:mod:`sae_match_lens.solvers.certificate`) uses them to prove most rows without another pass.

**The bound.** ``C_ij = c_i + c_j − 2 a_i·b_j``. Splitting the stacked coordinates into a set
``S`` (the ``m`` coordinates of largest energy over both SAEs) and the rest ``R``,
Cauchy–Schwarz gives ``a_i·b_j ≤ a_iS·b_jS + ‖a_iR‖‖b_jR‖``, hence
``L_ij = c_i + c_j − 2(a_iS·b_jS + ‖a_iR‖‖b_jR‖)`` (for ``mse`` this is
``‖a_S − b_S‖² + (‖a_R‖ − ‖b_R‖)²``): one matrix product of width ``m + 1`` instead of ``K``.
Any ``S`` gives a valid bound; energy only makes it tight. With ``m = K`` the screen is the cost.

**Rounding.** The norms ``‖x_R‖`` are rounded up. In float32 one product gives ``L`` directly:
it also carries the constants and an allowance ``γ(c_i + c_j + 2‖a'_i‖‖b'_j‖)``,
``γ = 2(m + 9)·2⁻²⁴``, that covers its own accumulation error in any summation order, so ``L`` is
rigorously ≤ the exact real cost ``c_i + c_j − 2a_i·b_j`` with the stored float64 constants
(the float64 cost of :mod:`sae_match_lens.solvers.costs` differs from it by the float64 rounding of the
norms; the certificate widens the duals by that before comparing them with floors,
:func:`~sae_match_lens.solvers.certificate.floor_pads`). With ``precision="bfloat16"``/``"float16"``
the product runs in that precision and the bound subtracts a rigorous allowance for the rounding of the inputs
(``‖δa_i‖‖b̃_j‖ + ‖a_i‖‖δb_j‖``, measured exactly), of the product's accumulation and output
(``(K·2⁻²⁴ + u_out)‖ã_i‖‖b̃_j‖``) and of the float32 constants. On CPUs without bf16/fp16 matrix
units (e.g. AVX2-only) low precision is slower than float32 (measured on an AVX2 EPYC: float32
≈ 139, bf16 ≈ 14, fp16 ≈ 10 GFLOP/s); it is meant for GPUs.

**Width.** ``screen_dims="auto"`` (:func:`screen_dims_auto`) estimates from a sample of rows how
many rows each width would leave for the certificate to recheck, and picks the cheapest.

**Rows only.** Top-k problems (:func:`~sae_match_lens.flow.linking.links`) need no column lists:
:func:`screen_rows` keeps each row's ``k`` smallest bounds and a floor below every other entry
of the row, optionally for the cost plus a non-separable gap ``|g_i − h_j|`` (added to ``L``
with a rigorous float32 allowance, :func:`gap_slack`; columns in order of ``h``, selected by
chunks of adjacent columns so that only ``k`` chunks per row are read entry by entry);
:func:`screen_rows_below` lists, for rows the caller could not prove, every column whose
bound reaches a given limit (the columns that may still beat the row's proven k-th cost);
:func:`row_screen_dims_auto` picks the width from the sampled rows' exact ``k``-th costs,
floors and the columns each recheck would list.
The constants ``c`` must be ≥ 0 (the allowance ``γ·c`` assumes it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np
import torch

from ..progress import progress_bar
from .costs import StackedFeatures, ieee_products, matmul_nt

__all__ = [
    "CHUNK_COLUMNS",
    "LISTED_PAIR_COST",
    "Candidates",
    "Precision",
    "RowCandidates",
    "RowsBelow",
    "Screen",
    "block_rows_for",
    "coordinate_order",
    "gap_slack",
    "make_screen",
    "round_up_f32",
    "row_screen_dims_auto",
    "screen_block",
    "screen_dims_auto",
    "screen_pass",
    "screen_rows",
    "screen_rows_below",
]

logger = logging.getLogger(__name__)

Precision = Literal["float32", "bfloat16", "float16"]
LOW_PRECISION = {"bfloat16": (torch.bfloat16, 2.0**-8), "float16": (torch.float16, 2.0**-11)}
"""Low-precision screens: torch dtype and unit roundoff of its output."""
_EPS32 = 2.0**-24
_ENERGY_SAMPLE = 4096


class Screen(NamedTuple):
    """Operands of the screening product and per-feature rounding allowances."""

    a_FS: torch.Tensor
    """Source side of the product [n_a, width] (float32 fused form, or low precision)."""
    b_FS: torch.Tensor
    """Target side of the product [n_b, width]."""
    norm_a: torch.Tensor
    """Upper bounds of the source rows' norms (low precision: of the unrounded rows)."""
    norm_b: torch.Tensor
    """Upper bounds of the target rows' norms (low precision: of the rounded rows)."""
    err_a: torch.Tensor
    """Low precision: per-row rounding allowance of the source side."""
    err_b: torch.Tensor
    """Low precision: per-row input rounding of the target side."""
    const_a: torch.Tensor
    """Cost constants of the source rows (float32)."""
    const_b: torch.Tensor
    """Cost constants of the target rows (float32)."""
    fused: bool
    """True when the product alone is ``L`` (float32)."""


class Candidates(NamedTuple):
    """What one screening pass keeps."""

    row_idx: torch.Tensor
    """Candidate columns of each row [n_a, k_rows] (int64, CPU)."""
    col_idx: torch.Tensor
    """Candidate rows of each column [n_b, k_cols] (int64, CPU)."""
    row_floor: np.ndarray
    """Lower bound of every non-candidate edge of each row [n_a] (inf: none pruned)."""
    col_floor: np.ndarray
    """Lower bound of every non-candidate edge of each column [n_b] (inf: none pruned)."""


def coordinate_order(a: StackedFeatures, b: StackedFeatures) -> torch.Tensor:
    """Stacked coordinates by decreasing energy over (a row sample of) both SAEs."""
    energy = torch.zeros(a.matrix_FK.shape[1], dtype=torch.float64)
    for x in (a.matrix_FK, b.matrix_FK):
        stride = max(1, x.shape[0] // _ENERGY_SAMPLE)
        energy += x[::stride].square().sum(dim=0).cpu().double()
    return torch.argsort(energy, descending=True, stable=True)


def make_screen(a: StackedFeatures, b: StackedFeatures, m: int, precision: Precision,
                dev: torch.device, order: torch.Tensor | None = None,
                extra: float = 0.0) -> Screen:
    """Screening operands ``[x_S, ‖x_R‖↑]`` (``S``: the first ``m`` coordinates of ``order``,
    by default :func:`coordinate_order`) with their rounding allowances (see the module doc).
    ``extra``: a further allowance ``extra·2‖a_i‖‖b_j‖`` subtracted from every bound, for
    operands that carry their own rounding relative to the cost they stand for."""
    K = a.matrix_FK.shape[1]
    if m >= K:
        keep = torch.arange(K)
    else:
        keep = (coordinate_order(a, b) if order is None else order)[:m].sort().values
    has_rest = len(keep) < K
    # float32 norms of w coordinates are within a relative (w + 2)·2⁻²⁴ of the exact ones
    up_full, down_part = 1.0 + (K + 2) * _EPS32, 1.0 - (len(keep) + 2) * _EPS32
    up_rest = 1.0 + 2 * (K + 2) * _EPS32  # float32 norms times this are upper bounds
    up64 = 1.0 + 2 * (K + 6) * 2.0**-53
    up_part = 1.0 + 2 * (len(keep) + 3) * _EPS32

    width = len(keep) + int(has_rest)
    fused = precision == "float32"
    pad = 3 if fused else 0  # the fused product's constant columns, filled below

    def side(x: torch.Tensor, norm_sq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[x_S, ‖x_R‖↑]`` on ``dev`` (and ``pad`` columns left to fill) and upper bounds of
        its row norms, in chunks of rows. ``norm_sq``: ``fl(‖x‖²)`` in float64 when known
        (:attr:`StackedFeatures.norm_sq_F`, relative error ≤ ``(K + 1)·2⁻⁵³``; times
        ``1 + 2(K + 6)·2⁻⁵³`` it is an upper bound), else float32 norms are taken here."""
        out = torch.empty((x.shape[0], width + pad), dtype=torch.float32, device=dev)
        norms = torch.empty(x.shape[0], dtype=torch.float32, device=dev)
        keep_dev = keep.to(dev)
        select = getattr(x, "columns", None)  # operands computed on access (topk._Paired)
        for r0 in range(0, x.shape[0], 4096):
            r1 = min(x.shape[0], r0 + 4096)
            dst = out[r0:r1, :width]
            if select is not None:
                dst[:, : len(keep)] = select(r0, r1, keep).to(dev)
            else:
                chunk = x[r0:r1].to(dev)
                dst[:, : len(keep)] = chunk[:, keep_dev]
            if has_rest:
                # ‖x_R‖² ≤ ‖x‖↑² − ‖x_S‖↓² (no copy of the rest): float32 norms widened by their
                # error bound, the difference in float64, the result rounded up
                if select is not None:
                    full_sq = x.norm_sq_upper(r0, r1).to(dev)
                elif norm_sq is not None:
                    full_sq = norm_sq[r0:r1].to(dev, torch.float64) * up64
                else:
                    full_sq = (torch.linalg.vector_norm(chunk, dim=1).double()
                               * up_full).square_()
                part_sq = (torch.linalg.vector_norm(dst[:, : len(keep)], dim=1).double()
                           * down_part).square_()
                dst[:, -1] = (full_sq - part_sq).clamp_(min=0.0).sqrt_().float() * up_rest
            norms[r0:r1] = torch.linalg.vector_norm(dst, dim=1) * up_part
        return out, norms

    fa, na = side(a.matrix_FK, a.norm_sq_F)
    fb, nb = side(b.matrix_FK, b.norm_sq_F)
    ca, cb = a.const_F.to(dev, torch.float32), b.const_F.to(dev, torch.float32)
    if fused:
        # One product gives L directly: [x_S, r, c_a(1−γ), 1, ν_a] · [−2y_S, −2r, 1, c_b(1−γ),
        # −2γν_b] = c_a + c_b − 2(x_S·y_S + r_a r_b) − γ(c_a + c_b + 2ν_aν_b); γ covers the
        # accumulation (≤ γ_w Σ|terms|), the float32 constants, and the rounding of these columns.
        g = 2 * (width + 8) * _EPS32 + extra
        fa[:, width], fa[:, width + 1], fa[:, width + 2] = ca * (1 - g), 1.0, na
        fb[:, :width].mul_(-2.0)
        fb[:, width], fb[:, width + 1], fb[:, width + 2] = 1.0, cb * (1 - g), -2 * g * nb
        return Screen(fa, fb, na, nb, na, nb, ca, cb, True)
    sa, sb = fa, fb
    gamma = (sa.shape[1] + 2) * _EPS32
    dtype, u_out = LOW_PRECISION[precision]
    la, lb = sa.to(dtype), sb.to(dtype)
    if not (bool(torch.isfinite(la).all()) and bool(torch.isfinite(lb).all())):
        raise ValueError(f"features overflow {precision}; use precision='float32' (or bfloat16).")
    da = (sa.double() - la.double()).norm(dim=1)
    db = (sb.double() - lb.double()).norm(dim=1)
    nla, nlb = la.double().norm(dim=1), lb.double().norm(dim=1)
    # |a·b − ã·b̃| ≤ ‖δa‖‖b̃‖ + ‖a‖‖δb‖ (exact), accumulation and output rounding ≤ (γ + u)‖ã‖‖b̃‖:
    # allowance err_a_i·‖b̃_j‖ + ‖a_i‖·err_b_j with the terms below.
    err_a = (da + (gamma + u_out + extra) * nla) * 1.001
    return Screen(la, lb, na, (nlb * 1.001).float(), err_a.float(), (db * 1.001).float(),
                  ca, cb, False)


def screen_block(s: Screen, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``r0:r1`` of the lower bound ``L`` (float32, on the screen's device), written into
    ``out`` ([r1 − r0, n_b]) when given."""
    if out is None:
        out = torch.empty((r1 - r0, s.b_FS.shape[0]), dtype=torch.float32, device=s.a_FS.device)
    with ieee_products(s.a_FS.device):
        if s.fused:
            return matmul_nt(s.a_FS[r0:r1], s.b_FS, out)
        out.copy_(s.a_FS[r0:r1] @ s.b_FS.T)
    na, ca = s.norm_a[r0:r1], s.const_a[r0:r1]
    # 2 (err_a_i ‖b_j‖ + ‖a_i‖ err_b_j) + float32 rounding of the constants and the sum
    allow = torch.outer(s.err_a[r0:r1], s.norm_b).add_(torch.outer(na, s.err_b)).mul_(2.0)
    allow.add_(torch.outer(na, s.norm_b).mul_(2.0).add_(ca[:, None]).add_(s.const_b[None, :])
               .mul_(4 * _EPS32))
    return out.mul_(-2.0).add_(ca[:, None]).add_(s.const_b[None, :]).sub_(allow)


_WIDTHS = (1 / 10, 1 / 8, 1 / 7, 1 / 6, 1 / 5.5, 1 / 5, 1 / 4.5, 1 / 4, 1 / 3.5, 1 / 3, 1 / 2.5,
           1 / 2)
"""Screen widths tried by :func:`screen_dims_auto`, as fractions of the stacked width."""


def screen_dims_auto(a: StackedFeatures, b: StackedFeatures, k: int, *, sample: int = 128,
                     seed: int = 0, order: torch.Tensor | None = None,
                     chunk: int = 4096, screens: dict[int, Screen] | None = None,
                     device: torch.device | None = None) -> int:
    """Pick the screen width that minimises the expected work, from a sample of rows.

    For ``sample`` random rows of A and widths ``m`` from ``K/10`` up to ``K/2``, a pass of width
    ``m`` gives the floor the screening pass would give each sampled row (its ``k``-th smallest
    bound; all columns are needed: siblings of a feature cluster make column samples
    misleading). The first width's pass is the screen itself (:func:`make_screen`), and each
    sampled row's best cost is taken as the smallest cost of its ``k`` smallest bounds there
    (the best partner is almost always among them; where not, the estimate is too high, which
    can only favour wider screens). With the
    solver's duals (``u_i ≈ 0``, ``v_j`` ≈ the cost of column ``j``'s match) a row's pruned edges
    are proven when its floor exceeds ``max_j v_j``, estimated as 1.05 × the largest best cost in
    the sample. The share ``f_m`` of rows below it estimates how many rows the certificate would
    recheck; the width minimising ``m/K + 1.2 f_m`` wins against the exact pass (cost 1). Widths
    are tried in increasing order and the search stops at the first ``m`` with ``m/K`` at or
    above the best work found (no wider screen can do better), so usually one or two widths are
    read. Returns ``K`` for no screening (also for fewer than 4096 features or ``K < 512``). The
    estimate costs a screen of width ``K/10`` (:func:`make_screen`) and about
    ``Σ m · sample / (K · n_a)`` of an exact pass for the other widths read.

    ``screens``: a dict to receive that first screen (on ``device``), keyed by its width; the
    caller reuses it when the first width wins instead of building it again.
    """
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    K = a.matrix_FK.shape[1]
    if min(n_a, n_b) < 4096 or K < 512:
        return K
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n_a, generator=gen)[:sample]
    order = (coordinate_order(a, b) if order is None else order).cpu()
    widths = sorted({round(K * f) for f in _WIDTHS})
    x = a.matrix_FK[rows].cpu()
    x_sq = torch.linalg.vector_norm(x, dim=1).square()
    ca = a.const_F[rows].cpu().float()
    kk = min(k, n_b)

    def consts(c0: int, c1: int) -> torch.Tensor:
        return ca[:, None] + b.const_F[c0:c1].cpu().float()[None, :]

    # the first width's screen: its sampled rows' bounds give their floors, and the exact costs
    # of their kk smallest bounds their best costs (the best partner is almost always among
    # them; where not, the estimate is higher, which can only favour wider screens)
    first = make_screen(a, b, widths[0], "float32", device or a.matrix_FK.device, order=order)
    r = rows.to(first.a_FS.device)
    part = first._replace(a_FS=first.a_FS[r], norm_a=first.norm_a[r], err_a=first.err_a[r],
                          const_a=first.const_a[r])
    first_floors, cols = torch.topk(screen_block(part, 0, len(rows)), kk, dim=1, largest=False,
                                    sorted=False)
    first_floors, cols = first_floors.cpu(), cols.cpu()
    y = b.matrix_FK[cols.reshape(-1).to(b.matrix_FK.device)].cpu().view(len(rows), kk, -1)
    dots = torch.bmm(y, x[:, :, None]).squeeze(2)
    best = (ca[:, None] + b.const_F.cpu().float()[cols] - 2 * dots).amin(dim=1)
    need = 1.05 * float(best.max())
    if screens is not None:
        screens[widths[0]] = first
    del first, part
    best_m, best_work = K, 1.0
    for m in widths:
        if m / K >= best_work:
            break
        if m == widths[0]:
            floors = first_floors
        else:
            floors = _sample_floors(a, b, x, x_sq, consts, order[:m], kk, chunk)
        share = float((floors.amax(dim=1) < need).double().mean())
        work = m / K + 1.2 * share
        logger.debug("screen width %d: estimated share of rows to recheck %.3f", m, share)
        if work < best_work:
            best_m, best_work = m, work
    logger.info("screen width %d of %d (estimated work %.2f of an exact pass)", best_m, K,
                best_work)
    return best_m


def _sample_floors(a: StackedFeatures, b: StackedFeatures, x: torch.Tensor, x_sq: torch.Tensor,
                   consts: Callable[[int, int], torch.Tensor], sel: torch.Tensor, kk: int,
                   chunk: int) -> torch.Tensor:
    """The ``kk`` smallest unrounded width-``len(sel)`` bounds of the sampled rows ``x``."""
    n_b = b.matrix_FK.shape[0]
    xs = torch.index_select(x, 1, sel)
    rest_a = (x_sq - torch.linalg.vector_norm(xs, dim=1).square()).clamp_(min=0.0).sqrt_()
    floors = torch.full((len(x), kk), math.inf)
    for c0 in range(0, n_b, chunk):
        y = b.matrix_FK[c0:c0 + chunk].cpu()
        ys = torch.index_select(y, 1, sel)
        rest_b = (torch.linalg.vector_norm(y, dim=1).square()
                  - torch.linalg.vector_norm(ys, dim=1).square()).clamp_(min=0.0).sqrt_()
        low = matmul_nt(xs, ys, torch.empty((len(x), len(y))))
        low.addr_(rest_a, rest_b).mul_(-2.0).add_(consts(c0, c0 + len(y)))
        merged = torch.cat([floors, low], dim=1)
        floors = torch.topk(merged, kk, dim=1, largest=False, sorted=False).values
    return floors


def block_rows_for(n_b: int) -> int:
    """Rows per screening block: a float32 block buffer of about 128 MiB."""
    return int(min(4096, max(128, (1 << 27) // (4 * max(1, n_b)))))


_ROW_CHUNK = 64
"""Columns per chunk of :func:`screen_pass`' row selection (at most)."""


def screen_pass(screen: Screen, n_a: int, n_b: int, k: int, block_rows: int | None,
                progress: bool, label: str) -> Candidates:
    """One pass over the row blocks of ``L``: the candidates of each row and column, and the
    floors bounding every other edge of each row and column. The block buffer is reused for the
    whole pass (fresh allocations of this size cost as much as the selections).

    Rows select by chunks of ``c`` adjacent columns (:func:`_chunk_width`, ``c ≤ 64``): the
    ``k`` chunks with the smallest minima hold the row's ``k`` smallest entries (any entry
    outside them has ``k`` chunk minima at or below it), so only those ``k·c`` entries are read
    one by one; the floor is the smaller of the largest kept entry and the next chunk's minimum,
    which is the row's ``k``-th smallest entry, as a full selection gives."""
    kr, kc = min(k, n_b), min(max(4, k // 4), n_a)
    block_rows = block_rows or block_rows_for(n_b)
    dev = screen.a_FS.device
    cols = _ColumnLists(n_b, kc, dev)
    row_idx = torch.empty((n_a, kr), dtype=torch.int64)
    row_floor = torch.empty(n_a, dtype=torch.float64)
    low_buf = torch.empty((min(block_rows, n_a), n_b), dtype=torch.float32, device=dev)
    bar = progress_bar(total=n_a, desc=f"screening candidates {label}", unit="row",
                       enabled=progress, leave=False)
    c = _chunk_width(n_b, kr, _ROW_CHUNK)
    nc = n_b // c
    within = torch.arange(c, device=dev)
    for r0 in range(0, n_a, block_rows):
        r1 = min(n_a, r0 + block_rows)
        low = screen_block(screen, r0, r1, out=low_buf[: r1 - r0])
        if c > 1:  # the k chunks of smallest minimum hold the k smallest entries (module doc)
            bound, chunks = torch.topk(low.view(r1 - r0, nc, c).amin(dim=2), kr + 1, dim=1,
                                       largest=False, sorted=True)
            listed = (chunks[:, :kr, None] * c + within).view(r1 - r0, kr * c)
            vals, pos = torch.topk(torch.gather(low, 1, listed), kr, dim=1, largest=False,
                                   sorted=False)
            idx = listed.gather(1, pos)
            top = torch.minimum(vals.amax(dim=1), bound[:, kr])
        else:
            vals, idx = torch.topk(low, kr, dim=1, largest=False, sorted=False)
            top = vals.amax(dim=1)
        row_idx[r0:r1] = idx.cpu()
        row_floor[r0:r1] = top.double().cpu()
        cols.update(low, r0)
        bar.update(r1 - r0)
    bar.close()
    if kr == n_b:  # every edge of the row is a candidate
        row_floor.fill_(math.inf)
    col_floor = cols.val[:, -1].double().cpu() if kc < n_a else torch.full((n_b,), math.inf,
                                                                          dtype=torch.float64)
    return Candidates(row_idx, cols.idx.cpu(), row_floor.numpy(), col_floor.numpy())


_COL_GROUP = 16
"""Rows per group of :class:`_ColumnLists`' selection."""


class _ColumnLists:
    """The ``kc`` cheapest entries of every column seen so far (values ascending).

    A block is read by groups of ``g = 16`` adjacent rows: one pass takes each group's minimum
    per column. In each column, the ``kc`` groups of smallest minimum hold the block's ``kc``
    smallest entries (an entry outside them is ≥ its own group's minimum, hence ≥ the ``kc``
    chosen minima, each of which is an entry of a chosen group), so the first block reads only
    those ``kc·g`` entries per column one by one. Later blocks compare the group minima with
    each column's current ``kc``-th value: only groups whose minimum is below it can hold an
    entry that enters the list, and few do. The list is thus the exact ``kc`` smallest entries
    seen, and its last value bounds every entry left out."""

    def __init__(self, n_b: int, kc: int, dev: torch.device) -> None:
        self.kc = kc
        self.val = torch.full((n_b, kc), math.inf, device=dev)
        self.idx = torch.zeros((n_b, kc), dtype=torch.int64, device=dev)
        self._cols = torch.arange(n_b, device=dev)

    def update(self, low: torch.Tensor, r0: int) -> None:
        """Merge the block ``low`` (rows ``r0 : r0 + len(low)``, all columns)."""
        main = low.shape[0] // _COL_GROUP * _COL_GROUP
        if main:
            self._update(low[:main], r0, _COL_GROUP)
        if main < low.shape[0]:  # the last rows of a block whose length is not a multiple of g
            self._update(low[main:], r0 + main, 1)

    def _update(self, low: torch.Tensor, r0: int, g: int) -> None:
        n_rows, n_b = low.shape
        groups = n_rows // g
        dev = low.device
        mins = low.view(groups, g, n_b).amin(dim=1) if g > 1 else low
        within = torch.arange(g, device=dev)
        if bool(torch.isinf(self.val[:, -1]).any()):  # lists not yet full: the kc best groups
            take = min(self.kc, groups)
            best = torch.topk(mins.T.contiguous(), take, dim=1, largest=False,
                              sorted=False).indices
            rows = (best[:, :, None] * g + within).view(n_b, take * g)
            vals = low.reshape(-1)[rows * n_b + self._cols[:, None]]
            self._merge(self._cols, vals, rows + r0)
            return
        thr = self.val[:, -1]
        grp, cc = torch.nonzero(mins < thr[None, :], as_tuple=True)
        if len(cc) == 0:
            return
        rr = (grp[:, None] * g + within).reshape(-1)  # every row of each surviving group
        cc = cc.repeat_interleave(g)
        vv = low[rr, cc]
        keep = vv < thr[cc]
        rr, cc, vv = rr[keep], cc[keep], vv[keep]
        by_val = torch.argsort(vv)
        order = by_val[torch.argsort(cc[by_val], stable=True)]  # by column, then by value
        rr, cc, vv = rr[order], cc[order], vv[order]
        cols, counts = torch.unique_consecutive(cc, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(cc), device=dev) - torch.repeat_interleave(starts, counts)
        slot = torch.repeat_interleave(torch.arange(len(cols), device=dev), counts)
        keep = rank < self.kc
        width = int(min(self.kc, int(counts.max())))
        vals = torch.full((len(cols), width), math.inf, device=dev)
        rows = torch.zeros((len(cols), width), dtype=torch.int64, device=dev)
        vals[slot[keep], rank[keep]] = vv[keep]
        rows[slot[keep], rank[keep]] = rr[keep] + r0
        self._merge(cols, vals, rows)

    def _merge(self, cols: torch.Tensor, vals: torch.Tensor, rows: torch.Tensor) -> None:
        merged_v = torch.cat([self.val[cols], vals], dim=1)
        merged_i = torch.cat([self.idx[cols], rows], dim=1)
        best_v, pos = torch.topk(merged_v, self.kc, dim=1, largest=False, sorted=True)
        self.val[cols] = best_v
        self.idx[cols] = torch.gather(merged_i, 1, pos)


class RowCandidates(NamedTuple):
    """What a rows-only screening pass keeps (:func:`screen_rows`)."""

    idx: torch.Tensor
    """The columns of the ``k`` smallest bounds of each row [n_a, k] (int64, CPU)."""
    floor: np.ndarray
    """A lower bound of every other entry of each row [n_a] (float64; inf: none pruned)."""


def gap_slack(screen: Screen, gap_a: torch.Tensor, gap_b: torch.Tensor) -> float:
    """Allowance for adding ``|g_i − h_j|`` to a float32 block of ``L`` (one scalar).

    ``fl(L + |fl(g − h)|) − s`` is ≤ ``L + |g − h|`` when ``s ≥ u(2M + 3G)(1 + 2u) + u·s``
    (``u = 2⁻²⁴``, ``M ≥ |L|``, ``G ≥ |g_i| + |h_j|``): the difference and the sum round once
    each, by at most ``u`` of ``|g| + |h|`` and of ``M + G``, and subtracting ``s`` rounds by at
    most ``u(M + G + s)``. ``|L| ≤ 1.01(2ν_aν_b + c_a + c_b)`` for the fused float32 screen (its
    product has ``Σ|terms| ≤ 2ν_aν_b(1 + γ) + c_a + c_b``, accumulated within ``γ_w ≤ 0.003``); a
    low-precision screen adds its allowance ``2(err_a ν_b + ν_a err_b)``. Returned:
    ``8u(1.01·M + G)``, with margin."""
    if gap_a.numel() == 0 or gap_b.numel() == 0:
        return 0.0
    na, nb = float(screen.norm_a.max()), float(screen.norm_b.max())
    bound = 2 * na * nb + float(screen.const_a.abs().max()) + float(screen.const_b.abs().max())
    if not screen.fused:
        bound += 2 * (float(screen.err_a.max()) * nb + na * float(screen.err_b.max()))
    g = float(gap_a.abs().max()) + float(gap_b.abs().max())
    return 8 * _EPS32 * (1.01 * bound + g)


class _RowBounds:
    """Row blocks of ``L`` (plus ``|g_i − h_j| − gap_slack`` when ``gap = (g, h)``), computed
    into one reused buffer (memory: ``block_rows · n_b · 4`` bytes, twice with a gap)."""

    def __init__(self, screen: Screen, n_a: int, n_b: int, block_rows: int | None,
                 gap: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.screen = screen
        self.block_rows = block_rows or block_rows_for(n_b)
        dev = screen.a_FS.device
        self.buf = torch.empty((min(self.block_rows, max(n_a, 1)), n_b), dtype=torch.float32,
                               device=dev)
        self.gap_buf, self.slack = None, 0.0
        if gap is not None:
            self.g_a, self.g_b = gap[0].to(dev, torch.float32), gap[1].to(dev, torch.float32)
            self.slack = gap_slack(screen, self.g_a, self.g_b)
            self.gap_buf = torch.empty_like(self.buf)

    def block(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of ``fl(L + |g − h|)``: every entry less ``self.slack`` is a lower
        bound (the callers subtract it from a row's floor, or add it to a row's limit, in
        float64: one pass fewer over the block)."""
        low = screen_block(self.screen, r0, r1, out=self.buf[: r1 - r0])
        if self.gap_buf is not None:
            diff = torch.sub(self.g_a[r0:r1, None], self.g_b[None, :], out=self.gap_buf[: r1 - r0])
            low.add_(diff.abs_())
        return low


def round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """The float32 values nearest above (or equal to) the float64 ``x``."""
    y = x.to(torch.float32)
    return torch.where(y.double() < x, torch.nextafter(y, torch.tensor(math.inf)), y)


CHUNK_COLUMNS = 256
"""Columns per chunk of :func:`screen_rows`' selection (at most; a power of two dividing
``n_b``)."""


def _chunk_width(n_b: int, k: int, cap: int = CHUNK_COLUMNS) -> int:
    """The largest power of two ≤ ``cap`` dividing ``n_b`` that leaves at least ``2(k + 1)``
    chunks (1 when none does: every column its own chunk)."""
    c = cap
    while c > 1 and (n_b % c or n_b // c < 2 * (k + 1)):
        c //= 2
    return c


def screen_rows(screen: Screen, n_a: int, n_b: int, k: int, *,
                gap: tuple[torch.Tensor, torch.Tensor] | None = None,
                block_rows: int | None = None, progress: bool = True,
                label: str = "screen") -> RowCandidates:
    """One pass over the row blocks of ``L`` (plus ``|g_i − h_j|`` when ``gap = (g, h)``): each
    row's ``k`` smallest entries and a floor bounding every other entry of the row.

    The selection works on chunks of ``c`` adjacent columns (:func:`_chunk_width`), with the
    columns in order of ``h`` when there is a gap. A chunk's bound is its smallest ``L`` plus
    the distance from ``g_i`` to the chunk's range of ``h`` (no more than any of its entries,
    and without the gap its smallest entry). Only the ``k`` chunks with the smallest bounds are
    read entry by entry (gap included): their ``k`` smallest entries are kept, and the floor is
    the smaller of the largest kept entry and the next chunk's bound. Without a gap these are
    the row's ``k`` smallest entries and the floor is the largest of them, as a full selection
    would give; with a gap the floor can only be lower by the spread of ``h`` within a chunk.
    The gap is thus added to ``k·c`` entries per row, not ``n_b``. Rounding: ``fl(L + |fl(g −
    h)|) − gap_slack`` is rigorously below ``C + |g − h|`` (:func:`gap_slack`), and a chunk's
    bound rounds the same two operations on no larger magnitudes. The block buffer is reused for
    the whole pass (memory: ``block_rows · n_b · 4`` bytes)."""
    kr = min(k, n_b)
    dev = screen.a_FS.device
    perm, h, g_a, slack = None, None, None, 0.0
    if gap is not None:
        g_a, g_b = gap[0].to(dev, torch.float32), gap[1].to(dev, torch.float32)
        slack = gap_slack(screen, g_a, g_b)
        perm = torch.argsort(g_b, stable=True)
        h = g_b[perm].contiguous()
        screen = screen._replace(b_FS=screen.b_FS[perm], norm_b=screen.norm_b[perm],
                                 err_b=screen.err_b[perm], const_b=screen.const_b[perm])
    c = _chunk_width(n_b, kr)
    nc = n_b // c
    take = min(kr, nc)
    within = torch.arange(c, device=dev)
    if h is not None:
        h_lo, h_hi = h.view(nc, c)[:, 0], h.view(nc, c)[:, -1]
    rows = block_rows or block_rows_for(n_b)
    buf = torch.empty((min(rows, max(n_a, 1)), n_b), dtype=torch.float32, device=dev)
    idx = torch.empty((n_a, kr), dtype=torch.int64)
    floor = torch.empty(n_a, dtype=torch.float64)
    bar = progress_bar(total=n_a, desc=f"screening candidates {label}", unit="row",
                       enabled=progress, leave=False)
    for r0 in range(0, n_a, rows):
        r1 = min(n_a, r0 + rows)
        low = screen_block(screen, r0, r1, out=buf[: r1 - r0])
        bound = low.view(r1 - r0, nc, c).amin(dim=2)
        if g_a is not None:
            ga = g_a[r0:r1, None]
            bound.add_(torch.maximum(h_lo[None, :] - ga, ga - h_hi[None, :]).clamp_(min=0.0))
        chunk_bound, chunks = torch.topk(bound, min(take + 1, nc), dim=1, largest=False)
        cols = (chunks[:, :take, None] * c + within).view(r1 - r0, take * c)
        entries = torch.gather(low, 1, cols)
        if g_a is not None:
            entries.add_((g_a[r0:r1, None] - h[cols]).abs_())
        vals, pos = torch.topk(entries, kr, dim=1, largest=False, sorted=False)
        top = vals.amax(dim=1)
        if take < nc:  # every entry of a chunk not read is ≥ the next chunk's bound
            top = torch.minimum(top, chunk_bound[:, take])
        picked = cols.gather(1, pos)
        idx[r0:r1] = (picked if perm is None else perm[picked]).cpu()
        floor[r0:r1] = top.double().cpu()
        bar.update(r1 - r0)
    bar.close()
    floor -= slack
    if kr == n_b:  # every entry of the row is kept
        floor.fill_(math.inf)
    return RowCandidates(idx, floor.numpy())


class RowsBelow(NamedTuple):
    """What :func:`screen_rows_below` finds: per row, every column whose bound is ≤ its limit."""

    counts: np.ndarray
    """Columns at or below the row's limit [n_a] (int64; also for rows over ``max_cols``)."""
    cols: torch.Tensor
    """Those columns, padded with -1 [n_a, width] (int64, CPU; rows over ``max_cols``: all -1)."""


def screen_rows_below(screen: Screen, n_a: int, n_b: int, limits: torch.Tensor, *,
                      max_cols: int, gap: tuple[torch.Tensor, torch.Tensor] | None = None,
                      block_rows: int | None = None) -> RowsBelow:
    """Every column ``j`` of each row ``i`` with ``L_ij ≤ limits[i]`` (with the gap as in
    :func:`screen_rows`): a column left out has ``C_ij ≥ L_ij > limits[i]``. Rows
    with more than ``max_cols`` such columns are only counted (their lists are left empty)."""
    bounds = _RowBounds(screen, n_a, n_b, block_rows, gap)
    dev = screen.a_FS.device
    limits = round_up_f32(limits.double().cpu() + bounds.slack).to(dev)
    counts = np.zeros(n_a, dtype=np.int64)
    lists: list[tuple[int, torch.Tensor]] = []
    width = 0
    for r0 in range(0, n_a, bounds.block_rows):
        r1 = min(n_a, r0 + bounds.block_rows)
        mask = bounds.block(r0, r1) <= limits[r0:r1, None]
        n_below = mask.sum(dim=1).cpu().numpy()
        counts[r0:r1] = n_below
        listed = np.flatnonzero(n_below <= max_cols)
        if len(listed) == 0:
            continue
        sub = mask[torch.from_numpy(listed).to(dev)].cpu()
        flat = torch.from_numpy(np.flatnonzero(sub.numpy())) if dev.type == "cpu" else \
            torch.nonzero(sub.view(-1)).squeeze(1)
        cc = flat % n_b  # row-major: each listed row's columns in turn, ascending
        starts = np.concatenate([[0], np.cumsum(n_below[listed])])
        for pos, row in enumerate(listed):
            lists.append((r0 + int(row), cc[starts[pos]:starts[pos + 1]]))
        width = max(width, int(n_below[listed].max()))
    cols = torch.full((n_a, width), -1, dtype=torch.int64)
    for row, c in lists:
        cols[row, : len(c)] = c
    return RowsBelow(counts, cols)


LISTED_PAIR_COST = 64
"""Cost of scoring one listed pair (gathered rows) relative to one pair of the exact pass
(measured on 2 AVX2 cores at width 4608: about 4.5 µs against 70 ns): a row with more than
``n_b / LISTED_PAIR_COST`` columns below its limit is cheaper recomputed in full."""

_ROW_WIDTHS = (1 / 10, 1 / 8, 1 / 7, 1 / 6, 1 / 5, 0.225, 0.25, 0.275, 0.3, 0.325, 0.35, 0.4,
               0.45, 0.5, 0.6, 0.7, 0.8)
"""Screen widths tried by :func:`row_screen_dims_auto`, as fractions of the stacked width."""


def row_screen_dims_auto(a: StackedFeatures, b: StackedFeatures, k: int, keep: int, *,
                         gap: tuple[torch.Tensor, torch.Tensor] | None = None,
                         sample: int = 256, seed: int = 0, order: torch.Tensor | None = None,
                         chunk: int = 4096, overhead: float = 0.05,
                         exact: tuple[StackedFeatures, StackedFeatures] | None = None) -> int:
    """The screen width of a rows-only top-``k`` screen (:func:`screen_rows` keeping ``keep``)
    that minimises the expected work, from a sample of rows; ``K``: do not screen.

    For ``sample`` random rows of A, a pass over all of B (in chunks) gives each row's exact
    ``k``-th smallest cost ``c_k`` (with the gap); a second pass gives, for every width ``m`` of
    ``_ROW_WIDTHS``, the floor the screen would give the row (its ``keep``-th smallest bound; with
    a gap the chunked selection of :func:`screen_rows` can give a slightly lower one) and
    the number ``S`` of columns whose bound is ≤ ``c_k``. A row whose ``c_k`` is not below its
    floor is rechecked: a second pass of its row of the screen (``(m + 4)/K``) lists the ``S``
    columns that may beat it, scored at ``LISTED_PAIR_COST`` each relative to a pair of the exact
    pass, or, when ``S > n_b / LISTED_PAIR_COST``, the row is recomputed in full (cost 1). The
    work of width ``m`` is ``(m + 4)/K + overhead`` (selection and candidate scores) plus the
    rows' mean recheck cost and two standard errors of it (plus ``1/sample``: the share of
    rechecked rows jumps within a few percent of width, and an underestimate costs more than an
    overestimate), against 1 for the exact pass. It has no size floor: the caller decides when
    screening is worth estimating. ``exact``: the same costs in another basis, cheaper to read
    (the first pass uses it; e.g. the unpaired operands of a paired screen)."""
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    K = a.matrix_FK.shape[1]
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n_a, generator=gen)[:sample]
    order = (coordinate_order(a, b) if order is None else order).cpu()
    widths = sorted({max(1, round(K * f)) for f in _ROW_WIDTHS})
    sel = order[: widths[-1]]
    bounds = list(zip([0, *widths[:-1]], widths, strict=True))

    def prefix_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` restricted to the screened coordinates, and ``‖x‖² − ‖x_S‖²`` per width."""
        xs = torch.index_select(x, 1, sel)
        total = torch.linalg.vector_norm(x, dim=1).square()
        seg = [torch.linalg.vector_norm(xs[:, p:m], dim=1).square() for p, m in bounds]
        rest = total[:, None] - torch.stack(seg, dim=1).cumsum(dim=1)
        return xs, rest.clamp_(min=0.0).sqrt_()

    xs, rest_a = prefix_norms(a.matrix_FK[rows].cpu().float())
    ca = a.const_F[rows].cpu().float()
    ga, gb = (gap[0][rows].cpu().float(), gap[1].cpu().float()) if gap is not None else (None, None)
    kk, kept = min(k, n_b), min(keep, n_b)

    def consts(c0: int, c1: int) -> torch.Tensor:
        const = ca[:, None] + b.const_F[c0:c1].cpu().float()[None, :]
        if ga is not None and gb is not None:
            const += (ga[:, None] - gb[None, c0:c1]).abs()
        return const

    best = torch.full((len(rows), kk), math.inf)
    ex_a, ex_b = (a, b) if exact is None else exact
    x0 = ex_a.matrix_FK[rows].cpu().float()
    for c0 in range(0, n_b, chunk):
        y = ex_b.matrix_FK[c0:c0 + chunk].cpu().float()
        cost = consts(c0, c0 + len(y)) - 2 * matmul_nt(x0, y, torch.empty((len(rows), len(y))))
        best = torch.topk(torch.cat([best, cost], dim=1), kk, dim=1, largest=False).values
    kth = best.amax(dim=1)
    floors = torch.full((len(widths), len(rows), kept), math.inf)
    below = torch.zeros((len(widths), len(rows)), dtype=torch.float64)
    for c0 in range(0, n_b, chunk):
        c1 = min(n_b, c0 + chunk)
        ys, rest_b = prefix_norms(b.matrix_FK[c0:c1].cpu().float())
        const = consts(c0, c1)
        dot = torch.zeros((len(rows), c1 - c0))
        seg = torch.empty_like(dot)
        low = torch.empty_like(dot)
        for w, (p, m) in enumerate(bounds):
            dot += matmul_nt(xs[:, p:m].contiguous(), ys[:, p:m].contiguous(), seg)
            torch.addr(dot, rest_a[:, w], rest_b[:, w], out=low)
            torch.add(const, low, alpha=-2.0, out=low)
            part = torch.topk(low, min(kept, low.shape[1]), dim=1, largest=False).values
            floors[w] = torch.topk(torch.cat([floors[w], part], dim=1), kept, dim=1,
                                   largest=False).values
            below[w] += (low <= kth[:, None]).sum(dim=1).double()
    cap = n_b / LISTED_PAIR_COST
    works, shares = [], []
    for w, m in enumerate(widths):
        # a row is rechecked unless its k-th cost is strictly below its floor
        fail = (kth >= floors[w].amax(dim=1)).double()
        recheck = torch.where(below[w] <= cap, below[w] * LISTED_PAIR_COST / n_b, 1.0)
        cost = fail * ((m + 4) / K + recheck)
        spread = float(cost.std()) if len(cost) > 1 else 1.0
        works.append((m + 4) / K + overhead + float(cost.mean()) + 2 * spread / math.sqrt(len(cost))
                     + 1 / len(cost))
        shares.append(round(float(fail.mean()), 3))
    logger.debug("row screen widths %s: estimated shares of rows to recheck %s, works %s", widths,
                 shares, [round(v, 3) for v in works])
    pick = int(np.argmin(works))
    best_m, best_work = (widths[pick], works[pick]) if works[pick] < 1.0 else (K, 1.0)
    logger.info("row screen width %d of %d (estimated work %.2f of an exact pass)", best_m, K,
                best_work)
    return best_m
