"""Many-to-one links between two SAEs' features: for each source feature, its top-k partners.

A permutation (:func:`~sae_match_lens.matching.match`) pairs features one-to-one. Features also
split, merge and persist with several near-copies, so Feature Flow (Laptev et al. 2025) links each
feature to its best partner independently (top-1 of decoder cosine), many-to-one. This module
computes such links exactly (every score of every pair, block by block; the top-k per row are the
true top-k of the computed float32 scores), with a per-link confidence from the same data-free
null family as ``max_cost="auto"``.

Scores (higher is better; :data:`SCORES`):

* ``"decoder_cosine"``: ``cos(d_i, d_j)`` of the decoder rows (Feature Flow's score).
* ``"folded_mse"``: ``−C_ij``, minus SAE Match's folded matching cost of the pair (decoder rows,
  encoder columns and ``b_enc``).
* ``"cosine_sum"``: ``cos(d_i, d_j) + cos(e_i, e_j)``, decoder plus encoder cosine.
* ``"csls"``: cross-domain similarity local scaling (Conneau et al. 2018, against hubness in
  embedding alignment) of ``cosine_sum``: ``2·s_ij − r_A(i) − r_B(j)`` with ``r_B(j)`` the mean
  score of B's feature j to its ``csls_k`` nearest A features (and ``r_A(i)`` the same for A's
  feature i). A "hub" target, close to many sources, gets a large ``r_B`` and is demoted, so
  links do not pile onto a few dense features.
* ``"cosine_density"`` (default): ``cosine_sum − λ·|z_i − z_j|``, where ``o = (θ − b'_i)/‖e‖``
  is the distance of a feature's firing hyperplane from the SAE's centre ``b_dec`` (θ = the
  JumpReLU threshold, 0 for other architectures; ``b'`` = ``b_enc`` when the encoder subtracts
  ``b_dec`` from its input, else ``b_enc + e·b_dec``, so both conventions for the same SAE give
  the same offsets; transcoders, whose ``b_dec`` lives in the output space, use ``b_enc``;
  unchanged by folding) and ``z`` its z-score within its own SAE. Features far from the centre
  fire rarely, so a gap in ``z`` is a data-free estimate of a gap in firing density, which the
  co-firing Jaccard punishes and cosines ignore. ``λ = density_weight`` (0.2) was chosen on the
  default suite (held-out text, both families: 0.393 vs 0.367 for ``cosine_sum`` and 0.353 for
  ``decoder_cosine`` mean Jaccard, JumpReLU; 0.248 vs 0.235, TopK); it is not tuned on other
  SAEs. Measuring from the origin instead of ``b_dec`` gives 0.386 and 0.232 there.

**Confidence.** For ``n_null`` sampled source features, the best score against B's dictionary in
a random orthonormal basis (one rotation shared by decoder and encoder; see
:func:`~sae_match_lens.matching.null_max_cost`) is recorded. A link's ``confidence`` is the
fraction of those best-by-chance scores that it beats; with ``null_rate=q`` links whose
confidence is below ``1 − q`` become -1 ("no partner"): a feature with no true partner then keeps
a link with probability about ``q``.

The reverse direction (each target feature's best source predecessors) is
``links(..., direction="backward")``.

**Routes.** Both routes return each row's top-k, best first, equal scores by lower index.

* ``method="exact"``: every score of every pair, block by block (float32 products), each row's
  top-k of those float32 scores kept (pairs within float32 rounding of each other may come in
  either order).
* ``method="screened"`` (``"auto"`` takes it for large problems when a sampled estimate says it
  pays, :func:`~sae_match_lens.solvers.screen.row_screen_dims_auto`): a screen of width ``m``
  (:mod:`sae_match_lens.solvers.screen`) bounds every pair's score from above using ``m``
  coordinates and the norms of the rest, rigorously under float32 rounding. One pass keeps each
  row's ``candidates`` best bounds and a floor (the best bound of every other column). The
  candidates are scored from float32 dot products with a rigorous error bound; a row whose order
  is within that bound (near or exact ties) is rescored in float64. A row is *certified* when
  its proven k-th score beats its floor. A row that is not is *rechecked*: a second pass over
  its row of the screen lists every column whose bound reaches its proven k-th score (the true
  top-k are among them), scored the same way; a row with more than
  ``n_b / LISTED_PAIR_COST`` such columns is *recomputed* in full instead (an exact row). The
  top-k of certified and rechecked rows are proven to be the top-k of the real scores.
  ``links.route["links"]`` reports the width and how many rows took each path, with times.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .adapters import (
    _threshold_F,
    describe_sae,
    feature_view,
    hook_name_of,
    sae_identity,
    validate_sae,
)
from .neuronpedia import feature_urls
from .solvers.costs import CostWeights, StackedFeatures, ieee_products, matmul_nt, stack_features
from .solvers.screen import (
    LISTED_PAIR_COST,
    block_rows_for,
    coordinate_order,
    make_screen,
    round_up_f32,
    row_screen_dims_auto,
    screen_rows,
    screen_rows_below,
)

__all__ = ["SCORES", "LinkScore", "Links", "Transition", "firing_offset_z", "links"]

logger = logging.getLogger(__name__)

LinkScore = Literal["decoder_cosine", "folded_mse", "cosine_sum", "csls", "cosine_density"]
SCORES: tuple[str, ...] = ("decoder_cosine", "folded_mse", "cosine_sum", "csls", "cosine_density")
Method = Literal["auto", "exact", "screened"]
SCREEN_FROM_N = 4096
"""``method="auto"`` considers screening from this many features on both sides (and score
vectors at least 512 wide); below it the exact pass is cheap."""


class Links(NamedTuple):
    """Top-k links from each source feature to target features (see module docstring)."""

    indices: torch.Tensor
    """int64 ``[n_source, k]``: the k best target features of each source feature, best first;
    -1 where the null model says "no partner" (only with ``null_rate``)."""
    scores: torch.Tensor
    """float32 ``[n_source, k]``: the score of each link (higher is better; NaN where -1)."""
    confidence: torch.Tensor
    """float32 ``[n_source, k]``: the fraction of best-by-chance null scores each link beats."""
    score: str
    """Which score (:data:`SCORES`)."""
    source: dict[str, Any]
    """Identity of the source SAE (:func:`~sae_match_lens.adapters.sae_identity`)."""
    target: dict[str, Any]
    """Identity of the target SAE."""
    null_threshold: float | None
    """The score a link had to exceed to be kept (``None``: no null cut)."""
    options: dict[str, Any]
    """The options the links were computed with."""
    route: dict[str, Any] | None = None
    """How they were computed: ``route["links"]`` (and for ``csls`` ``"csls_source"``,
    ``"csls_target"``, the neighbourhood means) records the route (``"exact"`` or
    ``"screened"``), the score width, and for the screened route the screen width, the candidates
    per row, the rows certified and the rows recomputed exactly; plus seconds spent."""

    @property
    def k(self) -> int:
        """Links per source feature."""
        return int(self.indices.shape[1])

    @property
    def top1(self) -> torch.Tensor:
        """int64 ``[n_source]``: each source feature's best target (-1: none)."""
        return self.indices[:, 0]

    def distinct_targets(self, rank: int = 0) -> int:
        """How many different target features the rank-``rank`` links reach (hubs make it small)."""
        col = self.indices[:, rank]
        return int(torch.unique(col[col >= 0]).numel())

    def to_frame(self) -> pd.DataFrame:
        """One row per kept link: source feature, rank, target feature, score, confidence, and
        ``neuronpedia_id_a/_b``, ``neuronpedia_url_a/_b`` (None where an SAE has no id)."""
        n, k = self.indices.shape
        src = torch.arange(n)[:, None].expand(n, k)
        rank = torch.arange(k)[None, :].expand(n, k)
        ok = self.indices >= 0
        id_a, id_b = self.source.get("neuronpedia_id"), self.target.get("neuronpedia_id")
        return pd.DataFrame({
            "hook_a": self.source.get("hook_name"), "hook_b": self.target.get("hook_name"),
            "feature_a": src[ok].numpy(), "rank": rank[ok].numpy(),
            "feature_b": self.indices[ok].numpy(), "score": self.scores[ok].numpy(),
            "confidence": self.confidence[ok].numpy(),
            "neuronpedia_id_a": id_a, "neuronpedia_id_b": id_b,
            "neuronpedia_url_a": feature_urls(id_a, src[ok].tolist()),
            "neuronpedia_url_b": feature_urls(id_b, self.indices[ok].tolist()),
        })


