"""Matching costs between the features of two SAEs, built block by block.

The cost of pairing source feature ``i`` (SAE A) with target feature ``j`` (SAE B) is a weighted
sum over parameter blocks ``k`` ∈ {decoder, encoder, b_enc}:

* ``metric="mse"`` (the paper's): ``C_ij = Σ_k w_k ‖a_i^k − b_j^k‖²``;
* ``metric="cosine"``: ``C_ij = Σ_k w_k (1 − cos(a_i^k, b_j^k))`` over the vector blocks
  (decoder, encoder); a scalar bias has no direction, so ``b_enc`` must have weight 0.

Both are computed as one matrix product of "stacked" feature matrices (each block scaled by
``√w_k``, normalised for cosine), plus per-row and per-column constants. ``b_dec`` never counts.
:func:`cost_blocks` and :func:`exact_rows` give float32 rows of the matrix (used to *find* an
assignment and as filters with a rigorous error bound); :func:`listed_costs` and
:func:`edge_costs` give chosen entries in float64 (what certificates and results use).

**The float64 cost.** The cost that certificates speak about is the real number
``C_ij = ‖x_i − y_j‖² + o_i + o_j`` of the stacked float32 vectors ``x_i``, ``y_j`` and the
float64 offsets ``o = const − fl(‖x‖²)`` (:func:`exact_scales`; 0 up to rounding for ``mse``,
where ``const = ‖x‖²``, so ``C`` is the squared distance of the folded parameters; for
``cosine`` it is ``Σ_k w_k − 2 x_i·y_j``). It is computed from direct differences in float64:
the differences of float32 numbers, their squares and the sum of ``K`` non-negative terms have a
relative error ≤ ``(K + 2)·2⁻⁵³`` of ``‖x_i − y_j‖²`` each way; adding the offsets costs two more
roundings, so ``|ĉ − C| ≤ g64 · (|ĉ| + 2|o_i| + 2|o_j|)`` with ``g64 = 2(K + 6)·2⁻⁵³``
(:func:`edge_error`). A float32 entry of :func:`cost_blocks` / :func:`exact_rows` (one GEMM of
width ``K``, constants rounded to float32, three roundings of the sum; any summation order) is
within ``g32 · (|c_i| + |c_j| + 2ν_iν_j)`` of ``c_i + c_j − 2x_i·y_j``, ``g32 = 2(K + 9)·2⁻²⁴``,
``ν`` upper bounds of the row norms; that differs from ``C`` by the float64 rounding of the
norms, ≤ ``g64 · (ν_i² + |o_i| + ν_j² + |o_j|)`` (:func:`float32_error` adds both).

On the CPU the products run in numpy's BLAS (:func:`matmul_nt`): for these shapes it measured
1.4–1.6× the throughput of torch's CPU GEMM on an AVX2 EPYC (136–160 vs 99 GFLOP/s, float32).
That BLAS has its own thread pool (``OPENBLAS_NUM_THREADS`` or ``threadpoolctl`` limit it, not
``torch.set_num_threads``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from ..adapters import FeatureView

__all__ = ["BLOCKS", "CostWeights", "ExactScales", "Metric", "StackedFeatures", "cost_blocks",
           "edge_costs", "edge_error", "exact_rows", "exact_scales", "float32_error", "float32_error_max",
           "ieee_products", "listed_costs", "matmul_nt", "squared_norms", "stack_features"]

_GATHER_BYTES = 1 << 27
"""Size of the gather buffer used to compute listed entries off the CPU (128 MiB)."""
_CHUNK_BYTES = 1 << 20
"""Float64 working set of one chunk of the CPU's float64 passes (1 MiB: it stays in cache)."""
_EPS64 = 2.0**-53
_EPS32 = 2.0**-24

Metric = Literal["mse", "cosine"]
BLOCKS = ("decoder", "encoder", "b_enc")


