"""Matching costs between the features of two SAEs, built block by block.

The cost of pairing source feature ``i`` (SAE A) with target feature ``j`` (SAE B) is a weighted
sum over parameter blocks ``k`` ∈ {decoder, encoder, b_enc}:

* ``metric="mse"`` (the paper's): ``C_ij = Σ_k w_k ‖a_i^k − b_j^k‖²``;
* ``metric="cosine"``: ``C_ij = Σ_k w_k (1 − cos(a_i^k, b_j^k))`` over the vector blocks
  (decoder, encoder); a scalar bias has no direction, so ``b_enc`` must have weight 0.

Both are computed as one matrix product of "stacked" feature matrices (each block scaled by
``√w_k``, normalised for cosine), plus per-row and per-column constants. ``b_dec`` never counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from .adapters import FeatureView

__all__ = ["BLOCKS", "CostWeights", "Metric", "StackedFeatures", "cost_blocks", "stack_features"]

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
    B_KN = b.matrix_FK.to(dev).T
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
        torch.add(row[:, None], col[None, :], out=block)
        block.addmm_(rows, B_KN, beta=1.0, alpha=-2.0)  # one GEMM pass: C = r + c - 2 A Bᵀ
        block.clamp_(min=0.0)
        if out is not None and block.data_ptr() != out[r0:r1, :n_b].data_ptr():
            out[r0:r1, :n_b].copy_(block)
            block = out[r0:r1, :n_b]
        yield r0, r1, block.cpu()
