"""Steer a TransformerLens model along SAE features and feature flows, and generate.

**Interventions** (Feature Flow, arXiv 2502.03032; ``FEATURE_FLOW.md`` §A6), at an SAE's hook
``h`` (``cfg.metadata.hook_name``), per position:

* :class:`RescaleFeatures`: ``h ← h + (r − 1)·(a·V)``, ``a`` the SAE's own activations of the
  chosen features on ``h`` and ``a·V`` their exact decoded contribution
  ``decode(a ⊙ 1_S) − decode(0)``. ``r = 1`` changes nothing, ``r = 0`` removes the features,
  ``r < 0`` inverts them.
* :class:`AddDirection`: ``h ← h + s·Σ v_i`` over the chosen features' decoder rows ``v_i``, in
  ``"raw"`` units (``v = W_dec[i]``) or ``"folded"`` units (``v = W_dec[i]·fold_scale_i``, the
  folded SAE's decoder row; ``θ_i·W_dec[i]`` for JumpReLU), so that ``s`` counts thresholds and
  one value means the same at every layer.

Either may act everywhere or only where a feature ``where`` of the same SAE fires. Positions
holding the model's BOS state are left alone by default (``bos="keep"``): the SAEs are trained
without BOS and its state is an attention sink with a huge norm. They are recognised by their
state (position 0 attends only to itself, so its state at every hook is a fixed vector, computed
once by a one-token run when the hooks are built; hooks the caller installed fire on that run
too), which also works with a KV cache and left padding.

:func:`steer` is a context manager like :func:`~sae_match_lens.lens.hooks.substitute`: every hook name
and width is checked before anything is installed, only its own hooks are removed on exit (also
after an error), and it works on ``HookedTransformer`` and ``TransformerBridge`` (hooks never read
``hook.name``). A hook whose output is not finite raises, naming the SAE and the coefficient.

**Flows.** :func:`flow_interventions` steers the nodes of a
:class:`~sae_match_lens.flow.graph.FlowGraph`, a :class:`~sae_match_lens.chain.FeaturePath` or a list
of ``(layer, module, feature)``: ``"single"`` (the nodes at one layer) or ``"cumulative"`` (every
layer of the span, or of the span up to a layer), with a :class:`Schedule` of the coefficient
over layers: constant ``s``, exponential ``s·e^{αl}`` (``l`` the model layer), linear from ``s``
at the span's first layer to ``s*`` at its last.

**Generation.** :func:`generate_steered` samples with TransformerLens' ``generate`` (seeded,
batched) and returns the texts with per-token ids and log-probabilities. Scoring them (judge-free
proxies, sweeps, a judge) is one level up, in :mod:`sae_match_lens.judging.steering_scores`.

Example:
    >>> graph = flow_graph(saes, seed=(3, 117))
    >>> ivs = flow_interventions(saes, graph, mode="cumulative", kind="rescale", coefficient=0.0)
    >>> with steer(model, ivs):
    ...     text = model.generate("And the LORD said", max_new_tokens=20, verbose=False)
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import pandas as pd
import torch

from ..adapters import describe_sae, fold_scales, hook_name_of
from ..chain import FeaturePath
from ..flow.graph import FlowGraph, LayerSAEs, as_stack
from ..metrics import model_device, record_states
from ..options import accepts_flat_options, renamed_keywords
from ..progress import progress_bar
from .hooks import HookFn, check_substitute_sae
from .routes import hook_width, resolve_bos_token_id

__all__ = [
    "SCHEDULES",
    "AddDirection",
    "FlowNode",
    "Generation",
    "Intervention",
    "RescaleFeatures",
    "SamplingOptions",
    "Schedule",
    "flow_interventions",
    "flow_nodes",
    "generate_steered",
    "steer",
    "steering_hooks",
]

logger = logging.getLogger(__name__)

Units = Literal["raw", "folded"]
BosMode = Literal["keep", "steer"]
SCHEDULES: tuple[str, ...] = ("constant", "exponential", "linear")
"""The kinds of :class:`Schedule`: Feature Flow's steering schedules over layers."""


