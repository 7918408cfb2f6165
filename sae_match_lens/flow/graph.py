"""Feature flow across residual, MLP and attention SAEs: predecessors, origin groups, flow graphs.

Following Feature Flow (Laptev, Balagansky, Aksenov, Gavrilov 2025, arXiv 2502.03032), a layer
``L`` may have a residual SAE ``R(L)`` (``blocks.L.hook_resid_post``), an MLP-output SAE ``M(L)``
(``blocks.L.hook_mlp_out``) and an attention-output SAE ``A(L)`` (``blocks.L.hook_attn_out``).
A residual feature ``f`` at layer ``L`` has one top-1 predecessor in each of ``R(L−1)``,
``M(L)`` and ``A(L)``, with scores ``s(R), s(M), s(A)`` (:func:`predecessors`; the score is a
:mod:`~sae_match_lens.flow.linking` score; by default
:data:`~sae_match_lens.vocabulary.DEFAULT_LINK_SCORE`, as for every function that links; the
paper's reading below uses decoder cosine, ``score="decoder_cosine"``).

**Data-free reading** (:func:`predecessors`' ``reading`` column), the paper's rule ("high s(R),
low s(M), s(A): carried over; high s(R) and high s(M) or s(A): processed by that module; low
s(R), high s(M) or s(A): born in that module; all low: unexplained") with thresholds ``high``
and ``low`` (defaults 0.5 and 0.15, the paper's graph-cut values, in decoder-cosine units; the
paper gives no per-layer thresholds):

* ``carried over``: ``s(R) ≥ high`` and ``s(M), s(A) < low``;
* ``processed by MLP`` / ``processed by attention`` / ``processed by MLP and attention``:
  ``s(R) ≥ high`` and that module's score ``≥ high``;
* ``carried over, weak module link``: ``s(R) ≥ high``, no module score ``≥ high``, and one
  between ``low`` and ``high`` (neither low nor high, so the paper's rule does not decide);
* ``born in MLP`` / ``born in attention`` / ``born in MLP and attention``: ``s(R) < high`` and
  the module's score ``≥ high``;
* ``unexplained``: anything else. At layer 0 there is no ``R(L−1)`` (``s(R)`` is NaN).

**Chance levels.** A best cosine is never zero by chance: among ``F`` random unit vectors in
``d`` dimensions the best cosine with a given direction is about 0.28 for ``F = 1024``,
``d = 128`` (:func:`chance_best_cosine`), and the share of features whose best partner clears a
threshold by chance is :func:`chance_share_above` (100% for 0.15 there, 0.0001% for 0.5).
:func:`chance_levels` gives both beside each threshold for a layer's actual SAEs, with an
empirical check (the candidates' decoder rows turned by a seeded random rotation).

**Origin groups** (:func:`origin_groups`, activation-based, the paper's 8 groups): for every
residual feature active at a scored token, which of its three top-1 predecessors are active at
the same token: ``From RES``, ``From MLP``, ``From ATT``, ``From RES & MLP``, ``From RES & ATT``,
``From MLP & ATT``, ``From RES & MLP & ATT``, ``From nowhere``.

**Flow graphs** (:func:`flow_graph`): from a seed ``(layer, feature)``, forward and backward
over the residual stack by chained adjacent top-1 links, cut where ``s(R) < cut`` (0.5), with
MLP/attention predecessors of every residual node kept when their score is ``≥ module_min``
(0.15); :class:`FlowGraph` has a ``networkx.DiGraph`` view, node-link JSON and GraphML export and
a layered plot. :func:`persistence` counts for every feature how many layers its chain survives.
Links computed by a batch run (:func:`~sae_match_lens.batch.plan.plan_flow`) are read back through
``flow_graph(..., links_by_key=...)`` or :meth:`~sae_match_lens.batch.store.ResultStore.flow_graph`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from ..adapters import describe_sae, hook_name_of, layers_from_hooks
from ..atomicio import write_text
from ..metrics import check_tokens, fires, record_states, scored_activations
from ..neuronpedia import feature_url, neuronpedia_id
from ..permutation import ProvenanceError, check_direction
from .linking import DEFAULT_LINK_SCORE, Links, LinkScore, links

__all__ = [
    "FLOW_GRAPH_FORMAT",
    "FLOW_GRAPH_VERSION",
    "MODULES",
    "ORIGIN_GROUPS",
    "FlowGraph",
    "FlowGraphFileError",
    "FlowKey",
    "LayerSAEs",
    "chance_best_cosine",
    "chance_levels",
    "chance_share_above",
    "flow_graph",
    "origin_groups",
    "persistence",
    "predecessors",
]

logger = logging.getLogger(__name__)

Module = Literal["res", "mlp", "attn"]
MODULES: tuple[str, ...] = ("res", "mlp", "attn")
ORIGIN_GROUPS: tuple[str, ...] = (
    "From RES", "From MLP", "From ATT", "From RES & MLP", "From RES & ATT", "From MLP & ATT",
    "From RES & MLP & ATT", "From nowhere",
)
"""The 8 activation-based origin groups of Feature Flow, in the paper's order."""