@dataclass(frozen=True)
class CostWeights:
    """Weights of the parameter blocks in the matching cost (``b_dec`` never counts)."""

    decoder: float = 1.0
    """Weight of the decoder rows (``W_dec[i]``)."""
    encoder: float = 1.0
    """Weight of the encoder columns (``W_enc[:, i]``)."""
    b_enc: float = 1.0
    """Weight of the encoder bias (gated SAEs: ``b_gate`` and ``b_mag`` together)."""

    def __post_init__(self) -> None:
        for name in BLOCKS:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"cost weight {name}={value!r} must be a finite number >= 0.")
        if all(getattr(self, name) == 0 for name in BLOCKS):
            raise ValueError("at least one cost weight (decoder, encoder, b_enc) must be > 0.")

    @classmethod
    def resolve(cls, weights: CostWeights | Mapping[str, float] | None, metric: Metric) -> CostWeights:
        """Accept a ``CostWeights``, a mapping of block name → weight, or ``None`` (the default:
        all three blocks for ``mse``, decoder and encoder for ``cosine``)."""
        if metric not in ("mse", "cosine"):
            raise ValueError(f"metric must be 'mse' or 'cosine', got {metric!r}.")
        if weights is None:
            resolved = cls() if metric == "mse" else cls(b_enc=0.0)
        elif isinstance(weights, CostWeights):
            resolved = weights
        elif isinstance(weights, Mapping):
            unknown = set(weights) - set(BLOCKS)
            if unknown:
                raise ValueError(
                    f"unknown cost weight(s) {sorted(unknown)}; valid blocks are {list(BLOCKS)} "
                    "(b_dec never counts)."
                )
            resolved = cls(**{name: float(weights.get(name, 0.0)) for name in BLOCKS})
        else:
            raise TypeError(f"weights must be CostWeights, a mapping or None, got {type(weights).__name__}.")
        if metric == "cosine" and resolved.b_enc != 0:
            raise ValueError(
                "metric='cosine' compares directions, and the scalar b_enc has none: "
                "set weights={'decoder': ..., 'encoder': ...} (b_enc weight 0) or use metric='mse'."
            )
        return resolved

    def as_dict(self) -> dict[str, float]:
        """The weights as a plain dict (for saved metadata)."""
        return {name: float(getattr(self, name)) for name in BLOCKS}


@dataclass(frozen=True)
class StackedFeatures:
    """One SAE's features as a single matrix, so that costs are one matrix product.

    ``C = row_const[:, None] + col_const[None, :] − 2 · (A.matrix @ B.matrixᵀ)`` where for
    ``mse`` ``const = ‖row‖²`` and for ``cosine`` ``const = Σ_k w_k / 2`` (so that
    ``C = Σ_k w_k − Σ_k w_k cos_k``).
    """

    matrix_FK: torch.Tensor
    """Stacked, weighted feature vectors [d_sae, K]."""
    const_F: torch.Tensor
    """Per-feature constant of the cost expansion [d_sae] (float64; for ``mse`` ``‖row‖²``
    computed in float64, so that the float64 cost is the squared distance itself)."""
    norm_sq_F: torch.Tensor | None = None
    """``fl(‖row‖²)`` in float64 as :func:`squared_norms` computes it [d_sae], when known
    (:func:`stack_features` fills it; :func:`exact_scales` computes it otherwise). Leave it
    ``None`` for a matrix built any other way."""


