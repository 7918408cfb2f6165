"""An interactive, self-contained offline HTML view of a chain or a flow graph.

:func:`write_html` draws a :class:`~sae_match_lens.chain.ChainMatch` (or one
:class:`~sae_match_lens.matching.MatchResult` or :class:`~sae_match_lens.permutation.Permutation`,
drawn as a chain of two SAEs; SAEs across, features as
nodes, one horizontal path per traced feature, edge width falling with the link's match cost) or
a :class:`~sae_match_lens.flow.graph.FlowGraph` (model layers across; within a layer the attention,
MLP and residual nodes sit in sub-lanes in the order the model computes them, attention above
and MLP below the residual band; edge width growing with the link score). The figure is plotly;
its JavaScript is inlined (no CDN, no MathJax), so the file opens without any network request.

In the page: hovering a node shows its feature id, layer, module, hook, the scores/costs,
margins and confidences of its links, its top-activating tokens (when given) and its Neuronpedia
link (when known); clicking a node shows the same in the side panel, where the link is
clickable. Controls above the graph filter by layer range and by link strength (minimum score
for a flow graph, maximum cost for a chain: links that fail are hidden, and so are nodes left
with no passing link), and a search box highlights a feature id (``12``) or a node id
(``2:12`` for a chain, ``7/res/12`` for a flow graph).

Size caps (a 6-layer chain of 16k-feature SAEs has 16k paths and 98k nodes): a chain is split
into its disjoint paths (permutations are one-to-one, so each node has at most one predecessor
and one successor); they are ranked longest first, then by lowest mean link cost, and the first
``max_paths`` (:data:`DEFAULT_MAX_PATHS`) are in the page, fewer if they would exceed
``max_nodes`` (:data:`DEFAULT_MAX_NODES`). Of those, the page first shows the best
:data:`DEFAULT_SHOWN_PATHS` (a legible picture instead of a wall of a thousand nodes); the
"paths shown" box and its "all" button show more. A flow graph over ``max_nodes`` keeps the
seed and the nodes with the best link scores. Either cut is logged (what was kept out of how
many). A typical file is about 5 MB, almost all of it plotly.js.

Example:
    >>> chain = match_chain(saes)
    >>> write_html(chain, "chain.html", max_paths=50, neuronpedia=(
    ...     "https://www.neuronpedia.org/gpt2-small/{model_layer}-res-jb/{feature}"))
    >>> write_html(flow_graph(stack, (12, 345)), "flow.html")
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from ..adapters import hook_name_of, layers_from_hooks
from ..atomicio import write_text
from ..chain import ChainMatch
from ..flow.graph import MODULES, FlowGraph, LayerSAEs
from ..matching import MatchResult
from ..metrics import fires, record_states, scored_activations, token_batches
from ..permutation import Permutation
from ..progress import progress_bar

__all__ = ["DEFAULT_MAX_NODES", "DEFAULT_MAX_PATHS", "DEFAULT_SHOWN_PATHS",
           "top_activating_tokens", "write_html"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PATHS = 200
"""Paths of a chain drawn by default (longest first, then lowest mean link cost)."""
DEFAULT_MAX_NODES = 3000
"""Nodes drawn at most by default (plotly draws one SVG element per node)."""
DEFAULT_SHOWN_PATHS = 25
"""Paths of a chain the page shows when it opens (the best first; a control shows the rest of
the ``max_paths`` in the page): 150 nodes for a chain of six SAEs instead of 1,200."""

_COLOURS = {"feature": "#1f77b4", "res": "#1f77b4", "mlp": "#ff7f0e", "attn": "#2ca02c"}
_MODULE_NAMES = {"res": "residual", "mlp": "MLP", "attn": "attention"}
_LANE = {"attn": (-0.34, 1.0), "mlp": (-0.17, -1.0), "res": (0.0, 0.0)}  # (x offset, y band)
_WIDTH_BINS = 6
_MAX_HOVER_TOKENS = 5

Key = tuple[Any, ...]
TopTokens = Mapping[Key, Sequence[str]] | Callable[[list[Key]], Mapping[Key, Sequence[str]]]
Neuronpedia = str | Mapping[Key, str] | Callable[[Key], str | None]


class _Chain(NamedTuple):
    """A chain's links as plain arrays (from a ChainMatch, or from a saved chain directory)."""

    hook_names: list[str]
    layers: list[int]
    widths: list[int]
    indices: list[torch.Tensor]
    costs: list[torch.Tensor | None]
    margins: list[torch.Tensor | None]
    urls: dict[Key, str]
    confidences: list[torch.Tensor | None] | None = None
    """Each step's :attr:`MatchResult.confidence_F` (``None`` where it has none)."""


class _View(NamedTuple):
    """What the page draws: nodes, edges (row positions into ``nodes``) and the filter."""

    nodes: pd.DataFrame
    edges: pd.DataFrame
    kind: str
    title: str
    notes: list[str]
    ticks: tuple[list[float], list[str]]


def _model_layer(hook: str) -> int | None:
    found = re.match(r"blocks\.(\d+)\.", hook)
    return int(found.group(1)) if found else None


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- reading the inputs -----------------------------------------------------------------------
def _chain_from_match(chain: ChainMatch) -> _Chain:
    urls: dict[Key, str] = {}
    edges = chain.edges()
    for side, layer_col in (("a", "layer_a"), ("b", "layer_b")):
        column = f"neuronpedia_url_{side}"
        if column in edges.columns:
            for layer, feature, url in zip(edges[layer_col], edges[f"feature_{side}"], edges[column],
                                           strict=True):
                if isinstance(url, str) and url:
                    urls[(int(layer), int(feature))] = url
    widths = [chain.width(layer) for layer in chain.layers]
    return _Chain(list(chain.hook_names), list(chain.layers), widths,
                  [s.permutation.indices for s in chain.steps],
                  [s.cost_F.double() for s in chain.steps], [s.margin_F.double() for s in chain.steps],
                  urls, [s.confidence_F for s in chain.steps])