def _features(sae: Any, features: Any, what: str) -> tuple[int, ...]:
    values = (features,) if isinstance(features, int) else tuple(features)
    if not values:
        raise ValueError(f"{what} for {describe_sae(sae)} names no features.")
    d_sae = int(sae.cfg.d_sae)
    out = []
    for f in values:
        if isinstance(f, bool) or not hasattr(f, "__index__"):
            raise TypeError(f"{what} for {describe_sae(sae)}: feature ids must be integers, got {f!r}.")
        f = int(f.__index__())
        if not 0 <= f < d_sae:
            raise ValueError(f"{what}: feature {f} is not a feature of {describe_sae(sae)} (valid "
                             f"ids 0..{d_sae - 1}).")
        out.append(f)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} for {describe_sae(sae)} names a feature twice: {out}.")
    return tuple(out)


def _finite(value: Any, what: str, sae: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} for {describe_sae(sae)} must be a number, got {value!r}.")
    if not math.isfinite(float(value)):
        raise ValueError(f"{what} for {describe_sae(sae)} must be finite, got {value}.")
    return float(value)


@dataclass(frozen=True, eq=False)
class RescaleFeatures:
    """``h ← h + (r − 1)·(a·V)`` for ``features`` of ``sae`` at its hook (module docstring).

    Example:
        >>> RescaleFeatures(sae, (12, 40), factor=0.0)   # remove features 12 and 40
    """

    sae: Any
    """The SAE whose features are rescaled (it reads and is written at its hook)."""
    features: tuple[int, ...]
    """The features (an int is one feature)."""
    factor: float
    """``r``: 1 keeps them, 0 removes them, negative inverts them."""
    where: int | None = None
    """Only where this feature of the same SAE fires (``None``: every position)."""

    def __post_init__(self) -> None:
        check_substitute_sae(self.sae, "steered SAE")
        object.__setattr__(self, "features", _features(self.sae, self.features, "RescaleFeatures"))
        object.__setattr__(self, "factor", _finite(self.factor, "the rescale factor r", self.sae))
        if self.where is not None:
            object.__setattr__(self, "where", _features(self.sae, self.where, "where")[0])

    @property
    def hook_name(self) -> str:
        """Where the intervention acts."""
        return hook_name_of(self.sae)


@dataclass(frozen=True, eq=False)
class AddDirection:
    """``h ← h + s·Σ v_i`` over the decoder rows of ``features`` of ``sae`` (module docstring).

    Example:
        >>> AddDirection(sae, 7, coefficient=4.0)            # 4 thresholds of feature 7
        >>> AddDirection(sae, 7, coefficient=4.0, units="raw")
    """

    sae: Any
    """The SAE whose decoder rows are added at its hook."""
    features: tuple[int, ...]
    """The features (an int is one feature)."""
    coefficient: float
    """``s``."""
    units: Units = "folded"
    """``"folded"``: ``v`` = the folded decoder row (threshold units for JumpReLU); ``"raw"``:
    ``v = W_dec[i]``."""
    where: int | None = None
    """Only where this feature of the same SAE fires (``None``: every position)."""

    def __post_init__(self) -> None:
        check_substitute_sae(self.sae, "steered SAE")
        object.__setattr__(self, "features", _features(self.sae, self.features, "AddDirection"))
        object.__setattr__(self, "coefficient", _finite(self.coefficient, "the coefficient s",
                                                        self.sae))
        if self.units not in ("raw", "folded"):
            raise ValueError(f"units must be 'raw' or 'folded', got {self.units!r}.")
        if self.where is not None:
            object.__setattr__(self, "where", _features(self.sae, self.where, "where")[0])
        step = self.coefficient * self.direction()
        if not bool(torch.isfinite(step).all()):
            raise ValueError(
                f"coefficient {self.coefficient} times the decoder rows of {describe_sae(self.sae)} "
                f"is not finite in {step.dtype}; use a smaller coefficient.")

    @property
    def hook_name(self) -> str:
        """Where the intervention acts."""
        return hook_name_of(self.sae)

    def direction(self) -> torch.Tensor:
        """``Σ v_i`` ([d_in], the SAE's dtype and device) in this intervention's units."""
        idx = torch.tensor(self.features, device=self.sae.W_dec.device)
        rows = self.sae.W_dec.detach()[idx].to(torch.float64)
        if self.units == "folded":
            rows = rows * fold_scales(self.sae).to(rows.device)[idx][:, None]
        return rows.sum(0).to(self.sae.W_dec.dtype)


Intervention = RescaleFeatures | AddDirection