@dataclass(frozen=True)
class LayerSAEs:
    """The SAEs of one layer: residual (required), MLP-output and attention-output (optional)."""

    res: Any
    """Residual-stream SAE (``blocks.L.hook_resid_post``)."""
    mlp: Any | None = None
    """MLP-output SAE (``blocks.L.hook_mlp_out``)."""
    attn: Any | None = None
    """Attention-output SAE (``blocks.L.hook_attn_out``)."""

    def get(self, module: str) -> Any | None:
        """The SAE of ``module`` (``"res"``, ``"mlp"``, ``"attn"``), or ``None``."""
        if module not in MODULES:
            raise ValueError(f"module must be one of {list(MODULES)}, got {module!r}.")
        return getattr(self, module)


Stack = Mapping[int, LayerSAEs | Any]
FlowKey = tuple[int, int, str]
"""Which top-1 links a flow graph reads: ``(here, there, "res")`` links residual SAE ``here`` to
residual SAE ``there`` (adjacent layers; ``there < here`` for the backward walk), and ``(layer,
layer, module)`` links residual SAE ``layer`` to its ``"mlp"``/``"attn"`` SAE (source = the
residual SAE, so rows are residual features)."""


def as_stack(stack: Stack | Sequence[Any]) -> dict[int, LayerSAEs]:
    """Any accepted stack shape as ``{model layer: LayerSAEs}`` (a list is keyed by each residual
    SAE's hook; a mapping's values may be SAEs or :class:`LayerSAEs`)."""
    if isinstance(stack, Mapping):
        items = list(stack.items())
    else:  # a list: each entry's model layer from its (residual) SAE's hook name
        entries = list(stack)
        saes = [v.res if isinstance(v, LayerSAEs) else v for v in entries]
        items = list(zip(layers_from_hooks(saes, what="a stack given as a list"), entries,
                         strict=True))
    out = {}
    for layer, value in items:
        if not isinstance(layer, int):
            raise TypeError(f"stack keys must be model layer numbers (int), got {layer!r}.")
        out[layer] = value if isinstance(value, LayerSAEs) else LayerSAEs(res=value)
    if not out:
        raise ValueError("the stack is empty.")
    return dict(sorted(out.items()))


def _reading(s_r: float, s_m: float, s_a: float, high: float, low: float) -> str:
    modules = [(name, s) for name, s in (("MLP", s_m), ("attention", s_a)) if not math.isnan(s)]
    strong = [name for name, s in modules if s >= high]
    if not math.isnan(s_r) and s_r >= high:
        if strong:
            return "processed by " + " and ".join(strong)
        return "carried over" if all(s < low for _, s in modules) else (
            "carried over, weak module link")
    return "born in " + " and ".join(strong) if strong else "unexplained"


def chance_share_above(threshold: float, n_candidates: int, d_model: int) -> float:
    """The probability that the best of ``n_candidates`` independent random unit vectors in
    ``d_model`` dimensions has a cosine ``≥ threshold`` with a given direction: ``1 − G(t)^F``,
    where ``G`` is the distribution of one such cosine (``(1 + cos) / 2`` follows
    ``Beta((d − 1) / 2, (d − 1) / 2)``).

    Example:
        >>> round(chance_share_above(0.15, 1024, 128), 3)
        1.0
    """
    from scipy.special import betainc

    if n_candidates < 1 or d_model < 2:
        raise ValueError(f"need n_candidates >= 1 and d_model >= 2, got {n_candidates}, {d_model}.")
    half = (d_model - 1) / 2
    t = min(max(float(threshold), -1.0), 1.0)
    return float(1.0 - betainc(half, half, (1.0 + t) / 2.0) ** n_candidates)


def chance_best_cosine(n_candidates: int, d_model: int) -> float:
    """The expected best cosine between a given direction and ``n_candidates`` independent random
    unit vectors in ``d_model`` dimensions (the chance level of a top-1 decoder-cosine link):
    ``E[max] = ∫₀¹ P(max > x) dx − ∫₋₁⁰ P(max ≤ x) dx``, integrated on a fine grid.

    Example:
        >>> round(chance_best_cosine(1024, 128), 2)
        0.28
    """
    import numpy as np
    from scipy.special import betainc

    if n_candidates < 1 or d_model < 2:
        raise ValueError(f"need n_candidates >= 1 and d_model >= 2, got {n_candidates}, {d_model}.")
    half = (d_model - 1) / 2
    x = np.linspace(-1.0, 1.0, 40001)
    below = betainc(half, half, (1.0 + x) / 2.0) ** n_candidates
    pos = x >= 0
    return float(np.trapezoid(1.0 - below[pos], x[pos]) - np.trapezoid(below[~pos], x[~pos]))


