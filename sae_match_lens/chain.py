"""Match a stack of SAEs (one per model layer), compose the matches, and trace features through it.

``match_chain(saes)`` matches every adjacent pair of SAEs. Layers are always the *model's* layer
numbers (a mapping's keys, or the ``L`` of each hook name ``blocks.L.…``), never positions in a
list: a chain over Gemma Scope layers 10..14 is traced, composed and tabled at layers 10..14.
Composition follows the package convention: the map from layer ``src`` to layer ``dst > src`` is
``P(last step) @ … @ P(first step)``, i.e. ``indices = P_last.indices[…P_first.indices]``.
The paper's approximation ``P(A→C) ≈ P(B→C) ∘ P(A→B)`` can be checked against a direct match of
A and C with :func:`compare_composed_direct`, which reuses the options the chain was matched with.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch

from .adapters import describe_sae, feature_view, hook_name_of, layers_from_hooks, model_layer_of
from .matching import MatchOptions, MatchResult, MatchResultFileError, match
from .neuronpedia import feature_url, feature_urls
from .options import gather_options
from .permutation import Permutation, ProvenanceError
from .progress import progress_bar
from .savedir import decode_json, encode_json, read_versioned_manifest, write_directory
from .solvers.costs import CostWeights, stack_features

__all__ = [
    "CHAIN_VERSION",
    "ChainFileError",
    "ChainMatch",
    "CompositionCheck",
    "FeaturePath",
    "FeatureStep",
    "chain_saes",
    "compare_composed_direct",
    "match_chain",
]

logger = logging.getLogger(__name__)

CHAIN_FORMAT = "sae_match_lens.ChainMatch"
CHAIN_VERSION = 1
"""Version of the :meth:`ChainMatch.save` format; :meth:`ChainMatch.load` reads this one."""
_MANIFEST = "chain.json"


class ChainFileError(MatchResultFileError):
    """A saved chain is missing, unreadable, corrupt, or of another format version."""


class FeatureStep(NamedTuple):
    """One layer on a traced feature path."""

    layer: int
    """The model layer of the SAE (as in :attr:`ChainMatch.layers`)."""
    hook_name: str
    """Where that SAE reads."""
    feature: int
    """The feature at this layer (-1 once the path has lost its partner)."""
    cost: float
    """Match cost of the link that led here (NaN on the first step or after a break)."""
    margin: float
    """Margin of that link (second-best minus assigned cost; NaN on the first step)."""
    neuronpedia_id: str | None = None
    """The SAE's Neuronpedia id, when its metadata names one."""
    neuronpedia_url: str | None = None
    """The feature's Neuronpedia page (None without an id or after a break)."""


class FeaturePath(NamedTuple):
    """A feature followed from layer ``src`` to layer ``dst`` through adjacent matches."""

    steps: tuple[FeatureStep, ...]
    """One step per SAE of the chain, ``src`` to ``dst`` inclusive."""
    complete: bool
    """Whether every link had a partner (no -1 on the way)."""
    total_cost: float
    """Sum of the link costs (NaN when incomplete)."""

    @property
    def features(self) -> list[int]:
        """The feature index at each layer."""
        return [s.feature for s in self.steps]


def chain_saes(saes: Sequence[Any] | Mapping[Any, Any], *, what: str) -> tuple[list[int], list[Any]]:
    """The model layers and the SAEs of a stack, in layer order.

    A mapping ``{model layer: SAE}`` gives its (int) keys, sorted; a key that contradicts the
    SAE's hook name (``blocks.L.…`` with another ``L``) is refused, a hook that names no block
    is accepted. A list takes each SAE's layer from its hook name; the layers must increase.

    Args:
        saes: a mapping ``{model layer: SAE}`` or a list of SAEs.
        what: who asks, for the error messages.

    Raises:
        TypeError: a mapping key is not an int.
        ValueError: a key contradicts its SAE's hook; a listed SAE's hook names no block; two
            listed SAEs are at the same layer; listed layers do not increase.

    Example:
        >>> chain_saes({10: sae_a, 11: sae_b}, what="match_chain")
        ([10, 11], [sae_a, sae_b])
    """
    if isinstance(saes, Mapping):
        bad = [k for k in saes if not isinstance(k, numbers.Integral) or isinstance(k, bool)]
        if bad:
            raise TypeError(f"{what}: the keys of a mapping of SAEs are model layers (ints), got "
                            f"{bad!r}.")
        layers = sorted(int(k) for k in saes)  # type: ignore[call-overload]
        ordered = [saes[k] for k in sorted(saes)]
        for layer, sae in zip(layers, ordered, strict=True):
            found = model_layer_of(sae)
            if found is not None and found != layer:
                raise ValueError(f"{what}: key {layer} holds {describe_sae(sae)}, whose hook reads "
                                 f"model layer {found}; key each SAE by its model layer.")
        return layers, ordered
    if isinstance(saes, str | bytes) or not isinstance(saes, Sequence):
        raise TypeError(f"{what}: saes must be a list of SAEs or a mapping {{model layer: SAE}}, "
                        f"got {type(saes).__name__}.")
    ordered = list(saes)
    layers = layers_from_hooks(ordered, what=what)
    if any(b <= a for a, b in itertools.pairwise(layers)):
        hooks = [hook_name_of(sae) for sae in ordered]
        raise ValueError(f"{what}: the SAEs must be in increasing layer order, got {hooks} "
                         f"(layers {layers}); sort them or pass a mapping {{model layer: SAE}}.")
    return layers, ordered


