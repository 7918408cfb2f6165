"""Many-to-one links between two SAEs' features: for each source feature, its top-k partners.

A permutation (:func:`~sae_match_lens.matching.match`) pairs features one-to-one. Features also
split, merge and persist with several near-copies, so Feature Flow (Laptev et al. 2025) links each
feature to its best partner independently (top-1 of decoder cosine), many-to-one. This module
computes such links exactly (every score of every pair, block by block; the top-k per row are the
true top-k of the computed float32 scores), with a per-link confidence from the same data-free
null family as ``max_cost="auto"``.

Scores (higher is better; :data:`SCORES`):

* ``"decoder_cosine"`` (default, :data:`~sae_match_lens.vocabulary.DEFAULT_LINK_SCORE`):
  ``cos(d_i, d_j)`` of the decoder rows (Feature Flow's score).
* ``"folded_mse"``: ``−C_ij``, minus SAE Match's folded matching cost of the pair (decoder rows,
  encoder columns and ``b_enc``).
* ``"cosine_sum"``: ``cos(d_i, d_j) + cos(e_i, e_j)``, decoder plus encoder cosine.
* ``"csls"``: cross-domain similarity local scaling (Conneau et al. 2018, against hubness in
  embedding alignment) of ``cosine_sum``: ``2·s_ij − r_A(i) − r_B(j)`` with ``r_B(j)`` the mean
  score of B's feature j to its ``csls_k`` nearest A features (and ``r_A(i)`` the same for A's
  feature i). A "hub" target, close to many sources, gets a large ``r_B`` and is demoted, so
  links do not pile onto a few dense features.
* ``"cosine_density"``: ``cosine_sum − λ·|z_i − z_j|``, where ``o = (θ − b'_i)/‖e‖``
  is the distance of a feature's firing hyperplane from the SAE's centre ``b_dec`` (θ = the
  JumpReLU threshold, 0 for other architectures; ``b'`` = ``b_enc`` when the encoder subtracts
  ``b_dec`` from its input, else ``b_enc + e·b_dec``, so both conventions for the same SAE give
  the same offsets; transcoders, whose ``b_dec`` lives in the output space, use ``b_enc``;
  unchanged by folding) and ``z`` its z-score within its own SAE. Features far from the centre
  fire rarely, so a gap in ``z`` is a data-free estimate of a gap in firing density, which the
  co-firing Jaccard punishes and cosines ignore. ``λ = density_weight`` (0.2) was chosen on the
  default suite (held-out text, both families: 0.393 vs 0.367 for ``cosine_sum`` and 0.353 for
  ``decoder_cosine`` mean Jaccard, JumpReLU; 0.248 vs 0.235, TopK); it is not tuned on other
  SAEs. Measuring from the origin instead of ``b_dec`` gives 0.386 and 0.232 there. On the
  SmolLM2 suite it does not beat decoder cosine (held-out residual pairs and residual →
  MLP/attention pairs; docs "Suites"), which is why it is not the default.

**Confidence.** ``n_null`` null features are drawn from A (:mod:`~sae_match_lens.nulls`: a
sampled A feature whose decoder and encoder directions are redrawn jointly from A's own
direction mean and covariance, its norms, ``b_enc`` and density offset kept), and each one's
best score against B is recorded; for ``csls`` a null feature joins B's neighbourhood means as
a real one does. A link's ``confidence`` is the fraction of those best-by-chance scores that it
is strictly above (:func:`~sae_match_lens.nulls.chance_confidence`; the same definition as a
match's, :mod:`~sae_match_lens.nulls` "Confidence"); with ``null_rate=q`` links whose score
does not exceed the ``1 − q`` quantile become -1 ("no partner"). On unrelated SAEs with
realistic geometry (moment-matched to a real SAE, or a real SAE in a permuted residual basis)
every score keeps between q/3 and 3q of the features
(README, "Calibration"). The null is marginal over features, so it calibrates the kept
fraction, not each feature's own chance; ``folded_mse`` on SAEs whose folded decoder norms
spread widely (the default JumpReLU suite) has almost no power, because norms, which the null
keeps, dominate the cost.

The reverse direction (each target feature's best source predecessors) is
``links(..., direction="backward")``.

**Routes.** The top-k are exact on every route (every pair, or a certified screen for large
problems; :mod:`sae_match_lens.solvers.topk`); ``links.route["links"]`` reports which route was
taken, the screen's width and how many rows took each path, with times.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ..adapters import (
    describe_sae,
    feature_thresholds,
    feature_view,
    hook_name_of,
    sae_identity,
    validate_sae,
)
from ..neuronpedia import feature_urls
from ..nulls import chance_confidence, null_surrogates
from ..options import accepts_flat_options
from ..permutation import PermutationFileError, check_direction, check_provenance
from ..savedir import decode_json, encode_json, tensor_checksum, write_directory
from ..solvers.costs import CostWeights, ieee_products, stack_features
from ..solvers.screen import block_rows_for
from ..solvers.topk import Method, TopKProblem, exact_topk, score_blocks, solve_topk
from ..vocabulary import DEFAULT_LINK_SCORE, SCORES, LinkScore  # their home; re-exported

__all__ = ["DEFAULT_LINK_SCORE", "LINKS_FORMAT", "LINKS_VERSION", "SCORES", "LinkOptions",
           "LinkScore", "LinkSources", "Links", "LinksFileError", "Transition", "firing_offset_z",
           "links"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkOptions:
    """Tuning knobs of :func:`links`: the route of the top-k search, the null sample and the
    scores' secondary constants.

    ``route``, ``screen_dims``, ``candidates`` and ``block_rows`` change how the exact top-k is
    found, never which it is; ``n_null`` and ``seed`` set the null sample behind the confidence;
    ``csls_k`` and ``density_weight`` are constants of the ``csls`` and ``cosine_density``
    scores. The problem's own arguments (``k``, ``score``, ``direction``, ``null_rate``,
    ``fold``, ``weights``) stay in :func:`links`' signature.
    """

    route: Method = "auto"
    """``"exact"``: every score of every pair; ``"screened"``: the certified screen; ``"auto"``:
    screened when both SAEs have at least :data:`~sae_match_lens.solvers.topk.SCREEN_FROM_N`
    features, the score is at least 512 wide and the estimate says it pays, else exact. Same
    top-k either way. (0.2: ``method=``.)"""
    n_null: int = 2048
    """Best-by-chance scores collected for the confidence."""
    csls_k: int = 10
    """Neighbourhood size of the ``csls`` score."""
    density_weight: float = 0.2
    """``cosine_density`` only: the weight λ of the firing-density gap."""
    screen_dims: int | Literal["auto"] = "auto"
    """Screened route: coordinates of the screening bound (``"auto"``: estimated from a sample of
    rows, :func:`~sae_match_lens.solvers.screen.row_screen_dims_auto`)."""
    candidates: int | None = None
    """Screened route: partners kept per row by the screen and scored exactly (default
    ``k + 15``; at least ``k``)."""
    block_rows: int | None = None
    """Rows of the score matrix (or of the screen) computed at a time (``None``: about 128 MiB
    per block buffer)."""
    seed: int = 0
    """Seed of the null model's sample."""
    device: torch.device | str | None = None
    """Where the products run (default: SAE A's device), e.g. ``"cuda"``. (Until 0.3 a
    parameter of :func:`links`.)"""

    RENAMED_IN_0_3: ClassVar[Mapping[str, str]] = {"method": "route"}
    """Flat keywords of 0.2 whose field has another name (old → field)."""