def chance_levels(stack: Stack | Sequence[Any], layer: int, *,
                  thresholds: Sequence[float] = (0.5, 0.15), seed: int = 0) -> pd.DataFrame:
    """The chance level of each threshold of the decoder-cosine reading at ``layer``.

    For each predecessor SAE (``res`` = R(L−1), ``mlp`` = M(L), ``attn`` = A(L)) and threshold:
    the expected best cosine and the share of residual features whose best partner clears the
    threshold by chance for random unit vectors (:func:`chance_best_cosine`,
    :func:`chance_share_above`), and the same two measured with the predecessor's decoder rows
    turned by a seeded random rotation (its own geometry kept, its directions unrelated to the
    layer's features).

    Returns:
        One row per module and threshold: ``layer``, ``module``, ``n_candidates``, ``d_model``,
        ``threshold``, ``chance_best_cosine``, ``chance_share_above``, ``rotated_best_cosine``,
        ``rotated_share_above``.
    """
    layers = as_stack(stack)
    if layer not in layers:
        raise KeyError(f"layer {layer} has no SAEs; layers are {list(layers)}.")
    here = layers[layer]
    target = torch.nn.functional.normalize(here.res.W_dec.detach().double(), dim=1)
    d = target.shape[1]
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    rows = []
    sources = {"res": layers[layer - 1].res if layer - 1 in layers else None,
               "mlp": here.mlp, "attn": here.attn}
    for module, sae in sources.items():
        if sae is None:
            continue
        candidates = torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=1)
        best = (target @ (candidates @ rotation).T).max(dim=1).values
        n = candidates.shape[0]
        for t in thresholds:
            rows.append({"layer": layer, "module": module, "n_candidates": n, "d_model": d,
                         "threshold": float(t), "chance_best_cosine": chance_best_cosine(n, d),
                         "chance_share_above": chance_share_above(t, n, d),
                         "rotated_best_cosine": float(best.mean()),
                         "rotated_share_above": float((best >= t).double().mean())})
    return pd.DataFrame(rows)


def predecessors(
    stack: Stack | Sequence[Any],
    layer: int,
    *,
    score: LinkScore = DEFAULT_LINK_SCORE,
    high: float = 0.5,
    low: float = 0.15,
    progress: bool = False,
) -> pd.DataFrame:
    """Top-1 predecessors of every residual feature at ``layer`` in ``R(L−1)``, ``M(L)``, ``A(L)``.

    Args:
        stack: ``{layer: LayerSAEs}`` (or ``{layer: residual SAE}``, or a list whose layers
            come from the residual SAEs' hook names ``blocks.L.…``).
        layer: the model layer of the residual features.
        score: the link score (:data:`~sae_match_lens.flow.linking.SCORES`).
        high: the upper threshold of the data-free reading (module docstring: the paper's rule),
            in the score's units; :func:`chance_levels` gives the chance levels of both thresholds.
        low: the lower threshold of the data-free reading, in the same units.
        progress: show progress bars.

    Returns:
        One row per residual feature: ``feature``, ``pred_res``/``s_res``, ``pred_mlp``/
        ``s_mlp``, ``pred_attn``/``s_attn`` (-1 and NaN where the module has no SAE) and
        ``reading``.
    """
    layers = as_stack(stack)
    if layer not in layers:
        raise KeyError(f"layer {layer} has no SAEs; layers are {list(layers)}.")
    here = layers[layer]
    n = here.res.cfg.d_sae
    columns: dict[str, Any] = {"feature": torch.arange(n).numpy()}
    sources = {"res": layers[layer - 1].res if layer - 1 in layers else None,
               "mlp": here.mlp, "attn": here.attn}
    for module, sae in sources.items():
        if sae is None:
            columns[f"pred_{module}"] = torch.full((n,), -1).numpy()
            columns[f"s_{module}"] = torch.full((n,), math.nan).numpy()
            continue
        lk = links(sae, here.res, k=1, score=score, direction="backward", progress=progress)
        columns[f"pred_{module}"] = lk.top1.numpy()
        columns[f"s_{module}"] = lk.scores[:, 0].double().numpy()
    frame = pd.DataFrame(columns)
    frame["reading"] = [_reading(r, m, a, high, low)
                        for r, m, a in zip(frame.s_res, frame.s_mlp, frame.s_attn, strict=True)]
    frame.insert(0, "layer", layer)
    frame.insert(1, "hook", hook_name_of(here.res))
    return frame