def _as_interventions(interventions: Intervention | Sequence[Intervention]) -> list[Intervention]:
    items = [interventions] if isinstance(interventions, RescaleFeatures | AddDirection) else list(
        interventions)
    for item in items:
        if not isinstance(item, RescaleFeatures | AddDirection):
            raise TypeError(f"interventions must be RescaleFeatures or AddDirection, got "
                            f"{type(item).__name__}.")
    return items


def _check_on_model(model: Any, item: Intervention) -> None:
    name, hook_dict = item.hook_name, model.hook_dict
    if name not in hook_dict:
        close = difflib.get_close_matches(name, list(hook_dict), n=3)
        raise ValueError(
            f"{describe_sae(item.sae)}: hook '{name}' is not a hook point of this "
            f"{type(model).__name__}, so this SAE does not belong to the model."
            + (f" Did you mean {close}?" if close else ""))
    width = hook_width(model, name)
    if width is not None and int(item.sae.cfg.d_in) != width:
        raise ValueError(f"{describe_sae(item.sae)}: d_in={item.sae.cfg.d_in} but the model's "
                         f"activation at '{name}' has width {width}.")


def _bos_states(model: Any, names: Sequence[str], bos_token_id: int | None
                ) -> dict[str, torch.Tensor]:
    bos = resolve_bos_token_id(model, bos_token_id)
    one = torch.tensor([[bos]], device=model_device(model))
    states = record_states(model, sorted(set(names)), one)
    return {name: h[0, 0].detach().clone() for name, h in states.items()}


def _hook(item: Intervention, bos_state: torch.Tensor | None) -> HookFn:
    sae = item.sae
    name = item.hook_name
    features = torch.tensor(item.features, device=sae.W_enc.device)
    direction = item.direction() if isinstance(item, AddDirection) else None
    needs_acts = isinstance(item, RescaleFeatures) or item.where is not None
    coefficient = item.factor if isinstance(item, RescaleFeatures) else item.coefficient

    def fn(h: torch.Tensor, *, hook: Any) -> torch.Tensor:
        x = h.to(sae.W_enc.device, sae.W_enc.dtype)
        acts = sae.encode(x) if needs_acts else None
        if isinstance(item, RescaleFeatures):
            assert acts is not None
            chosen = torch.zeros_like(acts)
            chosen[..., features] = acts[..., features]
            zero = acts.new_zeros((1, acts.shape[-1]))
            delta = (item.factor - 1.0) * (sae.decode(chosen) - sae.decode(zero))
        else:
            assert direction is not None
            delta = item.coefficient * direction.expand_as(x)
        keep = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        if item.where is not None:
            assert acts is not None
            keep &= acts[..., item.where] != 0
        if bos_state is not None:
            ref = bos_state.to(x.device, x.dtype)
            bos_like = (x - ref).norm(dim=-1) <= 1e-3 * ref.norm().clamp_min(1e-6)
            keep &= ~bos_like
        out = h + (delta * keep[..., None]).to(h.device, h.dtype)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"steering {describe_sae(sae)} at '{name}' with coefficient {coefficient} made the "
                "activations non-finite (NaN/inf); use a smaller coefficient or a wider dtype.")
        return out

    return fn


def steering_hooks(
    model: Any,
    interventions: Intervention | Sequence[Intervention],
    *,
    bos: BosMode = "keep",
    bos_token_id: int | None = None,
) -> list[tuple[str, HookFn]]:
    """Forward hooks for ``interventions``, after checking every one against ``model``.

    Interventions at the same hook run in list order (each sees the previous one's output).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        interventions: one or more :class:`RescaleFeatures` / :class:`AddDirection`.
        bos: ``"keep"`` (default): positions holding the BOS state are not changed;
            ``"steer"``: every position is.
        bos_token_id: the BOS id (default: the tokenizer's; needed with ``bos="keep"`` when the
            model has no tokenizer).

    Returns:
        ``[(hook name, fn), ...]`` for ``model.run_with_hooks(fwd_hooks=...)``.

    Raises:
        ValueError: a hook the model does not have (naming the SAE), a width mismatch, an
            unknown ``bos``.

    Example:
        >>> hooks = steering_hooks(model, [RescaleFeatures(sae_3, (5,), factor=0.0)])
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    """
    items = _as_interventions(interventions)
    if bos not in ("keep", "steer"):
        raise ValueError(f"bos must be 'keep' or 'steer', got {bos!r}.")
    for item in items:
        _check_on_model(model, item)
    states = _bos_states(model, [i.hook_name for i in items], bos_token_id) if (
        bos == "keep" and items) else {}
    return [(item.hook_name, _hook(item, states.get(item.hook_name))) for item in items]