def stack_features(view: FeatureView, weights: CostWeights, metric: Metric) -> StackedFeatures:
    """Stack the weighted blocks of a :class:`FeatureView` into one matrix (float32). With one
    block of weight 1 and ``metric="mse"`` the matrix is that block's tensor itself (no copy;
    nothing in the package writes to a stacked matrix)."""
    blocks = [(getattr(weights, name), tensor) for name, tensor in (
        ("decoder", view.decoder_FO), ("encoder", view.encoder_FD), ("b_enc", view.bias_FB))]
    blocks = [(w, t) for w, t in blocks if w != 0]
    if any(t.shape[1] == 0 for _, t in blocks):
        raise ValueError(
            f"feature view of {view.hook_name} has an empty block that the cost weighs "
            f"({weights}); build the view with feature_view(sae, encoder=True) (the default)."
        )
    width = sum(t.shape[1] for _, t in blocks)
    (w0, t0), single = blocks[0], len(blocks) == 1
    if single and metric == "mse" and w0 == 1.0 and t0.dtype == torch.float32 and t0.is_contiguous():
        matrix = t0.detach()  # one unweighted block: the view's own tensor (never written to)
        norm_sq = squared_norms(matrix)
        return StackedFeatures(matrix, norm_sq, norm_sq)
    matrix = torch.empty((view.d_sae, width), dtype=torch.float32, device=view.decoder_FO.device)
    col = 0
    for w, tensor in blocks:
        out = matrix[:, col:col + tensor.shape[1]]
        out.copy_(tensor)
        if metric == "cosine":
            out.div_(out.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
            w = w / 2.0  # C = Σw − 2·Σ(w/2)·cos
        if w != 1.0:
            out.mul_(math.sqrt(w))
        col += tensor.shape[1]
    norm_sq = squared_norms(matrix)  # float64 (a float32 norm is off by ~K·2⁻²⁴ relative)
    if metric == "mse":
        const = norm_sq
    else:
        total = sum(getattr(weights, n) for n in BLOCKS)
        const = torch.full((matrix.shape[0],), total / 2.0, dtype=torch.float64, device=matrix.device)
    return StackedFeatures(matrix, const, norm_sq)


def cost_blocks(
    a: StackedFeatures,
    b: StackedFeatures,
    *,
    block_rows: int = 1024,
    device: torch.device | str | None = None,
    out: torch.Tensor | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(row_start, row_stop, C_block)`` with ``C_block`` float32 [rows, n_b] on the CPU.

    Args:
        a: stacked source features.
        b: stacked target features.
        block_rows: rows per block (memory per block: ``block_rows · n_b · 4`` bytes).
        device: where the matrix product runs (default: ``a``'s device); blocks come back
            to the CPU.
        out: optional CPU float32 tensor whose first ``n_b`` columns receive the costs
            (``out[:n_a, :n_b]``); the yielded blocks are then views of it, and no other
            ``n_a × n_b`` memory is used.

    Costs are clamped at 0 from below (``mse`` costs are squared distances; float32
    cancellation can make a near-zero cost slightly negative).
    """
    if a.matrix_FK.shape[1] != b.matrix_FK.shape[1]:
        raise ValueError(
            f"stacked feature widths differ ({a.matrix_FK.shape[1]} vs {b.matrix_FK.shape[1]}); "
            "the SAEs' parameter blocks have different sizes."
        )
    dev = torch.device(device) if device is not None else a.matrix_FK.device
    B = b.matrix_FK.to(dev)
    col = b.const_F.to(dev, torch.float32)
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    for r0 in range(0, n_a, block_rows):
        r1 = min(n_a, r0 + block_rows)
        rows = a.matrix_FK[r0:r1].to(dev)
        row = a.const_F[r0:r1].to(dev, torch.float32)
        if out is not None and dev.type == "cpu" and out[r0:r1, :n_b].is_contiguous():
            block = out[r0:r1, :n_b]
        else:
            block = torch.empty((r1 - r0, n_b), dtype=torch.float32, device=dev)
        matmul_nt(rows, B, block)  # one GEMM pass: C = r + c - 2 A Bᵀ
        block.mul_(-2.0).add_(row[:, None]).add_(col[None, :]).clamp_(min=0.0)
        if out is not None and block.data_ptr() != out[r0:r1, :n_b].data_ptr():
            out[r0:r1, :n_b].copy_(block)
            block = out[r0:r1, :n_b]
        yield r0, r1, block.cpu()


@contextlib.contextmanager
def ieee_products(device: torch.device) -> Iterator[None]:
    """On CUDA, run float32 products in IEEE float32 (no TF32, whatever
    ``torch.set_float32_matmul_precision`` the caller chose) and accumulate bf16/fp16 products in
    float32; the previous settings are restored on exit. The rounding allowances of the sparse
    screen and the certificates assume exactly this arithmetic. A no-op on other devices."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    saved = (torch.get_float32_matmul_precision(), flags.allow_bf16_reduced_precision_reduction,
             flags.allow_fp16_reduced_precision_reduction)
    torch.set_float32_matmul_precision("highest")
    flags.allow_bf16_reduced_precision_reduction = False
    flags.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        flags.allow_bf16_reduced_precision_reduction = saved[1]
        flags.allow_fp16_reduced_precision_reduction = saved[2]


def matmul_nt(x_RK: torch.Tensor, y_NK: torch.Tensor, out_RN: torch.Tensor) -> torch.Tensor:
    """``out = x @ yᵀ`` into a preallocated tensor. Float32 CPU tensors go through numpy's BLAS
    (faster than torch's CPU GEMM where measured, see the module doc); anything else through
    ``torch.mm``. Any summation order obeys the same rounding bound, so callers' error
    allowances hold for both."""
    on_cpu = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x_RK, y_NK, out_RN))
    if on_cpu and out_RN.is_contiguous() and not (x_RK.requires_grad or y_NK.requires_grad):
        np.matmul(x_RK.numpy(), y_NK.numpy().T, out=out_RN.numpy())
    else:
        torch.mm(x_RK, y_NK.T, out=out_RN)
    return out_RN