@torch.no_grad()
def origin_groups(
    model: Any,
    stack: Stack | Sequence[Any],
    tokens: torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    score: LinkScore = DEFAULT_LINK_SCORE,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Share of each origin group (activation-based, :data:`ORIGIN_GROUPS`) per layer.

    Every (token, residual feature) pair where the feature is active at a scored position (BOS
    excluded) is assigned the group of its top-1 predecessors (:func:`predecessors`) that are
    active at the same token. Modules without an SAE count as inactive.

    Args:
        model: the TransformerLens model the SAEs read.
        stack: as in :func:`predecessors`.
        tokens: ``[n_seq, pos]`` integer token ids with BOS at position 0
            (:func:`~sae_match_lens.metrics.check_tokens`).
        layers: the layers to count (default: every layer of the stack).
        score: the link score of the top-1 predecessors.
        batch_size: sequences per forward pass.

    Returns:
        One row per layer: ``layer``, ``n_active`` and one share column per group (summing to 1).
    """
    stack_map = as_stack(stack)
    tokens = check_tokens(tokens, model, what="origin_groups")
    chosen = [layer for layer in (layers if layers is not None else list(stack_map))]
    preds = {layer: predecessors(stack_map, layer, score=score) for layer in chosen}
    names: list[str] = []
    for layer in chosen:
        for sae in (stack_map[layer].res, stack_map[layer].mlp, stack_map[layer].attn,
                    stack_map[layer - 1].res if layer - 1 in stack_map else None):
            if sae is not None and hook_name_of(sae) not in names:
                names.append(hook_name_of(sae))
    counts = {layer: torch.zeros(len(ORIGIN_GROUPS), dtype=torch.float64) for layer in chosen}
    for batch in tokens.split(batch_size):
        states = record_states(model, names, batch)
        fired: dict[str, torch.Tensor] = {}

        def fire(sae: Any, states: dict[str, torch.Tensor] = states,
                 fired: dict[str, torch.Tensor] = fired) -> torch.Tensor:
            name = hook_name_of(sae)
            if name not in fired:
                fired[name] = fires(scored_activations(sae, states[name])).cpu()
            return fired[name]

        for layer in chosen:
            here = stack_map[layer]
            target = fire(here.res)  # [T, F]
            frame = preds[layer]
            active = {}
            for module, sae in (("res", stack_map[layer - 1].res if layer - 1 in stack_map
                                 else None), ("mlp", here.mlp), ("attn", here.attn)):
                if sae is None:
                    active[module] = torch.zeros_like(target)
                    continue
                idx = torch.as_tensor(frame[f"pred_{module}"].to_numpy().copy())
                active[module] = fire(sae)[:, idx.clamp(min=0)] & (idx >= 0)[None]
            code = (active["res"].long() * 1 + active["mlp"].long() * 2
                    + active["attn"].long() * 4)[target]
            # code → group index: 1 RES, 2 MLP, 4 ATT, 3 RES&MLP, 5 RES&ATT, 6 MLP&ATT, 7 all, 0 none
            group_of_code = torch.tensor([7, 0, 1, 3, 2, 4, 5, 6])
            counts[layer] += torch.bincount(group_of_code[code], minlength=8).double()
    rows = []
    for layer in chosen:
        total = float(counts[layer].sum())
        shares = (counts[layer] / total).tolist() if total > 0 else [math.nan] * 8
        rows.append({"layer": layer, "n_active": int(total),
                     **dict(zip(ORIGIN_GROUPS, shares, strict=True))})
    return pd.DataFrame(rows)


FLOW_GRAPH_FORMAT = "sae_match_lens.FlowGraph"
FLOW_GRAPH_VERSION = 1
"""Version of the :meth:`FlowGraph.save` format; :meth:`FlowGraph.load` reads this one."""


class FlowGraphFileError(ValueError):
    """A saved flow graph is missing, unreadable, corrupt, foreign, or of another format version."""


def _node_link_checksum(body: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a node-link record."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


@dataclass
class FlowGraph:
    """A feature flow: nodes ``(layer, module, feature)`` and scored edges predecessor → node."""

    nodes: pd.DataFrame
    """One row per node: ``layer``, ``module``, ``feature``, ``hook``, ``node`` (its id),
    ``neuronpedia_id`` and ``neuronpedia_url`` (None when the SAE's metadata names no id)."""
    edges: pd.DataFrame
    """One row per link: ``source``, ``target`` (node ids), ``score``, ``confidence``, ``kind``
    (``"res"``, ``"mlp"``, ``"attn"``: the predecessor's module)."""
    options: dict[str, Any] = field(default_factory=dict)
    """How it was built (seed, score, cut, module_min)."""

    @staticmethod
    def node_id(layer: int, module: str, feature: int) -> str:
        """The node id ``"L/module/feature"`` (Neuronpedia's layer/kind/index order)."""
        return f"{layer}/{module}/{feature}"

    @property
    def similarity_span(self) -> tuple[int, int]:
        """First and last layer of the uncut residual chain."""
        res = self.nodes[self.nodes.module == "res"]
        return int(res.layer.min()), int(res.layer.max())

    def to_networkx(self) -> Any:
        """A ``networkx.DiGraph`` with node and edge attributes."""
        import networkx as nx

        graph = nx.DiGraph(**self.options)
        for row in self.nodes.itertuples(index=False):
            known = {k: getattr(row, k) for k in ("neuronpedia_id", "neuronpedia_url")
                     if getattr(row, k, None)}  # GraphML has no None
            graph.add_node(row.node, layer=int(row.layer), module=row.module,
                           feature=int(row.feature), hook=row.hook, **known)
        for row in self.edges.itertuples(index=False):
            graph.add_edge(row.source, row.target, score=float(row.score),
                           confidence=float(row.confidence), kind=row.kind)
        return graph

    def to_node_link(self) -> dict[str, Any]:
        """Node-link JSON (``networkx.node_link_data``)."""
        import networkx as nx

        return nx.node_link_data(self.to_networkx(), edges="links")

    def save(self, path: str | Path) -> Path:
        """Write the graph to the JSON file ``path``, atomically; returns ``path``.

        The file is :meth:`to_node_link`'s node-link JSON (strict: no NaN) with three more
        top-level keys: ``format`` (``"sae_match_lens.FlowGraph"``), ``format_version`` and a
        SHA-256 ``checksum`` of the node-link part, so :meth:`load` refuses a modified, truncated
        or foreign file; ``networkx.node_link_graph`` still reads it. Written beside ``path`` and
        renamed into place (:func:`~sae_match_lens.atomicio.write_text`): a failed or killed save
        leaves an earlier file there as it was.

        Example:
            >>> graph.save("flow.json")
            >>> FlowGraph.load("flow.json", stack=stack).edges.head()
        """
        body = json.loads(json.dumps(self.to_node_link(), allow_nan=False, default=str))
        record = {**body, "format": FLOW_GRAPH_FORMAT, "format_version": FLOW_GRAPH_VERSION,
                  "checksum": _node_link_checksum(body)}
        return write_text(Path(path), json.dumps(record, indent=1, allow_nan=False))

    save_json = save
    """The 0.2 name of :meth:`save` (kept as an alias)."""

    @classmethod
    def load(cls, path: str | Path, *, stack: Stack | Sequence[Any] | None = None) -> FlowGraph:
        """Read a graph written by :meth:`save` (every node and edge attribute it holds).

        Node-link JSON without a ``format`` key (written by ``save_json`` before 0.3) is read
        too, unchecked.

        Args:
            path: a file written by :meth:`save`.
            stack: optionally the SAEs the graph was made from (as for :func:`flow_graph`);
                every node's hook must be the hook of the stack's SAE at its layer and module.

        Raises:
            FlowGraphFileError: ``path`` is missing, not JSON, not a saved flow graph (another
                format, no ``nodes``/``links``), of a format version this release does not read,
                or its checksum does not match (modified or truncated). The message names the
                file.
            ProvenanceError: ``stack`` lacks a node's SAE or holds another hook there.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FlowGraphFileError(f"{path} is not a FlowGraph JSON file ({exc}); give a file "
                                     "written by FlowGraph.save.") from exc
        if not isinstance(data, dict) or not {"nodes", "links"} <= set(data):
            raise FlowGraphFileError(f"{path} is not a FlowGraph JSON file (it needs 'nodes' and "
                                     "'links'); write one with FlowGraph.save.")
        if "format" in data:
            if data["format"] != FLOW_GRAPH_FORMAT:
                raise FlowGraphFileError(f"{path} is not a FlowGraph JSON file: it says format "
                                         f"{data['format']!r}, expected {FLOW_GRAPH_FORMAT!r}.")
            got = data.get("format_version")
            if got != FLOW_GRAPH_VERSION:
                newer = isinstance(got, int) and got > FLOW_GRAPH_VERSION
                raise FlowGraphFileError(
                    f"{path} was saved in FlowGraph format version {got!r}, but this "
                    f"sae_match_lens reads version {FLOW_GRAPH_VERSION}; "
                    + ("upgrade sae_match_lens to read it." if newer else
                       "build the graph again with flow_graph and save it."))
            checksum = data.pop("checksum", None)
            del data["format"], data["format_version"]
            if _node_link_checksum(data) != checksum:
                raise FlowGraphFileError(f"{path}: checksum mismatch (the file was modified or "
                                         "truncated); build the graph again and save it.")
        else:
            logger.info("%s: node-link JSON without a format record (pre-0.3); read unchecked",
                        path)
        nodes = pd.DataFrame([{"node": n["id"], **{k: v for k, v in n.items() if k != "id"}}
                              for n in data["nodes"]],
                             columns=None if data["nodes"] else ["node", "layer", "module",
                                                                 "feature", "hook"])
        for column in ("neuronpedia_id", "neuronpedia_url"):  # unknown ids are not written
            nodes[column] = (nodes[column].astype(object).where(nodes[column].notna(), None)
                             if column in nodes.columns else None)
        edges = pd.DataFrame(data["links"], columns=None if data["links"] else
                             ["source", "target", "score", "confidence", "kind"])
        graph = cls(nodes, edges, dict(data.get("graph", {})))
        if stack is not None:
            graph.check_stack(stack, what=f"the flow graph in {path}")
        return graph

    @classmethod
    def load_json(cls, path: str | Path) -> FlowGraph:
        """The 0.2 name of :meth:`load` (kept as an alias)."""
        return cls.load(path)

    def check_stack(self, stack: Stack | Sequence[Any], *, what: str = "this flow graph") -> None:
        """Raise :class:`~sae_match_lens.permutation.ProvenanceError` unless every node's SAE is
        in ``stack`` at the node's layer and module, reading the node's hook."""
        layers = as_stack(stack)
        for row in self.nodes[["layer", "module", "hook"]].drop_duplicates().itertuples(index=False):
            here = layers.get(int(row.layer))
            sae = here.get(row.module) if here is not None else None
            if sae is None or hook_name_of(sae) != row.hook:
                found = "no SAE" if sae is None else describe_sae(sae)
                raise ProvenanceError(f"{what} has {row.module} nodes at layer {row.layer} read at "
                                      f"{row.hook}, but the stack given holds {found} there; pass "
                                      "the stack the graph was made from.")

    def save_graphml(self, path: str | Path) -> Path:
        """Write the graph as GraphML."""
        import networkx as nx

        path = Path(path)
        graph = self.to_networkx()
        graph.graph = {k: str(v) for k, v in graph.graph.items()}
        nx.write_graphml(graph, path)
        return path

    def figure(self, *, title: str | None = None) -> Any:
        """The layered picture :meth:`plot` saves, as a matplotlib ``Figure``.

        Model layers run left to right; in each layer the attention, MLP and residual nodes sit
        in the order the model computes them, attention above and MLP below the residual band
        (as in the HTML view, :mod:`~sae_match_lens.report.viewer`). Each edge is an arrow from source
        to target, its width growing with the link score (the legend's "score" entries give the
        scale: the score itself when every score lies in [0, 1], else scaled between the
        smallest and the largest); the seed is a large red-edged star.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D

        lane = {"attn": (-0.34, 1.0), "mlp": (-0.17, -1.0), "res": (0.0, 0.0)}  # (dx, band)
        names = {"res": "residual", "mlp": "MLP", "attn": "attention"}
        colours = {"res": "tab:blue", "mlp": "tab:orange", "attn": "tab:green"}
        seed = self.options.get("seed")
        pos = {}
        for (layer, module), group in self.nodes.groupby(["layer", "module"]):
            dx, band = lane[module]
            features = sorted(group.feature)
            for row in group.itertuples():
                j = features.index(row.feature)
                pos[row.node] = (layer + dx, band + (j - (len(features) - 1) / 2) * 0.25)
        scores = [float(v) for v in self.edges.score]
        lo, hi = (min(scores), max(scores)) if scores else (0.0, 1.0)
        unit = lo >= 0 and hi <= 1

        def strength(value: float) -> float:  # in [0, 1]
            if unit:
                return value
            return (value - lo) / (hi - lo) if hi > lo else 0.5

        def width(value: float) -> float:
            return 0.6 + 4.0 * strength(value)

        fig, ax = plt.subplots(figsize=(max(6, 1.3 * self.nodes.layer.nunique() + 3), 4.5))
        for row in self.edges.itertuples(index=False):
            ax.annotate("", xy=pos[row.target], xytext=pos[row.source], zorder=2,
                        arrowprops={"arrowstyle": "-|>", "color": colours[row.kind],
                                    "alpha": 0.7, "lw": width(float(row.score)),
                                    "shrinkA": 6, "shrinkB": 6, "mutation_scale": 12})
        for module in MODULES:
            group = self.nodes[self.nodes.module == module]
            if not len(group):
                continue
            xs, ys = zip(*(pos[n] for n in group.node), strict=True)
            ax.scatter(xs, ys, s=60, color=colours[module], zorder=3, label=names[module])
            below = module != "attn"  # clear of the arrows that come down from attention
            for node, x, y in zip(group.node, xs, ys, strict=True):
                ax.annotate(node.split("/")[-1], (x, y), textcoords="offset points",
                            xytext=(0, -13 if below else 7), ha="center", fontsize=7)
        if seed in pos:
            ax.scatter(*pos[seed], s=320, marker="*", color=colours["res"], edgecolors="tab:red",
                       linewidths=1.5, zorder=4, label=f"seed {seed}")
        handles, labels = ax.get_legend_handles_labels()
        values = ([0.25, 0.5, 0.75, 1.0] if unit else
                  [lo + (hi - lo) * q for q in (0.0, 1 / 3, 2 / 3, 1.0)])
        for value in values:
            handles.append(Line2D([], [], color="grey", lw=width(value)))
            labels.append(f"score {value:.2g}")
        ax.set_yticks([1.0, 0.0, -1.0], ["attention", "residual", "MLP"])
        ax.set_ylim(-1.7, 1.7)
        layers = sorted(self.nodes.layer.unique())
        ax.set_xticks(layers, [str(v) for v in layers])
        if layers:
            ax.set_xlim(min(layers) - 0.7, max(layers) + 0.5)
        ax.set_xlabel("model layer (arrows: source → target)")
        ax.set_title(title or f"feature flow from {seed} "
                     f"(edge width = {self.options.get('score')} score; labels = feature ids)",
                     fontsize=9)
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
                  title="nodes, edge width", title_fontsize=7)  # outside the axes
        fig.tight_layout()
        return fig

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Save :meth:`figure` as a PNG (layers left to right, attention above and MLP below the
        residual band, arrows source → target, width = score with its scale in the legend, the
        seed starred)."""
        import matplotlib.pyplot as plt

        fig = self.figure(title=title)
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def flow_graph(
    stack: Stack | Sequence[Any],
    seed: tuple[int, int],
    *,
    score: LinkScore = DEFAULT_LINK_SCORE,
    cut: float = 0.5,
    module_min: float = 0.15,
    max_layers: int | None = None,
    progress: bool = False,
    links_by_key: Mapping[FlowKey, Links] | None = None,
) -> FlowGraph:
    """The flow graph of residual feature ``seed = (layer, feature)``.

    Forward, each residual node links to its top-1 partner at the next layer; backward, to its
    top-1 predecessor at the previous layer; each direction stops at the first link scoring
    below ``cut`` (the uncut stretch is the similarity span). Every residual node also gets its
    top-1 MLP and attention predecessors at its own layer when they score ``≥ module_min``.

    Args:
        stack: ``{layer: LayerSAEs}`` or ``{layer: residual SAE}`` (model layer numbers).
        seed: ``(layer, feature)`` of the residual seed feature.
        score: the link score; ``cut`` and ``module_min`` are in its units (the defaults, 0.5
            and 0.15, are the paper's, for decoder cosine).
        max_layers: follow at most this many layers in each direction.
        progress: show progress bars.
        links_by_key: top-1 links already computed (e.g. by a batch run,
            :meth:`~sae_match_lens.batch.store.ResultStore.flow_graph`), by :data:`FlowKey`; they are
            used instead of computing them, and keys not in it are computed as without it. The
            stack is still needed (hooks, widths, Neuronpedia ids). Each link set used is checked
            first: ``k ≥ 1``, scored by ``score``, one row per source feature, targets within
            the target SAE, and, where it records SAE identities, source and target are the
            stack's SAEs at that key (hook, sizes, architecture, direction signature; links of
            the reverse direction are refused with a message saying how to reverse them,
            :func:`~sae_match_lens.permutation.check_direction`). Its other
            options are the caller's: ``null_rate`` cuts links (-1 ends the walk there), ``n_null``
            and ``seed`` change ``confidence``.

    Raises:
        KeyError: the seed layer is not in the stack.
        ValueError: the seed feature is out of range, or a link set of ``links_by_key`` does not
            fit its key (the message names the key; ``ProvenanceError`` for other SAEs' or
            reversed links).
        TypeError: a value of ``links_by_key`` is not a :class:`~sae_match_lens.flow.linking.Links`.

    Example:
        >>> graph = flow_graph({0: LayerSAEs(res0, mlp=mlp0), 1: LayerSAEs(res1)}, (1, 42))
        >>> graph.edges[["source", "target", "score", "kind"]]
        >>> known = {(0, 1, "res"): links(res0, res1, k=1, score="decoder_cosine")}
        >>> flow_graph({0: res0, 1: res1}, (0, 7), links_by_key=known)  # computes no links
    """
    layers = as_stack(stack)
    layer0, feature0 = seed
    if layer0 not in layers:
        raise KeyError(f"seed layer {layer0} has no SAEs; layers are {list(layers)}.")
    if not 0 <= feature0 < layers[layer0].res.cfg.d_sae:
        raise ValueError(f"seed feature {feature0} is out of range for "
                         f"{describe_sae(layers[layer0].res)}.")
    cache: dict[FlowKey, Links] = {}

    def link(a: Any, b: Any, key: FlowKey) -> Links:
        if key not in cache:
            if links_by_key is not None and key in links_by_key:
                cache[key] = _checked_links(links_by_key[key], key, a, b, score)
            else:
                if links_by_key is not None:
                    logger.info("flow graph: links %s are not among the given ones; computing them",
                                key)
                cache[key] = links(a, b, k=1, score=score, progress=progress)
        return cache[key]

    nodes: dict[str, dict[str, Any]] = {}
    edges: list[dict[str, Any]] = []

    def add(layer: int, module: str, feature: int, sae: Any) -> str:
        nid = FlowGraph.node_id(layer, module, feature)
        npid = neuronpedia_id(sae, registry=False)
        nodes.setdefault(nid, {"node": nid, "layer": layer, "module": module,
                               "feature": feature, "hook": hook_name_of(sae),
                               "neuronpedia_id": npid,
                               "neuronpedia_url": feature_url(npid, feature) if npid else None})
        return nid

    add(layer0, "res", feature0, layers[layer0].res)
    chain = [(layer0, feature0)]
    order = list(layers)
    i0 = order.index(layer0)
    limit = max_layers if max_layers is not None else len(order)
    for direction in (1, -1):
        i, feature = i0, feature0
        for _ in range(limit):
            j = i + direction
            if not 0 <= j < len(order) or order[j] != order[i] + direction:
                break
            here, there = order[i], order[j]
            # forward: the best partner at the next layer; backward: the best predecessor
            lk = link(layers[here].res, layers[there].res, (here, there, "res"))
            partner, s = int(lk.top1[feature]), float(lk.scores[feature, 0])
            c = float(lk.confidence[feature, 0])
            if partner < 0 or not s >= cut:
                break
            a = add(here, "res", feature, layers[here].res)
            b = add(there, "res", partner, layers[there].res)
            src, dst = (a, b) if direction == 1 else (b, a)
            edges.append({"source": src, "target": dst, "score": s, "confidence": c,
                          "kind": "res"})
            chain.append((there, partner))
            i, feature = j, partner
    for layer, feature in chain:
        for module in ("mlp", "attn"):
            sae = layers[layer].get(module)
            if sae is None:
                continue
            lk = link(layers[layer].res, sae, (layer, layer, module))  # res feature → module
            partner, s = int(lk.top1[feature]), float(lk.scores[feature, 0])
            if partner >= 0 and s >= module_min:
                src = add(layer, module, partner, sae)
                edges.append({"source": src, "target": FlowGraph.node_id(layer, "res", feature),
                              "score": s, "confidence": float(lk.confidence[feature, 0]),
                              "kind": module})
    options = {"seed": FlowGraph.node_id(layer0, "res", feature0), "score": score, "cut": cut,
               "module_min": module_min}
    node_frame = pd.DataFrame(list(nodes.values()),
                              columns=["node", "layer", "module", "feature", "hook",
                                       "neuronpedia_id", "neuronpedia_url"])
    edge_frame = pd.DataFrame(edges, columns=["source", "target", "score", "confidence", "kind"])
    return FlowGraph(node_frame.sort_values(["layer", "module"]).reset_index(drop=True),
                     edge_frame, options)


def _checked_links(lk: Any, key: FlowKey, source: Any, target: Any, score: str) -> Links:
    """``lk`` when it is top-1 links by ``score`` from ``source``'s features to ``target``'s
    (see :func:`flow_graph`'s ``links_by_key``); otherwise raise naming ``key``."""
    where = f"links_by_key[{key!r}] (links {describe_sae(source)} -> {describe_sae(target)})"
    if not isinstance(lk, Links):
        raise TypeError(f"{where} is a {type(lk).__name__}, not a Links.")
    if lk.indices.ndim != 2 or lk.k < 1:
        raise ValueError(f"{where} has indices of shape {tuple(lk.indices.shape)}; a flow graph "
                         "needs at least the top-1 link of every source feature (k >= 1).")
    if lk.score != score:
        raise ValueError(f"{where} was scored by {lk.score!r}, but this flow graph uses "
                         f"score={score!r}; pass links made with score={score!r} or leave the key "
                         "out to compute it.")
    n_source, n_target = int(source.cfg.d_sae), int(target.cfg.d_sae)
    if lk.indices.shape[0] != n_source:
        raise ValueError(f"{where} has {lk.indices.shape[0]} source features, but the source SAE "
                         f"has d_sae={n_source}.")
    recorded = (lk.target or {}).get("d_sae")
    if recorded is not None and int(recorded) != n_target:
        raise ValueError(f"{where} links into {recorded} target features, but the target SAE "
                         f"has d_sae={n_target}.")
    top = lk.indices[:, 0]
    if top.numel() and int(top.max()) >= n_target:
        raise ValueError(f"{where} links to target feature {int(top.max())}, but the target SAE "
                         f"has d_sae={n_target}.")
    check_direction(lk, source, target, what=where, here="the stack's")
    return lk


def persistence(
    stack: Stack | Sequence[Any],
    *,
    score: LinkScore = DEFAULT_LINK_SCORE,
    cut: float = 0.5,
    progress: bool = False,
) -> pd.DataFrame:
    """For every residual feature of every layer, how many consecutive layers its forward chain
    of top-1 links survives with score ``≥ cut`` (0: its first link is already cut).

    Returns:
        One row per (start layer, feature): ``layer``, ``feature``, ``survives``; a histogram per
        start layer is ``frame.groupby("layer").survives.value_counts()``.
    """
    layers = as_stack(stack)
    order = list(layers)
    steps = []
    for here, there in itertools.pairwise(order):
        if there != here + 1:
            steps.append(None)
            continue
        lk = links(layers[here].res, layers[there].res, k=1, score=score, progress=progress)
        ok = (lk.top1 >= 0) & (lk.scores[:, 0] >= cut)
        steps.append(torch.where(ok, lk.top1, torch.full_like(lk.top1, -1)))
    rows = []
    for i, layer in enumerate(order):
        n = layers[layer].res.cfg.d_sae
        current = torch.arange(n)
        survives = torch.zeros(n, dtype=torch.int64)
        alive = torch.ones(n, dtype=torch.bool)
        for step in steps[i:]:
            if step is None:
                break
            nxt = torch.where(alive, step[current.clamp(min=0)], torch.full_like(current, -1))
            alive = alive & (nxt >= 0)
            survives += alive.long()
            current = nxt
            if not bool(alive.any()):
                break
        rows.append(pd.DataFrame({"layer": layer, "feature": torch.arange(n).numpy(),
                                  "survives": survives.numpy()}))
    return pd.concat(rows, ignore_index=True)