def _chain_from_result(result: MatchResult | Permutation) -> _Chain:
    """One match (a result, or a bare permutation: no costs) as a chain of two SAEs."""
    perm = result.permutation if isinstance(result, MatchResult) else result
    hooks = [(perm.source or {}).get("hook_name") or "source SAE",
             (perm.target or {}).get("hook_name") or "target SAE"]
    layers = [_model_layer(h) for h in hooks]
    if None in layers or layers[0] == layers[1]:
        layers = [0, 1]
    costs: list[torch.Tensor | None] = [None]
    margins: list[torch.Tensor | None] = [None]
    confidences: list[torch.Tensor | None] = [None]
    if isinstance(result, MatchResult):
        costs, margins = [result.cost_F.double()], [result.margin_F.double()]
        confidences = [result.confidence_F]
    return _Chain(hooks, layers, [perm.n_source, perm.n_target], [perm.indices], costs, margins, {},
                  confidences)


def _chain_from_directory(directory: Path) -> _Chain:
    if (directory / "result.json").is_file() and not (directory / "chain.json").is_file():
        return _chain_from_result(MatchResult.load(directory))
    if not (directory / "chain.json").is_file():
        old = " (step_NNN.safetensors files of an older release: match the chain again)" if any(
            directory.glob("step_*.safetensors")) else ""
        raise ValueError(f"{directory} holds no chain.json{old}; give a directory written by "
                         "ChainMatch.save or MatchResult.save, a permutation .safetensors file "
                         "or a FlowGraph JSON file written by FlowGraph.save_json.")
    return _chain_from_match(ChainMatch.load(directory))


def _load_flow(path: Path) -> FlowGraph:
    try:
        return FlowGraph.load_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a FlowGraph JSON file ({exc}); give a file written by "
                         "FlowGraph.save_json or a directory written by ChainMatch.save.") from None


# -- chains -----------------------------------------------------------------------------------
def _chain_view(data: _Chain, *, max_paths: int, max_nodes: int, max_cost: float | None,
                features: Iterable[int | tuple[int, int]] | None) -> _View:
    n_layers = len(data.hook_names)
    position = {layer: i for i, layer in enumerate(data.layers)}
    nxt = []
    for idx, cost in zip(data.indices, data.costs, strict=True):
        ok = idx >= 0
        if max_cost is not None and cost is not None:
            ok = ok & (cost <= max_cost)
        nxt.append(torch.where(ok, idx, torch.full_like(idx, -1)))
    if features is None:
        heads = [(0, torch.arange(data.widths[0]))]
        for layer in range(1, n_layers):
            reached = torch.zeros(data.widths[layer], dtype=torch.bool)
            step = nxt[layer - 1]
            reached[step[step >= 0]] = True
            heads.append((layer, torch.nonzero(~reached).flatten()))
    else:
        starts: dict[int, list[int]] = {}
        for item in features:
            model_layer, feature = (data.layers[0], item) if isinstance(item, int) else item
            layer = position.get(model_layer, -1)
            if layer < 0 or not 0 <= feature < data.widths[layer]:
                raise ValueError(f"features: ({model_layer}, {feature}) is not a feature of the "
                                 f"chain (model layers {data.layers}, widths {data.widths}).")
            starts.setdefault(layer, []).append(feature)
        heads = [(layer, torch.tensor(sorted(set(fs)))) for layer, fs in sorted(starts.items())]
    start_layer, start_feature, length, mean_cost = [], [], [], []
    for layer, cur in heads:
        alive = torch.ones(len(cur), dtype=torch.bool)
        n_links = torch.zeros(len(cur), dtype=torch.int64)
        total = torch.zeros(len(cur), dtype=torch.float64)
        at = cur.clone()
        for step in range(layer, n_layers - 1):
            to = torch.where(alive, nxt[step][at.clamp(min=0)], torch.full_like(at, -1))
            alive = alive & (to >= 0)
            n_links += alive.long()
            if data.costs[step] is not None:
                total += torch.where(alive, data.costs[step][at.clamp(min=0)], 0.0)
            at = to
        start_layer.append(torch.full((len(cur),), layer))
        start_feature.append(cur)
        length.append(n_links)
        known = all(c is not None for c in data.costs)
        mean_cost.append(total / n_links.clamp(min=1) if known else torch.full((len(cur),), math.nan))
    s_layer, s_feature = torch.cat(start_layer).numpy(), torch.cat(start_feature).numpy()
    n_links, mean = torch.cat(length).numpy(), torch.cat(mean_cost).numpy()
    order = np.lexsort((s_feature, s_layer, np.where(np.isnan(mean), np.inf, mean), -n_links))
    chosen, n_nodes = [], 0
    for i in order[:max_paths]:
        if n_nodes + n_links[i] + 1 > max_nodes:
            break
        chosen.append(i)
        n_nodes += int(n_links[i]) + 1
    if len(chosen) < len(order):
        logger.info("chain view: kept %d of %d paths (%d nodes; longest first, then lowest mean "
                    "link cost; max_paths=%d, max_nodes=%d)", len(chosen), len(order), n_nodes,
                    max_paths, max_nodes)
    rows, edges = [], []
    for rank, i in enumerate(chosen):
        layer, feature = int(s_layer[i]), int(s_feature[i])
        path_rows = [len(rows)]
        rows.append({"layer": layer, "feature": feature, "path": rank})
        for step in range(layer, layer + int(n_links[i])):
            to = int(nxt[step][feature])
            cost = float(data.costs[step][feature]) if data.costs[step] is not None else math.nan
            margin = (float(data.margins[step][feature]) if data.margins[step] is not None
                      else math.nan)
            known = data.confidences[step] if data.confidences is not None else None
            confidence = float(known[feature]) if known is not None else math.nan
            edges.append({"src": len(rows) - 1, "dst": len(rows), "value": cost, "cost": cost,
                          "margin": margin, "confidence": confidence, "kind": "feature"})
            rows.append({"layer": step + 1, "feature": to, "path": rank})
            path_rows.append(len(rows) - 1)
            feature = to
        for r in path_rows:
            rows[r].update(path_links=int(n_links[i]), path_mean_cost=float(mean[i]),
                           path_start=f"{data.layers[layer]}:{int(s_feature[i])}")
    nodes = pd.DataFrame(rows, columns=["layer", "feature", "path", "path_links", "path_mean_cost",
                                        "path_start"])
    nodes["module"] = "feature"
    nodes["hook"] = [data.hook_names[v] for v in nodes.layer]
    nodes["x"] = nodes.layer.astype(float)  # evenly spaced SAEs, labelled with model layers
    nodes["layer"] = [data.layers[v] for v in nodes.layer]
    nodes["id"] = [f"{a}:{b}" for a, b in zip(nodes.layer, nodes.feature, strict=True)]
    nodes["key"] = list(zip(nodes.layer, nodes.feature, strict=True))
    nodes["y"] = -nodes.path.astype(float)
    nodes["symbol"] = "circle"
    nodes["url"] = [data.urls.get(k) for k in nodes.key]
    edge_frame = pd.DataFrame(edges, columns=["src", "dst", "value", "cost", "margin",
                                              "confidence", "kind"])
    info = []
    for row in nodes.itertuples():
        lines = [("layer", f"{row.layer} ({row.hook})"),
                 ("path", f"#{row.path + 1} from {row.path_start}: {row.path_links} links, mean "
                          f"cost {_fmt(row.path_mean_cost)}")]
        info.append(lines)
    feature_of = nodes.feature.tolist()
    for edge in edge_frame.itertuples():
        text = (f"cost {_fmt(edge.cost)}, margin {_fmt(edge.margin)}, confidence "
                f"{_fmt(edge.confidence)}")
        info[edge.src].append(("link out", f"to feature {feature_of[edge.dst]}: {text}"))
        info[edge.dst].append(("link in", f"from feature {feature_of[edge.src]}: {text}"))
    nodes["details"] = info
    notes = []
    if any(c is None for c in data.costs):
        notes.append("Link costs and margins are unknown for this chain.")
    title = (f"SAE Match chain: {n_layers} SAEs ({data.hook_names[0]} → {data.hook_names[-1]}); "
             f"{len(chosen)} of {len(order)} paths")
    ticks = (list(range(n_layers)), [f"{layer}<br>{html.escape(h)}"
                                     for layer, h in zip(data.layers, data.hook_names, strict=True)])
    return _View(nodes, edge_frame, "chain", title, notes, ticks)