@contextmanager
def steer(
    model: Any,
    interventions: Intervention | Sequence[Intervention],
    *,
    bos: BosMode = "keep",
    bos_token_id: int | None = None,
) -> Iterator[Any]:
    """Context manager: every forward pass (and ``generate``) inside it is steered.

    Only the hooks added here are removed on exit, also when the body raises. Arguments as in
    :func:`steering_hooks`.

    Example:
        >>> with steer(model, AddDirection(sae_2, 17, coefficient=8.0)):
        ...     model.generate("I think ", max_new_tokens=20, verbose=False)
    """
    hooks = steering_hooks(model, interventions, bos=bos, bos_token_id=bos_token_id)
    with model.hooks(fwd_hooks=hooks) as hooked:
        yield hooked


@dataclass(frozen=True)
class Schedule:
    """How a coefficient varies over the layers of a flow (Feature Flow's steering schedules).

    * ``"constant"``: ``s`` at every layer;
    * ``"exponential"``: ``s·e^{α·l}`` with ``l`` the model layer;
    * ``"linear"``: from ``s`` at the span's first layer to ``end`` (``s*``) at its last.

    Example:
        >>> Schedule("linear", end=1.0).values(4.0, [2, 3, 4], span=(2, 4))
        {2: 4.0, 3: 2.5, 4: 1.0}
    """

    kind: str = "constant"
    """One of :data:`SCHEDULES`."""
    alpha: float = -0.05
    """``α`` of the exponential schedule (the paper's −0.05)."""
    end: float = 1.0
    """``s*``: the linear schedule's value at the span's last layer."""

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; valid: {list(SCHEDULES)}.")
        for what, value in (("alpha", self.alpha), ("end", self.end)):
            if not math.isfinite(float(value)):
                raise ValueError(f"schedule {what} must be finite, got {value}.")

    def values(self, s: float, layers: Sequence[int], span: tuple[int, int]) -> dict[int, float]:
        """The coefficient at each of ``layers`` for start value ``s`` over ``span``."""
        if not math.isfinite(float(s)):
            raise ValueError(f"the coefficient must be finite, got {s}.")
        first, last = span
        out = {}
        for layer in layers:
            if self.kind == "constant":
                value = float(s)
            elif self.kind == "exponential":
                value = float(s) * math.exp(self.alpha * layer)
            else:
                t = 0.0 if last == first else (layer - first) / (last - first)
                value = float(s) + (self.end - float(s)) * t
            if not math.isfinite(value):
                raise ValueError(f"schedule {self} gives a non-finite coefficient at layer {layer}.")
            out[int(layer)] = value
        return out

    @property
    def label(self) -> str:
        """A short name for tables."""
        if self.kind == "exponential":
            return f"exponential(α={self.alpha:g})"
        if self.kind == "linear":
            return f"linear(→{self.end:g})"
        return "constant"


class FlowNode(NamedTuple):
    """A feature of one SAE of a stack."""

    layer: int
    """The stack's layer key (the model layer)."""
    module: str
    """``"res"``, ``"mlp"`` or ``"attn"``."""
    feature: int
    """The feature id in that SAE."""


NodeSource = FlowGraph | FeaturePath | Sequence[Any]