@dataclass(frozen=True)
class ChainMatch:
    """Adjacent matches of a stack of SAEs: ``steps[i]`` maps the SAE at ``layers[i]`` to the SAE
    at ``layers[i + 1]``. Every method takes and returns model layers (:attr:`layers`)."""

    steps: tuple[MatchResult, ...]
    """The adjacent match results, in layer order."""
    hook_names: tuple[str, ...]
    """Hook name of each SAE in the chain (one more than ``steps``)."""
    layers: tuple[int, ...]
    """The model layer of each SAE (strictly increasing; one more than ``steps``)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The keyword arguments of :func:`~sae_match_lens.matching.match` the chain was matched
    with (``fold``, ``weights``, ``metric`` and whatever else was passed, e.g. ``max_cost``,
    ``solver``); :func:`compare_composed_direct` reuses them."""

    def __post_init__(self) -> None:
        n = len(self.steps) + 1
        if len(self.hook_names) != n or len(self.layers) != n:
            raise ValueError(
                f"a chain of {len(self.steps)} steps needs {n} hook names and {n} layers, "
                f"got {len(self.hook_names)} and {len(self.layers)}."
            )
        if any(not isinstance(v, numbers.Integral) or isinstance(v, bool) for v in self.layers):
            raise TypeError(f"layers must be ints (model layers), got {self.layers!r}.")
        layers = tuple(int(v) for v in self.layers)  # type: ignore[call-overload]
        if any(b <= a for a, b in itertools.pairwise(layers)):
            raise ValueError(f"the layers of a chain must increase, got {layers} for hooks "
                             f"{list(self.hook_names)}.")
        for layer, hook in zip(layers, self.hook_names, strict=True):
            found = model_layer_of(hook)
            if found is not None and found != layer:
                raise ValueError(f"hook '{hook}' reads model layer {found}, but the chain puts it "
                                 f"at layer {layer}.")
        for i, step in enumerate(self.steps):
            for role, end, hook in (("source", step.permutation.source, self.hook_names[i]),
                                    ("target", step.permutation.target, self.hook_names[i + 1])):
                recorded = (end or {}).get("hook_name")
                if recorded is not None and recorded != hook:
                    raise ValueError(f"step {layers[i]}→{layers[i + 1]} was matched with {role} "
                                     f"'{recorded}', but the chain has '{hook}' there.")
        for i, (p, q) in enumerate(zip(self.steps, self.steps[1:], strict=False)):
            if p.permutation.n_target != q.permutation.n_source:
                raise ValueError(
                    f"step {layers[i]}→{layers[i + 1]} maps into {p.permutation.n_target} "
                    f"features but step {layers[i + 1]}→{layers[i + 2]} starts from "
                    f"{q.permutation.n_source}."
                )
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "hook_names", tuple(self.hook_names))
        object.__setattr__(self, "options", dict(self.options))

    @property
    def n_layers(self) -> int:
        """Number of SAEs in the chain."""
        return len(self.hook_names)

    def neuronpedia_ids(self) -> list[str | None]:
        """The Neuronpedia id of each SAE in the chain (from the match records; None: unknown)."""
        ends = [step.permutation.source for step in self.steps] + [self.steps[-1].permutation.target]
        return [(end or {}).get("neuronpedia_id") for end in ends]

    def position(self, layer: int, what: str = "layer") -> int:
        """Where model layer ``layer`` sits in :attr:`layers` (ValueError listing them if nowhere)."""
        if isinstance(layer, numbers.Integral) and not isinstance(layer, bool) and layer in self.layers:
            return self.layers.index(int(layer))  # type: ignore[call-overload]
        raise ValueError(f"{what}={layer!r} is not a layer of this chain; its model layers are "
                         f"{list(self.layers)}.")

    def width(self, layer: int) -> int:
        """``d_sae`` of the SAE at model layer ``layer``."""
        i = self.position(layer)
        return (self.steps[i].permutation.n_source if i < len(self.steps)
                else self.steps[-1].permutation.n_target)

    def compose(self, src: int, dst: int) -> Permutation:
        """The composed map from the SAE at model layer ``src`` to the one at ``dst``
        (``dst < src`` uses inverses; ``src == dst``: the identity).

        Example:
            >>> chain = match_chain({10: sae_10, 11: sae_11, 12: sae_12})
            >>> chain.compose(10, 12).indices[42]  # feature 42 at layer 10 ↔ this one at 12
        """
        i, j = self.position(src, "src"), self.position(dst, "dst")
        if j < i:
            return self.compose(dst, src).inverse()
        if i == j:
            last = i == len(self.steps)
            perm = self.steps[i - 1 if last else i].permutation
            end = perm.target if last else perm.source
            width = perm.n_target if last else perm.n_source
            ends = {"source": end, "target": end} if end is not None else {}
            return Permutation(torch.arange(width), width, ends)
        composed = self.steps[i].permutation
        for step in self.steps[i + 1:j]:
            composed = step.permutation @ composed  # checks that each step starts where the last ended
        return composed

    def trace(self, feature: int, src: int | None = None, dst: int | None = None) -> FeaturePath:
        """Follow ``feature`` of the SAE at model layer ``src`` (default: the first) forward to
        the SAE at ``dst`` (default: the last).

        Example:
            >>> chain.trace(42, src=10, dst=12).features  # [42, f11, f12]
            >>> [step.layer for step in chain.trace(42).steps]  # [10, 11, 12]
        """
        src = self.layers[0] if src is None else src
        dst = self.layers[-1] if dst is None else dst
        i, j = self.position(src, "src"), self.position(dst, "dst")
        if j < i:
            raise ValueError(f"trace goes forward: dst={dst} must be >= src={src}.")
        width = self.width(src)
        if not 0 <= feature < width:
            raise ValueError(f"feature {feature} is out of range for layer {src} "
                             f"('{self.hook_names[i]}', d_sae={width}).")
        ids = self.neuronpedia_ids()

        def page(k: int, f: int) -> str | None:
            return feature_url(ids[k], f) if ids[k] and f >= 0 else None

        steps = [FeatureStep(self.layers[i], self.hook_names[i], feature, math.nan, math.nan,
                             ids[i], page(i, feature))]
        current = feature
        for k in range(i, j):
            result = self.steps[k]
            if current >= 0:
                nxt = int(result.permutation.indices[current])
                cost = float(result.cost_F[current]) if nxt >= 0 else math.nan
                margin = float(result.margin_F[current])
            else:
                nxt, cost, margin = -1, math.nan, math.nan
            steps.append(FeatureStep(self.layers[k + 1], self.hook_names[k + 1], nxt, cost, margin,
                                     ids[k + 1], page(k + 1, nxt)))
            current = nxt
        complete = all(s.feature >= 0 for s in steps)
        total = sum(s.cost for s in steps[1:]) if complete else math.nan
        return FeaturePath(tuple(steps), complete, total)

    def paths(self, src: int | None = None, dst: int | None = None) -> torch.Tensor:
        """Every feature of the SAE at model layer ``src`` (default: the first) traced to
        ``dst`` (default: the last): int64 ``[n_src, n]``, one column per SAE from ``src`` to
        ``dst`` (``n`` of them), -1 after a break.

        Example:
            >>> table = chain.paths(10, 12)  # columns: layers 10, 11, 12
        """
        src = self.layers[0] if src is None else src
        dst = self.layers[-1] if dst is None else dst
        i, j = self.position(src, "src"), self.position(dst, "dst")
        if j < i:
            raise ValueError(f"paths go forward: dst={dst} must be >= src={src}.")
        columns = [torch.arange(self.width(src))]
        for k in range(i, j):
            prev = columns[-1]
            nxt = torch.full_like(prev, -1)
            ok = prev >= 0
            nxt[ok] = self.steps[k].permutation.indices[prev[ok]]
            columns.append(nxt)
        return torch.stack(columns, dim=1)

    def edges(self) -> pd.DataFrame:
        """All links of the chain as a graph edge table (one row per matched source feature).

        Columns: ``layer_a``/``layer_b`` (model layers), ``hook_a``/``hook_b``,
        ``feature_a``/``feature_b``, ``cost``, ``margin``, ``confidence`` (the step's
        :attr:`~sae_match_lens.matching.MatchResult.confidence_F`; NaN where it has none),
        ``neuronpedia_id_a/_b`` and ``neuronpedia_url_a/_b`` (None where an SAE has no id).

        Example:
            >>> chain.edges().query("layer_a == 10").sort_values("margin").head()
        """
        frames = []
        ids = self.neuronpedia_ids()
        for k, result in enumerate(self.steps):
            ok = result.matched
            feature_a = torch.nonzero(ok).flatten().numpy()
            feature_b = result.permutation.indices[ok].numpy()
            frames.append(pd.DataFrame({
                "layer_a": self.layers[k], "layer_b": self.layers[k + 1],
                "hook_a": self.hook_names[k], "hook_b": self.hook_names[k + 1],
                "feature_a": feature_a, "feature_b": feature_b,
                "cost": result.cost_F[ok].numpy(),
                "margin": result.margin_F[ok].numpy(),
                "confidence": (result.confidence_F[ok].numpy() if result.confidence_F is not None
                               else float("nan")),
                "neuronpedia_id_a": ids[k], "neuronpedia_id_b": ids[k + 1],
                "neuronpedia_url_a": feature_urls(ids[k], feature_a),
                "neuronpedia_url_b": feature_urls(ids[k + 1], feature_b),
            }))
        return pd.concat(frames, ignore_index=True)

    def step_name(self, k: int) -> str:
        """The sub-directory :meth:`save` writes step ``k`` to: ``step_{layer_a:03d}_{layer_b:03d}``."""
        return f"step_{self.layers[k]:03d}_{self.layers[k + 1]:03d}"

    def save(self, directory: str | os.PathLike[str], *,
             extra_files: Mapping[str, str] | None = None) -> Path:
        """Write the whole chain into ``directory``, atomically; returns the directory.

        Layout: ``chain.json`` (format version, :attr:`layers`, :attr:`hook_names`,
        :attr:`options` and the step directories) and one directory per step,
        ``step_{layer_a:03d}_{layer_b:03d}/``, written by :meth:`MatchResult.save
        <sae_match_lens.matching.MatchResult.save>` (permutation, costs, margins, certificate,
        provenance; every tensor bit for bit). The directory is built beside ``directory`` and
        renamed into place (:func:`~sae_match_lens.savedir.write_directory`): a failed or killed
        save leaves an earlier save there exactly as it was; an existing ``directory`` that is
        neither empty nor a saved chain is refused with ``FileExistsError``.

        Args:
            directory: the directory to (re)write.
            extra_files: more text files to write into it in the same atomic step, ``{file
                name: text}`` (e.g. an edge table); :meth:`load` ignores them.

        Example:
            >>> chain.save("results/chain_10_14")
            >>> ChainMatch.load("results/chain_10_14", saes=stack).layers
            (10, 11, 12, 13, 14)
        """
        names = [self.step_name(k) for k in range(len(self.steps))]
        extra = dict(extra_files or {})
        for name in extra:
            if (not name or name != Path(name).name or name.startswith(".") or name == _MANIFEST
                    or name in names):
                raise ValueError(f"extra_files: {name!r} is not a plain file name, or clashes with "
                                 f"{_MANIFEST} or a step directory.")
        record = {
            "format": CHAIN_FORMAT,
            "format_version": CHAIN_VERSION,
            "layers": list(self.layers),
            "hook_names": list(self.hook_names),
            "options": encode_json(dict(self.options)),
            "steps": [{"layer_a": self.layers[k], "layer_b": self.layers[k + 1], "directory": name}
                      for k, name in enumerate(names)],
        }
        text = json.dumps(record, indent=1, sort_keys=True, allow_nan=False)

        def write(tmp: Path) -> None:
            for name, result in zip(names, self.steps, strict=True):
                result.save(tmp / name)
            for name, content in extra.items():
                (tmp / name).write_text(content, encoding="utf-8")
            (tmp / _MANIFEST).write_text(text, encoding="utf-8")

        return write_directory(directory, write, manifest=_MANIFEST, kind=CHAIN_FORMAT)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *,
             saes: Sequence[Any] | Mapping[Any, Any] | None = None) -> ChainMatch:
        """Read a chain written by :meth:`save` (every field exact, provenance included).

        Args:
            directory: a directory written by :meth:`save`.
            saes: optionally the SAEs the chain was made for (a list or a mapping, as for
                :func:`match_chain`); they must be at the saved layers, and each step is
                checked against them (hook, widths, architecture, weight signature).

        Raises:
            ChainFileError: a missing or unreadable directory, one that is not a saved chain, a
                format version this release does not read, or a corrupt step.
            ProvenanceError: ``saes`` are not the SAEs the chain was made for.

        Example:
            >>> chain = ChainMatch.load("results/chain_10_14", saes=stack)
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise ChainFileError(f"chain directory {directory} does not exist.")
        record = read_versioned_manifest(directory, _MANIFEST, CHAIN_FORMAT, CHAIN_VERSION,
                                         ChainFileError, "saved chain", "re-run match_chain")
        layers = [int(v) for v in record["layers"]]
        given: list[Any] | None = None
        if saes is not None:
            given_layers, given = chain_saes(saes, what="ChainMatch.load")
            if given_layers != layers:
                raise ProvenanceError(f"the chain in {directory} is at model layers {layers}, but "
                                      f"the SAEs given are at {given_layers}.")
        steps = []
        for k, entry in enumerate(record["steps"]):
            if (entry.get("layer_a"), entry.get("layer_b")) != (layers[k], layers[k + 1]):
                raise ChainFileError(f"{directory}: step {k} is recorded for layers "
                                     f"{entry.get('layer_a')}→{entry.get('layer_b')}, expected "
                                     f"{layers[k]}→{layers[k + 1]}.")
            steps.append(MatchResult.load(
                directory / entry["directory"],
                source=given[k] if given is not None else None,
                target=given[k + 1] if given is not None else None,
            ))
        return cls(tuple(steps), tuple(record["hook_names"]), tuple(layers),
                   decode_json(record.get("options") or {}))


def _recorded_options(fold: bool, weights: CostWeights, metric: str,
                      match_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {"fold": fold, "weights": weights.as_dict(), "metric": metric}
    for key, value in match_kwargs.items():
        options[key] = str(value) if isinstance(value, torch.device) else value
    return options


def match_chain(
    saes: Sequence[Any] | Mapping[int, Any],
    *,
    fold: bool = True,
    weights: CostWeights | Mapping[str, float] | None = None,
    metric: str = "mse",
    progress: bool = True,
    **match_kwargs: Any,
) -> ChainMatch:
    """Match every adjacent pair of a stack of SAEs (ordered by model layer).

    Each SAE's folded, stacked features are computed once and reused for both pairs it is in.

    Args:
        saes: a mapping ``{model layer: SAE}`` (its keys, sorted, are the layers; a key that
            contradicts the hook name ``blocks.L.…`` is refused), or a list of SAEs whose hook
            names give their layers (which must increase) — see :func:`chain_saes`.
        fold: as in :func:`~sae_match_lens.matching.match`.
        weights: as in :func:`~sae_match_lens.matching.match`.
        metric: as in :func:`~sae_match_lens.matching.match`.
        progress: show a progress bar over the pairs.
        **match_kwargs: passed on to :func:`~sae_match_lens.matching.match` (``max_cost``,
            ``solver``, ``block_rows``, ``device``, ...).

    Returns:
        A :class:`ChainMatch` at those layers, recording these options in ``options``.

    Example:
        >>> chain = match_chain({10: sae_10, 11: sae_11, 12: sae_12})
        >>> chain.trace(42, src=10, dst=12).features
    """
    layers, ordered = chain_saes(saes, what="match_chain")
    if len(ordered) < 2:
        raise ValueError(f"match_chain needs at least 2 SAEs, got {len(ordered)}.")
    w = CostWeights.resolve(weights, metric)  # type: ignore[arg-type]
    previous = stack_features(feature_view(ordered[0], fold=fold), w, metric)  # type: ignore[arg-type]
    steps = []
    pairs = progress_bar(range(len(ordered) - 1), desc="matching layers", unit="pair", enabled=progress)
    for k in pairs:
        current = stack_features(feature_view(ordered[k + 1], fold=fold), w, metric)  # type: ignore[arg-type]
        steps.append(match(ordered[k], ordered[k + 1],  # type: ignore[arg-type]
                           fold=fold, weights=w, metric=metric,  # type: ignore[arg-type]
                           progress=False, features=(previous, current),
                           **gather_options(MatchOptions, match_kwargs)))
        previous = current
    return ChainMatch(tuple(steps), tuple(hook_name_of(s) for s in ordered), tuple(layers),
                      _recorded_options(fold, w, metric, match_kwargs))


class CompositionCheck(NamedTuple):
    """Composed vs directly matched permutation for one pair of layers."""

    src: int
    """Source model layer."""
    dst: int
    """Target model layer."""
    distance: int
    """``dst - src`` (model layers)."""
    agreement: float
    """Fraction of source features (matched in either map) sent to the same target by both."""
    composed: Permutation
    """The composition of adjacent matches."""
    direct: MatchResult
    """The direct match of the SAE at ``src`` with the SAE at ``dst``."""


def _differs(key: str, recorded: Any, given: Any, metric: str) -> bool:
    if key == "weights":
        try:
            return (CostWeights.resolve(recorded, metric).as_dict()  # type: ignore[arg-type]
                    != CostWeights.resolve(given, metric).as_dict())  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return True
    if key == "device":
        return str(recorded) != str(given)
    return bool(recorded != given)


def compare_composed_direct(
    chain: ChainMatch,
    saes: Sequence[Any] | Mapping[int, Any],
    *,
    max_distance: int = 3,
    progress: bool = True,
    **match_kwargs: Any,
) -> list[CompositionCheck]:
    """Directly match every pair of the chain's SAEs that is at least two steps and at most
    ``max_distance`` model layers apart, and compare with the composition of adjacent matches.

    The direct matches use the options the chain was matched with (:attr:`ChainMatch.options`);
    a keyword argument given here overrides one of them, with a logged warning when it differs
    from the recorded value.

    Args:
        chain: the chain.
        saes: its SAEs, a list or a mapping as for :func:`match_chain`; each must be the SAE
            the chain has at that layer (same hook).
        max_distance: the largest ``dst - src`` (model layers) compared.
        progress: show a progress bar.
        **match_kwargs: overrides of the recorded :func:`~sae_match_lens.matching.match` options.

    Returns:
        One :class:`CompositionCheck` per pair, by distance in steps then by source layer.

    Example:
        >>> chain = match_chain({3: sae_3, 4: sae_4, 5: sae_5}, metric="cosine")
        >>> [(c.src, c.dst, c.agreement) for c in compare_composed_direct(chain, chain_saes)]
    """
    layers, ordered = chain_saes(saes, what="compare_composed_direct")
    if tuple(layers) != chain.layers:
        raise ValueError(f"the chain is at model layers {list(chain.layers)} but the SAEs given "
                         f"are at {layers}.")
    for layer, sae, hook in zip(layers, ordered, chain.hook_names, strict=True):
        if hook_name_of(sae) != hook:
            raise ValueError(f"the SAE given at layer {layer} is {describe_sae(sae)} but the chain "
                             f"has '{hook}' at layer {layer}.")
    options = dict(chain.options)
    metric = str(match_kwargs.get("metric", options.get("metric", "mse")))
    for key, value in match_kwargs.items():
        if key in options and _differs(key, options[key], value, metric):
            logger.warning("compare_composed_direct: %s=%r overrides the chain's recorded %s=%r",
                           key, value, key, options[key])
    options.update(match_kwargs)
    n = chain.n_layers
    pairs = [(i, i + g) for g in range(2, n) for i in range(n - g)
             if chain.layers[i + g] - chain.layers[i] <= max_distance]
    if not pairs:
        logger.warning("compare_composed_direct: no pair of layers %s is two or more steps and at "
                       "most max_distance=%d layers apart.", list(chain.layers), max_distance)
    checks = []
    for i, j in progress_bar(pairs, desc="direct matches", unit="pair", enabled=progress):
        src, dst = chain.layers[i], chain.layers[j]
        direct = match(ordered[i], ordered[j],
                       **gather_options(MatchOptions, {**options, "progress": False}))
        composed = chain.compose(src, dst)
        checks.append(CompositionCheck(src, dst, dst - src, composed.agreement(direct.permutation),
                                       composed, direct))
    return checks