# -- flow graphs ------------------------------------------------------------------------------
def _flow_view(graph: FlowGraph, *, max_nodes: int) -> _View:
    nodes = graph.nodes.reset_index(drop=True).copy()
    seed = graph.options.get("seed")
    edges = graph.edges.reset_index(drop=True)
    if len(nodes) > max_nodes:
        best = pd.concat([edges[["source", "score"]].rename(columns={"source": "node"}),
                          edges[["target", "score"]].rename(columns={"target": "node"})])
        best = best.groupby("node").score.max()
        rank = nodes.node.map(best).fillna(-math.inf).to_numpy()
        rank = np.where(nodes.node.to_numpy() == seed, math.inf, rank)
        keep = np.sort(np.argsort(-rank, kind="stable")[:max_nodes])
        logger.info("flow view: kept %d of %d nodes (the seed and the best link scores; "
                    "max_nodes=%d)", len(keep), len(nodes), max_nodes)
        nodes = nodes.iloc[keep].reset_index(drop=True)
    position = {n: i for i, n in enumerate(nodes.node)}
    edges = edges[edges.source.isin(position) & edges.target.isin(position)].reset_index(drop=True)
    xs, ys = np.zeros(len(nodes)), np.zeros(len(nodes))
    for (_, module), group in nodes.groupby(["layer", "module"]):
        dx, band = _LANE[module]
        order = group.sort_values("feature").index
        for j, i in enumerate(order):
            xs[i] = nodes.layer[i] + dx
            ys[i] = band + (j - (len(order) - 1) / 2) * 0.3 / max(1, len(order) - 1) ** 0.5
    nodes["x"], nodes["y"] = xs, ys
    nodes["id"] = nodes.node
    nodes["key"] = list(zip(nodes.layer.astype(int), nodes.module, nodes.feature.astype(int),
                            strict=True))
    nodes["symbol"] = ["star" if n == seed else "circle" for n in nodes.node]
    nodes["url"] = nodes["neuronpedia_url"] if "neuronpedia_url" in nodes.columns else None
    base = {"node", "layer", "module", "feature", "hook", "x", "y", "id", "key", "symbol", "url",
            "neuronpedia_url", "neuronpedia_id"}
    extra = [c for c in graph.nodes.columns if c not in base]
    info = []
    for row in nodes.to_dict("records"):
        lines = [("layer", f"{row['layer']} ({row['hook']})"),
                 ("module", _MODULE_NAMES.get(row["module"], row["module"]))]
        if row["node"] == seed:
            lines.append(("seed", "yes"))
        lines += [(c, _fmt(row[c])) for c in extra]
        info.append(lines)
    frame = pd.DataFrame({"src": edges.source.map(position), "dst": edges.target.map(position),
                          "value": edges.score.astype(float), "kind": edges.kind})
    for e, src, dst in zip(edges.itertuples(), frame.src, frame.dst, strict=True):
        text = f"score {_fmt(float(e.score))}, confidence {_fmt(float(e.confidence))} ({e.kind})"
        info[src].append(("link out", f"to {e.target}: {text}"))
        info[dst].append(("link in", f"from {e.source}: {text}"))
    nodes["details"] = info
    title = (f"Feature flow from {seed} (edge width = {graph.options.get('score', 'link')} score; "
             f"{len(nodes)} nodes)")
    layers = sorted(int(v) for v in nodes.layer.unique())
    return _View(nodes, frame, "flow", title, [], (layers, [str(v) for v in layers]))