def flow_nodes(source: NodeSource, stack: Mapping[int, Any] | Sequence[Any]) -> list[FlowNode]:
    """The nodes of a flow graph, a traced path or a list, checked against ``stack``.

    A list may hold ``(layer, module, feature)``, ``(layer, feature)`` (residual) or node ids
    ``"layer/module/feature"``. A :class:`~sae_match_lens.chain.FeaturePath`'s steps are found in
    ``stack`` by hook name (steps that lost their partner, feature -1, are skipped).

    Raises:
        KeyError: a layer or module without an SAE in ``stack``, or a path hook not in it.
        ValueError: a feature id outside its SAE, or a graph node whose hook differs from the
            stack's SAE.
    """
    layers = as_stack(stack)
    raw: list[tuple[int, str, int]] = []
    if isinstance(source, FlowGraph):
        for row in source.nodes.itertuples(index=False):
            raw.append((int(row.layer), str(row.module), int(row.feature)))
            sae = layers.get(int(row.layer), LayerSAEs(None)).get(str(row.module))
            if sae is not None and hook_name_of(sae) != row.hook:
                raise ValueError(f"flow node {row.node} was built on '{row.hook}' but the stack's "
                                 f"SAE there is {describe_sae(sae)}.")
    elif isinstance(source, FeaturePath):
        where = {hook_name_of(s.get(m)): (layer, m) for layer, s in layers.items() for m in
                 ("res", "mlp", "attn") if s.get(m) is not None}
        for step in source.steps:
            if step.feature < 0:
                continue
            if step.hook_name not in where:
                raise KeyError(f"the path's step at '{step.hook_name}' has no SAE in the stack "
                               f"(its hooks: {sorted(where)}).")
            layer, module = where[step.hook_name]
            raw.append((layer, module, int(step.feature)))
    else:
        for item in source:
            if isinstance(item, str):
                parts = item.split("/")
                if len(parts) != 3:
                    raise ValueError(f"node id {item!r} is not 'layer/module/feature'.")
                raw.append((int(parts[0]), parts[1], int(parts[2])))
            elif len(item) == 3:
                raw.append((int(item[0]), str(item[1]), int(item[2])))
            elif len(item) == 2:
                raw.append((int(item[0]), "res", int(item[1])))
            else:
                raise ValueError(f"node {item!r} is not (layer, module, feature) or (layer, feature).")
    nodes = []
    for layer, module, feature in raw:
        if layer not in layers:
            raise KeyError(f"node {layer}/{module}/{feature}: layer {layer} has no SAEs in the "
                           f"stack (layers {list(layers)}).")
        sae = layers[layer].get(module)
        if sae is None:
            raise KeyError(f"node {layer}/{module}/{feature}: the stack has no {module} SAE at "
                           f"layer {layer}.")
        _features(sae, feature, f"node {layer}/{module}/{feature}")
        node = FlowNode(layer, module, feature)
        if node not in nodes:
            nodes.append(node)
    if not nodes:
        raise ValueError("the flow source holds no nodes.")
    return sorted(nodes)


@renamed_keywords(kind="intervention")
def flow_interventions(
    stack: Mapping[int, Any] | Sequence[Any],
    source: NodeSource,
    *,
    mode: Literal["single", "cumulative"] = "cumulative",
    layer: int | None = None,
    intervention: Literal["rescale", "add"] = "rescale",
    coefficient: float = 0.0,
    schedule: Schedule | str = "constant",
    units: Units = "folded",
    where: int | None = None,
) -> list[Intervention]:
    """Interventions on the nodes of a flow (module docstring).

    Args:
        stack: ``{layer: LayerSAEs or residual SAE}`` (or a list indexed by layer).
        source: a :class:`~sae_match_lens.flow.graph.FlowGraph`, a
            :class:`~sae_match_lens.chain.FeaturePath` or a node list (:func:`flow_nodes`).
        mode: ``"single"``: the nodes at ``layer`` only; ``"cumulative"``: the nodes at every
            layer of the span (``layer=None``) or of the span up to ``layer``.
        layer: see ``mode`` (required for ``"single"``).
        intervention: ``"rescale"`` (:class:`RescaleFeatures`, coefficient = ``r``) or ``"add"``
            (:class:`AddDirection`, coefficient = ``s``).
        coefficient: the schedule's start value.
        schedule: a :class:`Schedule` or its kind; layers are placed within the span of all the
            source's nodes.
        units: ``"add"`` only: raw or folded decoder rows.
        where: only where this feature fires; only meaningful for a single SAE, so it needs the
            selection to be at one hook.

    Returns:
        One intervention per SAE (rescale: all its selected features together) or per node (add).

    Example:
        >>> ivs = flow_interventions(stack, graph, mode="single", layer=3, intervention="add",
        ...                          coefficient=6.0)
    """
    nodes = flow_nodes(source, stack)
    layers = as_stack(stack)
    sched = Schedule(schedule) if isinstance(schedule, str) else schedule
    if not isinstance(sched, Schedule):
        raise TypeError(f"schedule must be a Schedule or one of {list(SCHEDULES)}, got {schedule!r}.")
    if intervention not in ("rescale", "add"):
        raise ValueError(f"intervention must be 'rescale' or 'add', got {intervention!r}.")
    span = (min(n.layer for n in nodes), max(n.layer for n in nodes))
    if mode == "single":
        if layer is None:
            raise ValueError("mode='single' needs layer=.")
        chosen = [n for n in nodes if n.layer == layer]
    elif mode == "cumulative":
        chosen = [n for n in nodes if layer is None or n.layer <= layer]
    else:
        raise ValueError(f"mode must be 'single' or 'cumulative', got {mode!r}.")
    if not chosen:
        raise ValueError(f"the flow has no nodes at layer {layer} (mode {mode!r}); its layers are "
                         f"{sorted({n.layer for n in nodes})}.")
    values = sched.values(coefficient, sorted({n.layer for n in chosen}), span)
    groups: dict[tuple[int, str], list[int]] = {}
    for node in chosen:
        groups.setdefault((node.layer, node.module), []).append(node.feature)
    if where is not None and len(groups) != 1:
        raise ValueError(f"where={where} names a feature of one SAE, but the selection spans "
                         f"{len(groups)} SAEs; use mode='single' with one module, or where=None.")
    out: list[Intervention] = []
    for (lay, module), features in groups.items():
        sae = layers[lay].get(module)
        if intervention == "rescale":
            out.append(RescaleFeatures(sae, tuple(features), values[lay], where=where))
        else:
            out.extend(AddDirection(sae, f, values[lay], units=units, where=where)
                       for f in features)
    return out


