"""Certified-optimal sparse matching for SAEs too wide for a dense cost matrix (16k-1M features).

The dense route (:mod:`sae_match_lens.matching`) holds the whole ``n_a × n_b`` cost matrix; at 65k
features that is 16 GiB, at 1M 4 TiB. This module never holds more than one block of rows:

1. **Screening pass.** Row blocks of a *lower bound* ``L ≤ C`` are computed on ``device`` and
   reduced there to each row's ``k`` and each column's ``max(4, k // 4)`` cheapest entries;
   only those candidate edges (about ``1.25 · n · k``) move to the host. ``L`` is the cost
   itself (``screen_dims=None``) or a cheaper bound (see *screening* below). The ``k``-th value
   of row ``i`` (``row_floor_i``) and the last kept value of column ``j`` (``col_floor_j``)
   bound every edge that was not kept:
   ``C_ij ≥ max(row_floor_i, col_floor_j)``.
2. **Sparse solve.** Exact float32 costs of the candidate edges are computed, and
   ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (LAPJVsp) solves the assignment
   restricted to them. Its output is checked (every edge exists, one-to-one, right size).
3. **Duals.** Given the matching, dual variables ``(u, v)`` with reduced costs
   ``r_ij = C_ij − u_i − v_j ≥ 0`` on every candidate edge and ``= 0`` on matched edges come
   from shortest paths on the residual graph (Bellman–Ford, vectorised, from both sides and
   averaged, which keeps the prices central). Then ``Σu + Σv`` equals the matching's cost.
4. **Certificate.** If every *pruned* edge also has ``r_ij ≥ 0`` the duals are feasible for the
   full problem, so ``Σu + Σv`` is a lower bound on every assignment: the matching is optimal.
   A pruned edge can violate only if ``v_j > row_floor_i − u_i`` *and*
   ``u_i > col_floor_j − v_j``; rows with no such column are proven without touching the matrix
   again (a sort and a binary search). The remaining rows are checked exactly (their suspect
   edges, or their whole row), violating edges join the graph and the problem is re-solved
   (at most ``max_rounds`` repairs). ``gap = Σ_i max(0, −min_j r_ij)``: lowering each ``u_i`` by
   its worst violation makes the duals feasible, so ``gap`` bounds ``total − optimum``.

**Screening.** ``C_ij = c_i + c_j − 2 a_i·b_j``. Splitting the stacked coordinates into a set
``S`` (the ``screen_dims`` of largest energy) and the rest ``R``, Cauchy–Schwarz gives
``a_i·b_j ≤ a_iS·b_jS + ‖a_iR‖‖b_jR‖``, hence the bound ``L_ij = c_i + c_j − 2(a_iS·b_jS +
‖a_iR‖‖b_jR‖)`` (for ``mse`` this is ``‖a_S − b_S‖² + (‖a_R‖ − ‖b_R‖)²``), one matrix product
of width ``|S| + 1`` instead of ``K`` (the norms ``‖x_R‖`` are rounded up, and in float32 the
product also carries the constants and an allowance ``γ(c_i + c_j + 2‖a'_i‖‖b'_j‖)``,
``γ = 2(|S| + 9)·2⁻²⁴``, that covers its own accumulation error, so ``L`` is one GEMM and
rigorously ≤ the exact real cost). With ``precision="bfloat16"``/``"float16"`` the screen runs
in that precision; the bound subtracts a rigorous allowance for the rounding of the inputs
(``‖δa_i‖‖b̃_j‖ + ‖a_i‖‖δb_j‖``, measured exactly), of the product's accumulation and output
(``(K·2⁻²⁴ + u_out)‖ã_i‖‖b̃_j‖``) and of the float32 constants. Any screen is only a filter:
candidate costs are always recomputed in float32, and the certificate uses ``L`` only as a lower
bound. On CPUs without bf16/fp16 matrix units (e.g. AVX2-only) low precision is slower than
float32 (measured on an AVX2 EPYC: float32 ≈ 139, bf16 ≈ 14, fp16 ≈ 10 GFLOP/s); it is meant
for GPUs. ``screen_dims="auto"`` (:func:`screen_dims_auto`) picks the width from a sample.

**Rigour.** Bounds hold for the exact real-valued costs of the stacked float32 features; the
costs the solver compares are float32 computations of them (as in the dense route), so
"certified" means optimal up to that rounding: the gap is compared with
``1e-5 · max(1, |total|) + 1e-6 · n``, the dense route's tolerance.

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

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from tqdm.auto import tqdm

from .costs import StackedFeatures

__all__ = ["Precision", "SparseSolution", "screen_dims_auto", "solve_sparse", "sparse_bytes"]

logger = logging.getLogger(__name__)

Precision = Literal["float32", "bfloat16", "float16"]
_LOW = {"bfloat16": (torch.bfloat16, 2.0**-8), "float16": (torch.float16, 2.0**-11)}
_EPS32 = 2.0**-24
_EDGE_CHUNK_BYTES = 1 << 27


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


class _Screen(NamedTuple):
    a_FS: torch.Tensor
    b_FS: torch.Tensor
    norm_a: torch.Tensor
    norm_b: torch.Tensor
    err_a: torch.Tensor
    err_b: torch.Tensor
    const_a: torch.Tensor
    const_b: torch.Tensor
    fused: bool


def sparse_bytes(n_a: int, n_b: int, k: int, block_rows: int) -> int:
    """Rough peak host memory of :func:`solve_sparse` beyond the stacked features (bytes)."""
    edges = (n_a + n_b) * (2 * k + 4)
    return 3 * min(block_rows, n_a) * n_b * 4 + edges * 80 + (n_a + n_b) * 200


def screen_dims_auto(a: StackedFeatures, b: StackedFeatures, k: int, *, sample: int = 256,
                     sample_cols: int = 4096, seed: int = 0) -> int:
    """Pick the screen width that minimises the expected work, from a sample of rows.

    For ``sample`` random rows of A the exact costs against all of B give each row's best cost
    (a proxy for the dual prices ``u_i + v_j`` near that row, which scale with the features'
    norms). For each width ``m`` in ``K/8 … K/2`` the screened ``k``-th cost of each sample row is
    estimated on ``sample_cols`` random columns (the matching quantile); the fraction ``f_m`` of
    rows whose floor falls below 1.1 × their best cost estimates how many rows a certificate
    would recheck exactly. The width minimising ``m/K + 1.2 f_m`` wins against the exact pass
    (cost 1); returns ``K`` for no screening.
    """
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    K = a.matrix_FK.shape[1]
    if min(n_a, n_b) < 4096 or K < 512:
        return K
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n_a, generator=gen)[:sample]
    cols = torch.randperm(n_b, generator=gen)[:sample_cols]
    sub_a = StackedFeatures(a.matrix_FK[rows], a.const_F[rows])
    sub_b = StackedFeatures(b.matrix_FK[cols], b.const_F[cols])
    exact = _exact_rows(sub_a, b, torch.arange(len(rows)), block_rows=len(rows), device=None)
    proxy = 1.1 * exact.min(dim=1).values.double()
    kk = max(1, min(len(cols), round(k * len(cols) / n_b)))
    best_m, best_work = K, 1.0
    for m in (K // 8, K // 6, K // 5, K // 4, K // 3, K // 2):
        screen = _make_screen(sub_a, sub_b, m, "float32", torch.device("cpu"))
        low = _screen_block(screen, 0, len(rows))
        floor = torch.topk(low, kk, dim=1, largest=False).values[:, -1]
        frac = float((floor.double() < proxy).double().mean())
        work = m / K + 1.2 * frac
        logger.info("screen width %d: %.3f of sample rows would need a recheck", m, frac)
        if work < best_work:
            best_m, best_work = m, work
    return best_m


def _make_screen(a: StackedFeatures, b: StackedFeatures, m: int, precision: Precision,
                 dev: torch.device) -> _Screen:
    """Screening matrices ``[x_S, ‖x_R‖]`` and per-feature rounding allowances (see module doc)."""
    K = a.matrix_FK.shape[1]
    if m >= K:
        keep = torch.arange(K)
    else:
        # which coordinates to keep is a heuristic (any set gives a valid bound): a row sample
        stride_a = max(1, a.matrix_FK.shape[0] // 4096)
        stride_b = max(1, b.matrix_FK.shape[0] // 4096)
        energy = (torch.linalg.vector_norm(a.matrix_FK[::stride_a], dim=0).double().pow(2)
                  + torch.linalg.vector_norm(b.matrix_FK[::stride_b], dim=0).double().pow(2))
        keep = torch.topk(energy, m).indices.sort().values
    has_rest = len(keep) < K

    up_rest = 1.0 + 2 * (K + 2) * _EPS32  # float32 norms times this are upper bounds
    up_part = 1.0 + 2 * (len(keep) + 3) * _EPS32

    def side(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[x_S, ‖x_R‖↑]`` on ``dev`` and upper bounds of its row norms, in chunks of rows."""
        width = len(keep) + int(has_rest)
        out = torch.empty((x.shape[0], width), dtype=torch.float32, device=dev)
        norms = torch.empty(x.shape[0], dtype=torch.float32, device=dev)
        for r0 in range(0, x.shape[0], 4096):
            chunk = x[r0:r0 + 4096].to(dev)
            part = chunk[:, keep.to(dev)]
            if has_rest:
                # ‖x_R‖² = ‖x‖² − ‖x_S‖² in float64 (no copy of the rest), with slack for its
                # rounding, then rounded up
                full_sq = torch.linalg.vector_norm(chunk, dim=1, dtype=torch.float64).square()
                part_sq = torch.linalg.vector_norm(part, dim=1, dtype=torch.float64).square()
                rest_sq = (full_sq - part_sq).add_(full_sq * (4 * K * 2.0**-53)).clamp_(min=0.0)
                rest_norm = rest_sq.sqrt_().float() * up_rest
                part = torch.cat([part, rest_norm[:, None]], dim=1)
            out[r0:r0 + 4096] = part
            norms[r0:r0 + 4096] = torch.linalg.vector_norm(part, dim=1) * up_part
        return out, norms

    sa, na = side(a.matrix_FK)
    sb, nb = side(b.matrix_FK)
    ca, cb = a.const_F.to(dev, torch.float32), b.const_F.to(dev, torch.float32)
    if precision == "float32":
        # One product gives L directly: [x_S, r, c_a(1−γ), 1, ν_a] · [−2y_S, −2r, 1, c_b(1−γ),
        # −2γν_b] = c_a + c_b − 2(x_S·y_S + r_a r_b) − γ(c_a + c_b + 2ν_aν_b); γ covers the
        # accumulation (≤ γ_w Σ|terms|), the float32 constants, and the rounding of these columns.
        g = 2 * (sa.shape[1] + 8) * _EPS32
        one_a = torch.ones_like(ca)[:, None]
        one_b = torch.ones_like(cb)[:, None]
        fa = torch.cat([sa, (ca * (1 - g))[:, None], one_a, na[:, None]], dim=1)
        fb = torch.cat([sb.mul_(-2.0), one_b, (cb * (1 - g))[:, None], (-2 * g * nb)[:, None]],
                       dim=1)
        return _Screen(fa, fb, na, nb, na, nb, ca, cb, True)
    gamma = (sa.shape[1] + 2) * _EPS32
    dtype, u_out = _LOW[precision]
    la, lb = sa.to(dtype), sb.to(dtype)
    if not (bool(torch.isfinite(la).all()) and bool(torch.isfinite(lb).all())):
        raise ValueError(f"features overflow {precision}; use precision='float32' (or bfloat16).")
    da = (sa.double() - la.double()).norm(dim=1)
    db = (sb.double() - lb.double()).norm(dim=1)
    nla, nlb = la.double().norm(dim=1), lb.double().norm(dim=1)
    # |a·b − ã·b̃| ≤ ‖δa‖‖b̃‖ + ‖a‖‖δb‖ (exact), accumulation and output rounding ≤ (γ + u)‖ã‖‖b̃‖:
    # allowance err_a_i·‖b̃_j‖ + ‖a_i‖·err_b_j with the terms below.
    err_a = (da + (gamma + u_out) * nla) * 1.001
    return _Screen(la, lb, na, (nlb * 1.001).float(), err_a.float(), (db * 1.001).float(),
                   ca, cb, False)