# -- decorations: tokens and links ------------------------------------------------------------
def _check_key(key: Any, kind: str) -> Key:
    want = 2 if kind == "chain" else 3
    if not isinstance(key, tuple) or len(key) != want:
        form = "(layer, feature)" if kind == "chain" else "(layer, module, feature)"
        raise TypeError(f"top_tokens keys for a {kind} are {form} tuples, got {key!r}.")
    return key


def _decorate(view: _View, top_tokens: TopTokens | None, neuronpedia: Neuronpedia | None) -> None:
    nodes = view.nodes
    keys = list(nodes.key)
    tokens: dict[Key, list[str]] = {}
    if top_tokens is not None:
        given = top_tokens(keys) if callable(top_tokens) else top_tokens
        if not isinstance(given, Mapping):
            raise TypeError(f"top_tokens must be a mapping key -> list of strings (or a callable "
                            f"returning one), got {type(given).__name__}.")
        for key, values in given.items():
            _check_key(key, view.kind)
            if isinstance(values, str) or not all(isinstance(v, str) for v in values):
                raise TypeError(f"top_tokens[{key!r}] must be a list of strings, got {values!r}.")
            tokens[key] = list(values)
        logger.info("top tokens for %d of %d shown nodes", sum(k in tokens for k in keys), len(keys))
    urls = list(nodes.url) if "url" in nodes.columns else [None] * len(nodes)
    if neuronpedia is not None:
        for i, row in enumerate(nodes.itertuples()):
            fields = {"layer": row.layer, "feature": row.feature, "hook": row.hook,
                      "module": "res" if row.module == "feature" else row.module,
                      "model_layer": _model_layer(row.hook)
                      if _model_layer(row.hook) is not None else row.layer}
            if isinstance(neuronpedia, str):
                urls[i] = neuronpedia.format(**fields)
            elif isinstance(neuronpedia, Mapping):
                urls[i] = neuronpedia.get(row.key)
            else:
                urls[i] = neuronpedia(row.key)
    for i, url in enumerate(urls):
        if url is None or (isinstance(url, float) and math.isnan(url)):
            urls[i] = None
        elif not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ValueError(f"the Neuronpedia link of node {nodes.id[i]} must be an http(s) URL, "
                             f"got {url!r}.")
    nodes["url"] = pd.Series(urls, index=nodes.index, dtype=object)
    nodes["tokens"] = [tokens.get(k, []) for k in keys]
    hover = []
    for row in nodes.itertuples():
        head = (f"<b>feature {row.feature}</b>" if view.kind == "chain" else
                f"<b>{html.escape(row.id)}</b> (feature {row.feature})")
        lines = [head] + [f"{html.escape(k)}: {html.escape(v)}" for k, v in row.details]
        if row.tokens:
            shown = ", ".join(html.escape(t) for t in row.tokens[:_MAX_HOVER_TOKENS])
            lines.append(f"top tokens: {shown}")
        lines.append("Neuronpedia: " + ("click the node for the link" if isinstance(row.url, str)
                                         else "unknown"))
        hover.append("<br>".join(lines))
    nodes["hover"] = hover


# -- the figure and the page ------------------------------------------------------------------
def _strength(view: _View) -> np.ndarray:
    """Each edge's strength in [0, 1] (its width): for a flow the score itself when every score
    lies in [0, 1] (decoder cosine), else min-max scaled; for a chain ``1 − cost / max cost``."""
    value = view.edges.value.to_numpy(dtype=float)
    ok = ~np.isnan(value)
    if not ok.any():
        return np.full(len(value), 0.5)
    lo, hi = value[ok].min(), value[ok].max()
    if view.kind == "chain":
        s = 1.0 - value / hi if hi > 0 else np.ones(len(value))
    elif lo >= 0 and hi <= 1:
        s = value
    else:
        s = (value - lo) / (hi - lo) if hi > lo else np.full(len(value), 0.5)
    return np.where(ok, np.clip(s, 0.0, 1.0), 0.5)