@dataclass(frozen=True, eq=False)
class Transition:
    """A many-to-one map of activations from A's features into B's (Feature Flow's ``T``).

    ``f_B[..., target[e]] += weight[e] · f_A[..., source[e]]`` over its edges ``e``: B's feature j
    receives the sum of the (weighted) activations of every A feature linked to it. Build it from
    :class:`Links` with :meth:`from_links`; a permutation is the special case of one edge per
    source and per target with weight 1.
    """

    source: torch.Tensor
    """int64 ``[n_edges]``: the source feature of each edge."""
    target: torch.Tensor
    """int64 ``[n_edges]``: the target feature of each edge."""
    weight: torch.Tensor
    """float64 ``[n_edges]``: the weight of each edge."""
    n_source: int
    """Features of the source SAE."""
    n_target: int
    """Features of the target SAE."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Identities of the SAEs (``source``/``target``) and how it was built."""

    def __post_init__(self) -> None:
        src, tgt = torch.as_tensor(self.source).long(), torch.as_tensor(self.target).long()
        w = torch.as_tensor(self.weight, dtype=torch.float64)
        if not (src.shape == tgt.shape == w.shape and src.ndim == 1):
            raise ValueError(f"a Transition needs 1-D source, target and weight of one length, got "
                             f"{tuple(src.shape)}, {tuple(tgt.shape)}, {tuple(w.shape)}.")
        if src.numel() and (int(src.min()) < 0 or int(src.max()) >= self.n_source
                            or int(tgt.min()) < 0 or int(tgt.max()) >= self.n_target):
            raise ValueError(f"Transition edges out of range for {self.n_source} -> "
                             f"{self.n_target} features.")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("Transition weights must be finite.")
        object.__setattr__(self, "source", src.cpu())
        object.__setattr__(self, "target", tgt.cpu())
        object.__setattr__(self, "weight", w.cpu())

    @classmethod
    def from_links(cls, lk: Links, *, k: int | None = None,
                   weights: Literal["binary", "score"] = "binary") -> Transition:
        """Edges from each source feature to its top ``k`` (default: all) kept links, weight 1
        (``"binary"``, the Feature Flow appendix's binarised transition) or the link's score."""
        if weights not in ("binary", "score"):
            raise ValueError(f"weights must be 'binary' or 'score', got {weights!r}.")
        idx = lk.indices if k is None else lk.indices[:, :k]
        ok = idx >= 0
        src = torch.arange(idx.shape[0])[:, None].expand_as(idx)[ok]
        w = torch.ones(int(ok.sum()), dtype=torch.float64) if weights == "binary" else \
            lk.scores[:, :idx.shape[1]][ok].double()
        return cls(src, idx[ok], w, idx.shape[0], int(lk.target.get("d_sae", -1)),
                   {"source": lk.source, "target": lk.target, "score": lk.score,
                    "k": int(idx.shape[1]), "weights": weights})

    @property
    def source_identity(self) -> dict[str, Any] | None:
        """Identity record of the source SAE (``None``: built by hand)."""
        return self.metadata.get("source")

    @property
    def target_identity(self) -> dict[str, Any] | None:
        """Identity record of the target SAE (``None``: built by hand)."""
        return self.metadata.get("target")

    @property
    def linked(self) -> torch.Tensor:
        """Boolean ``[n_source]``: source features with at least one edge."""
        out = torch.zeros(self.n_source, dtype=torch.bool)
        out[self.source] = True
        return out

    def apply(self, acts: torch.Tensor) -> torch.Tensor:
        """Move ``acts [..., n_source]`` into ``[..., n_target]`` (sum over incoming edges)."""
        if acts.shape[-1] != self.n_source:
            raise ValueError(f"activations have {acts.shape[-1]} features, the transition maps "
                             f"{self.n_source}.")
        out = acts.new_zeros((*acts.shape[:-1], self.n_target))
        src, tgt = self.source.to(acts.device), self.target.to(acts.device)
        return out.index_add_(-1, tgt, acts[..., src] * self.weight.to(acts))