class Generation(NamedTuple):
    """Sampled continuations, one entry per sample, prompts repeated ``n_samples`` times."""

    prompts: tuple[str, ...]
    """The prompt of each sample."""
    prompt_index: tuple[int, ...]
    """Which prompt (index into the given prompts) each sample continues."""
    texts: tuple[str, ...]
    """The generated continuation (special tokens skipped)."""
    sequences: tuple[torch.Tensor, ...]
    """Token ids, prompt (with BOS) then continuation, int64 on the CPU."""
    prompt_lengths: tuple[int, ...]
    """Number of prompt tokens (with BOS) in each sequence."""
    logprobs: tuple[torch.Tensor, ...]
    """Log-probability of each generated token under the steered model (temperature 1)."""
    seeds: tuple[int, ...]
    """The seed of the batch each sample was drawn in."""

    def frame(self) -> pd.DataFrame:
        """One row per sample: ``prompt_index``, ``prompt``, ``text``, ``n_new``,
        ``mean_logprob``, ``seed``."""
        return pd.DataFrame({
            "prompt_index": list(self.prompt_index), "prompt": list(self.prompts),
            "text": list(self.texts), "n_new": [int(lp.numel()) for lp in self.logprobs],
            "mean_logprob": [float(lp.mean()) if lp.numel() else math.nan for lp in self.logprobs],
            "seed": list(self.seeds)})

    def token_frame(self) -> pd.DataFrame:
        """One row per generated token: ``sample``, ``step``, ``position``, ``token``,
        ``logprob``."""
        rows = []
        for i, (seq, n, lp) in enumerate(zip(self.sequences, self.prompt_lengths, self.logprobs,
                                             strict=True)):
            for step in range(lp.numel()):
                rows.append({"sample": i, "step": step, "position": n + step,
                             "token": int(seq[n + step]), "logprob": float(lp[step])})
        return pd.DataFrame(rows, columns=["sample", "step", "position", "token", "logprob"])


@dataclass(frozen=True)
class SamplingOptions:
    """How :func:`generate_steered` samples (TransformerLens' ``generate``): the sampler's
    settings, the seeds and the batch size. The same options give the same texts."""

    max_new_tokens: int = 36
    """Tokens sampled after each prompt at most."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches ``top_p``."""
    top_k: int | None = None
    """Sample among the ``top_k`` most likely tokens only."""
    do_sample: bool = True
    """``False``: greedy decoding."""
    stop_at_eos: bool = False
    """Stop a sample at the tokenizer's EOS (kept as its last token)."""
    seed: int = 0
    """Base seed: batch ``k`` (counted over all prompts) is drawn with ``torch`` seeded to
    ``seed + k`` inside a forked RNG."""
    batch_size: int = 8
    """Samples per ``generate`` call."""

    RENAMED_IN_0_3: ClassVar[Mapping[str, str]] = {}
    """Flat keywords of 0.2 whose field has another name (none)."""


