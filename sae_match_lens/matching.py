"""Data-free matching of two SAEs' features: ``match(sae_a, sae_b) -> MatchResult``.

The permutation minimises the summed matching cost (:mod:`sae_match_lens.solvers.costs`) between
the folded parameters of SAE A's features and SAE B's features, a linear assignment problem.
The full cost matrix is built block by block into one ``n_a × n_b`` float32 array (the only
one alive), then solved exactly:

* ``solver="lapjv"``: the Jonker–Volgenant solver of the ``lapjv`` package on the float32
  matrix; its solution is then certified, or repaired and certified, against the float64 costs
  of the parameters (:mod:`sae_match_lens.solvers.dense`);
* ``solver="scipy"``: ``scipy.optimize.linear_sum_assignment`` on the float32 matrix, certified
  the same way;
* ``solver="sparse"``: top-``k`` candidate edges, never the whole matrix, with a certificate of
  global optimality and repair rounds (:mod:`sae_match_lens.solvers.sparse`); for 16k to 1M features;
* ``solver="auto"``: lapjv for n < 8192 without ``max_cost`` when the dense matrix fits
  comfortably in memory (at most half of the available memory), otherwise sparse (lapjv 1.3.29
  also crashes at n ≥ 46342; with ``max_cost`` the sparse route's dummy partners are much cheaper
  to certify than the dense route's clamped entries).

**Unmatched features.** With ``max_cost=λ`` a source feature may stay unmatched at cost λ. This is
solved inside the same optimal assignment: leaving row ``i`` unmatched is a dummy partner of
cost λ, and the problem "pairs + dummies" has the same optimum as the full assignment on
``min(C, λ)`` (any pair costing ≥ λ is no better than its dummy). So the matrix is clamped at λ
in place, solved once, and pairs whose true cost is ≥ λ become -1. Unequal widths give a
rectangular assignment; the excess features are unmatched. ``max_cost="auto"`` picks λ from a
data-free null model (:func:`null_max_cost`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .adapters import describe_sae, feature_view, hook_name_of, sae_identity, validate_sae
from .nulls import chance_confidence, null_surrogates
from .options import accepts_flat_options, resolve_options
from .permutation import Permutation, PermutationFileError, ProvenanceError, check_provenance
from .progress import progress_bar
from .savedir import (
    decode_json,
    encode_json,
    read_versioned_manifest,
    tensor_checksum,
    write_directory,
)
from .solvers.costs import (
    CostWeights,
    ExactScales,
    Metric,
    StackedFeatures,
    cost_blocks,
    exact_scales,
    ieee_products,
    stack_features,
)
from .solvers.dense import DenseCertificate, certify_dense, encode_max_cost, square_assignment
from .solvers.screen import block_rows_for
from .solvers.sparse import Precision, solve_sparse, sparse_bytes

__all__ = ["CONFIDENCE_MAX_N", "LAPJV_MAX_N", "MATCH_RESULT_VERSION", "MatchOptions", "MatchResult",
           "MatchResultFileError", "Solver", "load_match_result", "match", "match_features",
           "null_confidence", "null_costs", "null_max_cost"]

logger = logging.getLogger(__name__)

Solver = Literal["auto", "lapjv", "scipy", "sparse"]
CONFIDENCE_MAX_N = 8192
"""Up to this many source features :func:`match` computes :attr:`MatchResult.confidence_F` by
default: 2048 null rows against B, a quarter of the dense matrix's rows at this size
(measured: 0.09 s beside a 0.4 s match at 1024 features, d = 128, two CPU cores). Beyond it
the null costs are a noticeable share of the sparse route's time; call
:meth:`MatchResult.with_confidence`, or ``max_cost="auto"``, which computes them anyway."""

SPARSE_FROM_N = 8192
"""From this size on, ``solver="auto"`` takes the certified sparse route: it skips most of the
dense matrix pass, which dominates the time (about 2× faster at n = 16384, same optimum)."""
LAPJV_MAX_N = 46341
"""Largest square size passed to lapjv (lapjv 1.3.29 overflows an int32 index at n ≥ 46342)."""


@dataclass(frozen=True)
class MatchOptions:
    """Tuning knobs of :func:`match`: which exact solver runs and how it spends time and memory.

    Every route returns an optimal assignment (the sparse one certifies it or reports its gap),
    so these change speed, memory and the certificate, not the problem. The problem's own
    arguments (``fold``, ``weights``, ``metric``, ``max_cost``, ``null_rate``) stay in
    :func:`match`'s signature.
    """

    solver: Solver = "auto"
    """``"auto"``, ``"lapjv"``, ``"scipy"`` or ``"sparse"`` (all exact; sparse is certified or
    reports its gap). ``"auto"`` takes lapjv when the dense matrix fits comfortably in memory,
    otherwise sparse."""
    block_rows: int | None = None
    """Rows of the cost matrix computed at a time (``None``: 1024 on the dense route, about
    128 MiB per block on the sparse route)."""
    candidates: int = 16
    """Sparse solver: candidate partners kept per source feature (target features keep
    ``max(4, candidates // 4)``); repairs add what is missing. (0.2: ``k=``.)"""
    certify: bool = True
    """Sparse solver: prove optimality, repairing if needed; ``False``: one pass."""
    max_rounds: int = 16
    """Repair rounds at most (both routes: each round re-solves with the pairs the float64 check
    found). When they run out, ``certified`` is False and ``gap`` bounds the distance to the
    optimum."""
    screen_dims: int | Literal["auto"] | None = "auto"
    """Sparse solver: width of the cheap screening bound (``None``: exact screen; ``"auto"``:
    estimated from a sample of rows)."""
    precision: Precision = "float32"
    """Sparse solver: arithmetic of the screen (``"bfloat16"``/``"float16"`` pay off on GPUs; on
    AVX2 CPUs they are slower than float32)."""

    device: torch.device | str | None = None
    """Where the cost blocks are computed (default: SAE A's device), e.g. ``"cuda"``. (Until
    0.3 a parameter of :func:`match`.)"""

    RENAMED_IN_0_3: ClassVar[Mapping[str, str]] = {"k": "candidates"}
    """Flat keywords of 0.2 whose field has another name (old → field)."""


class MatchResult(NamedTuple):
    """The result of matching SAE A's features to SAE B's."""

    permutation: Permutation
    """``permutation.indices[i] = j``: A's feature i ↔ B's feature j (-1: no partner)."""
    cost_F: torch.Tensor
    """Cost of each source feature's assigned pair [n_a] (float64, computed in float64 from
    direct differences of the stacked features, :mod:`~sae_match_lens.solvers.costs`; NaN where
    unmatched)."""
    total_cost: float
    """Sum of ``cost_F`` over matched features (float64, correctly rounded)."""
    margin_F: torch.Tensor
    """Best alternative cost minus assigned cost, per source feature [n_a] (float64): how much
    cheaper the assigned partner is than the second-best one (≤ 0 when the global assignment
    took a column that is not the row's cheapest; for unmatched rows: second-best minus best
    cost). Always a rigorous lower bound of that float64 quantity, exact when the rival is
    among the row's listed edges: on the dense routes the row's 4 cheapest float32 entries
    (recomputed in float64), on the sparse route its candidate edges; where the rival may lie
    outside them, the row's floor (a lower bound of every other edge: the 4th float32 value
    minus its error bound, or the screening floor) stands in for its cost."""
    max_cost: float | None
    """The cost above which features stayed unmatched (``None``: full assignment)."""
    certified: bool
    """True when the assignment is proven optimal for the float64 costs on every route: no
    pair is known to violate the dual certificate, and ``gap`` is within the written rounding
    tolerance (about ``1e-11 · n · max cost``; :mod:`~sae_match_lens.solvers.certificate`). The float32
    solvers only find a start: near-ties they get wrong are repaired in float64
    (:mod:`~sae_match_lens.solvers.dense`). False when ``max_rounds`` ran out with known violations
    (or ``certify=False`` left suspect rows)."""
    gap: float
    """Rigorous upper bound on ``total − optimum`` for the float64 costs, from the dual
    certificate (inf when not bounded). It is a floating-point bound, never exactly 0: it adds
    the rounding-error bound of every matched float64 cost and of the sums
    (:func:`~sae_match_lens.solvers.certificate.dual_gap`) to the primal–dual difference, so an
    optimal assignment shows a small positive gap (4.0e-10 on a total cost of 3293, the
    default JumpReLU suite's layers 2→3, about 1e-13 of the total). Read it against
    ``total_cost``; ``certified`` already compares it with the rounding tolerance (about
    ``1e-11 · n · max cost``)."""
    solver: str
    """The solver that produced the assignment."""
    options: dict[str, Any]
    """Matching options (fold, metric, weights, max_cost, solver) for provenance."""
    confidence_F: torch.Tensor | None = None
    """Per source feature [n_a] (float64): the fraction of best-by-chance null costs
    (:func:`null_costs`, the model behind ``max_cost="auto"``, 2048 null features) that are
    strictly above the assigned pair's cost (:func:`~sae_match_lens.nulls.chance_confidence`,
    one definition with :attr:`Links.confidence <sae_match_lens.flow.linking.Links.confidence>`):
    1.0: chance never does as well; NaN where unmatched. :func:`match` sets it by default when
    it is cheap (SAE A has at most :data:`CONFIDENCE_MAX_N` features) and always with
    ``max_cost="auto"`` (the null costs are computed anyway); otherwise ``None`` until
    :meth:`with_confidence`. It ignores the one-to-one competition that ``max_cost="auto"``
    allows for (:func:`null_max_cost`), so a kept pair may score below ``1 − null_rate``."""

    @property
    def confidence(self) -> torch.Tensor | None:
        """:attr:`confidence_F` under the name :class:`~sae_match_lens.flow.linking.Links` uses."""
        return self.confidence_F

    @property
    def matched(self) -> torch.Tensor:
        """Boolean mask [n_a] of source features that have a partner."""
        return self.permutation.matched

    def to_frame(self) -> pd.DataFrame:
        """One row per source feature (matched or not), the same columns on every result.

        Columns: ``hook_a``/``hook_b`` and ``layer_a``/``layer_b`` (model layer from the hook
        name; None for a hand-built result or a hook outside the blocks), ``feature_a``,
        ``feature_b`` (its partner, -1: none), ``matched``, ``cost`` (NaN where unmatched),
        ``margin``, ``confidence`` (:attr:`confidence_F`; NaN when the result has none),
        ``neuronpedia_id_a/_b`` and ``neuronpedia_url_a/_b`` (None where an SAE has no
        Neuronpedia id, and for ``feature_b = -1``). The names are those of
        :meth:`ChainMatch.edges <sae_match_lens.chain.ChainMatch.edges>` and
        :meth:`Links.to_frame <sae_match_lens.flow.linking.Links.to_frame>`.

        Example:
            >>> frame = match(sae_layer_3, sae_layer_4, max_cost="auto").to_frame()
            >>> frame.sort_values("margin").head()  # the least certain pairs
        """
        from .neuronpedia import feature_urls

        perm = self.permutation
        source, target = perm.source or {}, perm.target or {}
        id_a, id_b = source.get("neuronpedia_id"), target.get("neuronpedia_id")
        hook_a, hook_b = source.get("hook_name"), target.get("hook_name")
        confidence = (np.full(perm.n_source, np.nan) if self.confidence_F is None
                      else self.confidence_F.to(torch.float64).numpy())
        return pd.DataFrame({
            "hook_a": hook_a, "hook_b": hook_b,
            "layer_a": _model_layer(hook_a), "layer_b": _model_layer(hook_b),
            "feature_a": np.arange(perm.n_source), "feature_b": perm.indices.numpy(),
            "matched": perm.matched.numpy(),
            "cost": self.cost_F.to(torch.float64).numpy(),
            "margin": self.margin_F.to(torch.float64).numpy(),
            "confidence": confidence,
            "neuronpedia_id_a": id_a, "neuronpedia_id_b": id_b,
            "neuronpedia_url_a": feature_urls(id_a, range(perm.n_source)),
            "neuronpedia_url_b": feature_urls(id_b, perm.indices.tolist()),
        })

    def with_confidence(self, sae_a: Any, sae_b: Any, *, n_rows: int = 2048,
                        seed: int = 0) -> MatchResult:
        """This result with :attr:`confidence_F` computed from the null model (what
        :func:`match` does by default up to :data:`CONFIDENCE_MAX_N` source features).

        Uses the ``fold``, ``weights`` and ``metric`` recorded in :attr:`options`; ``sae_a``
        and ``sae_b`` must be the SAEs the result was made for (checked against the recorded
        identities). Costs ``n_rows`` rows of the cost matrix.

        Example:
            >>> result = match(sae_a, sae_b).with_confidence(sae_a, sae_b)
            >>> result.to_frame().confidence.describe()
        """
        self.permutation.check_saes(sae_a, sae_b, what="this match result")
        fold = bool(self.options.get("fold", True))
        metric = self.options.get("metric", "mse")
        w = CostWeights.resolve(self.options.get("weights"), metric)
        features = (stack_features(feature_view(sae_a, fold=fold), w, metric),
                    stack_features(feature_view(sae_b, fold=fold), w, metric))
        best = _null_best(sae_a, sae_b, w, features, metric=metric, n_rows=n_rows, seed=seed)
        return self._replace(confidence_F=null_confidence(self.cost_F, best))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the whole result into ``directory``, atomically; returns the directory.

        ``result.safetensors`` holds every tensor, bit for bit: the permutation's ``indices``,
        the float64 ``cost_F``, ``margin_F`` and (when set) ``confidence_F``. ``result.json``
        holds the format version, ``n_source``/``n_target``, the scalar fields (``total_cost``,
        ``max_cost``, the certificate ``certified``/``gap``, ``solver``, ``options``), the
        permutation's provenance metadata (both SAEs' identities: hook, widths, architecture,
        weight fingerprints, release, Neuronpedia id) and a SHA-256 checksum of all of it.
        Non-finite floats (``gap = inf``) are written as ``{"float": "inf"}`` so the JSON is
        strict. The directory is built beside ``directory`` and renamed into place
        (:func:`~sae_match_lens.savedir.write_directory`): a failed or killed save leaves an
        earlier save there exactly as it was. An existing ``directory`` that is not a saved
        match result (nor empty) is refused with ``FileExistsError``.

        Example:
            >>> match(sae_a, sae_b).save("results/l3_l4")
            >>> MatchResult.load("results/l3_l4", source=sae_a, target=sae_b).certified
        """
        tensors, fields = self._split_fields()
        encoded = encode_json(fields)
        metadata = encode_json(dict(self.permutation.metadata))
        n_source, n_target = self.permutation.n_source, self.permutation.n_target
        checksum = tensor_checksum(tensors, encoded, metadata, n_source, n_target)
        record = {
            "format": MATCH_RESULT_FORMAT,
            "format_version": MATCH_RESULT_VERSION,
            "n_source": n_source,
            "n_target": n_target,
            "n_matched": self.permutation.n_matched,
            "checksum": checksum,
            "fields": encoded,
            "permutation_metadata": metadata,
        }
        text = json.dumps(record, indent=1, sort_keys=True, allow_nan=False)

        def write(tmp: Path) -> None:
            save_file(dict(tensors), str(tmp / _TENSORS), metadata={"checksum": checksum})
            os.chmod(tmp / _TENSORS, 0o666 & ~_umask())  # safetensors creates it 0600
            (tmp / _MANIFEST).write_text(text, encoding="utf-8")

        return write_directory(directory, write, manifest=_MANIFEST, kind=MATCH_RESULT_FORMAT)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        source: Any | None = None,
        target: Any | None = None,
    ) -> MatchResult:
        """Read a result written by :meth:`save` (every field exact, provenance included).

        The loaded permutation keeps both SAEs' identities, so it still refuses to be used with
        other SAEs (:meth:`Permutation.check_saes
        <sae_match_lens.permutation.Permutation.check_saes>`, substitution, composition).

        Args:
            directory: a directory written by :meth:`save`.
            source: optionally the source SAE; it must be the one the result was made for
                (hook, widths, architecture, fold-invariant weight signature).
            target: optionally the target SAE, checked the same way.

        Raises:
            MatchResultFileError: a missing or unreadable directory, a directory that is not a
                saved match result, a format version this release does not read (the message
                says which it reads and what to do), or a checksum mismatch.
            ProvenanceError: ``source``/``target`` are not the SAEs the result was made for.
        """
        directory = Path(directory)
        tensor_file = directory / _TENSORS
        if not directory.is_dir():
            hint = (" (a file: MatchResult.save writes a directory; a lone .safetensors file is "
                    "a Permutation, read it with Permutation.load)") if directory.is_file() else ""
            raise MatchResultFileError(f"match result directory {directory} does not exist{hint}.")
        record = read_versioned_manifest(directory, _MANIFEST, MATCH_RESULT_FORMAT,
                                         MATCH_RESULT_VERSION, MatchResultFileError,
                                         "saved match result", "re-run the matching")
        try:
            tensors = load_file(str(tensor_file))
        except Exception as exc:
            raise MatchResultFileError(f"cannot read {tensor_file}: {exc}") from exc
        encoded, encoded_md = record.get("fields"), record.get("permutation_metadata")
        n_source, n_target = record.get("n_source"), record.get("n_target")
        if tensor_checksum(tensors, encoded, encoded_md, n_source, n_target) != record.get(
                "checksum"):
            raise MatchResultFileError(
                f"{directory}: checksum mismatch (its files were modified, truncated or mixed "
                "with another save's). Re-run the matching to save it again."
            )
        fields, metadata = decode_json(encoded), decode_json(encoded_md)
        values: dict[str, Any] = {}
        for name in cls._fields:
            if name == "permutation":
                values[name] = Permutation(tensors["indices"], int(n_target), metadata)
            elif name in tensors:
                values[name] = tensors[name]
            elif name in fields:
                values[name] = fields[name]
            elif name in cls._field_defaults:
                values[name] = cls._field_defaults[name]
            else:
                raise MatchResultFileError(f"{directory} lacks the field {name!r}.")
        result = cls(**values)
        what = f"the match result in {directory}"
        for role, sae, width in (("source", source, result.permutation.n_source),
                                 ("target", target, result.permutation.n_target)):
            if sae is not None and int(sae.cfg.d_sae) != width:
                raise ProvenanceError(f"{what} has {width} {role} features, but its {role} here "
                                      f"is {describe_sae(sae)}; pass the SAE it was made for.")
        check_provenance(result.permutation.source if source is not None else None,
                         result.permutation.target if target is not None else None,
                         source, target, what=what)
        return result

    def _split_fields(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors (with the permutation's ``indices``) and the JSON-able fields."""
        tensors = {"indices": self.permutation.indices.contiguous()}
        fields: dict[str, Any] = {}
        for name in self._fields:
            value = getattr(self, name)
            if name == "permutation" or (value is None and name in self._field_defaults):
                continue
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                fields[name] = value
        return tensors, fields


MATCH_RESULT_FORMAT = "sae_match_lens.MatchResult"
MATCH_RESULT_VERSION = 1
"""Version of the :meth:`MatchResult.save` format; :meth:`MatchResult.load` reads this one."""
_MANIFEST = "result.json"
_TENSORS = "result.safetensors"


class MatchResultFileError(PermutationFileError):
    """A saved match result is missing, unreadable, corrupt, or of another format version."""


def load_match_result(directory: str | os.PathLike[str], *, source: Any | None = None,
                      target: Any | None = None) -> MatchResult:
    """Read a result written by :meth:`MatchResult.save` (same as :meth:`MatchResult.load`)."""
    return MatchResult.load(directory, source=source, target=target)


def null_confidence(cost_F: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """For each cost, the fraction of best-by-chance costs ``best`` strictly above it
    (float64; NaN where the cost is NaN): :func:`~sae_match_lens.nulls.chance_confidence` for
    costs."""
    return chance_confidence(cost_F, best, higher_is_better=False)


def _model_layer(hook: str | None) -> int | None:
    found = re.match(r"blocks\.(\d+)\.", hook or "")
    return int(found.group(1)) if found else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def available_bytes() -> int:
    """Memory available to this process in bytes (``MemAvailable`` of ``/proc/meminfo``)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_pair(sae_a: Any, sae_b: Any, weights: CostWeights) -> None:
    a_in, b_in = sae_a.cfg.d_in, sae_b.cfg.d_in
    a_out = getattr(sae_a.cfg, "d_out", a_in)
    b_out = getattr(sae_b.cfg, "d_out", b_in)
    if weights.encoder and a_in != b_in:
        raise ValueError(
            f"cannot compare encoders: {describe_sae(sae_a)} has d_in={a_in} but "
            f"{describe_sae(sae_b)} has d_in={b_in}. Match SAEs on the same model's residual "
            "stream, or set the encoder weight to 0."
        )
    if weights.decoder and a_out != b_out:
        raise ValueError(
            f"cannot compare decoders: {describe_sae(sae_a)} writes {a_out} dims but "
            f"{describe_sae(sae_b)} writes {b_out}. Set the decoder weight to 0 to match on "
            "encoders only."
        )


def _check_families(sae_a: Any, sae_b: Any, fold: bool, metric: str) -> None:
    """Refuse anything but two SAEs (raw weight tensors get a hint), and warn when the two are
    folded by different rules (their folded costs then compare parameters in different units)."""
    for role, sae in (("sae_a", sae_a), ("sae_b", sae_b)):
        if isinstance(sae, torch.Tensor):
            raise TypeError(
                f"match() takes two SAELens SAEs, but {role} is a tensor of shape "
                f"{tuple(sae.shape)}; pass the SAE objects (SAE.load_from_disk(...)), or stack raw "
                "feature tensors with solvers.costs.stack_features and call match_features()."
            )
    rules = []
    for sae in (sae_a, sae_b):
        spec = validate_sae(sae)
        rescaled = spec.name in ("topk", "abstopk") and getattr(
            sae.cfg, "rescale_acts_by_decoder_norm", False)
        rules.append((spec.name, "decoder_norm" if rescaled else spec.scale_rule))
    if fold and metric != "cosine" and rules[0][1] != rules[1][1]:
        logger.warning(
            "matching %s (%s, folded by rule '%s') with %s (%s, folded by rule '%s'): the two "
            "families are folded by different rules, so their folded parameters are in "
            "different units and the costs mix them; match SAEs of one family, or use "
            "metric='cosine' (scale-free).", describe_sae(sae_a), rules[0][0], rules[0][1],
            describe_sae(sae_b), rules[1][0], rules[1][1])


@accepts_flat_options(MatchOptions)
def match(
    sae_a: Any,
    sae_b: Any,
    *,
    fold: bool = True,
    weights: CostWeights | Mapping[str, float] | None = None,
    metric: Metric = "mse",
    max_cost: float | Literal["auto"] | None = None,
    null_rate: float = 0.01,
    progress: bool = True,
    features: tuple[StackedFeatures, StackedFeatures] | None = None,
    options: MatchOptions | None = None,
) -> MatchResult:
    """Match SAE A's features to SAE B's without data (SAE Match).

    Args:
        sae_a: source SAE (layer A), any supported SAELens inference SAE.
        sae_b: target SAE (layer B).
        fold: compare folded parameters (threshold units for JumpReLU); ``False`` compares raw
            parameters (the "unfolded" baseline). With ``metric="cosine"`` it changes nothing:
            cosine ignores per-feature scales.
        weights: weights of the decoder rows, encoder columns and b_enc in the cost
            (:class:`CostWeights` or a mapping); default: all three (cosine: decoder+encoder).
        metric: ``"mse"`` (summed squared distances, the paper's) or ``"cosine"``.
        max_cost: leave a source feature unmatched when no partner costs less than this;
            ``"auto"`` picks it from a null model (:func:`null_max_cost`) so that a feature with
            no partner is matched with probability about ``null_rate``; ``None`` forces a
            full one-to-one assignment as in the paper.
        null_rate: ``max_cost="auto"`` only: the false-match rate the threshold is calibrated
            for (default 1%).
        progress: show a progress bar.
        features: ``stack_features`` of both SAEs computed with these same ``fold``,
            ``weights`` and ``metric`` (as :func:`~sae_match_lens.chain.match_chain` does, to
            fold each SAE of a stack once); computed here when omitted.
        options: the solver's tuning knobs (:class:`MatchOptions`; default: its defaults). The
            flat keywords of 0.2 (``solver=``, ``block_rows=``, ``k=``, ``certify=``,
            ``max_rounds=``, ``screen_dims=``, ``precision=``, ``device=``) still work until 0.4,
            with a ``DeprecationWarning``.

    Returns:
        A :class:`MatchResult`; its permutation's metadata records both SAEs' identities and
        these options, so ``result.permutation.save(path)`` keeps the provenance. Its
        ``confidence_F`` is set when SAE A has at most :data:`CONFIDENCE_MAX_N` features or
        ``max_cost="auto"`` (else :meth:`MatchResult.with_confidence` adds it).

    Example:
        >>> result = match(sae_layer_3, sae_layer_4)
        >>> result.permutation.indices[17]  # feature 17 of layer 3 ↔ this feature of layer 4
    """
    opts = resolve_options(MatchOptions, options)
    solver, k = opts.solver, opts.candidates
    certify, max_rounds, screen_dims, precision = (opts.certify, opts.max_rounds, opts.screen_dims,
                                                   opts.precision)
    _check_families(sae_a, sae_b, fold, metric)
    w = CostWeights.resolve(weights, metric)
    _check_pair(sae_a, sae_b, w)
    if features is None:
        enc = w.encoder != 0  # a cost without the encoder needs no transposed copy of W_enc
        features = (stack_features(feature_view(sae_a, fold=fold, encoder=enc), w, metric),
                    stack_features(feature_view(sae_b, fold=fold, encoder=enc), w, metric))
    stacked_a, stacked_b = features
    for sae, stacked in ((sae_a, stacked_a), (sae_b, stacked_b)):
        if stacked.matrix_FK.shape[0] != sae.cfg.d_sae:
            raise ValueError(f"precomputed features have {stacked.matrix_FK.shape[0]} rows but "
                             f"{describe_sae(sae)} has d_sae={sae.cfg.d_sae}.")
    recorded = {"fold": fold, "metric": metric, "weights": w.as_dict(), "solver": solver}
    best = None
    if max_cost == "auto" or stacked_a.matrix_FK.shape[0] <= CONFIDENCE_MAX_N:
        best = _null_best(sae_a, sae_b, w, features, metric=metric)
    if max_cost == "auto":
        if not (isinstance(null_rate, int | float) and 0 < null_rate < 1):
            raise ValueError(f"null_rate must be in (0, 1), got {null_rate!r}.")
        max_cost = _auto_max_cost(sae_a, sae_b, w, features, best, metric=metric,
                                  null_rate=null_rate)
        recorded["null_rate"] = null_rate
    recorded["max_cost"] = max_cost
    if solver == "sparse" or solver == "auto":
        recorded.update(k=k, certify=certify, max_rounds=max_rounds, screen_dims=screen_dims,
                        precision=precision)
    result = match_features(
        stacked_a, stacked_b, max_cost=max_cost, progress=progress, recorded=recorded,
        label=f"{hook_name_of(sae_a)} -> {hook_name_of(sae_b)}", options=opts,
    )
    metadata = {"source": sae_identity(sae_a), "target": sae_identity(sae_b), "options": recorded}
    perm = Permutation(result.permutation.indices, result.permutation.n_target, metadata)
    confidence = None if best is None else null_confidence(result.cost_F, best)
    return result._replace(permutation=perm, confidence_F=confidence)


@accepts_flat_options(MatchOptions)
def match_features(
    a: StackedFeatures,
    b: StackedFeatures,
    *,
    max_cost: float | None = None,
    progress: bool = True,
    recorded: dict[str, Any] | None = None,
    label: str = "match",
    options: MatchOptions | None = None,
) -> MatchResult:
    """Solve the assignment between two stacked feature sets (the engine behind :func:`match`).

    Matching a chain of SAEs: stack each SAE once (:func:`~sae_match_lens.solvers.costs.stack_features`)
    and call this for each adjacent pair; the folded, stacked tensors are then computed once per
    SAE instead of twice.

    Args:
        a: the source SAE's stacked features.
        b: the target SAE's stacked features.
        max_cost: as in :func:`match` (a number or ``None``; ``"auto"`` is :func:`match`'s).
        progress: show a progress bar.
        recorded: the options the result records (:attr:`MatchResult.options`).
        label: names the pair in logs and progress bars.
        options: the solver's knobs (:class:`MatchOptions`). The flat keywords of 0.2
            (``solver=``, ``k=``, ...) still work until 0.4, with a ``DeprecationWarning``.

    Returns:
        A :class:`MatchResult` (its permutation without the SAEs' identities).
    """
    opts = resolve_options(MatchOptions, options)
    solver, block_rows, device, k = opts.solver, opts.block_rows, opts.device, opts.candidates
    certify, max_rounds, screen_dims, precision = (opts.certify, opts.max_rounds, opts.screen_dims,
                                                   opts.precision)
    if max_cost is not None and not (isinstance(max_cost, int | float) and math.isfinite(max_cost)):
        raise ValueError(f"max_cost must be a finite number, 'auto' or None, got {max_cost!r}.")
    if solver not in ("auto", "lapjv", "scipy", "sparse"):
        raise ValueError(f"solver must be 'auto', 'lapjv', 'scipy' or 'sparse', got {solver!r}.")
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    n = max(n_a, n_b)
    free = available_bytes()
    if solver == "auto":
        dense_fits = n * n * 4 <= 0.5 * free and n <= LAPJV_MAX_N
        # With max_cost the sparse route is also the faster one: its dummy partners carry the
        # clamp, while the dense route must certify every clamped entry (measured: 1024 default-
        # suite features 0.17 s vs 5.1 s, 2048 unrelated features 0.36 s vs 22 s; same result).
        small = dense_fits and n < SPARSE_FROM_N and max_cost is None
        solver = "lapjv" if small else "sparse"
        logger.info("%s: solver='auto' chose %s (dense matrix %.1f GiB, %.1f GiB available)",
                    label, solver, n * n * 4 / 2**30, free / 2**30)
    if solver == "lapjv" and n > LAPJV_MAX_N:
        raise ValueError(
            f"lapjv cannot solve n={n} (it crashes at n >= {LAPJV_MAX_N + 1}); use "
            "solver='sparse' (or 'scipy' if the dense matrix fits in memory)."
        )
    sparse_need = sparse_bytes(n_a, n_b, k, block_rows, a.matrix_FK.shape[1], screen_dims)
    if solver == "sparse":
        if sparse_need > 0.9 * free:
            raise MemoryError(
                f"{label}: the sparse solve of {n_a}x{n_b} features with k={k}, block_rows="
                f"{min(n_a, block_rows or block_rows_for(n_b))} needs about "
                f"{sparse_need / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB is available "
                "(beyond the features themselves). Lower block_rows or k, pass a smaller "
                "screen_dims, or free memory."
            )
        return _match_sparse(a, b, max_cost=max_cost, block_rows=block_rows, device=device,
                             progress=progress, options=recorded, label=label, k=k,
                             certify=certify, max_rounds=max_rounds, screen_dims=screen_dims,
                             precision=precision)
    shape = (n, n) if solver == "lapjv" else (n_a, n_b)
    need = shape[0] * shape[1] * 4 * (3 if solver == "scipy" else 1)
    if need > 0.9 * free:
        raise MemoryError(
            f"{label}: the dense {solver} solve of a {n_a}x{n_b} cost matrix needs about "
            f"{need / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB is available. Use "
            f"solver='sparse' (about {sparse_need / 2**30:.1f} GiB), "
            "or match on a machine with more memory."
        )
    t0 = time.perf_counter()
    C = torch.zeros(shape, dtype=torch.float32)
    n_top = min(4, n_b)  # each row's cheapest float32 entries: the rivals of its margin
    top_idx = torch.empty((n_a, n_top), dtype=torch.int64)
    dev = torch.device(device) if device is not None else a.matrix_FK.device
    bar = progress_bar(total=n_a, desc=f"match costs {label}", unit="row", enabled=progress, leave=False)
    with ieee_products(dev):
        for r0, r1, block in cost_blocks(a, b, block_rows=block_rows or 1024, device=device,
                                         out=C):
            top_idx[r0:r1] = torch.topk(block, n_top, dim=1, largest=False).indices
            bar.update(r1 - r0)
    bar.close()
    t_cost = time.perf_counter() - t0
    scales = exact_scales(a, b)
    if max_cost is not None:
        encode_max_cost(C[:n_a, :n_b], float(max_cost), scales)
    cert = _solve(C, a, b, solver, scales=scales, max_cost=max_cost, max_rounds=max_rounds,
                  dev=dev, top_idx=top_idx, label=label)
    t_solve = time.perf_counter() - t0 - t_cost
    keep = cert.cost < max_cost if max_cost is not None else np.ones(len(cert.rows), dtype=bool)
    indices = torch.full((n_a,), -1, dtype=torch.int64)
    indices[torch.from_numpy(cert.rows[keep])] = torch.from_numpy(cert.cols[keep])
    cost = torch.full((n_a,), float("nan"), dtype=torch.float64)
    cost[torch.from_numpy(cert.rows[keep])] = torch.from_numpy(cert.cost[keep])
    matched = indices >= 0
    total = math.fsum(cert.cost[keep].tolist())
    logger.info("%s: %d/%d matched, total cost %.6g, costs %.2fs, %s solve %.2fs (%d float64 "
                "rounds), certified=%s, gap=%.3g", label, int(matched.sum()), n_a, total, t_cost,
                solver, t_solve, cert.rounds, cert.certified, cert.gap)
    return MatchResult(
        permutation=Permutation(indices, n_b),
        cost_F=cost, total_cost=total, margin_F=torch.from_numpy(cert.margin),
        max_cost=None if max_cost is None else float(max_cost),
        certified=cert.certified, gap=cert.gap, solver=solver, options=dict(recorded or {}),
    )


def _match_sparse(a: StackedFeatures, b: StackedFeatures, *, max_cost: float | None,
                  options: dict[str, Any] | None, label: str, **kwargs: Any) -> MatchResult:
    """The sparse route of :func:`match_features`, assembled into the same :class:`MatchResult`.

    ``margin_F`` is a rigorous lower bound: computed from each row's candidate edges, with the
    row floor standing in for the rival where it may not be a candidate."""
    sol = solve_sparse(a, b, max_cost=max_cost, label=label, **kwargs)
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    indices = torch.full((n_a,), -1, dtype=torch.int64)
    cost = torch.full((n_a,), float("nan"), dtype=torch.float64)
    keep = sol.cost < max_cost if max_cost is not None else np.ones(len(sol.rows), dtype=bool)
    rows = torch.from_numpy(sol.rows[keep])
    indices[rows] = torch.from_numpy(sol.cols[keep])
    cost[rows] = torch.from_numpy(sol.cost[keep])
    matched = indices >= 0
    total = math.fsum(sol.cost[keep].tolist())
    logger.info("%s: %d/%d matched, total cost %.6g, sparse solve %.2fs (%d rounds, %d edges), "
                "certified=%s, gap=%.3g", label, int(matched.sum()), n_a, total,
                sol.stats["t_total"], sol.rounds, sol.stats["edges"], sol.certified, sol.gap)
    return MatchResult(
        permutation=Permutation(indices, n_b),
        cost_F=cost, total_cost=total, margin_F=torch.from_numpy(sol.margin),
        max_cost=None if max_cost is None else float(max_cost),
        certified=sol.certified, gap=sol.gap, solver="sparse", options=dict(options or {}),
    )


def _solve(C: torch.Tensor, a: StackedFeatures, b: StackedFeatures, solver: str, *,
           scales: ExactScales, max_cost: float | None, max_rounds: int, dev: torch.device,
           top_idx: torch.Tensor, label: str) -> DenseCertificate:
    """Find an assignment on the float32 matrix ``C`` (square padded for lapjv), then certify
    or repair it against the float64 costs (:func:`~sae_match_lens.solvers.dense.certify_dense`)."""
    n_a, n_b = a.matrix_FK.shape[0], b.matrix_FK.shape[0]
    if solver == "scipy":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(C.numpy())
        match_right, v = square_assignment(rows, cols, n_a, n_b), None
    else:
        from lapjv import lapjv

        row_to_col, _, (_, _, v) = lapjv(C.numpy())
        match_right = np.asarray(row_to_col, dtype=np.int64)
        if sorted(match_right.tolist()) != list(range(C.shape[0])):
            raise RuntimeError("lapjv returned an invalid assignment; use solver='scipy'.")
        v = np.asarray(v, dtype=np.float64)
    return certify_dense(C, a, b, match_right, v, scales=scales, max_cost=max_cost,
                         max_rounds=max_rounds, dev=dev, top_idx=top_idx, label=label)


def _block_columns(weights: CostWeights, d_in: int, d_out: int) -> dict[str, slice]:
    """Column ranges of the decoder and encoder blocks in :func:`stack_features`' matrix."""
    out, col = {}, 0
    for name, width in (("decoder", d_out), ("encoder", d_in)):
        if getattr(weights, name) != 0:
            out[name] = slice(col, col + width)
            col += width
    return out


def null_costs(
    stacked_a: StackedFeatures,
    stacked_b: StackedFeatures,
    *,
    columns: Mapping[str, slice],
    metric: Metric = "mse",
    n_rows: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """Best-by-chance costs: for null features drawn from A, the cheapest partner in B.

    Each null feature is a sampled feature of A whose decoder and encoder directions (the
    ``columns`` blocks) are redrawn from a Gaussian with the joint mean and covariance of A's
    unit decoder and encoder directions, each block keeping the sampled feature's own norm; its
    other columns (``b_enc``) are its own (:func:`~sae_match_lens.nulls.null_surrogates`). So
    null features share A's mean direction, covariance, encoder–decoder alignment, norms and
    biases, but no partner in B. B is used as it is. With ``metric="mse"`` each null feature's
    row constant is its squared norm; with ``"cosine"`` the constant is unchanged.

    Args:
        stacked_a: SAE A's stacked features (:func:`stack_features`).
        stacked_b: SAE B's stacked features.
        columns: the column range of each vector block (``"decoder"``, ``"encoder"``).
        metric: the metric the features were stacked for.
        n_rows: null features (A's features drawn without replacement, again when A has fewer).
        seed: seed of the draw.

    Returns:
        float64 ``[n_rows]``: each null feature's cheapest cost against B.
    """
    gen = torch.Generator().manual_seed(seed)
    _, sub, _ = null_surrogates(stacked_a.matrix_FK, list(columns.values()), n_rows,
                                generator=gen)
    if metric == "mse":
        const = sub.to(torch.float64).square().sum(dim=1)
    else:
        const = stacked_a.const_F[:1].expand(n_rows).to(torch.float64)
    null = StackedFeatures(sub.contiguous(), const.to(stacked_a.const_F))
    return torch.cat([blk.min(dim=1).values.cpu()
                      for _, _, blk in cost_blocks(null, stacked_b)]).to(torch.float64)


def null_max_cost(
    sae_a: Any,
    sae_b: Any,
    *,
    fold: bool = True,
    weights: CostWeights | Mapping[str, float] | None = None,
    metric: Metric = "mse",
    null_rate: float = 0.01,
    n_rows: int = 2048,
    seed: int = 0,
    features: tuple[StackedFeatures, StackedFeatures] | None = None,
) -> float:
    """A data-free ``max_cost``: the cost that chance alone beats with probability ``null_rate``.

    **Null model** (:mod:`~sae_match_lens.nulls`, :func:`null_costs`). Null features are
    sampled features of A whose decoder and encoder directions are redrawn jointly from a
    Gaussian with A's own mean and covariance of unit directions, each keeping its norms and
    ``b_enc``: they share A's mean direction, low-rank covariance, encoder–decoder alignment,
    norms and biases, but have no partner in B. For ``n_rows`` of them the cheapest partner in B
    is found (the best-by-chance costs behind :attr:`MatchResult.confidence_F`).

    **Competition.** The assignment is one-to-one: a feature whose cheapest chance partner is
    also another's may lose it, so the ``null_rate`` quantile of best-by-chance costs keeps
    fewer than ``null_rate`` (on the default JumpReLU suite with ``metric="mse"``, whose folded
    costs are dominated by decoder norms, 0.3% at 0.01). So a null SAE of A's size (one null
    feature per feature of A) is drawn, each null feature's 16 cheapest partners in B are found,
    and λ is set by bisection so that the capped one-to-one assignment of the null SAE keeps
    ``null_rate`` of its features. Above :data:`COMPETITION_MAX_N` source features this step is
    skipped and λ is the best-by-chance quantile (conservative). Measured on the default suite's
    adjacent pairs against unrelated SAEs built three ways (isotropic, moment-matched, permuted
    residual basis; README, "Calibration"): 0.6–2.2% matched at ``null_rate=0.01``.

    **Limits.** One λ for all features: the kept fraction is calibrated, not each feature's own
    chance. Where costs are dominated by what the null keeps (decoder norms, ``metric="mse"``
    on the default JumpReLU suite) real partners barely beat chance: real adjacent pairs of
    that suite match 1.3% at 0.01.

    Args:
        sae_a: as in :func:`match`.
        sae_b: as in :func:`match`.
        fold: as in :func:`match`.
        weights: as in :func:`match`.
        metric: as in :func:`match`.
        null_rate: the false-match rate to calibrate for, in (0, 1).
        n_rows: best-by-chance costs to collect (null features drawn from A's).
        seed: seed of the null features.
        features: both SAEs' :func:`~sae_match_lens.solvers.costs.stack_features` for these ``fold``,
            ``weights`` and ``metric`` (reused from :func:`match`; computed when omitted).
    """
    if not (isinstance(null_rate, int | float) and 0 < null_rate < 1):
        raise ValueError(f"null_rate must be in (0, 1), got {null_rate!r}.")
    if not isinstance(n_rows, int) or n_rows < 1:
        raise ValueError(f"n_rows must be a positive integer, got {n_rows!r}.")
    w = CostWeights.resolve(weights, metric)
    _check_pair(sae_a, sae_b, w)
    if features is None:
        features = (stack_features(feature_view(sae_a, fold=fold), w, metric),
                    stack_features(feature_view(sae_b, fold=fold), w, metric))
    best = _null_best(sae_a, sae_b, w, features, metric=metric, n_rows=n_rows, seed=seed)
    return _auto_max_cost(sae_a, sae_b, w, features, best, metric=metric, null_rate=null_rate,
                          seed=seed)


COMPETITION_MAX_N = 4096
"""Up to this many source features ``max_cost="auto"`` simulates the one-to-one competition of
a null SAE of A's size (:func:`null_max_cost`); above it λ is the best-by-chance quantile
(conservative). The simulation scores a whole null SAE against B, as many pairs as the match
itself (measured: 23 s against a 16 s match at 16,384 features, d = 256, two CPU cores)."""


def _auto_max_cost(sae_a: Any, sae_b: Any, weights: CostWeights,
                   features: tuple[StackedFeatures, StackedFeatures], best: torch.Tensor, *,
                   metric: Metric, null_rate: float, seed: int = 0, k: int = 16) -> float:
    """λ at which a null SAE of A's size, assigned one-to-one to B with that cap, keeps
    ``null_rate`` of its features (``null_max_cost``, "Competition")."""
    stacked_a, stacked_b = features
    label = f"{hook_name_of(sae_a)} -> {hook_name_of(sae_b)}"
    low = float(torch.quantile(best, null_rate))
    n_a = stacked_a.matrix_FK.shape[0]
    if n_a > COMPETITION_MAX_N:
        logger.info("null max_cost for %s: %.6g (rate %.3g of %d best-by-chance costs; %d "
                    "features > %d, one-to-one competition not simulated: conservative)",
                    label, low, null_rate, len(best), n_a, COMPETITION_MAX_N)
        return low
    d_in = int(sae_a.cfg.d_in)
    columns = _block_columns(weights, d_in, int(getattr(sae_a.cfg, "d_out", d_in)))
    gen = torch.Generator().manual_seed(seed + 1)
    _, sub, _ = null_surrogates(stacked_a.matrix_FK, list(columns.values()), n_a, generator=gen)
    const = (sub.to(torch.float64).square().sum(dim=1) if metric == "mse"
             else stacked_a.const_F[:1].expand(n_a).to(torch.float64))
    null = StackedFeatures(sub.contiguous(), const.to(stacked_a.const_F))
    kk = min(k, stacked_b.matrix_FK.shape[0])
    values, columns_k = [], []
    for _, _, blk in cost_blocks(null, stacked_b):
        v, j = torch.topk(blk, kk, dim=1, largest=False)
        values.append(v)
        columns_k.append(j)
    cost_nk, col_nk = torch.cat(values).double().numpy(), torch.cat(columns_k).numpy()
    target = null_rate * n_a
    high = float(torch.quantile(best, min(1.0, 10 * null_rate)))
    if _null_assigned(cost_nk, col_nk, high) < target:
        logger.info("null max_cost for %s: %.6g (the null keeps fewer than %.3g at 10x the "
                    "rate's best-by-chance cost)", label, high, null_rate)
        return high
    if _null_assigned(cost_nk, col_nk, low) >= target:
        return low
    for _ in range(24):  # bisection: the capped assignment keeps more as λ grows
        mid = 0.5 * (low + high)
        if _null_assigned(cost_nk, col_nk, mid) < target:
            low = mid
        else:
            high = mid
    logger.info("null max_cost for %s: %.6g (a null SAE of %d features assigned with this cap "
                "keeps %.3g; best-by-chance quantile %.6g)", label, high, n_a, null_rate,
                float(torch.quantile(best, null_rate)))
    return high


def _null_assigned(cost_nk: np.ndarray, col_nk: np.ndarray, cap: float) -> int:
    """Rows of the capped assignment (pairs cheaper than ``cap``, each column once) matched:
    a dense assignment on the rows and columns with an edge below the cap (the others cannot
    matter), absent edges at ``cap``."""
    from scipy.optimize import linear_sum_assignment

    below = cost_nk < cap
    rows = np.flatnonzero(below.any(axis=1))
    if rows.size == 0:
        return 0
    cols, inverse = np.unique(col_nk[rows][below[rows]], return_inverse=True)
    dense = np.full((rows.size, cols.size), cap, dtype=np.float64)
    r_idx = np.repeat(np.arange(rows.size), below[rows].sum(axis=1))
    dense[r_idx, inverse] = cost_nk[rows][below[rows]]
    r, c = linear_sum_assignment(dense)
    return int((dense[r, c] < cap).sum())


def _null_best(sae_a: Any, sae_b: Any, weights: CostWeights,
               features: tuple[StackedFeatures, StackedFeatures], *, metric: Metric = "mse",
               n_rows: int = 2048, seed: int = 0) -> torch.Tensor:
    """The best-by-chance costs of :func:`null_max_cost` (:func:`null_costs`)."""
    d_in = int(sae_a.cfg.d_in)
    d_out = int(getattr(sae_a.cfg, "d_out", d_in))
    return null_costs(*features, columns=_block_columns(weights, d_in, d_out), metric=metric,
                      n_rows=n_rows, seed=seed)
