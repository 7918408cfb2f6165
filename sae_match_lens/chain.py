"""Match a stack of SAEs (one per layer), compose the matches, and trace features through it.

``match_chain(saes)`` matches every adjacent pair ``(l, l+1)``. Composition follows the package
convention: the map from layer ``src`` to layer ``dst > src`` is
``P(dst-1→dst) @ … @ P(src→src+1)``, i.e. ``indices = P_last.indices[…P_first.indices]``.
The paper's approximation ``P(A→C) ≈ P(B→C) ∘ P(A→B)`` can be checked against a direct match of
A and C with :func:`compare_composed_direct`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from tqdm.auto import tqdm

from .adapters import describe_sae, feature_view, hook_name_of
from .costs import CostWeights, stack_features
from .matching import MatchResult, match
from .neuronpedia import feature_url, feature_urls
from .permutation import Permutation

__all__ = [
    "ChainMatch",
    "CompositionCheck",
    "FeaturePath",
    "FeatureStep",
    "compare_composed_direct",
    "match_chain",
]


class FeatureStep(NamedTuple):
    """One layer on a traced feature path."""

    layer: int
    """Position of the SAE in the chain."""
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
    """One step per layer, ``src`` to ``dst`` inclusive."""
    complete: bool
    """Whether every link had a partner (no -1 on the way)."""
    total_cost: float
    """Sum of the link costs (NaN when incomplete)."""

    @property
    def features(self) -> list[int]:
        """The feature index at each layer."""
        return [s.feature for s in self.steps]


@dataclass(frozen=True)
class ChainMatch:
    """Adjacent matches of a stack of SAEs: ``steps[l]`` maps SAE ``l`` to SAE ``l + 1``."""

    steps: tuple[MatchResult, ...]
    """The adjacent match results, in layer order."""
    hook_names: tuple[str, ...]
    """Hook name of each SAE in the chain (one more than ``steps``)."""

    def __post_init__(self) -> None:
        if len(self.hook_names) != len(self.steps) + 1:
            raise ValueError(
                f"a chain of {len(self.steps)} steps needs {len(self.steps) + 1} hook names, "
                f"got {len(self.hook_names)}."
            )
        for layer, (p, q) in enumerate(zip(self.steps, self.steps[1:], strict=False)):
            if p.permutation.n_target != q.permutation.n_source:
                raise ValueError(
                    f"step {layer} maps into {p.permutation.n_target} features but step {layer + 1} "
                    f"starts from {q.permutation.n_source}."
                )

    @property
    def n_layers(self) -> int:
        """Number of SAEs in the chain."""
        return len(self.hook_names)

    def neuronpedia_ids(self) -> list[str | None]:
        """The Neuronpedia id of each SAE in the chain (from the match records; None: unknown)."""
        ends = [step.permutation.source for step in self.steps] + [self.steps[-1].permutation.target]
        return [(end or {}).get("neuronpedia_id") for end in ends]

    def _check_layer(self, layer: int, what: str) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"{what}={layer!r} is not a layer of this chain (0..{self.n_layers - 1}).")
        return layer

    def compose(self, src: int, dst: int) -> Permutation:
        """The composed map from SAE ``src`` to SAE ``dst`` (``dst < src`` uses inverses)."""
        self._check_layer(src, "src")
        self._check_layer(dst, "dst")
        if dst < src:
            return self.compose(dst, src).inverse()
        if src == dst:
            step = self.steps[src] if src < len(self.steps) else self.steps[-1]
            end = step.permutation.source if src < len(self.steps) else step.permutation.target
            width = (step.permutation.n_source if src < len(self.steps)
                     else step.permutation.n_target)
            ends = {"source": end, "target": end} if end is not None else {}
            return Permutation(torch.arange(width), width, ends)
        perm = self.steps[src].permutation
        for step in self.steps[src + 1:dst]:
            perm = step.permutation @ perm  # checks that each step starts where the last ended
        return perm

    def trace(self, feature: int, src: int = 0, dst: int | None = None) -> FeaturePath:
        """Follow ``feature`` of SAE ``src`` forward to SAE ``dst`` (default: the last SAE)."""
        dst = self.n_layers - 1 if dst is None else dst
        self._check_layer(src, "src")
        self._check_layer(dst, "dst")
        if dst < src:
            raise ValueError(f"trace goes forward: dst={dst} must be >= src={src}.")
        width = (self.steps[src].permutation.n_source if src < len(self.steps)
                 else self.steps[-1].permutation.n_target)
        if not 0 <= feature < width:
            raise ValueError(f"feature {feature} is out of range for layer {src} (d_sae={width}).")
        ids = self.neuronpedia_ids()

        def page(layer: int, f: int) -> str | None:
            return feature_url(ids[layer], f) if ids[layer] and f >= 0 else None

        steps = [FeatureStep(src, self.hook_names[src], feature, math.nan, math.nan, ids[src],
                             page(src, feature))]
        current = feature
        for layer in range(src, dst):
            result = self.steps[layer]
            if current >= 0:
                nxt = int(result.permutation.indices[current])
                cost = float(result.cost_F[current]) if nxt >= 0 else math.nan
                margin = float(result.margin_F[current])
            else:
                nxt, cost, margin = -1, math.nan, math.nan
            steps.append(FeatureStep(layer + 1, self.hook_names[layer + 1], nxt, cost, margin,
                                     ids[layer + 1], page(layer + 1, nxt)))
            current = nxt
        complete = all(s.feature >= 0 for s in steps)
        total = sum(s.cost for s in steps[1:]) if complete else math.nan
        return FeaturePath(tuple(steps), complete, total)

    def paths(self, src: int = 0, dst: int | None = None) -> torch.Tensor:
        """Every feature of SAE ``src`` traced to ``dst``: int64 [n_src, dst - src + 1], -1 after a break."""
        dst = self.n_layers - 1 if dst is None else dst
        self._check_layer(src, "src")
        self._check_layer(dst, "dst")
        columns = [torch.arange(self.compose(src, src).n_source)]
        for layer in range(src, dst):
            prev = columns[-1]
            nxt = torch.full_like(prev, -1)
            ok = prev >= 0
            nxt[ok] = self.steps[layer].permutation.indices[prev[ok]]
            columns.append(nxt)
        return torch.stack(columns, dim=1)

    def edges(self) -> pd.DataFrame:
        """All links of the chain as a graph edge table (one row per matched source feature),
        with ``neuronpedia_id_a/_b`` and ``neuronpedia_url_a/_b`` (None where an SAE has no id)."""
        frames = []
        ids = self.neuronpedia_ids()
        for layer, result in enumerate(self.steps):
            ok = result.matched
            feature_a = torch.nonzero(ok).flatten().numpy()
            feature_b = result.permutation.indices[ok].numpy()
            frames.append(pd.DataFrame({
                "layer_a": layer, "layer_b": layer + 1,
                "hook_a": self.hook_names[layer], "hook_b": self.hook_names[layer + 1],
                "feature_a": feature_a, "feature_b": feature_b,
                "cost": result.cost_F[ok].numpy(),
                "margin": result.margin_F[ok].numpy(),
                "neuronpedia_id_a": ids[layer], "neuronpedia_id_b": ids[layer + 1],
                "neuronpedia_url_a": feature_urls(ids[layer], feature_a),
                "neuronpedia_url_b": feature_urls(ids[layer + 1], feature_b),
            }))
        return pd.concat(frames, ignore_index=True)

    def save(self, directory: str | Path) -> Path:
        """Save each adjacent permutation as ``step_{l:03d}.safetensors`` (+ JSON sidecar)."""
        directory = Path(directory)
        for layer, result in enumerate(self.steps):
            result.permutation.save(directory / f"step_{layer:03d}.safetensors")
        return directory


def match_chain(
    saes: Sequence[Any] | Mapping[Any, Any],
    *,
    fold: bool = True,
    weights: CostWeights | Mapping[str, float] | None = None,
    metric: str = "mse",
    progress: bool = True,
    **match_kwargs: Any,
) -> ChainMatch:
    """Match every adjacent pair of a stack of SAEs (ordered by layer).

    Each SAE's folded, stacked features are computed once and reused for both pairs it is in.

    Args:
        saes: the SAEs in layer order (a sequence, or a mapping whose values are in order).
        fold, weights, metric: as in :func:`~sae_match_lens.matching.match`.
        progress: show a progress bar over the pairs.
        **match_kwargs: passed on to :func:`~sae_match_lens.matching.match` (``max_cost``,
            ``solver``, ``block_rows``, ``device``).

    Example:
        >>> chain = match_chain([sae_l0, sae_l1, sae_l2])
        >>> chain.trace(42, src=0, dst=2).features
    """
    saes = list(saes.values()) if isinstance(saes, Mapping) else list(saes)
    if len(saes) < 2:
        raise ValueError(f"match_chain needs at least 2 SAEs, got {len(saes)}.")
    w = CostWeights.resolve(weights, metric)  # type: ignore[arg-type]
    previous = stack_features(feature_view(saes[0], fold=fold), w, metric)  # type: ignore[arg-type]
    steps = []
    pairs = tqdm(range(len(saes) - 1), desc="matching layers", unit="pair", disable=not progress)
    for layer in pairs:
        current = stack_features(feature_view(saes[layer + 1], fold=fold), w, metric)  # type: ignore[arg-type]
        steps.append(match(saes[layer], saes[layer + 1], fold=fold, weights=w, metric=metric,  # type: ignore[arg-type]
                           progress=False, features=(previous, current), **match_kwargs))
        previous = current
    return ChainMatch(tuple(steps), tuple(hook_name_of(s) for s in saes))


class CompositionCheck(NamedTuple):
    """Composed vs directly matched permutation for one pair of layers."""

    src: int
    """Source layer."""
    dst: int
    """Target layer."""
    distance: int
    """``dst - src``."""
    agreement: float
    """Fraction of source features (matched in either map) sent to the same target by both."""
    composed: Permutation
    """The composition of adjacent matches."""
    direct: MatchResult
    """The direct match of SAE ``src`` with SAE ``dst``."""


def compare_composed_direct(
    chain: ChainMatch,
    saes: Sequence[Any],
    *,
    max_distance: int = 3,
    progress: bool = True,
    **match_kwargs: Any,
) -> list[CompositionCheck]:
    """Directly match every pair at distance 2..``max_distance`` and compare with the composition.

    ``match_kwargs`` should be the options the chain was matched with (fold, weights, ...).
    """
    saes = list(saes)
    if len(saes) != chain.n_layers:
        raise ValueError(f"the chain has {chain.n_layers} layers but {len(saes)} SAEs were given.")
    for layer, sae in enumerate(saes):
        if hook_name_of(sae) != chain.hook_names[layer]:
            raise ValueError(f"SAE {layer} is {describe_sae(sae)} but the chain has "
                             f"'{chain.hook_names[layer]}' at layer {layer}.")
    pairs = [(s, s + d) for d in range(2, max_distance + 1) for s in range(chain.n_layers - d)]
    checks = []
    for src, dst in tqdm(pairs, desc="direct matches", unit="pair", disable=not progress):
        direct = match(saes[src], saes[dst], progress=False, **match_kwargs)
        composed = chain.compose(src, dst)
        checks.append(CompositionCheck(src, dst, dst - src, composed.agreement(direct.permutation),
                                       composed, direct))
    return checks
