"""Plans of pair jobs: SAE references, pair jobs, job keys, plans from stacks, releases and YAML
files (the plan file format is in :mod:`sae_match_lens.batch.runs`'s docstring). Nothing here loads an
SAE or imports torch; :func:`~sae_match_lens.batch.runs.batch_match` runs a plan.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..vocabulary import DEFAULT_LINK_SCORE

__all__ = ["FLOW_MODULES", "HOOK_OPTIONS", "KINDS", "JobKind", "PairJob", "SAERef", "job_key",
           "load_plan", "plan_flow", "plan_from_release", "plan_pairs"]

logger = logging.getLogger(__name__)

JobKind = Literal["match", "links", "compare"]
KINDS: tuple[str, ...] = ("match", "links", "compare")
HOOK_OPTIONS: tuple[str, ...] = ("delay_s",)
"""Options every kind takes besides its function's keyword arguments (module docstring)."""
FLOW_MODULES: tuple[str, ...] = ("mlp", "attn")
"""The module SAEs a flow graph links each residual SAE to (:func:`plan_flow`)."""
_NOT_OPTIONS = ("sae_a", "sae_b", "progress", "device", "features")
SAELoader = Callable[[str, str], Any]


@dataclass(frozen=True)
class SAERef:
    """Where an SAE comes from: a SAELens ``release`` + ``sae_id``, or a ``path`` saved by
    ``sae.save_model(path)``. Jobs carry refs, never SAEs."""

    release: str | None = None
    sae_id: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        by_release = self.release is not None or self.sae_id is not None
        if by_release == (self.path is not None) or (by_release and not (self.release and self.sae_id)):
            raise ValueError(f"an SAERef needs either release and sae_id, or path; got {self}.")
        if self.path is not None:
            # absolute: workers of a cluster do not share the driver's working directory
            object.__setattr__(self, "path", os.path.abspath(os.fspath(self.path)))

    def __str__(self) -> str:
        return self.path if self.path is not None else f"{self.release}:{self.sae_id}"

    def as_dict(self) -> dict[str, str]:
        """The JSON form (``{"path": ...}`` or ``{"release": ..., "sae_id": ...}``)."""
        return ({"path": self.path} if self.path is not None
                else {"release": str(self.release), "sae_id": str(self.sae_id)})

    @classmethod
    def parse(cls, value: Any, base: Path | None = None) -> SAERef:
        """From a mapping, a ``"release:sae_id"`` string, or a directory path (relative to ``base``)."""
        if isinstance(value, SAERef):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"release", "sae_id", "path"}
            if unknown:
                raise ValueError(f"an SAE reference takes path, or release and sae_id; got keys "
                                 f"{sorted(unknown)} in {dict(value)!r}.")
            path = value.get("path")
            if path is not None and base is not None:
                path = str(base / path)
            return cls(release=value.get("release"), sae_id=value.get("sae_id"), path=path)
        if isinstance(value, str | os.PathLike):
            text = os.fspath(value)
            full = Path(text) if base is None else base / text
            if ":" in text and not full.exists():
                release, sae_id = text.split(":", 1)
                return cls(release=release, sae_id=sae_id)
            return cls(path=str(full))
        raise TypeError(f"cannot read an SAE reference from {value!r}.")

    def validate(self) -> None:
        """Raise ValueError naming this ref when it cannot be loaded (checked before any job)."""
        if self.path is not None:
            p = Path(self.path)
            if not (p / "cfg.json").is_file():
                what = "does not exist" if not p.exists() else "has no cfg.json"
                raise ValueError(f"SAE {self.path!r} {what}; give a directory written by "
                                 "sae.save_model(path) or a release and sae_id.")
            if not list(p.glob("*.safetensors")):
                raise ValueError(f"SAE {self.path!r} has no .safetensors weights file.")
            return
        from ..releases import lookup_release

        try:
            entry = lookup_release(str(self.release))
        except KeyError as exc:
            raise ValueError(f"SAE {self}: {exc.args[0]}") from None
        if self.sae_id not in entry.saes_map:
            raise ValueError(f"SAE {self}: release {self.release!r} has no sae_id "
                             f"{self.sae_id!r} (it has {len(entry.saes_map)} ids, e.g. "
                             f"{next(iter(entry.saes_map), None)!r}).")

    def fingerprint(self) -> str:
        """SHA-256 of ``cfg.json`` and the weight files' bytes (a path; no loading), or of the
        release, sae_id and the registry's repo id and file path (a release)."""
        h = hashlib.sha256()
        if self.path is not None:
            p = Path(self.path)
            for f in [p / "cfg.json", *sorted(p.glob("*.safetensors"))]:
                h.update(f"{f.name}|".encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
            return h.hexdigest()
        from ..releases import lookup_release

        entry = lookup_release(str(self.release))
        h.update(json.dumps([self.release, self.sae_id, entry.repo_id,
                             entry.saes_map.get(self.sae_id)]).encode())
        return h.hexdigest()

    def load(self, sae_loader: SAELoader | None = None) -> Any:
        """Load the SAE (on the CPU): ``SAE.load_from_disk`` or the release loader."""
        if self.path is not None:
            from sae_lens import SAE

            return SAE.load_from_disk(self.path, device="cpu")
        from ..releases import load_release_saes

        return load_release_saes(str(self.release), [str(self.sae_id)], sae_loader=sae_loader,
                                 progress=False)[0]


@dataclass(frozen=True)
class PairJob:
    """One pair job of a plan: ``kind`` applied to (``source``, ``target``) with ``options``."""

    source: SAERef
    target: SAERef
    kind: JobKind = "match"
    options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of the kind's function (plus :data:`HOOK_OPTIONS`); JSON values."""
    layer_a: int | None = None
    layer_b: int | None = None
    module_a: str | None = None
    module_b: str | None = None
    distance: int | None = None
    """Positions apart in the stack the plan was made from (1: adjacent; 0: across modules at
    one layer; negative: a backward pair whose target lies that many positions before its
    source, as :func:`plan_flow` plans for the backward walk)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"job {self.label}: unknown kind {self.kind!r}; valid: {list(KINDS)}.")
        object.__setattr__(self, "options", dict(self.options))
        try:
            json.dumps(self.options, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"job {self.label}: options must be JSON values ({exc}).") from None
        valid = _valid_options(self.kind)
        unknown = sorted(set(self.options) - set(valid))
        if unknown:
            raise ValueError(f"job {self.label}: unknown {self.kind} option(s) {unknown}; valid: "
                             f"{sorted(valid)}.")

    @property
    def label(self) -> str:
        """A short name: ``kind source -> target`` with layers/modules when known."""
        def end(ref: SAERef, layer: int | None, module: str | None) -> str:
            if layer is None:
                return str(ref)
            return f"{module or ''}{'@' if module else 'L'}{layer}"
        return (f"{self.kind} {end(self.source, self.layer_a, self.module_a)} -> "
                f"{end(self.target, self.layer_b, self.module_b)}")


def _valid_options(kind: str) -> tuple[str, ...]:
    """The options a job of ``kind`` may carry: its function's keyword arguments, the fields of
    its options dataclass as flat names (the names of 0.2 among them), and the hook options."""
    from ..options import flat_names

    if kind == "links":
        from ..flow.linking import LinkOptions, links

        fn, options_cls = links, LinkOptions
    else:
        from ..matching import MatchOptions, match

        fn, options_cls = match, MatchOptions
    params = inspect.signature(fn).parameters
    return (tuple(p for p in params if p not in _NOT_OPTIONS and p != "options")
            + tuple(flat_names(options_cls)) + HOOK_OPTIONS)


def job_key(job: PairJob, source_fingerprint: str, target_fingerprint: str) -> str:
    """The store key of ``job``: a hash of its kind, both fingerprints and its options."""
    text = json.dumps([job.kind, source_fingerprint, target_fingerprint, job.options],
                      sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------- plans


def _distances(distances: int | Iterable[int]) -> list[int]:
    out = list(range(1, distances + 1)) if isinstance(distances, int) else sorted(set(distances))
    if not out or any(not isinstance(d, int) or d < 1 for d in out):
        raise ValueError(f"distances must be positive ints (or d for 1..d), got {distances!r}.")
    return out


def plan_pairs(
    stack: Mapping[int, Any],
    distances: int | Iterable[int] = range(1, 2),
    *,
    kind: JobKind = "match",
    options: Mapping[str, Any] | None = None,
    modules: Sequence[tuple[str, str]] | None = None,
) -> list[PairJob]:
    """The pair jobs of a stack: every pair of SAEs ``d`` positions apart, for ``d`` in ``distances``.

    Args:
        stack: ``{layer: SAERef}`` (refs, paths or ``"release:sae_id"`` strings), or a module
            stack ``{layer: {module: SAERef}}``.
        distances: positions apart in the sorted stack (1: adjacent); an int ``d`` means 1..d.
        kind: ``"match"``, ``"links"`` or ``"compare"``.
        options: the jobs' options (module docstring).
        modules: module stacks only: which module pairs to plan, e.g. ``[("res", "res"),
            ("mlp", "res"), ("attn", "res")]`` (Feature Flow's R(L-d)→R(L), M(L)→R(L),
            A(L)→R(L)). A same-module pair runs over ``distances``; a cross-module pair links the
            two modules at the same layer (distance 0). Default: ``[("res", "res")]``.

    Example:
        >>> plan_pairs({3: "saes/l3", 4: "saes/l4", 5: "saes/l5"}, distances=2)  # 3 jobs
    """
    ds = _distances(distances)
    layers = sorted(stack)
    opts = dict(options or {})
    nested = bool(layers) and isinstance(stack[layers[0]], Mapping)
    if not nested:
        if modules is not None:
            raise ValueError("modules= needs a module stack {layer: {module: SAERef}}.")
        refs = {layer: SAERef.parse(stack[layer]) for layer in layers}
        return [PairJob(refs[layers[i]], refs[layers[i + d]], kind, opts, layer_a=layers[i],
                        layer_b=layers[i + d], distance=d)
                for d in ds for i in range(len(layers) - d)]
    jobs = []
    for ma, mb in modules or [("res", "res")]:
        have = [layer for layer in layers if ma in stack[layer] and mb in stack[layer]]
        if not have:
            raise ValueError(f"no layer of the stack has both modules {ma!r} and {mb!r}; the "
                             f"modules are {sorted({m for v in stack.values() for m in v})}.")
        if ma != mb:
            jobs += [PairJob(SAERef.parse(stack[L][ma]), SAERef.parse(stack[L][mb]), kind, opts,
                             layer_a=L, layer_b=L, module_a=ma, module_b=mb, distance=0)
                     for L in have]
            continue
        jobs += [PairJob(SAERef.parse(stack[have[i]][ma]), SAERef.parse(stack[have[i + d]][mb]),
                         kind, opts, layer_a=have[i], layer_b=have[i + d], module_a=ma,
                         module_b=mb, distance=d)
                 for d in ds for i in range(len(have) - d)]
    return jobs


def plan_flow(
    stack: Mapping[int, Any],
    *,
    score: str = DEFAULT_LINK_SCORE,
    modules: Sequence[str] = FLOW_MODULES,
) -> list[PairJob]:
    """The ``links`` jobs (``k=1``, ``score``) that :func:`~sae_match_lens.flow.graph.flow_graph`
    reads, for every seed of a whole stack.

    For every pair of adjacent layers ``L, L+1`` of the stack: residual ``L → L+1`` (each
    feature's best partner forward, ``distance=1``) and residual ``L+1 → L`` (its best
    predecessor backward, ``distance=-1``); for every layer with such SAEs: residual ``→ mlp``
    and residual ``→ attn`` at the same layer (source = the residual SAE, so the links are
    indexed by residual features; ``distance=0``). Each job's ``layer_a``/``layer_b``/
    ``module_a``/``module_b`` say which link set it is, so
    :meth:`~sae_match_lens.batch.store.ResultStore.flow_graph` finds it. Layers that are not adjacent
    (a gap in the stack) get no residual pair: a flow graph stops there.

    Args:
        stack: a module stack ``{layer: {module: SAERef}}`` (modules ``"res"``, required, and
            ``"mlp"``/``"attn"``; refs, paths or ``"release:sae_id"`` strings), or a residual
            stack ``{layer: SAERef}``.
        score: the link score (:data:`~sae_match_lens.flow.linking.SCORES`); a flow graph read from
            the store must use the same one.
        modules: which module SAEs to link each residual SAE to (a subset of
            :data:`FLOW_MODULES`); layers without one are skipped.

    Returns:
        The jobs, residual pairs first (an empty list for one residual layer and no modules).

    Raises:
        ValueError: an unknown score or module, a layer of a module stack without ``"res"``, a
            stack mixing both forms.
        TypeError: a layer key that is not an int.

    Example:
        >>> stack = {L: {"res": f"saes/res{L}", "mlp": f"saes/mlp{L}", "attn": f"saes/attn{L}"}
        ...          for L in range(3)}
        >>> batch_match(plan_flow(stack), "results/flow")  # 4 residual + 6 module jobs
        >>> ResultStore("results/flow").flow_graph(loaded_stack, (1, 42))
    """
    from ..flow.linking import SCORES

    if score not in SCORES:
        raise ValueError(f"unknown link score {score!r}; valid: {list(SCORES)}.")
    unknown = [m for m in modules if m not in FLOW_MODULES]
    if isinstance(modules, str) or unknown:
        raise ValueError(f"modules must be a subset of {list(FLOW_MODULES)}, got {modules!r}.")
    layers = sorted(stack)
    nested = bool(layers) and isinstance(stack[layers[0]], Mapping)
    refs: dict[int, dict[str, SAERef]] = {}
    for layer in layers:
        if not isinstance(layer, int):
            raise TypeError(f"stack keys must be model layer numbers (int), got {layer!r}.")
        entry = stack[layer]
        if isinstance(entry, Mapping) != nested:
            raise ValueError(f"layer {layer}: a stack is either {{layer: SAERef}} or {{layer: "
                             "{module: SAERef}}, not both.")
        if not nested:
            refs[layer] = {"res": SAERef.parse(entry)}
            continue
        bad = sorted(set(entry) - {"res", *FLOW_MODULES})
        if "res" not in entry or bad:
            raise ValueError(f"layer {layer} of the stack has modules {sorted(entry)}; a flow "
                             f"stack needs 'res' and may have {list(FLOW_MODULES)}.")
        refs[layer] = {m: SAERef.parse(r) for m, r in entry.items()}
    opts = {"k": 1, "score": score}
    jobs = []
    for a, b in itertools.pairwise(layers):
        if b != a + 1:
            logger.info("plan_flow: layers %d and %d are not adjacent; no residual links between "
                        "them (a flow graph stops at the gap)", a, b)
            continue
        jobs.append(PairJob(refs[a]["res"], refs[b]["res"], "links", opts, layer_a=a, layer_b=b,
                            module_a="res", module_b="res", distance=1))
        jobs.append(PairJob(refs[b]["res"], refs[a]["res"], "links", opts, layer_a=b, layer_b=a,
                            module_a="res", module_b="res", distance=-1))
    jobs += [PairJob(refs[layer]["res"], refs[layer][m], "links", opts, layer_a=layer,
                     layer_b=layer, module_a="res", module_b=m, distance=0)
             for layer in layers for m in modules if m in refs[layer]]
    return jobs


def plan_from_release(
    release: str,
    layers: Iterable[int] | None = None,
    *,
    width: str | int | None = None,
    l0: float | str | None = None,
    hook: str | None = None,
    variant: str | None = None,
    distances: int | Iterable[int] = range(1, 2),
    kind: JobKind = "match",
    options: Mapping[str, Any] | None = None,
) -> list[PairJob]:
    """:func:`plan_pairs` over the SAEs of a SAELens release (resolved by
    :func:`~sae_match_lens.releases.resolve_release`, nothing downloaded)."""
    from ..releases import resolve_release

    entries = resolve_release(release, layers=layers, width=width, l0=l0, hook=hook,
                              variant=variant)
    stack = {e.layer: SAERef(release=e.release, sae_id=e.sae_id) for e in entries}
    return plan_pairs(stack, distances, kind=kind, options=options)


def load_plan(path: str | os.PathLike[str]) -> list[PairJob]:
    """Read a YAML plan file (module docstring); relative paths are relative to the file.

    Raises:
        ValueError: an unreadable file, or a plan with none or several of ``release``,
            ``stack`` and ``jobs``, or unknown keys.
    """
    try:
        import yaml
    except ImportError as exc:
        raise ImportError("plan files are YAML: pip install pyyaml (or 'sae-match-lens[ray]').") from exc
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read plan {path}: {exc}") from exc
    if not isinstance(spec, Mapping):
        raise ValueError(f"plan {path} must be a mapping with release:, stack: or jobs:.")
    base = path.parent
    sources = [k for k in ("release", "stack", "jobs") if k in spec]
    if len(sources) != 1:
        raise ValueError(f"plan {path} needs exactly one of release:, stack:, jobs: (found "
                         f"{sources or 'none'}).")
    allowed = {"release": {"release", "layers", "width", "l0", "hook", "variant", "distances",
                           "kind", "options"},
               "stack": {"stack", "distances", "kind", "options", "modules"},
               "jobs": {"jobs"}}[sources[0]]
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"plan {path}: unknown key(s) {unknown}; a {sources[0]} plan takes "
                         f"{sorted(allowed)}.")
    common = {"kind": spec.get("kind", "match"), "options": spec.get("options") or {}}
    if sources[0] == "jobs":
        return [PairJob(SAERef.parse(j["source"], base), SAERef.parse(j["target"], base),
                        j.get("kind", "match"), j.get("options") or {},
                        layer_a=j.get("layer_a"), layer_b=j.get("layer_b"))
                for j in spec["jobs"]]
    distances = spec.get("distances", 1)
    if sources[0] == "stack":
        stack = {int(k): (SAERef.parse(v, base) if not isinstance(v, Mapping) or "path" in v
                          or "release" in v else {m: SAERef.parse(r, base) for m, r in v.items()})
                 for k, v in spec["stack"].items()}
        modules = [tuple(m) for m in spec["modules"]] if spec.get("modules") else None
        return plan_pairs(stack, distances, modules=modules, **common)  # type: ignore[arg-type]
    layers = spec.get("layers")
    if isinstance(layers, str):
        from ..releases import parse_layers

        layers = parse_layers(layers, minimum=1)
    return plan_from_release(spec["release"], layers, width=spec.get("width"), l0=spec.get("l0"),
                             hook=spec.get("hook"), variant=spec.get("variant"),
                             distances=distances, **common)  # type: ignore[arg-type]