_CHUNK = 4096
"""Features processed at a time when building operands (bounds the temporaries)."""


def firing_offset_z(sae: Any) -> torch.Tensor:
    """z-scores (within the SAE) of each feature's firing-hyperplane distance from the SAE's
    centre ``b_dec``, ``(θ − b'_i) / ‖W_enc[:, i]‖`` (θ = 0 without a threshold; ``b'`` the
    encoder bias (gated: the gate bias), plus ``W_enc[:, i]·b_dec`` when the encoder does not
    subtract ``b_dec`` from its input itself; transcoders: the bias alone). An SAE written with
    or without ``apply_b_dec_to_input`` computes the same function and gets the same offsets.
    Folding and any positive per-feature rescaling leave it unchanged. The encoder norms are
    reduced along the input dimension in float32 (no transposed copy of the encoder), the rest
    in float64."""
    spec = validate_sae(sae)
    bias = getattr(sae, spec.bias_names[0]).detach().to(torch.float64)
    if not spec.name.endswith("transcoder") and not getattr(sae.cfg, "apply_b_dec_to_input",
                                                            False):
        # e·x + b = e·(x − b_dec) + (b + e·b_dec): the bias the encoder has around b_dec
        b_dec = sae.b_dec.detach().to(torch.float32)
        bias = bias + (b_dec @ sae.W_enc.detach().to(torch.float32)).to(torch.float64)
    theta = _threshold_F(sae, spec)
    theta = torch.zeros_like(bias) if theta is None else theta.to(bias)
    norms = torch.linalg.vector_norm(sae.W_enc.detach(), dim=0, dtype=torch.float32).to(bias)
    offset = (theta - bias) / norms.clamp_min(torch.finfo(torch.float64).tiny)
    spread = offset.std()
    z = (offset - offset.mean()) / spread if float(spread) > 0 else torch.zeros_like(offset)
    return z.to(torch.float32)