LINKS_FORMAT = "sae_match_lens.Links"
LINKS_VERSION = 1
"""Version of the :meth:`Links.save` format; :meth:`Links.load` reads this one."""
_LINKS_MANIFEST = "links.json"
_LINKS_TENSORS = "links.safetensors"


class LinksFileError(PermutationFileError):
    """Saved links are missing, unreadable, corrupt, or of another format version."""


class LinkSources(NamedTuple):
    """The source features that link to one target feature (:meth:`Links.sources_of`)."""

    indices: torch.Tensor
    """int64 ``[n]``: source features, highest score first."""
    scores: torch.Tensor
    """float32 ``[n]``: the score of each one's link to the target (higher is better)."""
    ranks: torch.Tensor
    """int64 ``[n]``: the rank of that link among the source's k links (0: its best)."""


class Links(NamedTuple):
    """Top-k links from each source feature to target features (see module docstring)."""

    indices: torch.Tensor
    """int64 ``[n_source, k]``: the k best target features of each source feature, best first;
    -1 where the null model says "no partner" (only with ``null_rate``)."""
    scores: torch.Tensor
    """float32 ``[n_source, k]``: the score of each link (higher is better; NaN where -1)."""
    confidence: torch.Tensor
    """float32 ``[n_source, k]``: the fraction of best-by-chance null scores each link's score
    is strictly above (:func:`~sae_match_lens.nulls.chance_confidence`, one definition with
    :attr:`MatchResult.confidence_F <sae_match_lens.matching.MatchResult.confidence_F>`); a
    resolution of ``1 / n_null`` (1.0: no null feature did as well). Kept for links cut to
    -1."""
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

    def check_saes(self, sae_a: Any, sae_b: Any, *, what: str = "these links") -> None:
        """Raise unless the links run from ``sae_a``'s features to ``sae_b``'s; reversed links
        are refused with a message saying how to reverse them
        (:func:`~sae_match_lens.permutation.check_direction`)."""
        check_direction(self, sae_a, sae_b, what=what)

    def sources_of(self, target: int, *, rank: int | None = None) -> LinkSources:
        """Which source features link to target feature ``target``: the reverse lookup of
        :attr:`indices`, best score first.

        Args:
            target: a target feature, ``0 <= target < n_target``.
            rank: only links of this rank (0: top-1 links); ``None`` (default): links of any
                rank below :attr:`k`.

        Returns:
            :class:`LinkSources`: the sources, each link's score and rank, sorted by score
            (highest first; ties by source feature). Empty when nothing links to ``target``.

        Raises:
            ValueError: ``target`` outside the target SAE, or ``rank`` outside ``0..k-1``.

        Example:
            >>> lk = links(sae_l3, sae_l4, k=3)
            >>> lk.sources_of(42).indices  # layer-3 features with layer-4 feature 42 in their top-3
        """
        n_target = self.target.get("d_sae")
        if isinstance(target, bool) or not isinstance(target, int) or target < 0 or (
                n_target is not None and target >= int(n_target)):
            raise ValueError(f"target must be a feature of {self.target.get('hook_name')} "
                             f"(0 <= target < {n_target}), got {target!r}.")
        if rank is not None and not (isinstance(rank, int) and 0 <= rank < self.k):
            raise ValueError(f"rank must be None or in 0..{self.k - 1} (these links keep k = "
                             f"{self.k}), got {rank!r}.")
        hit = self.indices == target
        if rank is not None:
            hit[:, [r for r in range(self.k) if r != rank]] = False
        source, ranks = torch.nonzero(hit, as_tuple=True)
        scores = self.scores[source, ranks]
        order = torch.sort(scores, descending=True, stable=True).indices  # nonzero: by source
        return LinkSources(source[order], scores[order], ranks[order])

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the links into ``directory``, atomically; returns the directory.

        ``links.safetensors`` holds ``indices``, ``scores`` and ``confidence`` bit for bit;
        ``links.json`` holds the format name and version, the other fields (score, both SAEs'
        identities, null threshold, options, route) and a SHA-256 checksum of all of it. Built
        beside ``directory`` and renamed into place like :meth:`MatchResult.save
        <sae_match_lens.matching.MatchResult.save>` (:func:`~sae_match_lens.savedir.write_directory`):
        a failed or killed save leaves an earlier save there as it was; an existing ``directory``
        that is neither empty nor saved links is refused with ``FileExistsError``. The results
        store keeps a links job's result in this format.

        Example:
            >>> links(sae_a, sae_b, k=3).save("results/l3_l4_links")
            >>> Links.load("results/l3_l4_links", source=sae_a, target=sae_b).top1[:5]
        """
        tensors = {"indices": self.indices.contiguous(), "scores": self.scores.contiguous(),
                   "confidence": self.confidence.contiguous()}
        fields = encode_json({name: getattr(self, name) for name in self._fields
                              if name not in tensors})
        checksum = tensor_checksum(tensors, fields)
        text = json.dumps({"format": LINKS_FORMAT, "format_version": LINKS_VERSION,
                           "version": LINKS_VERSION, "checksum": checksum, "fields": fields},
                          indent=1, sort_keys=True, allow_nan=False)

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / _LINKS_TENSORS))
            (tmp / _LINKS_MANIFEST).write_text(text, encoding="utf-8")

        return write_directory(directory, write, manifest=_LINKS_MANIFEST, kind=LINKS_FORMAT)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, source: Any | None = None,
             target: Any | None = None) -> Links:
        """Read links written by :meth:`save` (every field exact, provenance included).

        Args:
            directory: a directory written by :meth:`save`.
            source: optionally the source SAE; it must be the one the links were made for
                (hook, widths, architecture, fold-invariant weight signature).
            target: optionally the target SAE, checked the same way.

        Raises:
            LinksFileError: a missing or unreadable directory, one that is not saved links, a
                format version this release does not read, or a checksum mismatch (the message
                names the directory and what to do).
            ProvenanceError: ``source``/``target`` are not the SAEs the links were made for.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise LinksFileError(f"links directory {directory} does not exist (Links.save writes "
                                 "a directory).")
        manifest = directory / _LINKS_MANIFEST
        try:
            record = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LinksFileError(f"{directory} is not readable saved links ({manifest.name}: "
                                 f"{exc}).") from exc
        found = record.get("format") if isinstance(record, dict) else None
        if found != LINKS_FORMAT:
            raise LinksFileError(f"{directory} is not saved links: its {manifest.name} says format "
                                 f"{found!r}, expected {LINKS_FORMAT!r}.")
        got = record.get("format_version", record.get("version"))  # "version": early 0.3 stores
        if got != LINKS_VERSION:
            newer = isinstance(got, int) and got > LINKS_VERSION
            raise LinksFileError(
                f"{directory} was saved in {LINKS_FORMAT} format version {got!r}, but this "
                f"sae_match_lens reads version {LINKS_VERSION}; "
                + ("upgrade sae_match_lens to read it." if newer else "re-run links to save it again."))
        try:
            tensors = load_file(str(directory / _LINKS_TENSORS))
        except Exception as exc:
            raise LinksFileError(f"cannot read {directory / _LINKS_TENSORS}: {exc}") from exc
        if tensor_checksum(tensors, record.get("fields")) != record.get("checksum"):
            raise LinksFileError(f"{directory}: checksum mismatch (its files were modified, "
                                 "truncated or mixed with another save's). Re-run links to save "
                                 "them again.")
        lk = cls(indices=tensors["indices"], scores=tensors["scores"],
                 confidence=tensors["confidence"].to(torch.float32),
                 **decode_json(record["fields"]))
        check_provenance(lk.source if source is not None else None,
                         lk.target if target is not None else None, source, target,
                         what=f"the links in {directory}")
        return lk

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

    def check_saes(self, sae_a: Any, sae_b: Any, *, what: str = "this transition") -> None:
        """Raise unless the transition maps ``sae_a``'s features into ``sae_b``'s (where it
        records their identities; :func:`~sae_match_lens.permutation.check_direction`)."""
        check_direction(self, sae_a, sae_b, what=what)

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
    theta = feature_thresholds(sae, spec)
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