def _figure(view: _View) -> tuple[Any, dict[str, Any]]:
    import plotly.graph_objects as go

    nodes, edges = view.nodes, view.edges.copy()
    edges["bin"] = np.rint(_strength(view) * (_WIDTH_BINS - 1)).astype(int)
    fig = go.Figure()
    node_x, node_y = nodes.x.tolist(), nodes.y.tolist()
    chain = view.kind == "chain"
    n_paths = int(nodes.path.max()) + 1 if chain and len(nodes) else 0
    shown_paths = min(DEFAULT_SHOWN_PATHS, n_paths)
    # the figure as it opens: a chain's first paths only (the page's control shows the rest)
    opening = (nodes.path < shown_paths).to_numpy() if chain else np.ones(len(nodes), dtype=bool)
    edge_trace = np.zeros(len(edges), dtype=int)
    for (kind, b), group in edges.groupby(["kind", "bin"]):
        x, y = [], []
        for s, d in zip(group.src, group.dst, strict=True):
            if not opening[s]:
                continue
            x += [node_x[s], node_x[d], None]
            y += [node_y[s], node_y[d], None]
        edge_trace[group.index] = len(fig.data)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", hoverinfo="skip", showlegend=False,
                                 uid=f"edges-{kind}-{b}", opacity=0.6,
                                 line={"width": 1 + 5 * b / (_WIDTH_BINS - 1),
                                       "color": _COLOURS[kind]}))
    labels = len(nodes) <= 300
    node_traces = {}
    groups = ["feature"] if view.kind == "chain" else [m for m in MODULES if (nodes.module == m).any()]
    for group in groups:
        part = nodes[(nodes.module == group).to_numpy() & opening]
        node_traces[group] = len(fig.data)
        fig.add_trace(go.Scatter(
            x=part.x.tolist(), y=part.y.tolist(), mode="markers+text" if labels else "markers",
            text=[str(f) for f in part.feature] if labels else None,
            textposition="middle right" if view.kind == "chain" else "top center",
            textfont={"size": 9}, hovertext=part.hover.tolist(), hoverinfo="text",
            customdata=part.index.tolist(), uid=f"nodes-{group}",
            name=_MODULE_NAMES.get(group, "feature") if view.kind == "flow" else "feature",
            marker={"size": 10, "color": _COLOURS[group], "symbol": part.symbol.tolist(),
                    "line": {"width": 1, "color": "white"}}))
    highlight = len(fig.data)
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", hoverinfo="skip", uid="highlight",
                             name="search match", marker={"size": 20, "symbol": "circle-open",
                                                          "color": "#d62728", "line": {"width": 3}}))
    bands = {} if chain else {"attention": 1.0, "residual": 0.0, "MLP": -1.0}
    n_rows = n_paths if chain and len(nodes) else 3
    fig.update_layout(
        title={"text": html.escape(view.title), "font": {"size": 14}}, hovermode="closest",
        template="plotly_white", height=int(min(1100, max(450, 16 * n_rows + 200))),
        margin={"l": 60, "r": 20, "t": 60, "b": 90}, legend={"orientation": "h", "y": 1.02},
        xaxis={"tickvals": view.ticks[0], "ticktext": view.ticks[1], "zeroline": False,
               "title": "model layer (one SAE each)" if chain else "model layer"},
        yaxis={"showticklabels": not chain, "zeroline": False, "showgrid": not chain,
               "tickvals": list(bands.values()), "ticktext": list(bands),
               "range": None if chain else [-1.6, 1.6],
               "title": "path (best first)" if chain else ""})
    value = edges.value.to_numpy(dtype=float)
    known = value[~np.isnan(value)]
    data = {
        "kind": view.kind,
        "nodes": {"x": nodes.x.tolist(), "y": nodes.y.tolist(), "layer": nodes.layer.astype(int).tolist(),
                  "feature": nodes.feature.astype(int).tolist(), "id": nodes.id.tolist(),
                  "group": nodes.module.tolist(), "hover": nodes.hover.tolist(),
                  "symbol": nodes.symbol.tolist(),
                  "url": [u if isinstance(u, str) else None for u in nodes.url],
                  "info": [list(map(list, i)) for i in nodes["details"]], "tokens": nodes.tokens.tolist(),
                  "label": [str(f) for f in nodes.feature] if labels else None,
                  "path": nodes.path.astype(int).tolist() if chain else None},
        "edges": {"src": edges.src.astype(int).tolist(), "dst": edges.dst.astype(int).tolist(),
                  "value": [None if math.isnan(v) else v for v in value],
                  "trace": edge_trace.tolist()},
        "nodeTraces": node_traces, "highlight": highlight,
        "filter": {"label": "maximum link cost" if chain else "minimum link score",
                   "sense": "max" if chain else "min",
                   "lo": float(known.min()) if len(known) else None,
                   "hi": float(known.max()) if len(known) else None},
        "layers": sorted(int(v) for v in nodes.layer.unique()),
        "paths": {"total": n_paths, "shown": shown_paths} if chain else None,
    }
    return fig, data


_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222}
#sae-match-controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;padding:8px 12px;
 background:#f4f6f8;border-bottom:1px solid #ddd;font-size:14px}
#sae-match-main{display:flex}#sae-match-plot{flex:1;min-width:0}
#sae-match-panel{order:2;width:320px;flex:none;padding:10px 14px;border-left:1px solid #ddd;font-size:13px;
 overflow-wrap:anywhere}#sae-match-panel h3{margin:4px 0 8px}#sae-match-panel li{margin:2px 0}