def _cosine_matrix(sae: Any, with_encoder: bool) -> torch.Tensor:
    """``[unit decoder rows | unit encoder columns]`` (float32), built in chunks of features."""
    validate_sae(sae)
    dec, enc = sae.W_dec.detach(), sae.W_enc.detach()
    d_out, d_in = dec.shape[1], enc.shape[0]
    out = torch.empty((dec.shape[0], d_out + (d_in if with_encoder else 0)), dtype=torch.float32,
                      device=dec.device)
    tiny = torch.finfo(torch.float32).tiny
    for r0 in range(0, dec.shape[0], _CHUNK):
        r1 = min(dec.shape[0], r0 + _CHUNK)
        parts = [(out[r0:r1, :d_out], dec[r0:r1])]
        if with_encoder:
            parts.append((out[r0:r1, d_out:], enc[:, r0:r1].T))
        for dst, src in parts:  # normalised in place: no temporaries of the chunk
            dst.copy_(src)
            dst.div_(torch.linalg.vector_norm(dst, dim=1, keepdim=True).clamp_min_(tiny))
    return out


def _score_operands(sae: Any, score: str, weights: CostWeights | None,
                    density_weight: float = 0.0, fold: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(matrix_FK, const_F)`` such that ``score_ij = 2·a_i·b_j − const_a_i − const_b_j`` (mse)
    or ``a_i·b_j − |const_a_i − const_b_j|`` (cosine scores; const = λ·z or 0)."""
    if score == "folded_mse":
        w = weights or CostWeights()
        stacked = stack_features(feature_view(sae, fold=fold), w, "mse")
        return stacked.matrix_FK, stacked.const_F.to(torch.float32)
    matrix = _cosine_matrix(sae, score != "decoder_cosine")
    if score == "cosine_density":
        return matrix, (density_weight * firing_offset_z(sae)).to(matrix.device)
    return matrix, torch.zeros(matrix.shape[0], dtype=torch.float32, device=matrix.device)


class _Problem(NamedTuple):
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

    def rows(self, idx: torch.Tensor) -> _Problem:
        """The problem restricted to rows ``idx`` of ``a``."""
        idx = idx.to(self.a.device)
        return self._replace(a=self.a[idx].contiguous(),
                             p=None if self.p is None else self.p[idx],
                             g=None if self.g is None else self.g[idx])

    def swapped(self) -> _Problem:
        """The problem of ``b``'s rows against ``a``'s (the score is symmetric in its terms)."""
        return _Problem(self.b, self.a, self.alpha, self.q, self.p, self.h, self.g, self.pairs)


def _score_blocks(prob: _Problem, block_rows: int):
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


def _exact_topk(prob: _Problem, k: int, *, block_rows: int, progress: bool = False,
                label: str = "links") -> tuple[torch.Tensor, torch.Tensor]:
    """Every score, block by block: the top-``k`` (CPU int64 indices, float32 scores)."""
    n_a = prob.a.shape[0]
    kk = min(k, prob.b.shape[0])
    idx = torch.empty((n_a, kk), dtype=torch.int64)
    val = torch.empty((n_a, kk), dtype=torch.float32)
    bar = tqdm(total=n_a, desc=f"links {label}", unit="row", disable=not progress, leave=False)
    for r0, r1, block in _score_blocks(prob, block_rows):
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


def _cost_form(prob: _Problem) -> tuple[StackedFeatures, StackedFeatures,
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


def _listed_scores(prob: _Problem, idx: torch.Tensor) -> torch.Tensor:
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
    def of(cls, prob: _Problem) -> _Bounds:
        def mag(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.abs().cpu().double()

        q, h = mag(prob.q), mag(prob.h)
        return cls(_norm_bounds(prob.a), _norm_bounds(prob.b), mag(prob.p),
                   0.0 if q is None or not len(q) else float(q.max()), mag(prob.g),
                   0.0 if h is None or not len(h) else float(h.max()))

    def error(self, prob: _Problem, rows: torch.Tensor, cols: torch.Tensor, gamma: float
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


def _rank_lists(prob: _Problem, rows: torch.Tensor, cols: torch.Tensor, kk: int, bounds: _Bounds
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


def _screened_topk(prob: _Problem, k: int, *, m: int, keep: int, sides: tuple, block_rows: int,
                   progress: bool, label: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Top-``k`` through a width-``m`` screen keeping ``keep`` candidates per row, certified row
    by row (module doc, "Routes"): rows the candidates cannot prove are rechecked against every
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
        idx_full, val_full = _exact_topk(prob.rows(full), k, block_rows=block_rows)
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


def _solve(prob: _Problem, k: int, *, method: str, screen_dims: int | str, keep: int,
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
        idx, val = _exact_topk(prob, k, block_rows=block_rows, progress=progress, label=label)
        stats: dict[str, Any] = {"route": "exact", "width": int(K)}
        logger.info("%s: exact top-%d over every pair (%d x %d, width %d)", label,
                    min(k, n_b), n_a, n_b, K)
    else:
        idx, val, stats = _screened_topk(prob, k, m=m, keep=keep, sides=sides,
                                         block_rows=block_rows, progress=progress, label=label)
    stats["t_width"] = t_width
    stats["seconds"] = time.perf_counter() - t0
    return idx, val, stats


def _null_best(base: _Problem, *, widths: list[int], r_b: torch.Tensor | None, csls_k: int,
               n_null: int, seed: int, block_rows: int) -> torch.Tensor:
    """Best score of sampled source rows rotated into a random basis (B kept), as in
    :func:`~sae_match_lens.matching.null_costs`: one Haar rotation shared by all vector blocks.
    With ``r_b`` (csls) the rotated rows' own ``r`` comes from the same score blocks."""
    from .matching import _haar_orthogonal

    a = base.a
    gen = torch.Generator().manual_seed(seed)
    best: list[torch.Tensor] = []
    collected = 0
    while collected < n_null:
        take = min(a.shape[0], n_null - collected)
        rows = torch.randperm(a.shape[0], generator=gen)[:take].to(a.device)
        sub = a[rows].to(torch.float64)
        q_by_width: dict[int, torch.Tensor] = {}
        col = 0
        for width in widths:
            if width not in q_by_width:
                q_by_width[width] = _haar_orthogonal(width, gen).to(sub.device)
            sub[:, col:col + width] = sub[:, col:col + width] @ q_by_width[width].T
            col += width
        rotated = base.rows(rows)._replace(a=sub.to(torch.float32).contiguous())
        if r_b is None:
            best.append(_exact_topk(rotated, 1, block_rows=block_rows)[1][:, 0])
        else:
            kk = min(csls_k, base.b.shape[0])
            for _, _, block in _score_blocks(rotated, block_rows):
                r_sub = block.topk(kk, dim=1).values.mean(dim=1)
                block.mul_(2.0).sub_(r_b[None, :]).sub_(r_sub[:, None])
                best.append(block.amax(dim=1).cpu())
        collected += take
    return torch.cat(best).to(torch.float64)


@torch.no_grad()
def links(
    sae_a: Any,
    sae_b: Any,
    *,
    k: int = 1,
    score: LinkScore = "cosine_density",
    direction: Literal["forward", "backward"] = "forward",
    null_rate: float | None = None,
    n_null: int = 2048,
    csls_k: int = 10,
    density_weight: float = 0.2,
    weights: CostWeights | Mapping[str, float] | None = None,
    fold: bool = True,
    method: Method = "auto",
    screen_dims: int | Literal["auto"] = "auto",
    candidates: int | None = None,
    block_rows: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Links:
    """For each feature of SAE A, its ``k`` best partners in SAE B (many-to-one links).

    The top-k are the true top-k of the score on every route (module doc, "Routes"): the
    screened route proves each row's top-k against a cheap bound of every other pair and
    recomputes exactly the rows it cannot prove; ``links.route`` says what was screened.

    Args:
        sae_a: source SAE (any supported SAELens inference SAE).
        sae_b: target SAE; the decoder (and, for ``cosine_sum``/``csls``/``folded_mse``, encoder)
            widths must agree with A's.
        k: partners kept per source feature, best first.
        score: one of :data:`SCORES` (module docstring). ``cosine_density`` is the default: on
            the default suite it beats decoder cosine (Feature Flow) and the SAE Match
            permutation on co-firing Jaccard in every adjacent pair.
        direction: ``"forward"``: each A feature's best B partners; ``"backward"``: each B
            feature's best A predecessors (the result's source is then B).
        null_rate: when given, links whose confidence is below ``1 − null_rate`` become -1.
        n_null: best-by-chance scores collected for the confidence.
        csls_k: neighbourhood size of ``csls``.
        density_weight: ``cosine_density`` only: the weight λ of the firing-density gap.
        weights: ``folded_mse`` only: block weights as in :func:`~sae_match_lens.matching.match`.
        fold: ``folded_mse`` only: ``False`` compares raw parameters (the unfolded ablation).
        method: ``"exact"``: every score of every pair; ``"screened"``: the certified screen;
            ``"auto"`` (default): screened when both SAEs have at least ``SCREEN_FROM_N``
            features, the score is at least 512 wide and the estimate says it pays, else exact.
            Same top-k either way.
        screen_dims: screened route: coordinates of the screening bound (``"auto"``: estimated
            from a sample of rows, :func:`~sae_match_lens.solvers.screen.row_screen_dims_auto`).
        candidates: screened route: partners kept per row by the screen and scored exactly
            (default ``k + 15``; at least ``k``).
        block_rows: rows of the score matrix (or of the screen) computed at a time (``None``:
            about 128 MiB per block buffer).
        device: where the products run (default: SAE A's device).
        seed: seed of the null model.
        progress: show a progress bar.

    Returns:
        :class:`Links` whose ``indices[i]`` are source feature i's top-k targets.

    Example:
        >>> lk = links(sae_l3, sae_l4, k=3)
        >>> lk.indices[17], lk.scores[17], lk.confidence[17]
        >>> lk.route["links"]["rows_recomputed"]  # screened route: rows proven by a full row
    """
    if direction == "backward":
        return links(sae_b, sae_a, k=k, score=score, null_rate=null_rate, n_null=n_null,
                     csls_k=csls_k, density_weight=density_weight, weights=weights, fold=fold,
                     method=method, screen_dims=screen_dims, candidates=candidates,
                     block_rows=block_rows, device=device, seed=seed, progress=progress)
    if direction != "forward":
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}.")
    if score not in SCORES:
        raise ValueError(f"unknown link score {score!r}; valid: {list(SCORES)}.")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if null_rate is not None and not (isinstance(null_rate, int | float) and 0 < null_rate < 1):
        raise ValueError(f"null_rate must be in (0, 1) or None, got {null_rate!r}.")
    if not isinstance(csls_k, int) or csls_k < 1:
        raise ValueError(f"csls_k must be a positive integer, got {csls_k!r}.")
    if method not in ("auto", "exact", "screened"):
        raise ValueError(f"method must be 'auto', 'exact' or 'screened', got {method!r}.")
    if not (screen_dims == "auto" or (isinstance(screen_dims, int) and screen_dims >= 1)):
        raise ValueError(f"screen_dims must be a positive integer or 'auto', got {screen_dims!r}.")
    if candidates is not None and not (isinstance(candidates, int) and candidates >= k):
        raise ValueError(f"candidates must be an integer >= k ({k}) or None, got {candidates!r}.")
    if block_rows is not None and not (isinstance(block_rows, int) and block_rows >= 1):
        raise ValueError(f"block_rows must be a positive integer or None, got {block_rows!r}.")
    for name, dim in (("d_in", "d_in"), ("d_out", "d_out")):
        a_dim = getattr(sae_a.cfg, dim, sae_a.cfg.d_in)
        b_dim = getattr(sae_b.cfg, dim, sae_b.cfg.d_in)
        if a_dim != b_dim:
            raise ValueError(f"cannot link {describe_sae(sae_a)} to {describe_sae(sae_b)}: "
                             f"{name} {a_dim} vs {b_dim}; both must read and write the same space.")
    w = CostWeights.resolve(weights, "mse") if score == "folded_mse" else None
    if not (isinstance(density_weight, int | float) and math.isfinite(density_weight)
            and density_weight >= 0):
        raise ValueError(f"density_weight must be a finite number >= 0, got {density_weight!r}.")
    t0 = time.perf_counter()
    a, const_a = _score_operands(sae_a, score, w, density_weight, fold)
    b, const_b = _score_operands(sae_b, score, w, density_weight, fold)
    dev = torch.device(device) if device is not None else a.device
    a, const_a, b, const_b = a.to(dev), const_a.to(dev), b.to(dev), const_b.to(dev)
    rows = block_rows or block_rows_for(max(b.shape[0], a.shape[0]))
    label = f"{hook_name_of(sae_a)} -> {hook_name_of(sae_b)}"
    keep = candidates if candidates is not None else k + 15
    route: dict[str, Any] = {"method": method, "t_operands": time.perf_counter() - t0}
    solve = {"method": method, "screen_dims": screen_dims, "keep": keep, "block_rows": rows}
    d_out = int(getattr(sae_a.cfg, "d_out", sae_a.cfg.d_in))
    if score == "folded_mse":  # stacked layout [decoder | encoder | b_enc]; b_enc not rotated
        assert w is not None
        widths = [wd for wd, on in ((d_out, w.decoder), (int(sae_a.cfg.d_in), w.encoder)) if on]
    else:
        widths = [d_out] + ([int(sae_a.cfg.d_in)] if score != "decoder_cosine" else [])
    # decoder and encoder blocks of equal width: the screen pairs them up (_Paired)
    pairs = widths[0] if len(widths) == 2 and widths[0] == widths[1] else 0
    if score == "folded_mse":
        base = _Problem(a, b, 2.0, const_a, const_b, pairs=pairs)
    elif score == "cosine_density" and density_weight > 0:
        base = _Problem(a, b, 1.0, g=const_a, h=const_b, pairs=pairs)
    else:
        base = _Problem(a, b, 1.0, pairs=pairs)
    r_b = None
    with ieee_products(dev):
        if score == "csls":
            _, v, route["csls_source"] = _solve(base, csls_k, progress=False,
                                                label=f"{label} csls r_A", **solve)
            r_a = v.mean(dim=1).to(dev)
            _, v, route["csls_target"] = _solve(base.swapped(), csls_k, progress=False,
                                                label=f"{label} csls r_B", **solve)
            r_b = v.mean(dim=1).to(dev)
            final = _Problem(a, b, 2.0, r_a, r_b, pairs=pairs)
        else:
            final = base
        indices, scores, route["links"] = _solve(final, k, progress=progress, label=label,
                                                 **solve)
        t1 = time.perf_counter()
        null = _null_best(base, widths=widths, r_b=r_b, csls_k=csls_k, n_null=n_null, seed=seed,
                          block_rows=rows)
        route["t_null"] = time.perf_counter() - t1
    null_sorted = torch.sort(null.float()).values
    confidence = (torch.searchsorted(null_sorted, scores.contiguous(), right=False).float()
                  / len(null_sorted))
    threshold = None
    if null_rate is not None:
        threshold = float(torch.quantile(null, 1.0 - null_rate))
        cut = scores <= threshold
        indices = indices.masked_fill(cut, -1)
        scores = scores.masked_fill(cut, math.nan)
    route["seconds"] = time.perf_counter() - t0
    logger.info("%s: %d links per feature by %s (%s route, %.1fs); %.1f%% of top-1 links beat "
                "99%% of chance", label, indices.shape[1], score, route["links"]["route"],
                route["seconds"], 100 * float((confidence[:, 0] >= 0.99).float().mean()))
    options = {"k": k, "score": score, "null_rate": null_rate, "n_null": n_null,
               "csls_k": csls_k, "density_weight": density_weight, "fold": fold,
               "weights": None if w is None else w.as_dict(), "seed": seed, "method": method,
               "screen_dims": screen_dims, "candidates": keep}
    return Links(indices, scores, confidence, score, sae_identity(sae_a), sae_identity(sae_b),
                 threshold, options, route)
