"""Matching costs between the features of two SAEs, built block by block.

The cost of pairing source feature ``i`` (SAE A) with target feature ``j`` (SAE B) is a weighted
sum over parameter blocks ``k`` ∈ {decoder, encoder, b_enc}:

* ``metric="mse"`` (the paper's): ``C_ij = Σ_k w_k ‖a_i^k − b_j^k‖²``;
* ``metric="cosine"``: ``C_ij = Σ_k w_k (1 − cos(a_i^k, b_j^k))`` over the vector blocks
  (decoder, encoder); a scalar bias has no direction, so ``b_enc`` must have weight 0.

Both are computed as one matrix product of "stacked" feature matrices (each block scaled by
``√w_k``, normalised for cosine), plus per-row and per-column constants. ``b_dec`` never counts.
:func:`cost_blocks` yields the matrix by blocks of rows; :func:`exact_rows`, :func:`listed_costs`
and :func:`edge_costs` compute chosen entries only (the sparse solver's recomputations).

On the CPU the products run in numpy's BLAS (:func:`matmul_nt`): for these shapes it measured
1.4–1.6× the throughput of torch's CPU GEMM on an AVX2 EPYC (136–160 vs 99 GFLOP/s, float32).
That BLAS has its own thread pool (``OPENBLAS_NUM_THREADS`` or ``threadpoolctl`` limit it, not
``torch.set_num_threads``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .adapters import FeatureView

__all__ = ["BLOCKS", "CostWeights", "Metric", "StackedFeatures", "cost_blocks", "edge_costs",
           "exact_rows", "ieee_products", "listed_costs", "matmul_nt", "stack_features"]

_GATHER_BYTES = 1 << 27
"""Size of the gather buffer used to compute listed entries (128 MiB)."""

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
    """Per-feature constant of the cost expansion [d_sae] (float64)."""


def stack_features(view: FeatureView, weights: CostWeights, metric: Metric) -> StackedFeatures:
    """Stack the weighted blocks of a :class:`FeatureView` into one matrix (float32)."""
    blocks = [(getattr(weights, name), tensor) for name, tensor in (
        ("decoder", view.decoder_FO), ("encoder", view.encoder_FD), ("b_enc", view.bias_FB))]
    blocks = [(w, t) for w, t in blocks if w != 0]
    width = sum(t.shape[1] for _, t in blocks)
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
    if metric == "mse":
        const = torch.cat([torch.linalg.vector_norm(matrix[r:r + 4096], dim=1).to(torch.float64).square()
                           for r in range(0, matrix.shape[0], 4096)])
    else:
        total = sum(getattr(weights, n) for n in BLOCKS)
        const = torch.full((matrix.shape[0],), total / 2.0, dtype=torch.float64, device=matrix.device)
    return StackedFeatures(matrix, const)


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
        a, b: stacked source and target features.
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


def listed_costs(x: StackedFeatures, y: StackedFeatures, idx_XL: torch.Tensor,
                 dev: torch.device) -> torch.Tensor:
    """Float32 costs between each row ``i`` of ``x`` and the rows ``idx_XL[i]`` of ``y``
    ([n_x, L], float64, CPU). Gathers into one preallocated buffer (fresh allocations per chunk
    cost more than the arithmetic), then one batched product per chunk."""
    n_x, L = idx_XL.shape
    K = x.matrix_FK.shape[1]
    out = torch.empty((n_x, L), dtype=torch.float64)
    if n_x == 0 or L == 0:
        return out
    rows = max(1, _GATHER_BYTES // (4 * K * L))
    buf = torch.empty((rows * L, K), dtype=torch.float32, device=dev)
    Y = y.matrix_FK.to(dev)
    cy = y.const_F.to(dev, torch.float32)
    for r0 in range(0, n_x, rows):
        r1 = min(n_x, r0 + rows)
        idx = idx_XL[r0:r1].to(dev)
        gathered = torch.index_select(Y, 0, idx.reshape(-1), out=buf[: (r1 - r0) * L])
        dot = _batched_dot(gathered.view(r1 - r0, L, K), x.matrix_FK[r0:r1].to(dev))
        cost = (x.const_F[r0:r1].to(dev, torch.float32)[:, None] + cy[idx]
                - 2.0 * dot).clamp_(min=0.0)
        out[r0:r1] = cost.double().cpu()
    return out


def edge_costs(a: StackedFeatures, b: StackedFeatures, rows: np.ndarray, cols: np.ndarray,
               dev: torch.device) -> np.ndarray:
    """Float32 costs of individual entries ``(rows[e], cols[e])`` (float64 array)."""
    out = np.empty(len(rows), dtype=np.float64)
    if len(rows) == 0:
        return out
    K = a.matrix_FK.shape[1]
    chunk = max(1, _GATHER_BYTES // (8 * K))
    buf_a = torch.empty((chunk, K), dtype=torch.float32, device=dev)
    buf_b = torch.empty((chunk, K), dtype=torch.float32, device=dev)
    A, B = a.matrix_FK.to(dev), b.matrix_FK.to(dev)
    ca, cb = a.const_F.to(dev, torch.float32), b.const_F.to(dev, torch.float32)
    r_t, c_t = torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev)
    for s0 in range(0, len(rows), chunk):
        r, c = r_t[s0:s0 + chunk], c_t[s0:s0 + chunk]
        ga = torch.index_select(A, 0, r, out=buf_a[: len(r)])
        gb = torch.index_select(B, 0, c, out=buf_b[: len(r)])
        dot = _batched_dot(ga[:, None, :], gb)[:, 0]
        cost = (ca[r] + cb[c] - 2.0 * dot).clamp_(min=0.0)
        out[s0:s0 + len(r)] = cost.double().cpu().numpy()
    return out


def _batched_dot(g_RLK: torch.Tensor, x_RK: torch.Tensor) -> torch.Tensor:
    """``out[r, l] = g[r, l] · x[r]`` ([R, L]); numpy's batched matmul on the CPU (about 1.8×
    torch's ``bmm`` for these matrix-vector batches), ``torch.bmm`` elsewhere."""
    if g_RLK.device.type == "cpu" and g_RLK.dtype == x_RK.dtype == torch.float32:
        return torch.from_numpy(np.matmul(g_RLK.numpy(), x_RK.numpy()[:, :, None])[:, :, 0])
    return torch.bmm(g_RLK, x_RK[:, :, None])[:, :, 0]