@accepts_flat_options(SamplingOptions)
def generate_steered(
    model: Any,
    prompts: str | Sequence[str],
    interventions: Intervention | Sequence[Intervention] = (),
    *,
    n_samples: int = 1,
    bos: BosMode = "keep",
    bos_token_id: int | None = None,
    progress: bool = True,
    options: SamplingOptions | None = None,
) -> Generation:
    """Sample continuations of ``prompts`` with the model steered by ``interventions``.

    Samples of one prompt are drawn in batches of ``batch_size`` by TransformerLens' ``generate``
    (KV cache on); batch ``k`` (counted over all prompts) is drawn with ``torch`` seeded to
    ``seed + k`` inside a forked RNG, so the same arguments give the same texts and the caller's
    random state is untouched. Log-probabilities come from one steered forward pass over each
    finished batch.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` with a tokenizer.
        prompts: one prompt or several (tokenized with BOS prepended).
        interventions: what to steer (none: the clean model).
        n_samples: samples per prompt.
        bos: see :func:`steering_hooks`.
        bos_token_id: see :func:`steering_hooks`.
        progress: show a progress bar over batches.
        options: how to sample (:class:`SamplingOptions`; default: its defaults). The flat
            keywords of 0.2 (``max_new_tokens=``, ``temperature=``, ``top_p=``, ``top_k=``,
            ``do_sample=``, ``stop_at_eos=``, ``seed=``, ``batch_size=``) still work until 0.4,
            with a ``DeprecationWarning``.

    Example:
        >>> gen = generate_steered(model, "I think ", ivs, n_samples=8,
        ...                        options=SamplingOptions(top_p=0.7, temperature=1.27))
        >>> gen.frame()[["text", "mean_logprob"]]
    """
    opts = options if options is not None else SamplingOptions()
    if not isinstance(opts, SamplingOptions):
        raise TypeError(f"options must be a SamplingOptions, got {type(opts).__name__}.")
    max_new_tokens, temperature, top_p, top_k = (opts.max_new_tokens, opts.temperature, opts.top_p,
                                                 opts.top_k)
    do_sample, stop_at_eos, seed, batch_size = (opts.do_sample, opts.stop_at_eos, opts.seed,
                                                opts.batch_size)
    texts_in = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts_in or not all(isinstance(p, str) for p in texts_in):
        raise TypeError("prompts must be a string or a non-empty list of strings.")
    for what, value in (("n_samples", n_samples), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}.")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"this {type(model).__name__} has no tokenizer; generate_steered needs "
                         "one to read prompts and write texts.")
    hooks = steering_hooks(model, interventions, bos=bos, bos_token_id=bos_token_id)
    eos = model.tokenizer.eos_token_id
    jobs = [(i, min(batch_size, n_samples - start)) for i in range(len(texts_in))
            for start in range(0, n_samples, batch_size)]
    out: dict[str, list[Any]] = {k: [] for k in Generation._fields}
    device = model_device(model)
    devices = [device] if device is not None and str(device).startswith("cuda") else []
    for k, (i, size) in enumerate(progress_bar(jobs, desc="generating", unit="batch", enabled=progress)):
        prompt_tokens = model.to_tokens(texts_in[i]).to(device)
        batch = prompt_tokens.expand(size, -1).contiguous()
        n_prompt = batch.shape[1]
        with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                model.hooks(fwd_hooks=hooks):
            torch.manual_seed(seed + k)
            seqs = model.generate(batch, max_new_tokens=max_new_tokens, stop_at_eos=False,
                                  do_sample=do_sample, top_k=top_k, top_p=top_p,
                                  temperature=temperature, verbose=False, return_type="tokens")
            logp = torch.log_softmax(model(seqs, return_type="logits").float(), dim=-1)
        new = seqs[:, n_prompt:]
        picked = logp[:, n_prompt - 1:-1].gather(-1, new[..., None])[..., 0]
        for row in range(size):
            n_new = new.shape[1]
            if stop_at_eos and eos is not None:
                hits = torch.nonzero(new[row] == eos).flatten()
                n_new = int(hits[0]) + 1 if hits.numel() else n_new
            cont = new[row, :n_new].cpu()
            out["prompts"].append(texts_in[i])
            out["prompt_index"].append(i)
            out["texts"].append(model.tokenizer.decode(cont.tolist(), skip_special_tokens=True))
            out["sequences"].append(seqs[row, :n_prompt + n_new].cpu())
            out["prompt_lengths"].append(n_prompt)
            out["logprobs"].append(picked[row, :n_new].cpu())
            out["seeds"].append(seed + k)
    return Generation(**{k: tuple(v) for k, v in out.items()})
