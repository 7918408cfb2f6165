"""``Permutation``: a validated, partial one-to-one map from source features to target features.

Direction convention (one, used everywhere in the package):

* ``perm.indices[i] = j`` means feature ``i`` of the *source* SAE (layer A) corresponds to
  feature ``j`` of the *target* SAE (layer B); ``-1`` means feature ``i`` has no partner.
* Composition: ``(P_BC @ P_AB).indices == P_BC.indices[P_AB.indices]`` (``-1`` propagates).
* Moving activations from A's order to B's order is a scatter:
  ``f_B[..., perm.indices] = f_A`` (:meth:`Permutation.apply`).

Provenance: a permutation made by :func:`~sae_match_lens.matching.match` records the identities
of its source and target SAEs (``metadata["source"]``, ``metadata["target"]``: hook name, widths,
architecture, a fold-invariant weight signature; see
:func:`~sae_match_lens.adapters.sae_identity`). Using it with other SAEs raises
(:meth:`Permutation.check_saes`); composition checks that the inner map's target is the outer
map's source and keeps the outer ends. Permutations built by hand carry no identities and are
never checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomicio import atomic_write_files

__all__ = ["FORMAT_VERSION", "Permutation", "PermutationFileError", "ProvenanceError",
           "check_direction", "check_provenance", "map_identities"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_SIDECAR_SUFFIX = ".json"


class PermutationFileError(ValueError):
    """A saved permutation is unreadable, corrupt, or does not belong to the given SAEs."""


class ProvenanceError(ValueError):
    """A permutation is used with (or composed with) SAEs other than the ones it was made for."""


def check_provenance(source: Mapping[str, Any] | None, target: Mapping[str, Any] | None,
                     sae_a: Any, sae_b: Any, *, what: str) -> None:
    """Raise :class:`ProvenanceError` unless ``sae_a``/``sae_b`` match the recorded identities
    ``source``/``target`` (``None``: that side is not checked)."""
    from .adapters import describe_sae, same_sae

    for role, record, sae in (("source", source, sae_a), ("target", target, sae_b)):
        reason = same_sae(record, sae) if record else None
        if reason is not None:
            raise ProvenanceError(
                f"{what}: made for source {_describe_identity(source)} -> target "
                f"{_describe_identity(target)}, but its {role} here is {describe_sae(sae)} "
                f"({reason}). Match or link these SAEs, or pass the map made for them."
            )


def map_identities(mapping: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
    """The recorded source and target SAE identities of a map between two SAEs' features, and
    what kind of map it is.

    Understands a :class:`Permutation`, a ``MatchResult`` (its ``permutation``), ``Links`` and a
    ``Transition`` (:mod:`~sae_match_lens.flow.linking`); an index tensor or a hand-made map records
    nothing (``None`` for both sides).

    Returns:
        ``(source, target, kind)`` with ``kind`` one of ``"permutation"``, ``"match result"``,
        ``"links"``, ``"transition"``, ``"index tensor"``.
    """
    def record(value: Any) -> dict[str, Any] | None:
        return dict(value) if isinstance(value, Mapping) and value else None

    if isinstance(mapping, Permutation):
        return mapping.source, mapping.target, "permutation"
    if isinstance(getattr(mapping, "permutation", None), Permutation):  # MatchResult
        perm = mapping.permutation
        return perm.source, perm.target, "match result"
    if hasattr(mapping, "source_identity") and hasattr(mapping, "target_identity"):  # Transition
        return record(mapping.source_identity), record(mapping.target_identity), "transition"
    if hasattr(mapping, "score") and isinstance(getattr(mapping, "source", None), Mapping):
        return record(mapping.source), record(mapping.target), "links"  # Links
    return None, None, "index tensor"


def _reverse_advice(kind: str, source_hook: str, target_hook: str) -> str:
    """How to get a map from ``source_hook`` to ``target_hook`` out of one that runs backwards."""
    src, tgt = f"<SAE '{source_hook}'>", f"<SAE '{target_hook}'>"
    if kind == "links":
        return (f"Compute the links in this direction: links({src}, {tgt}, ...), or equivalently "
                f"links({tgt}, {src}, ..., direction='backward').")
    if kind == "transition":
        return f"Build it from links in this direction: Transition.from_links(links({src}, {tgt}))."
    if kind == "match result":
        return (f"Use result.permutation.inverse() (the one-to-one map reversed), or "
                f"match({src}, {tgt}).")
    return f"Use perm.inverse() (the same one-to-one map reversed), or match({src}, {tgt})."


def check_direction(mapping: Any, source_sae: Any, target_sae: Any, *, what: str,
                    here: str = "the one used here") -> None:
    """Refuse a map between two SAEs' features unless it runs from ``source_sae`` to ``target_sae``.

    Every consumer of a :class:`Permutation`, ``MatchResult``, ``Links`` or ``Transition`` calls
    this with the SAEs it is about to use as the map's source (its rows) and target (the
    features its indices name). The identities the map recorded when it was made
    (:func:`map_identities`; hook name, widths, architecture, the fold-invariant direction
    signature, :func:`~sae_match_lens.adapters.identity_mismatch`) must be those SAEs'. A map
    that records no identities (made by hand, an index tensor) is not checked.

    Args:
        mapping: the map.
        source_sae: the SAE the consumer reads the map's rows as.
        target_sae: the SAE the consumer reads the map's indices as.
        what: the map, as the error message names it (e.g. ``"method 'links' for pair (1, 2)"``).
        here: the SAEs the map is compared with, as the message names them.

    Raises:
        ProvenanceError: (a ``ValueError``) the map was made for other SAEs (naming the recorded
            and the given hooks), or it runs the other way, from ``target_sae`` to
            ``source_sae``: then the message says so and how to reverse it (``perm.inverse()``,
            ``links(..., direction="backward")``).
    """
    from .adapters import describe_sae, hook_name_of, identity_mismatch, sae_identity

    source, target, kind = map_identities(mapping)
    if source is None and target is None:
        return
    actual_source, actual_target = sae_identity(source_sae), sae_identity(target_sae)
    why = {"source": identity_mismatch(source, actual_source),
           "target": identity_mismatch(target, actual_target)}
    if why["source"] is None and why["target"] is None:
        return
    if (source is not None and target is not None
            and identity_mismatch(source, actual_target) is None
            and identity_mismatch(target, actual_source) is None):
        raise ProvenanceError(
            f"{what}: it runs the other way ({kind} made from '{source.get('hook_name')}' to "
            f"'{target.get('hook_name')}'), but it is used here from {describe_sae(source_sae)} "
            f"to {describe_sae(target_sae)}. "
            + _reverse_advice(kind, hook_name_of(source_sae), hook_name_of(target_sae))
        )
    role = "source" if why["source"] is not None else "target"
    sae = source_sae if role == "source" else target_sae
    raise ProvenanceError(
        f"{what}: made for source {_describe_identity(source)} -> target "
        f"{_describe_identity(target)}, but its {role} SAE is not {here} ({why[role]}): its "
        f"{role} here is {describe_sae(sae)}. Match or link these SAEs, or pass the map made for "
        "them."
    )


def _describe_identity(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "an SAE of unknown identity"
    return (f"SAE '{record.get('hook_name')}' ({record.get('architecture', '?')}, "
            f"d_sae={record.get('d_sae', '?')})")


@dataclass(frozen=True, eq=False)
class Permutation:
    """A partial injection from ``n_source`` source features into ``n_target`` target features.

    Args:
        indices: int64 tensor [n_source]; ``indices[i] = j`` maps source feature ``i`` to target
            feature ``j``, ``-1`` marks a source feature with no partner. Targets are distinct.
        n_target: number of target features (default: ``n_source``).
        metadata: free-form JSON-able record (e.g. the SAEs' identities and matching options);
            kept in saved files, ignored by ``==``.

    Example:
        >>> P = Permutation(torch.tensor([2, 0, 1]))
        >>> P.apply(torch.tensor([10.0, 20.0, 30.0]))
        tensor([20., 30., 10.])
    """

    indices: torch.Tensor
    n_target: int = -1
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        idx = torch.as_tensor(self.indices)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
            raise TypeError(f"Permutation indices must be integers, got dtype {idx.dtype}.")
        if idx.ndim != 1:
            raise ValueError(f"Permutation indices must be 1-D [n_source], got shape {tuple(idx.shape)}.")
        idx = idx.detach().to(device="cpu", dtype=torch.int64).contiguous()
        n_target = len(idx) if self.n_target == -1 else int(self.n_target)
        if n_target < 0:
            raise ValueError(f"n_target must be >= 0, got {n_target}.")
        bad = (idx < -1) | (idx >= n_target)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"Permutation index out of range: indices[{first}] = {int(idx[first])}, valid "
                f"values are -1 (no partner) or 0..{n_target - 1} (n_target={n_target})."
            )
        matched = idx[idx >= 0]
        if matched.numel() != torch.unique(matched).numel():
            values, counts = torch.unique(matched, return_counts=True)
            dup = int(values[counts > 1][0])
            raise ValueError(
                f"Permutation is not one-to-one: target feature {dup} is the partner of "
                f"{int(counts.max())} source features. Many-to-one links are not a Permutation."
            )
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "n_target", n_target)
        object.__setattr__(self, "metadata", dict(self.metadata))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def identity(cls, n: int) -> Permutation:
        """The identity map on ``n`` features."""
        return cls(torch.arange(n, dtype=torch.int64), n)

    @classmethod
    def random(cls, n: int, *, generator: torch.Generator | None = None) -> Permutation:
        """A uniformly random bijection on ``n`` features (a chance baseline)."""
        return cls(torch.randperm(n, generator=generator), n)

    # -- properties ---------------------------------------------------------------------------
    @property
    def n_source(self) -> int:
        """Number of source features."""
        return int(self.indices.numel())

    @property
    def matched(self) -> torch.Tensor:
        """Boolean mask [n_source] of source features that have a partner."""
        return self.indices >= 0

    @property
    def n_matched(self) -> int:
        """Number of source features that have a partner."""
        return int(self.matched.sum())

    @property
    def is_bijection(self) -> bool:
        """True when every source and every target feature has exactly one partner."""
        return self.n_source == self.n_target == self.n_matched

    @property
    def source(self) -> dict[str, Any] | None:
        """Identity record of the source SAE it was made for (``None``: built by hand)."""
        record = self.metadata.get("source")
        return dict(record) if isinstance(record, Mapping) else None

    @property
    def target(self) -> dict[str, Any] | None:
        """Identity record of the target SAE it was made for (``None``: built by hand)."""
        record = self.metadata.get("target")
        return dict(record) if isinstance(record, Mapping) else None

    def check_saes(self, sae_a: Any, sae_b: Any, *, what: str = "this permutation") -> None:
        """Raise :class:`ProvenanceError` unless ``sae_a``/``sae_b`` are the SAEs it maps.

        Compares hook name, widths, architecture and the fold-invariant weight signature
        (:func:`~sae_match_lens.adapters.same_sae`) with the identities recorded by ``match``;
        a side without a recorded identity is not checked (hand-made permutations). A
        permutation that maps B→A where A→B is asked for is refused with a message pointing to
        :meth:`inverse` (:func:`check_direction`).
        """
        check_direction(self, sae_a, sae_b, what=what)

    def __len__(self) -> int:
        return self.n_source

    def __repr__(self) -> str:
        head = ", ".join(str(int(v)) for v in self.indices[:6])
        more = ", ..." if self.n_source > 6 else ""
        return (f"Permutation(n_source={self.n_source}, n_target={self.n_target}, "
                f"matched={self.n_matched}, indices=[{head}{more}])")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Permutation):
            return NotImplemented
        return self.n_target == other.n_target and torch.equal(self.indices, other.indices)

    __hash__ = None  # type: ignore[assignment]

    # -- algebra ------------------------------------------------------------------------------
    def __matmul__(self, other: Permutation) -> Permutation:
        """``P_BC @ P_AB`` is the map A→C: first ``other`` (A→B), then ``self`` (B→C)."""
        if not isinstance(other, Permutation):
            return NotImplemented
        if other.n_target != self.n_source:
            raise ValueError(
                f"cannot compose: the inner map has n_target={other.n_target} but the outer map "
                f"has n_source={self.n_source}. In P_BC @ P_AB, P_AB must map into B's features."
            )
        from .adapters import identity_mismatch

        reason = identity_mismatch(other.target, self.source)
        if reason is not None:
            raise ProvenanceError(
                f"cannot compose: in P_BC @ P_AB, P_AB maps into {_describe_identity(other.target)} "
                f"but P_BC starts from {_describe_identity(self.source)} ({reason}); the inner "
                "map's target must be the outer map's source."
            )
        inner = other.indices
        out = torch.full_like(inner, -1)
        ok = inner >= 0
        out[ok] = self.indices[inner[ok]]
        metadata: dict[str, Any] = {}
        if other.source is not None or self.target is not None:
            metadata = {"source": other.source, "target": self.target, "composed": True}
        return Permutation(out, self.n_target, metadata)

    def inverse(self) -> Permutation:
        """The map B→A: ``inverse().indices[j] = i`` where ``indices[i] = j``; -1 where unmatched."""
        inv = torch.full((self.n_target,), -1, dtype=torch.int64)
        ok = self.matched
        inv[self.indices[ok]] = torch.nonzero(ok).flatten()
        metadata: dict[str, Any] = {}
        if self.source is not None or self.target is not None:
            metadata = {"source": self.target, "target": self.source, "inverted": True}
        return Permutation(inv, self.n_source, metadata)

    def agreement(self, other: Permutation) -> float:
        """Fraction of source features (matched in either map) that both maps send to the same target."""
        if other.n_source != self.n_source or other.n_target != self.n_target:
            raise ValueError(
                f"cannot compare maps of shapes {self.n_source}->{self.n_target} and "
                f"{other.n_source}->{other.n_target}."
            )
        either = self.matched | other.matched
        if not bool(either.any()):
            return float("nan")
        same = (self.indices == other.indices) & either
        return float(same.sum()) / float(either.sum())

    # -- acting on activations ----------------------------------------------------------------
    def apply(self, acts: torch.Tensor) -> torch.Tensor:
        """Move activations ``acts [..., n_source]`` into target order ``[..., n_target]``.

        ``out[..., indices[i]] = acts[..., i]``; unmatched source features are dropped and
        target features with no source get 0. Differentiable, keeps device and dtype.
        """
        if acts.shape[-1] != self.n_source:
            raise ValueError(
                f"activations have {acts.shape[-1]} features in their last dimension, but the "
                f"permutation maps {self.n_source} source features."
            )
        if self.is_bijection:
            gather = self._gather_index().to(acts.device)
            return torch.gather(acts, -1, gather.expand(*acts.shape[:-1], self.n_target))
        idx = self.indices.to(acts.device)
        out = acts.new_zeros((*acts.shape[:-1], self.n_target))
        ok = idx >= 0
        out[..., idx[ok]] = acts[..., ok]
        return out

    def _gather_index(self) -> torch.Tensor:
        """``inv[j] = i`` for a bijection (computed once; the object is immutable)."""
        cached = self.__dict__.get("_gather")
        if cached is None:
            cached = torch.empty_like(self.indices)
            cached[self.indices] = torch.arange(self.n_source)
            object.__setattr__(self, "_gather", cached)
        return cached

    # -- persistence --------------------------------------------------------------------------
    def checksum(self) -> str:
        """SHA-256 of the index array and ``n_target`` (hex)."""
        h = hashlib.sha256()
        h.update(str(self.n_target).encode())
        h.update(self.indices.numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (safetensors) and ``path + '.json'`` (metadata sidecar) atomically.

        Both files are written to temporaries in the same directory
        (``.NAME.HOST.PID.RANDOM.sae-match-tmp``) and moved into place only once both are written
        (:func:`~sae_match_lens.atomicio.atomic_write_files`), so a failed write never leaves a
        half-written file or damages an existing one. Temporaries that an earlier, killed save of
        the same target left behind are removed. The files get the permissions of any newly
        created file (the user's umask). Returns the path of the safetensors file.
        """
        path = Path(path)
        sidecar = Path(str(path) + _SIDECAR_SUFFIX)
        record = {
            "format": "sae_match_lens.Permutation",
            "format_version": FORMAT_VERSION,
            "n_source": self.n_source,
            "n_target": self.n_target,
            "n_matched": self.n_matched,
            "checksum": self.checksum(),
            "metadata": dict(self.metadata),
        }
        text = json.dumps(record, indent=2, sort_keys=True, default=_json_default)

        def write_tensor(tmp: Path) -> None:
            save_file({"indices": self.indices}, str(tmp),
                      metadata={"n_target": str(self.n_target), "checksum": record["checksum"]})

        atomic_write_files({path: write_tensor,
                            sidecar: lambda tmp: tmp.write_text(text)})
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        source: Any | None = None,
        target: Any | None = None,
    ) -> Permutation:
        """Read a permutation written by :meth:`save`, checking it against the SAEs it maps.

        Args:
            path: the safetensors file (its ``.json`` sidecar must sit beside it).
            source: optionally the source SAE; its identity (hook name, d_sae, fingerprint)
                must match the one recorded at save time.
            target: optionally the target SAE, checked the same way.

        Raises:
            PermutationFileError: missing/corrupt files, checksum mismatch, or SAEs that the
                permutation was not made for.
        """
        path = Path(path)
        sidecar = Path(str(path) + _SIDECAR_SUFFIX)
        for p in (path, sidecar):
            if not p.is_file():
                raise PermutationFileError(f"permutation file {p} does not exist.")
        try:
            record = json.loads(sidecar.read_text())
            tensors = load_file(str(path))
        except Exception as exc:
            raise PermutationFileError(f"cannot read permutation {path}: {exc}") from exc
        if record.get("format") != "sae_match_lens.Permutation" or "indices" not in tensors:
            raise PermutationFileError(f"{path} is not a sae_match_lens permutation file.")
        perm = cls(tensors["indices"], int(record["n_target"]), record.get("metadata", {}))
        if perm.checksum() != record.get("checksum"):
            raise PermutationFileError(
                f"{path}: checksum mismatch (the file or its sidecar was modified or truncated)."
            )
        for role, sae in (("source", source), ("target", target)):
            if sae is not None:
                _check_identity(path, role, record.get("metadata", {}).get(role), sae,
                                perm.n_source if role == "source" else perm.n_target)
        return perm


def _check_identity(path: Path, role: str, recorded: Mapping[str, Any] | None, sae: Any,
                    width: int) -> None:
    from .adapters import describe_sae, sae_identity

    actual = sae_identity(sae)
    if actual["d_sae"] != width:
        raise PermutationFileError(
            f"{path}: the permutation's {role} side has {width} features but {describe_sae(sae)} "
            f"has d_sae={actual['d_sae']}; this permutation was made for other SAEs."
        )
    if not recorded:
        return
    for key in ("hook_name", "d_sae", "fingerprint", "release", "sae_id"):
        if recorded.get(key) is not None and recorded.get(key) != actual[key]:
            raise PermutationFileError(
                f"{path}: the permutation's {role} SAE had {key}={recorded.get(key)!r}, but "
                f"{describe_sae(sae)} has {key}={actual[key]!r}; it was made for another SAE. "
                "Re-run the matching for these SAEs, or load without source/target to skip the check."
            )


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in permutation metadata")