def exact_rows(a: StackedFeatures, b: StackedFeatures, rows: torch.Tensor, *, block_rows: int,
               device: torch.device | None) -> torch.Tensor:
    """Float32 costs of the given source rows against all of B [len(rows), n_b] (CPU)."""
    dev = device or a.matrix_FK.device
    B = b.matrix_FK.to(dev)
    cb = b.const_F.to(dev, torch.float32)
    out = torch.empty((len(rows), b.matrix_FK.shape[0]), dtype=torch.float32)
    for s0 in range(0, len(rows), block_rows):
        idx = rows[s0:s0 + block_rows]
        blk = out[s0:s0 + len(idx)] if dev.type == "cpu" else torch.empty(
            (len(idx), B.shape[0]), dtype=torch.float32, device=dev)
        matmul_nt(a.matrix_FK[idx].to(dev), B, blk)
        blk.mul_(-2.0).add_(cb[None, :]).add_(a.const_F[idx].to(dev, torch.float32)[:, None])
        blk.clamp_(min=0.0)
        if dev.type != "cpu":
            out[s0:s0 + len(idx)] = blk.cpu()
    return out


class ExactScales(NamedTuple):
    """Per-feature quantities of the float64 cost and of its rounding bounds (module doc)."""

    offset_a: np.ndarray
    """``o_i = const_i − fl(‖x_i‖²)`` of the source features (float64)."""
    offset_b: np.ndarray
    """The same for the target features."""
    norm_a: np.ndarray
    """Upper bounds of the source rows' norms ``ν_i ≥ ‖x_i‖`` (float64)."""
    norm_b: np.ndarray
    """Upper bounds of the target rows' norms."""
    const_a: np.ndarray
    """``|const_i|`` of the source features (float64)."""
    const_b: np.ndarray
    """``|const_j|`` of the target features."""
    width: int
    """Stacked width ``K``."""

    @property
    def g64(self) -> float:
        """Relative error factor of a float64 cost (module doc)."""
        return 2 * (self.width + 6) * _EPS64

    @property
    def g32(self) -> float:
        """Relative error factor of a float32 cost entry (module doc)."""
        return 2 * (self.width + 9) * _EPS32


def _host_view(t: torch.Tensor) -> np.ndarray | None:
    """``t`` as a numpy array without a copy when it is a float32 CPU tensor, else ``None``."""
    if t.device.type != "cpu" or t.dtype != torch.float32:
        return None
    return t.detach().numpy()


def _row_dots(x: np.ndarray) -> np.ndarray:
    """``Σ_k x[..., k]²`` in float64 (numpy's ``vecdot`` where it exists: faster than einsum)."""
    vecdot = getattr(np, "vecdot", None)
    return vecdot(x, x) if vecdot is not None else np.einsum("...k,...k->...", x, x)