@contextlib.contextmanager
def _full_precision_reductions(dev: torch.device) -> Iterator[None]:
    """On CUDA, keep float32 accumulation for half-precision products (the allowance needs it)."""
    if dev.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    saved = (flags.allow_bf16_reduced_precision_reduction,
             flags.allow_fp16_reduced_precision_reduction)
    flags.allow_bf16_reduced_precision_reduction = False
    flags.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (flags.allow_bf16_reduced_precision_reduction,
         flags.allow_fp16_reduced_precision_reduction) = saved


def _screen_block(s: _Screen, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of the lower bound ``L`` (float32, on the screen's device)."""
    if s.fused:
        return s.a_FS[r0:r1] @ s.b_FS.T
    with _full_precision_reductions(s.a_FS.device):
        dot = (s.a_FS[r0:r1] @ s.b_FS.T).float()
    na, ca = s.norm_a[r0:r1], s.const_a[r0:r1]
    # 2 (err_a_i ‖b_j‖ + ‖a_i‖ err_b_j) + float32 rounding of the constants and the sum
    allow = torch.outer(s.err_a[r0:r1], s.norm_b).add_(torch.outer(na, s.err_b)).mul_(2.0)
    allow.add_(torch.outer(na, s.norm_b).mul_(2.0).add_(ca[:, None]).add_(s.const_b[None, :])
               .mul_(4 * _EPS32))
    return dot.mul_(-2.0).add_(ca[:, None]).add_(s.const_b[None, :]).sub_(allow)


def _exact_rows(a: StackedFeatures, b: StackedFeatures, rows: torch.Tensor, *, block_rows: int,
                device: torch.device | None) -> torch.Tensor:
    """Exact float32 costs of the given source rows against all of B [len(rows), n_b] (CPU)."""
    dev = device or a.matrix_FK.device
    B = b.matrix_FK.to(dev)
    cb = b.const_F.to(dev, torch.float32)
    out = torch.empty((len(rows), b.matrix_FK.shape[0]), dtype=torch.float32)
    for s0 in range(0, len(rows), block_rows):
        idx = rows[s0:s0 + block_rows]
        blk = a.matrix_FK[idx].to(dev) @ B.T
        blk.mul_(-2.0).add_(cb[None, :]).add_(a.const_F[idx].to(dev, torch.float32)[:, None])
        out[s0:s0 + len(idx)] = blk.clamp_(min=0.0).cpu()
    return out


def _listed_costs(x: StackedFeatures, y: StackedFeatures, idx_XL: torch.Tensor,
                  dev: torch.device) -> torch.Tensor:
    """Exact float32 costs between each row ``i`` of ``x`` and the rows ``idx_XL[i]`` of ``y``
    ([n_x, L], float64, CPU). Gathers into one preallocated buffer (fresh allocations per chunk
    cost more than the arithmetic), then one batched product per chunk."""
    n_x, L = idx_XL.shape
    K = x.matrix_FK.shape[1]
    out = torch.empty((n_x, L), dtype=torch.float64)
    if n_x == 0 or L == 0:
        return out
    rows = max(1, _EDGE_CHUNK_BYTES // (4 * K * L))
    buf = torch.empty((rows * L, K), dtype=torch.float32, device=dev)
    Y = y.matrix_FK.to(dev)
    cy = y.const_F.to(dev, torch.float32)
    for r0 in range(0, n_x, rows):
        r1 = min(n_x, r0 + rows)
        idx = idx_XL[r0:r1].to(dev)
        gathered = torch.index_select(Y, 0, idx.reshape(-1), out=buf[: (r1 - r0) * L])
        dot = torch.bmm(gathered.view(r1 - r0, L, K), x.matrix_FK[r0:r1].to(dev)[:, :, None])
        cost = (x.const_F[r0:r1].to(dev, torch.float32)[:, None] + cy[idx]
                - 2.0 * dot[:, :, 0]).clamp_(min=0.0)
        out[r0:r1] = cost.double().cpu()
    return out


def _edge_costs(a: StackedFeatures, b: StackedFeatures, rows: np.ndarray, cols: np.ndarray,
                dev: torch.device) -> np.ndarray:
    """Exact float32 costs of individual edges ``(rows[e], cols[e])`` (float64 array)."""
    out = np.empty(len(rows), dtype=np.float64)
    if len(rows) == 0:
        return out
    K = a.matrix_FK.shape[1]
    chunk = max(1, _EDGE_CHUNK_BYTES // (8 * K))
    buf_a = torch.empty((chunk, K), dtype=torch.float32, device=dev)
    buf_b = torch.empty((chunk, K), dtype=torch.float32, device=dev)
    A, B = a.matrix_FK.to(dev), b.matrix_FK.to(dev)
    ca, cb = a.const_F.to(dev, torch.float32), b.const_F.to(dev, torch.float32)
    r_t, c_t = torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev)
    for s0 in range(0, len(rows), chunk):
        r, c = r_t[s0:s0 + chunk], c_t[s0:s0 + chunk]
        ga = torch.index_select(A, 0, r, out=buf_a[: len(r)])
        gb = torch.index_select(B, 0, c, out=buf_b[: len(r)])
        dot = torch.bmm(ga[:, None, :], gb[:, :, None])[:, 0, 0]
        cost = (ca[r] + cb[c] - 2.0 * dot).clamp_(min=0.0)
        out[s0:s0 + len(r)] = cost.double().cpu().numpy()
    return out


def _screen_pass(screen: _Screen, n_a: int, n_b: int, k: int, block_rows: int,
                 progress: bool, label: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray,
                                                      np.ndarray]:
    """Candidates of each row ``[n_a, kr]`` and of each column ``[n_b, kc]``, and the floors
    bounding every other edge of each row and column."""
    kr, kc = min(k, n_b), min(max(4, k // 4), n_a)
    dev = screen.a_FS.device
    col_val = torch.full((n_b, kc), math.inf, device=dev)
    col_idx = torch.zeros((n_b, kc), dtype=torch.int64, device=dev)
    row_idx = torch.empty((n_a, kr), dtype=torch.int64)
    row_floor = torch.empty(n_a, dtype=torch.float64)
    bar = tqdm(total=n_a, desc=f"screen {label}", unit="row", disable=not progress, leave=False)
    for r0 in range(0, n_a, block_rows):
        r1 = min(n_a, r0 + block_rows)
        low = _screen_block(screen, r0, r1)
        vals, idx = torch.topk(low, kr, dim=1, largest=False, sorted=True)
        row_idx[r0:r1] = idx.cpu()
        row_floor[r0:r1] = vals[:, -1].double().cpu()
        kb = min(kc, r1 - r0)
        cv, ci = torch.topk(low.T.contiguous(), kb, dim=1, largest=False, sorted=False)
        merged_v = torch.cat([col_val, cv], dim=1)
        merged_i = torch.cat([col_idx, ci + r0], dim=1)
        col_val, pos = torch.topk(merged_v, kc, dim=1, largest=False, sorted=True)
        col_idx = torch.gather(merged_i, 1, pos)
        bar.update(r1 - r0)
    bar.close()
    if kr == n_b:  # every edge of the row is a candidate
        row_floor.fill_(math.inf)
    col_floor = col_val[:, -1].double().cpu() if kc < n_a else torch.full((n_b,), math.inf,
                                                                         dtype=torch.float64)
    return row_idx, col_idx.cpu(), row_floor.numpy(), col_floor.numpy()


class _Graph:
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


def _complete_pairing(g: _Graph) -> tuple[np.ndarray, np.ndarray]:
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


class _Problem(NamedTuple):
    """The square problem the solver sees: left/right nodes, sparse edges, a zero-cost block."""

    n_left: int
    e_left: np.ndarray
    e_right: np.ndarray
    e_cost: np.ndarray
    block_left: np.ndarray
    block_right: np.ndarray


def _build_problem(g: _Graph, max_cost: float | None) -> tuple[_Problem, np.ndarray, np.ndarray]:
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
        prob = _Problem(n, e_left, e_right, e_cost, n_a + ar_b, n_b + ar_a)
        return prob, n_a + g.cols, n_b + g.rows
    n = max(n_a, n_b)
    block_left = np.arange(n_a, n) if n_b > n_a else (np.arange(n_a) if n_a > n_b else empty)
    block_right = np.arange(n_b, n) if n_a > n_b else (np.arange(n_b) if n_b > n_a else empty)
    return _Problem(n, g.rows, g.cols, g.cost, block_left, block_right), empty, empty


def _solve_problem(prob: _Problem, extra_l: np.ndarray, extra_r: np.ndarray, n_a: int,
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


def _duals(prob: _Problem, match_right: np.ndarray, mcost: np.ndarray) -> tuple[np.ndarray,
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


def _suspect_rows(u: np.ndarray, v: np.ndarray, row_floor: np.ndarray,
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
    block_rows: int = 1024,
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
            screen; ``"auto"``: chosen by :func:`screen_dims_auto`).
        precision: arithmetic of the screening product (``"float32"``, or ``"bfloat16"`` /
            ``"float16"`` with a rigorous rounding allowance; slower than float32 on AVX2 CPUs).
        block_rows: rows per block of the screening pass (memory: ``block_rows · n_b · 4 · 3``).
        device: where the screening pass and exact rechecks run (e.g. ``"cuda"``); only the
            candidate lists return to the host.
        progress: show progress bars.
        label: name used in logs and bars.
    """
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if not (isinstance(max_rounds, int) and max_rounds >= 0):
        raise ValueError(f"max_rounds must be an integer >= 0, got {max_rounds!r}.")
    if precision not in ("float32", *_LOW):
        raise ValueError(
            f"precision must be 'float32', 'bfloat16' or 'float16', got {precision!r}."
        )
    if a.matrix_FK.shape[1] != b.matrix_FK.shape[1]:
        raise ValueError(
            f"stacked feature widths differ ({a.matrix_FK.shape[1]} vs {b.matrix_FK.shape[1]})."
        )
    dev = torch.device(device) if device is not None else a.matrix_FK.device
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    K = a.matrix_FK.shape[1]
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    if screen_dims == "auto":
        m = screen_dims_auto(a, b, k) if precision == "float32" else K
    elif screen_dims is None:
        m = K
    elif isinstance(screen_dims, int) and screen_dims >= 1:
        m = min(int(screen_dims), K)
    else:
        raise ValueError(
            f"screen_dims must be a positive integer, 'auto' or None, got {screen_dims!r}."
        )
    stats["screen_dims"] = m
    screen = _make_screen(a, b, m, precision, dev)
    row_idx, col_idx, row_floor, col_floor = _screen_pass(screen, n_a, n_b, k, block_rows,
                                                           progress, label)
    del screen
    stats["t_screen"] = time.perf_counter() - t0
    g = _Graph(n_a, n_b)
    g.add(np.repeat(np.arange(n_a), row_idx.shape[1]), row_idx.numpy().ravel(),
          _listed_costs(a, b, row_idx, dev).numpy().ravel())
    g.add(col_idx.numpy().ravel(), np.repeat(np.arange(n_b), col_idx.shape[1]),
          _listed_costs(b, a, col_idx, dev).numpy().ravel())
    if max_cost is None:
        pr, pc = _complete_pairing(g)
        r_new, c_new = g.missing(pr, pc)
        g.add(r_new, c_new, _edge_costs(a, b, r_new, c_new, dev))
    stats["t_candidates"] = time.perf_counter() - t0 - stats["t_screen"]
    padded = max_cost is None and n_a != n_b
    certified, gap, rounds = False, math.inf, 0
    for rounds in range(max_rounds + 1):
        t1 = time.perf_counter()
        prob, extra_l, extra_r = _build_problem(g, max_cost)
        match_right, mcost = _solve_problem(prob, extra_l, extra_r, n_a, n_b, padded)
        u, v = _duals(prob, match_right, mcost)
        primal = float(mcost.sum())
        tol = 1e-5 * max(1.0, abs(primal)) + 1e-6 * max(n_a, n_b)
        in_graph_gap = _graph_violation(prob, u, v)
        u_r, v_r = u[:n_a], v[:n_b]
        suspects, count, order = _suspect_rows(u_r, v_r, row_floor, col_floor)
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
        add_r, add_c, add_w, neg = _recheck(a, b, g, suspects, count, order, u_r, v_r, col_floor,
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


def _graph_violation(prob: _Problem, u: np.ndarray, v: np.ndarray) -> float:
    """Sum over left nodes of the worst negative reduced cost among the problem's own edges."""
    red = prob.e_cost - u[prob.e_left] - v[prob.e_right]
    worst = np.zeros(prob.n_left)
    np.minimum.at(worst, prob.e_left, red)
    total = float(-worst.sum())
    if len(prob.block_left):
        total += max(0.0, float(u[prob.block_left].max() + v[prob.block_right].max())) * len(
            prob.block_left)
    return max(0.0, total)


def _recheck(a: StackedFeatures, b: StackedFeatures, g: _Graph, suspects: np.ndarray,
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
        w = _edge_costs(a, b, rr, cc, dev)
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
        C = _exact_rows(a, b, torch.from_numpy(idx), block_rows=chunk, device=dev).double()
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


def _best_two(g: _Graph, n_a: int) -> tuple[np.ndarray, np.ndarray]:
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