def _null_best(base: TopKProblem, *, widths: list[int], r_b: torch.Tensor | None, csls_k: int,
               n_null: int, seed: int, block_rows: int,
               kth_b: torch.Tensor | None = None) -> torch.Tensor:
    """Best score against B of ``n_null`` null features drawn from A
    (:func:`~sae_match_lens.nulls.null_surrogates`: each a sampled A feature whose decoder and
    encoder directions are redrawn from A's joint direction mean and covariance, its norms,
    ``b_enc`` and density offset kept). ``widths`` are the vector blocks at the start of A's
    operand rows. With ``r_b`` (csls) a null feature's own ``r`` comes from the same score
    blocks, and B's ``r_B(j)`` is taken as if the null feature were one of A's (``kth_b``:
    each B feature's ``csls_k``-th best A score): a real source feature is among the
    neighbours its own ``r_B`` averages over, and a null one must be too, or chance scores
    come out higher than a real unrelated feature's."""
    gen = torch.Generator().manual_seed(seed)
    spans, col = [], 0
    for width in widths:
        spans.append(slice(col, col + width))
        col += width
    _, sub, g = null_surrogates(base.a, spans, n_null, generator=gen, scalars_F=base.g)
    p = None
    if base.p is not None:  # folded_mse: the row constant is the surrogate's squared norm
        p = sub.to(torch.float64).square().sum(dim=1).to(base.p.dtype)
    null = base._replace(a=sub.contiguous(), p=p, g=g)
    if r_b is None:
        return exact_topk(null, 1, block_rows=block_rows)[1][:, 0].to(torch.float64)
    best: list[torch.Tensor] = []
    kk = min(csls_k, base.b.shape[0])
    k_b = min(csls_k, base.a.shape[0])
    for _, _, block in score_blocks(null, block_rows):
        r_sub = block.topk(kk, dim=1).values.mean(dim=1)
        joined = r_b[None, :] if kth_b is None else \
            r_b[None, :] + (block - kth_b[None, :]).clamp_min(0.0) / k_b
        block.mul_(2.0).sub_(joined).sub_(r_sub[:, None])
        best.append(block.amax(dim=1).cpu())
    return torch.cat(best).to(torch.float64)