.sae-match-note{color:#8a5a00;font-size:13px;padding:4px 12px}
"""

_JS = r"""
const gd = document.getElementById('{plot_id}');
const V = JSON.parse(document.getElementById('sae-match-data').textContent);
const N = V.nodes, E = V.edges, F = V.filter, $ = (id) => document.getElementById(id);
const lo = $('sae-match-layer-lo'), hi = $('sae-match-layer-hi'), thr = $('sae-match-threshold');
const thrBox = $('sae-match-threshold-value'), search = $('sae-match-search');
const pathsBox = $('sae-match-paths'), P = V.paths;
if (P) { pathsBox.min = 1; pathsBox.max = Math.max(1, P.total); pathsBox.value = P.shown; }
let matches = [];
V.layers.forEach((l, i) => {
  lo.add(new Option(String(l), String(l), i === 0, i === 0));
  hi.add(new Option(String(l), String(l), i === V.layers.length - 1, i === V.layers.length - 1));
});
// the slider moves in 200 steps from F.lo to F.hi; the number box holds the exact threshold
thr.min = 0; thr.max = 200; thr.step = 1; thr.value = F.sense === 'min' ? 0 : 200;
if (F.lo === null) { thr.disabled = thrBox.disabled = true; thrBox.placeholder = 'not saved'; }
else thrBox.value = String(F.sense === 'min' ? F.lo : F.hi);
function fromSlider() {
  const k = Number(thr.value);
  thrBox.value = String(k === 0 ? F.lo : k === 200 ? F.hi : F.lo + (F.hi - F.lo) * k / 200);
  render();
}
const degree = new Array(N.x.length).fill(0);
E.src.forEach((s, i) => { degree[s]++; degree[E.dst[i]]++; });
function visible() {
  const a = Number(lo.value), b = Number(hi.value), t = Number(thrBox.value);
  const off = thrBox.disabled || thrBox.value.trim() === '' || Number.isNaN(t);
  const pass = E.value.map((v) => off || v === null ||
                               (F.sense === 'min' ? v >= t : v <= t));
  const strong = new Array(N.x.length).fill(false);
  pass.forEach((p, i) => { if (p) { strong[E.src[i]] = true; strong[E.dst[i]] = true; } });
  const most = P ? Number(pathsBox.value) || P.total : Infinity;
  const node = N.layer.map((l, i) => l >= a && l <= b && (degree[i] === 0 || strong[i]) &&
                                     (!P || N.path[i] < most));
  const edge = pass.map((p, i) => p && node[E.src[i]] && node[E.dst[i]]);
  return {node, edge};
}
function render() {
  const vis = visible(), upd = {x: [], y: [], hovertext: [], customdata: [], text: [],
                               'marker.symbol': []}, idx = [];
  for (const [group, t] of Object.entries(V.nodeTraces)) {
    const keep = N.x.map((_, i) => i).filter((i) => vis.node[i] && N.group[i] === group);
    upd.x.push(keep.map((i) => N.x[i])); upd.y.push(keep.map((i) => N.y[i]));
    upd.hovertext.push(keep.map((i) => N.hover[i])); upd.customdata.push(keep);
    upd.text.push(N.label ? keep.map((i) => N.label[i]) : null);
    upd['marker.symbol'].push(keep.map((i) => N.symbol[i])); idx.push(t);
  }
  const lines = {};
  E.src.forEach((s, i) => {
    const t = E.trace[i], d = E.dst[i];
    lines[t] = lines[t] || {x: [], y: []};
    if (vis.edge[i]) { lines[t].x.push(N.x[s], N.x[d], null); lines[t].y.push(N.y[s], N.y[d], null); }
  });
  const ex = {x: [], y: []}, eidx = [];
  for (const [t, l] of Object.entries(lines)) { ex.x.push(l.x); ex.y.push(l.y); eidx.push(Number(t)); }
  const shown = matches.filter((i) => vis.node[i]);
  Plotly.restyle(gd, upd, idx);
  if (eidx.length) Plotly.restyle(gd, ex, eidx);
  Plotly.restyle(gd, {x: [shown.map((i) => N.x[i])], y: [shown.map((i) => N.y[i])]}, [V.highlight]);
  const n = vis.node.filter(Boolean).length, m = vis.edge.filter(Boolean).length;
  $('sae-match-count').textContent = `showing ${n} of ${N.x.length} nodes, ${m} of ${E.src.length} links`;
  return vis;
}
function show(i) {
  const panel = $('sae-match-panel'); panel.replaceChildren();
  const h = document.createElement('h3'); h.textContent = V.kind === 'chain' ?
    `feature ${N.feature[i]} (${N.id[i]})` : `${N.id[i]} (feature ${N.feature[i]})`;
  const ul = document.createElement('ul');
  N.info[i].forEach(([k, v]) => { const li = document.createElement('li');
    li.textContent = `${k}: ${v}`; ul.appendChild(li); });
  panel.append(h, ul);
  const p = document.createElement('p');
  if (N.url[i]) { const a = document.createElement('a'); a.href = N.url[i]; a.target = '_blank';
    a.rel = 'noopener noreferrer'; a.textContent = 'open on Neuronpedia'; a.id = 'sae-match-link';
    p.appendChild(a); }
  else p.textContent = 'Neuronpedia link: unknown (pass neuronpedia= to write_html).';
  panel.appendChild(p);
  if (N.tokens[i].length) { const t = document.createElement('p'); t.textContent = 'Top-activating tokens:';
    const ol = document.createElement('ol'); N.tokens[i].forEach((s) => {
      const li = document.createElement('li'); li.textContent = s; ol.appendChild(li); });
    panel.append(t, ol); }
}
function find() {
  const q = search.value.trim(), status = $('sae-match-search-status');
  matches = q === '' ? [] : N.id.map((_, i) => i).filter((i) =>
    (/^\d+$/.test(q) && N.feature[i] === Number(q)) || N.id[i] === q);
  const vis = render(), hidden = matches.filter((i) => !vis.node[i]).length;
  if (q === '') status.textContent = '';
  else if (!matches.length) status.textContent = `no node matches ${q}`;
  else { status.textContent = `${matches.length} node(s) match` +
           (hidden ? `, ${hidden} hidden by the filters` : '');
         show(matches.find((i) => vis.node[i]) ?? matches[0]); }
}
[lo, hi].forEach((el) => el.addEventListener('change', render));
thr.addEventListener('input', fromSlider);
thrBox.addEventListener('input', render);
search.addEventListener('input', find);
if (P) { pathsBox.addEventListener('input', render);
         $('sae-match-all').addEventListener('click', () => { pathsBox.value = P.total; render(); }); }
gd.on('plotly_click', (ev) => { const p = ev.points[0];
  if (Object.values(V.nodeTraces).includes(p.curveNumber)) show(p.customdata); });
render();
gd.setAttribute('data-sae-match-ready', '1');
"""


_SCRIPT_UNSAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                                "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _script_json(data: Any) -> str:
    """``data`` as JSON that is safe inside an HTML ``<script>`` element: every ``<``, ``>``,
    ``&``, U+2028 and U+2029 is written as a ``\\uXXXX`` escape, so no string in it (a token
    such as ``</script>`` or ``<!--<script>``) can end the element or open a comment. The JSON
    value is unchanged (``json.loads`` reads the same data back).
    """
    return json.dumps(data, allow_nan=False).translate(_SCRIPT_UNSAFE)


def _page(fig: Any, data: dict[str, Any], view: _View, title: str) -> str:
    plot = fig.to_html(full_html=False, include_plotlyjs=True, include_mathjax=False,
                       div_id="sae-match-graph", post_script=_JS,
                       config={"displaylogo": False, "responsive": True, "showSendToCloud": False})
    payload = _script_json(data)
    notes = "".join(f'<div class="sae-match-note">{html.escape(n)}</div>' for n in view.notes)
    search_hint = "feature id or 2:15" if view.kind == "chain" else "feature id or 7/res/15"
    paths = data.get("paths")
    paths_control = "" if not paths else (
        f'<label>paths shown <input type="number" id="sae-match-paths" step="1" '
        f'style="width:5em"> of {paths["total"]} <button type="button" id="sae-match-all">all'
        f'</button></label>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<div id="sae-match-controls">
<label>layers <select id="sae-match-layer-lo"></select> to <select id="sae-match-layer-hi"></select></label>
<label>{data['filter']['label']} <input type="range" id="sae-match-threshold">
<input type="number" step="any" id="sae-match-threshold-value" style="width:7em"></label>
<label>search <input type="search" id="sae-match-search" placeholder="{search_hint}"></label>
{paths_control}
<span id="sae-match-search-status"></span><span id="sae-match-count"></span></div>
{notes}
<script type="application/json" id="sae-match-data">{payload}</script>
<div id="sae-match-main">
<div id="sae-match-panel"><h3>Details</h3><p>Click a node (or search a feature id) to see its
links, top-activating tokens and Neuronpedia link here.</p></div>
<div id="sae-match-plot">{plot}</div></div>
</body></html>
"""


def write_html(
    result: ChainMatch | MatchResult | Permutation | FlowGraph | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    top_tokens: TopTokens | None = None,
    neuronpedia: Neuronpedia | None = None,
    title: str | None = None,
    max_paths: int = DEFAULT_MAX_PATHS,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_cost: float | None = None,
    features: Iterable[int | tuple[int, int]] | None = None,
) -> Path:
    """Write one self-contained offline HTML page that shows a chain or a flow graph.

    The file is written to a temporary file beside ``path`` and moved into place, so a failed
    run leaves an existing file untouched.

    Args:
        result: a :class:`~sae_match_lens.chain.ChainMatch`, a
            :class:`~sae_match_lens.matching.MatchResult` or
            :class:`~sae_match_lens.permutation.Permutation` (a chain of two SAEs), a
            :class:`~sae_match_lens.flow.graph.FlowGraph`, a directory written by
            :meth:`ChainMatch.save` or :meth:`MatchResult.save`, a permutation
            ``.safetensors`` file, or a JSON file written by :meth:`FlowGraph.save_json`.
        path: the HTML file to write.
        top_tokens: top-activating tokens per node, a mapping ``(layer, feature)`` (chain: the
            SAE's model layer) or ``(layer, module, feature)`` (flow) → list of strings, or a
            callable that takes the shown nodes' keys and returns such a mapping (e.g.
            ``functools.partial(top_activating_tokens, model, saes, tokens)``).
        neuronpedia: Neuronpedia links: a format string with fields ``{layer}``,
            ``{model_layer}`` (from the hook name), ``{module}``, ``{hook}``, ``{feature}``, a
            mapping key → URL or a callable key → URL. Without it, a FlowGraph's
            ``neuronpedia_url`` node column or a chain's ``neuronpedia_url_a``/``_b`` edge
            columns are used when present.
        title: the page and figure title (default: what is shown, and how much of it).
        max_paths: chains: put at most this many paths in the page (longest first, then lowest
            mean link cost); the page opens showing the first :data:`DEFAULT_SHOWN_PATHS` of
            them, and its "paths shown" control shows more or all.
        max_nodes: draw at most this many nodes (chain: whole paths; flow: the seed and the
            best-scored nodes).
        max_cost: chains: links costlier than this are cut (their paths split in two).
        features: chains: draw only the paths starting at these features (an int is a feature of
            the first SAE, ``(model layer, feature)`` any other), instead of every path.

    Returns:
        The path written.

    Example:
        >>> write_html(match_chain(saes), "chain.html", max_paths=100)
        >>> write_html("flow.json", "flow.html", neuronpedia=
        ...     "https://www.neuronpedia.org/gemma-2-2b/{layer}-gemmascope-{module}-16k/{feature}")
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give an HTML file name such as view.html.")
    if max_paths < 1 or max_nodes < 1:
        raise ValueError(f"max_paths and max_nodes must be >= 1, got {max_paths} and {max_nodes}.")
    if isinstance(result, str | os.PathLike):
        source = Path(result)
        if source.is_dir():
            result = _chain_from_directory(source)
        elif source.is_file() and source.suffix.lower() == ".safetensors":
            result = _chain_from_result(Permutation.load(source))  # `sae-match match` before 0.3
        elif source.is_file():
            result = _load_flow(source)
        else:
            raise ValueError(f"{source} does not exist; give a directory written by ChainMatch.save "
                             "or MatchResult.save, a permutation .safetensors file or a JSON file "
                             "written by FlowGraph.save_json.")
    if isinstance(result, ChainMatch):
        result = _chain_from_match(result)
    elif isinstance(result, MatchResult | Permutation):
        result = _chain_from_result(result)
    if isinstance(result, _Chain):
        view = _chain_view(result, max_paths=max_paths, max_nodes=max_nodes, max_cost=max_cost,
                           features=features)
    elif isinstance(result, FlowGraph):
        if features is not None or max_cost is not None:
            raise ValueError("features and max_cost apply to chains; a FlowGraph is drawn whole "
                             "(up to max_nodes).")
        view = _flow_view(result, max_nodes=max_nodes)
    else:
        raise TypeError(f"write_html draws a ChainMatch, a MatchResult, a Permutation or a "
                        f"FlowGraph (or a saved one's path), got {type(result).__name__}.")
    _decorate(view, top_tokens, neuronpedia)
    fig, data = _figure(view)
    text = _page(fig, data, view, title or view.title)
    write_text(path, text)
    logger.info("wrote %s (%d nodes, %d links, %.1f MB)", path, len(view.nodes), len(view.edges),
                len(text.encode()) / 1e6)
    return path


# -- top-activating tokens --------------------------------------------------------------------
def _sae_for(saes: Mapping[Hashable, Any], key: Key) -> Any:
    prefix = key[:-1]
    if len(prefix) == 2 and prefix[0] in saes and isinstance(saes[prefix[0]], LayerSAEs):
        sae = saes[prefix[0]].get(prefix[1])
    else:
        sae = saes.get(prefix[0] if len(prefix) == 1 else prefix)
    if sae is None:
        raise KeyError(f"no SAE for node {key!r}: the SAEs are keyed {list(saes)} (a chain's keys are "
                       "its model layers; a flow's are {layer: LayerSAEs} or (layer, module)).")
    return sae


@torch.no_grad()
def top_activating_tokens(
    model: Any,
    saes: Sequence[Any] | Mapping[Hashable, Any],
    tokens: torch.Tensor,
    features: Iterable[Key],
    *,
    k: int = 5,
    context: int = 4,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[Key, list[str]]:
    """The ``k`` tokens on which each feature fires most strongly, with their left context.

    Positions are the scored ones (BOS excluded, :func:`~sae_match_lens.metrics.scored_states`).
    Each entry reads ``"<context>[<token>] (<activation>)"``; a feature that never fires gets an
    empty list. Only the listed features are tracked (a running top-k over the batches).

    Args:
        model: the TransformerLens model the SAEs read (it needs a tokenizer).
        saes: a chain's SAEs, a list (layers from the hook names ``blocks.L.…``) or a mapping
            ``{model layer: SAE}`` (keys ``(model layer, feature)``), or a flow's stack
            ``{layer: LayerSAEs}`` / ``{(layer, module): SAE}`` (keys ``(layer, module, feature)``).
        tokens: ``[n_seq, pos]`` token ids, BOS first.
        features: the node keys to describe.
        k: tokens per feature.
        context: tokens of left context shown before the top token.
        batch_size: sequences per forward pass.
        progress: show a progress bar.

    Returns:
        ``{key: [k strings, strongest first]}``.

    Example:
        >>> write_html(chain, "chain.html",
        ...            top_tokens=functools.partial(top_activating_tokens, model, saes, tokens))
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("top_activating_tokens needs a model with a tokenizer (model.tokenizer is None).")
    sae_map = (dict(saes) if isinstance(saes, Mapping)
               else dict(zip(layers_from_hooks(saes, what="top_activating_tokens"), saes, strict=True)))
    by_hook: dict[str, tuple[Any, list[Key]]] = {}
    for key in dict.fromkeys(features):
        sae = _sae_for(sae_map, key)
        if not 0 <= int(key[-1]) < sae.cfg.d_sae:
            raise ValueError(f"feature {key[-1]} of node {key!r} is out of range for "
                             f"{hook_name_of(sae)} (d_sae={sae.cfg.d_sae}).")
        by_hook.setdefault(hook_name_of(sae), (sae, []))[1].append(key)
    batches, n_batches = token_batches(tokens, batch_size)
    best = {h: (torch.full((len(ks), 0), -math.inf), torch.zeros((len(ks), 0), dtype=torch.int64))
            for h, (_, ks) in by_hook.items()}
    all_tokens, offset = [], 0
    for batch in progress_bar(batches, total=n_batches, desc="top tokens", unit="batch", enabled=progress):
        states = record_states(model, list(by_hook), batch)
        n_seq, n_pos = batch.shape[0], batch.shape[1] - 1
        for hook, (sae, keys) in by_hook.items():
            cols = torch.tensor([int(key[-1]) for key in keys])
            acts = scored_activations(sae, states[hook])
            acts = acts[:, cols.to(acts.device)].T.float().cpu()
            acts = torch.where(fires(acts), acts, torch.tensor(-math.inf))
            where = offset * n_pos + torch.arange(n_seq * n_pos)  # flat (sequence, position)
            values = torch.cat([best[hook][0], acts], dim=1)
            places = torch.cat([best[hook][1], where.expand(len(keys), -1)], dim=1)
            top = values.topk(min(k, values.shape[1]), dim=1)
            best[hook] = (top.values, places.gather(1, top.indices))
        all_tokens.append(batch.cpu())
        offset += n_seq
    toks = torch.cat(all_tokens) if all_tokens else torch.zeros((0, 1), dtype=torch.int64)
    n_pos = toks.shape[1] - 1
    out: dict[Key, list[str]] = {}
    for hook, (_, keys) in by_hook.items():
        values, places = best[hook]
        for row, key in enumerate(keys):
            entries = []
            for value, place in zip(values[row].tolist(), places[row].tolist(), strict=True):
                if value == -math.inf:
                    break
                seq, pos = divmod(int(place), n_pos)
                pos += 1  # scored positions start after BOS
                left = tokenizer.decode(toks[seq, max(1, pos - context):pos].tolist())
                entries.append(f"{left}[{tokenizer.decode([int(toks[seq, pos])])}] ({value:.3g})")
            out[key] = entries
    return out