def _row_ranges(n: int, step: int) -> list[tuple[int, int]]:
    """``[(r0, r1), ...]`` covering ``range(n)`` in steps of ``step``."""
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _on_threads(work: list[tuple[int, int]], fn: Callable[[int, int], None]) -> None:
    """Run ``fn(r0, r1)`` over ``work``, split into one contiguous share per torch thread (numpy
    releases the GIL in the loops used here, so the shares run in parallel)."""
    threads = max(1, min(torch.get_num_threads(), len(work) // 4))
    if threads == 1:
        for r0, r1 in work:
            fn(r0, r1)
        return
    shares = np.array_split(np.arange(len(work)), threads)

    def run(share: np.ndarray) -> None:
        for i in share.tolist():
            fn(*work[i])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, shares))


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """``fl(‖x_i‖²)`` in float64 [n] on ``x``'s device: each float32 entry is widened exactly and
    squared and summed in float64 (any summation order: relative error ≤ ``(K + 1)·2⁻⁵³``); the
    same numbers as ``x.double().square().sum(dim=1)``, computed in chunks of about 1 MiB of
    float64 (they stay in cache)."""
    n, K = x.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=x.device)
    if x.device.type != "cpu":
        return torch.cat([x[r:r + 4096].double().square().sum(dim=1) for r in range(0, n, 4096)])
    out = torch.empty(n, dtype=torch.float64)
    step = max(1, _CHUNK_BYTES // (8 * max(1, K)))

    def part(r0: int, r1: int) -> None:
        torch.sum(x[r0:r1].double().square_(), dim=1, out=out[r0:r1])

    _on_threads(_row_ranges(n, step), part)
    return out


def exact_scales(a: StackedFeatures, b: StackedFeatures) -> ExactScales:
    """Offsets, norm bounds and constants of both sides (one float64 pass over the features)."""
    K = a.matrix_FK.shape[1]
    up = 1.0 + 2 * (K + 6) * _EPS64  # fl(‖x‖²) ≥ (1 − γ_K)‖x‖², one sqrt rounding
    out = []
    for x in (a, b):
        sq = (x.norm_sq_F if x.norm_sq_F is not None else squared_norms(x.matrix_FK)).to(
            "cpu", torch.float64)
        const = x.const_F.to("cpu", torch.float64)
        out.append(((const - sq).numpy(), (sq.sqrt() * up).numpy(), const.abs().numpy()))
    (oa, na, ca), (ob, nb, cb) = out
    return ExactScales(oa, ob, na, nb, ca, cb, K)


def edge_error(scales: ExactScales, rows: np.ndarray, cols: np.ndarray,
               cost: np.ndarray) -> np.ndarray:
    """Bound on ``|ĉ − C|`` of float64 costs ``cost`` of entries ``(rows, cols)`` (module doc;
    also valid for ``min(ĉ, λ)`` as a value of ``min(C, λ)``)."""
    return scales.g64 * (np.abs(cost) + 2 * np.abs(scales.offset_a[rows])
                         + 2 * np.abs(scales.offset_b[cols]))


def float32_error(scales: ExactScales, rows: np.ndarray) -> np.ndarray:
    """Bound on ``|C32_ij − C_ij|`` for float32 rows ``rows`` against all columns
    ([len(rows), n_b], float64; module doc)."""
    na, nb = scales.norm_a[rows], scales.norm_b
    # torch's elementwise ops run on all threads; each op rounds once, as numpy's would
    err = torch.outer(torch.from_numpy(na), torch.from_numpy(nb))
    err *= 2.0
    err += torch.from_numpy(scales.const_a[rows])[:, None]
    err += torch.from_numpy(scales.const_b)[None, :]
    err *= scales.g32
    err += torch.from_numpy(scales.g64 * (na * na + np.abs(scales.offset_a[rows])))[:, None]
    err += torch.from_numpy(scales.g64 * (nb * nb + np.abs(scales.offset_b)))[None, :]
    return err.numpy()


def float32_error_max(scales: ExactScales, rows: np.ndarray) -> np.ndarray:
    """``max_j`` of :func:`float32_error` for each of ``rows`` [len(rows)], without the matrix."""
    na = scales.norm_a[rows]
    nb, cb = scales.norm_b, scales.const_b
    tail = (scales.g64 * (nb * nb + np.abs(scales.offset_b))).max(initial=0.0)
    return (scales.g32 * (2 * na * nb.max(initial=0.0) + scales.const_a[rows] + cb.max(initial=0.0))
            + scales.g64 * (na * na + np.abs(scales.offset_a[rows])) + tail)


def listed_costs(x: StackedFeatures, y: StackedFeatures, idx_XL: torch.Tensor,
                 dev: torch.device, scales: ExactScales | None = None) -> torch.Tensor:
    """Float64 costs between each row ``i`` of ``x`` and the rows ``idx_XL[i]`` of ``y``
    ([n_x, L], float64, CPU), from direct differences (module doc). On the CPU the differences
    are taken in float64 straight from the float32 rows, a few rows at a time (about 1 MiB of
    float64: they stay in cache), on all torch threads; on other devices in chunks there."""
    n_x, L = idx_XL.shape
    K = x.matrix_FK.shape[1]
    out = torch.empty((n_x, L), dtype=torch.float64)
    if n_x == 0 or L == 0:
        return out
    scales = scales or exact_scales(x, y)
    xn, yn = _host_view(x.matrix_FK), _host_view(y.matrix_FK)
    if dev.type == "cpu" and xn is not None and yn is not None:
        idx = idx_XL.numpy()
        res = out.numpy()

        step = max(1, _CHUNK_BYTES // (8 * K * L))

        def part(p0: int, p1: int) -> None:
            # float64 buffers filled by casting copies, then one subtraction in place: faster
            # than a mixed-dtype subtraction (measured: 0.69 vs 0.82 CPU-s for 16384 × 16 × 2304)
            diff = np.empty((step, L, K))
            x64 = np.empty((step, 1, K))
            for r0 in range(p0, p1, step):
                r1 = min(p1, r0 + step)
                d, xr = diff[: r1 - r0], x64[: r1 - r0]
                np.copyto(d, yn[idx[r0:r1]])
                np.copyto(xr[:, 0], xn[r0:r1])
                np.subtract(d, xr, out=d)
                res[r0:r1] = _row_dots(d)

        _on_threads(_row_ranges(n_x, 64 * step), part)
    else:
        rows = max(1, _GATHER_BYTES // (12 * K * L))
        buf = torch.empty((rows * L, K), dtype=torch.float32, device=dev)
        Y = y.matrix_FK.to(dev)
        for r0 in range(0, n_x, rows):
            r1 = min(n_x, r0 + rows)
            idx_t = idx_XL[r0:r1].to(dev)
            gathered = torch.index_select(Y, 0, idx_t.reshape(-1), out=buf[: (r1 - r0) * L])
            diff = gathered.view(r1 - r0, L, K).double()
            diff -= x.matrix_FK[r0:r1].to(dev).double()[:, None, :]
            out[r0:r1] = diff.square_().sum(dim=2).cpu()
    out += torch.from_numpy(scales.offset_a)[:, None]
    out += torch.from_numpy(scales.offset_b)[idx_XL]
    return out


def edge_costs(a: StackedFeatures, b: StackedFeatures, rows: np.ndarray, cols: np.ndarray,
               dev: torch.device, scales: ExactScales | None = None) -> np.ndarray:
    """Float64 costs of individual entries ``(rows[e], cols[e])`` from direct differences
    (module doc; on the CPU as in :func:`listed_costs`)."""
    out = np.empty(len(rows), dtype=np.float64)
    if len(rows) == 0:
        return out
    scales = scales or exact_scales(a, b)
    K = a.matrix_FK.shape[1]
    an, bn = _host_view(a.matrix_FK), _host_view(b.matrix_FK)
    if dev.type == "cpu" and an is not None and bn is not None:

        def part(s0: int, s1: int) -> None:
            diff = np.subtract(an[rows[s0:s1]], bn[cols[s0:s1]], dtype=np.float64)
            out[s0:s1] = _row_dots(diff)

        _on_threads(_row_ranges(len(rows), max(1, _CHUNK_BYTES // (8 * K))), part)
    else:
        chunk = max(1, _GATHER_BYTES // (16 * K))
        buf_a = torch.empty((chunk, K), dtype=torch.float32, device=dev)
        buf_b = torch.empty((chunk, K), dtype=torch.float32, device=dev)
        A, B = a.matrix_FK.to(dev), b.matrix_FK.to(dev)
        r_t, c_t = torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev)
        for s0 in range(0, len(rows), chunk):
            r, c = r_t[s0:s0 + chunk], c_t[s0:s0 + chunk]
            diff = torch.index_select(A, 0, r, out=buf_a[: len(r)]).double()
            diff -= torch.index_select(B, 0, c, out=buf_b[: len(r)]).double()
            out[s0:s0 + len(r)] = diff.square_().sum(dim=1).cpu().numpy()
    out += scales.offset_a[rows]
    out += scales.offset_b[cols]
    return out