@torch.no_grad()
@accepts_flat_options(LinkOptions)
def links(
    sae_a: Any,
    sae_b: Any,
    *,
    k: int = 1,
    score: LinkScore = DEFAULT_LINK_SCORE,
    direction: Literal["forward", "backward"] = "forward",
    null_rate: float | None = None,
    weights: CostWeights | Mapping[str, float] | None = None,
    fold: bool = True,
    progress: bool = True,
    options: LinkOptions | None = None,
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
        weights: ``folded_mse`` only: block weights as in :func:`~sae_match_lens.matching.match`.
        fold: ``folded_mse`` only: ``False`` compares raw parameters (the unfolded ablation).
        progress: show a progress bar.
        options: the tuning knobs (:class:`LinkOptions`; default: its defaults). The flat
            keywords of 0.2 (``n_null=``, ``csls_k=``, ``density_weight=``, ``method=``,
            ``screen_dims=``, ``candidates=``, ``block_rows=``, ``seed=``, ``device=``) still
            work until 0.4, with a ``DeprecationWarning``.

    Returns:
        :class:`Links` whose ``indices[i]`` are source feature i's top-k targets.

    Example:
        >>> lk = links(sae_l3, sae_l4, k=3)
        >>> lk.indices[17], lk.scores[17], lk.confidence[17]
        >>> lk.route["links"]["rows_recomputed"]  # screened route: rows proven by a full row
    """
    opts = options if options is not None else LinkOptions()
    if not isinstance(opts, LinkOptions):
        raise TypeError(f"options must be a LinkOptions, got {type(opts).__name__}.")
    if direction == "backward":
        return links(sae_b, sae_a, k=k, score=score, null_rate=null_rate, weights=weights,
                     fold=fold, progress=progress, options=opts)
    n_null, csls_k, density_weight, method = opts.n_null, opts.csls_k, opts.density_weight, opts.route
    device = opts.device
    screen_dims, candidates, block_rows, seed = (opts.screen_dims, opts.candidates, opts.block_rows,
                                                 opts.seed)
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
        raise ValueError(f"route must be 'auto', 'exact' or 'screened', got {method!r}.")
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
        base = TopKProblem(a, b, 2.0, const_a, const_b, pairs=pairs)
    elif score == "cosine_density" and density_weight > 0:
        base = TopKProblem(a, b, 1.0, g=const_a, h=const_b, pairs=pairs)
    else:
        base = TopKProblem(a, b, 1.0, pairs=pairs)
    r_b = kth_b = None
    with ieee_products(dev):
        if score == "csls":
            _, v, route["csls_source"] = solve_topk(base, csls_k, progress=False,
                                                label=f"{label} csls r_A", **solve)
            r_a = v.mean(dim=1).to(dev)
            _, v, route["csls_target"] = solve_topk(base.swapped(), csls_k, progress=False,
                                                label=f"{label} csls r_B", **solve)
            r_b, kth_b = v.mean(dim=1).to(dev), v[:, -1].to(dev)
            final = TopKProblem(a, b, 2.0, r_a, r_b, pairs=pairs)
        else:
            final = base
        indices, scores, route["links"] = solve_topk(final, k, progress=progress, label=label,
                                                 **solve)
        t1 = time.perf_counter()
        null = _null_best(base, widths=widths, r_b=r_b, csls_k=csls_k, n_null=n_null, seed=seed,
                          block_rows=rows, kth_b=kth_b)
        route["t_null"] = time.perf_counter() - t1
    confidence = chance_confidence(scores, null.float(), higher_is_better=True).float()
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
