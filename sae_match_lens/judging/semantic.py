"""Do matched features mean the same thing? Judge explanations along chains and flow graphs.

SAE Match's semantic check (arXiv 2410.07656; ``FEATURE_FLOW.md`` §C): sample feature paths,
get an explanation of every feature on them, and let a judge label pairs 1 = DIFFERENT,
2 = MAYBE, 3 = SAME (:meth:`~sae_match_lens.judging.judge.Judge.compare`). Pairs (:func:`semantic_pairs`):

* ``consecutive``: each link of a path, layer ``l`` → ``l + 1`` (for a flow graph: every edge,
  MLP/attention predecessors included);
* ``composed``: the path's first feature against its feature at every later layer (the composed
  permutation, or the chained top-1 links of a flow graph);
* ``direct``: the first feature against its partner under a direct match of the first layer to a
  later one (only when such matches are given), so composed and direct can be compared.

Explanations of a node ``(layer, module, feature)`` come from a user table, from Neuronpedia
(:func:`neuronpedia_explainer`, when the SAEs' metadata names their Neuronpedia ids and the
network allows it), or from the top-activating contexts shown to the judge
(:func:`context_explanations` over :func:`~sae_match_lens.report.viewer.top_activating_tokens`).

**Offline proxy** (no judge): the label comes from the overlap of the two features'
top-activating tokens, ``J = |T_a ∩ T_b| / |T_a ∪ T_b|`` over the distinct top tokens: SAME when
``J ≥ same_at``, MAYBE when ``J ≥ maybe_at``, else DIFFERENT (defaults 0.5 and 0.2, our choice;
the papers have no such rule). It measures whether two features fire on the same tokens, not
whether they mean the same; every table made with it says so in its ``method``.

:func:`semantic_evaluation` runs all of it and returns the papers' tables: counts per label and
layer, and the mean label along paths (composed vs direct).

Example:
    >>> chain = match_chain(saes)
    >>> top = functools.partial(top_activating_tokens, model, stack_of(chain_saes), tokens)
    >>> result = semantic_evaluation(chain, top_tokens=top, options=SemanticOptions(n_paths=50))
    >>> result.counts
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pandas as pd
import torch

from ..chain import ChainMatch
from ..flow.graph import FlowGraph
from ..matching import MatchResult
from ..neuronpedia import NeuronpediaUnavailableError, explanations
from ..options import accepts_flat_options, resolve_options
from ..permutation import Permutation
from ..progress import progress_bar
from .judge import LABELS, Judge, JudgeError
from .rowlog import RowLog

__all__ = [
    "KINDS",
    "PROXY_METHOD",
    "SemanticOptions",
    "SemanticResult",
    "context_explanations",
    "label_pairs",
    "neuronpedia_explainer",
    "semantic_evaluation",
    "semantic_pairs",
    "semantic_tables",
    "token_overlap",
]

logger = logging.getLogger(__name__)

Key = tuple[int, str, int]
"""A node: ``(layer, module, feature)``; ``layer`` is the model layer (for a chain, one of
:attr:`ChainMatch.layers <sae_match_lens.chain.ChainMatch.layers>`, ``module`` ``"res"``)."""
KINDS: tuple[str, ...] = ("consecutive", "composed", "direct")
PROXY_METHOD = "proxy: top-activating-token overlap (Jaccard of distinct top tokens), no judge"
"""The method a result records when pairs were labelled without a judge."""
PAIR_COLUMNS = ("path", "kind", "layer_a", "module_a", "feature_a", "layer_b", "module_b",
                "feature_b", "distance")
"""The columns of the pair table, in order."""

Source = Mapping[Key, Any] | Callable[[list[Key]], Mapping[Key, Any]]


def _chain_paths(chain: ChainMatch, n_paths: int, start: int, stop: int,
                 seed: int) -> list[list[Key]]:
    traced = chain.paths(start, stop)  # one column per SAE from start to stop, -1 after a break
    layers = chain.layers[chain.position(start):chain.position(stop) + 1]
    complete = torch.nonzero((traced >= 0).all(dim=1)).flatten()
    if complete.numel() == 0:
        raise ValueError(f"no feature of chain layer {start} keeps a partner up to layer {stop}; "
                         "choose a shorter span (stop=) or a looser max_cost.")
    gen = torch.Generator().manual_seed(seed)
    chosen = complete[torch.randperm(complete.numel(), generator=gen)[:n_paths]].sort().values
    return [[(layer, "res", int(f)) for layer, f in zip(layers, traced[row].tolist(), strict=True)]
            for row in chosen.tolist()]


def _as_permutation(value: Permutation | MatchResult) -> Permutation:
    if isinstance(value, MatchResult):
        return value.permutation
    if not isinstance(value, Permutation):
        raise TypeError(f"direct matches must be Permutations or MatchResults, got "
                        f"{type(value).__name__}.")
    return value


def semantic_pairs(
    source: ChainMatch | FlowGraph,
    *,
    n_paths: int = 100,
    start: int | None = None,
    stop: int | None = None,
    direct: Mapping[int, Permutation | MatchResult] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """The pairs to judge (module docstring), one row each.

    Args:
        source: a :class:`~sae_match_lens.chain.ChainMatch` (paths: ``n_paths`` features of
            model layer ``start`` drawn at random, seeded, among those whose trace keeps a
            partner up to ``stop``) or a :class:`~sae_match_lens.flow.graph.FlowGraph` (one path: its
            residual chain; consecutive pairs: all its edges).
        n_paths: see ``source`` (chains only).
        start: see ``source`` (chains only); a model layer of the chain, default its first.
        stop: see ``source`` (chains only); a model layer of the chain, default its last.
        seed: see ``source`` (chains only).
        direct: ``{later model layer: the direct match of layer start to it}`` (chains only);
            adds the ``direct`` pairs (skipped where the direct match has no partner).

    Returns:
        :data:`PAIR_COLUMNS`: ``path`` (its number), ``kind``, both nodes, ``distance``
        (``layer_b − layer_a``).
    """
    rows: list[dict[str, Any]] = []

    def add(path: int, kind: str, a: Key, b: Key) -> None:
        rows.append({"path": path, "kind": kind, "layer_a": a[0], "module_a": a[1],
                     "feature_a": a[2], "layer_b": b[0], "module_b": b[1], "feature_b": b[2],
                     "distance": b[0] - a[0]})

    if isinstance(source, FlowGraph):
        if direct is not None:
            raise ValueError("direct matches are for chains; a flow graph's links are top-1 "
                             "links already.")
        nodes = {row.node: (int(row.layer), str(row.module), int(row.feature))
                 for row in source.nodes.itertuples(index=False)}
        for edge in source.edges.itertuples(index=False):
            add(0, "consecutive", nodes[edge.source], nodes[edge.target])
        chain = sorted(key for key in nodes.values() if key[1] == "res")
        for b in chain[1:]:
            add(0, "composed", chain[0], b)
    elif isinstance(source, ChainMatch):
        if isinstance(n_paths, bool) or not isinstance(n_paths, int) or n_paths < 1:
            raise ValueError(f"n_paths must be a positive integer, got {n_paths!r}.")
        first = source.layers[0] if start is None else start
        last = source.layers[-1] if stop is None else stop
        if not source.position(first, "start") < source.position(last, "stop"):
            raise ValueError(f"need start < stop, two of the chain's model layers "
                             f"{list(source.layers)}; got start={start!r}, stop={stop!r}.")
        perms = {int(k): _as_permutation(v) for k, v in (direct or {}).items()}
        for layer, perm in perms.items():
            if not first < layer <= last:
                raise ValueError(f"direct match to layer {layer} is outside the span "
                                 f"{first}..{last} (after start, up to stop).")
            width = source.width(first)
            if perm.n_source != width:
                raise ValueError(f"the direct match to layer {layer} maps {perm.n_source} "
                                 f"features, but chain layer {first} has {width}.")
        for number, path in enumerate(_chain_paths(source, n_paths, first, last, seed)):
            for a, b in itertools.pairwise(path):
                add(number, "consecutive", a, b)
            for b in path[1:]:
                add(number, "composed", path[0], b)
            for layer, perm in sorted(perms.items()):
                partner = int(perm.indices[path[0][2]])
                if partner >= 0:
                    add(number, "direct", path[0], (layer, "res", partner))
    else:
        raise TypeError(f"semantic_pairs reads a ChainMatch or a FlowGraph, got "
                        f"{type(source).__name__}.")
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def _keys(pairs: pd.DataFrame) -> list[Key]:
    keys: dict[Key, None] = {}
    for side in ("a", "b"):
        for layer, module, feature in zip(pairs[f"layer_{side}"], pairs[f"module_{side}"],
                                          pairs[f"feature_{side}"], strict=True):
            keys[(int(layer), str(module), int(feature))] = None
    return sorted(keys)


def _resolve(source: Source | None, keys: list[Key], what: str) -> dict[Key, Any]:
    if source is None:
        return {}
    table = source(keys) if callable(source) else source
    if not isinstance(table, Mapping):
        raise TypeError(f"{what} must be a mapping from (layer, module, feature) or a function "
                        f"of the node list returning one, got {type(table).__name__}.")
    out = {}
    for key in keys:
        for alias in (key, (key[0], key[2]), f"{key[0]}/{key[1]}/{key[2]}"):
            if alias in table:
                out[key] = table[alias]
                break
    return out


_TOKEN = re.compile(r"\[(.*)\] \([^()]*\)$", re.DOTALL)


def _top_token(entry: str) -> str:
    """The token of a :func:`~sae_match_lens.report.viewer.top_activating_tokens` entry
    ``"<context>[<token>] (<activation>)"`` (a plain string is the token itself)."""
    found = _TOKEN.search(entry)
    return (found.group(1) if found else entry).strip().lower()


def token_overlap(top_a: Sequence[str], top_b: Sequence[str]) -> float:
    """Jaccard overlap of two features' distinct top-activating tokens (NaN if both are empty).

    Entries may be :func:`~sae_match_lens.report.viewer.top_activating_tokens` strings (the bracketed
    token is used) or plain tokens; tokens are compared stripped and lower-cased.

    Example:
        >>> token_overlap(["the [LORD] (3.1)", "of [God] (2.0)"], ["[lord] (1.2)"])
        0.5
    """
    a, b = {_top_token(e) for e in top_a}, {_top_token(e) for e in top_b}
    union = a | b
    return len(a & b) / len(union) if union else math.nan


def context_explanations(top_tokens: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, str]:
    """Explanations for a judge made of each feature's top-activating contexts.

    Example:
        >>> context_explanations({(3, "res", 7): ["the [LORD] (3.1)"]})
        {(3, 'res', 7): 'fires most strongly on the bracketed token in: "the [LORD]"'}
    """
    out = {}
    for key, entries in top_tokens.items():
        contexts = [_TOKEN.sub(lambda m: f"[{m.group(1)}]", e).strip() for e in entries]
        out[key] = ("fires most strongly on the bracketed token in: "
                    + "; ".join(f'"{c}"' for c in contexts)) if contexts else None
    return out


def neuronpedia_explainer(
    ids: Mapping[int, str | None] | ChainMatch | FlowGraph,
    **options: Any,
) -> Callable[[list[Key]], dict[Key, str]]:
    """A function ``nodes -> {node: explanation}`` over Neuronpedia (cached, rate-limited).

    Args:
        ids: the Neuronpedia id of each layer's SAE (``{layer: id}``; a chain's
            ``neuronpedia_ids()``, or a flow graph's ``neuronpedia_id`` node column).
        **options: passed to :func:`~sae_match_lens.neuronpedia.explanations` (``cache_dir``,
            ``rate``, ...).

    Nodes whose SAE has no id, or that Neuronpedia does not explain, get no explanation. When
    Neuronpedia cannot be reached the error is logged and the nodes fetched so far are returned
    (the cache keeps them), so an offline run degrades to fewer judged pairs, never silently to
    made-up ones.
    """
    if isinstance(ids, ChainMatch):
        by_layer: dict[tuple[int, str], str | None] = {
            (layer, "res"): npid
            for layer, npid in zip(ids.layers, ids.neuronpedia_ids(), strict=True)}
    elif isinstance(ids, FlowGraph):
        by_layer = {(int(r.layer), str(r.module)): r.neuronpedia_id
                    for r in ids.nodes.itertuples(index=False)}
    else:
        by_layer = {(int(k), "res"): v for k, v in ids.items()}

    def explain(keys: list[Key]) -> dict[Key, str]:
        out: dict[Key, str] = {}
        groups: dict[str, list[Key]] = {}
        for key in keys:
            npid = by_layer.get((key[0], key[1]))
            if npid:
                groups.setdefault(npid, []).append(key)
        for npid, members in groups.items():
            try:
                found = explanations(npid, [k[2] for k in members], **options)
            except NeuronpediaUnavailableError as exc:
                logger.warning("Neuronpedia unavailable (%s); %d nodes of %s left unexplained",
                               exc, len(members), npid)
                continue
            for key in members:
                text = found[key[2]].text if key[2] in found else None
                if text:
                    out[key] = text
        return out

    return explain


def _proxy_label(overlap: float, same_at: float, maybe_at: float) -> float:
    if math.isnan(overlap):
        return math.nan
    return 3.0 if overlap >= same_at else 2.0 if overlap >= maybe_at else 1.0


def label_pairs(
    pairs: pd.DataFrame,
    *,
    judge: Judge | None = None,
    explanations: Source | None = None,
    top_tokens: Source | None = None,
    same_at: float = 0.5,
    maybe_at: float = 0.2,
    path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Label every pair: by ``judge`` over explanations, or by the token-overlap proxy.

    Args:
        pairs: from :func:`semantic_pairs`.
        judge: a :class:`~sae_match_lens.judging.judge.Judge`; ``None``: the offline proxy.
        explanations: ``{node: text}`` (keys ``(layer, module, feature)``, ``(layer, feature)``
            or ``"layer/module/feature"``), or a function of the node list returning one (e.g.
            :func:`neuronpedia_explainer`). With a judge and no explanations, the top-activating
            contexts are the explanations (:func:`context_explanations`).
        top_tokens: ``{node: top-activating entries}`` or a function of the node list (e.g.
            ``functools.partial(top_activating_tokens, model, stack, tokens)``); needed by the
            proxy, and by a judge without explanations. The overlap is reported either way.
        same_at: the proxy's threshold on the overlap for SAME (module docstring).
        maybe_at: the proxy's threshold on the overlap for MAYBE (module docstring).
        path: a :class:`~sae_match_lens.judging.rowlog.RowLog` for judged pairs: written as they
            finish, a rerun with the same judge (its
            :meth:`~sae_match_lens.judging.judge.Judge.identity`) skips them, a judge failure keeps
            them; a rerun with another judge is refused, naming what differs.
        progress: show a progress bar over judged pairs.

    Returns:
        ``pairs`` with ``explanation_a``, ``explanation_b``, ``overlap``, ``label`` (1–3; NaN
        where a node has no explanation or no top tokens) and ``label_name``.

    Raises:
        JudgeError: the judge failed; ``error.partial`` holds the pairs labelled so far.
    """
    if not 0.0 <= maybe_at <= same_at <= 1.0:
        raise ValueError(f"need 0 <= maybe_at <= same_at <= 1, got maybe_at={maybe_at}, "
                         f"same_at={same_at}.")
    keys = _keys(pairs)
    if judge is None and top_tokens is None:
        raise ValueError("without a judge the labels come from top-activating-token overlap; "
                         "pass top_tokens= (e.g. functools.partial(top_activating_tokens, model, "
                         "stack, tokens)), or pass judge=.")
    if judge is not None and explanations is None and top_tokens is None:
        raise ValueError("a judge needs explanations: pass explanations= (a table or "
                         "neuronpedia_explainer(...)) or top_tokens= (contexts are shown to it).")
    tops = _resolve(top_tokens, keys, "top_tokens")
    texts = _resolve(explanations, keys, "explanations") if explanations is not None else (
        context_explanations(tops) if judge is not None else {})
    frame = pairs.copy()
    node_a = list(zip(frame.layer_a, frame.module_a, frame.feature_a, strict=True))
    node_b = list(zip(frame.layer_b, frame.module_b, frame.feature_b, strict=True))
    frame["explanation_a"] = [texts.get(k) for k in node_a]
    frame["explanation_b"] = [texts.get(k) for k in node_b]
    frame["overlap"] = [token_overlap(tops[a], tops[b]) if a in tops and b in tops else math.nan
                        for a, b in zip(node_a, node_b, strict=True)]
    if judge is None:
        frame["label"] = [_proxy_label(v, same_at, maybe_at) for v in frame.overlap]
    else:
        frame["label"] = _judge_labels(frame, judge, path, progress)
    frame["label_name"] = [LABELS.get(int(v)) if not math.isnan(v) else None
                           for v in frame.label]
    return frame


def _judge_labels(frame: pd.DataFrame, judge: Judge, path: str | os.PathLike[str] | None,
                  progress: bool) -> list[float]:
    key = ("explanation_a", "explanation_b")
    log = RowLog(path, key=key, header={"what": "semantic labels", "judge": judge.identity()}
                 ) if path is not None else None
    labels: dict[tuple[str, str], int] = {}
    if log is not None:
        labels = {(r["explanation_a"], r["explanation_b"]): r["label"] for r in log.rows}
    todo = {(a, b) for a, b in zip(frame.explanation_a, frame.explanation_b, strict=True)
            if a and b and (a, b) not in labels}
    for a, b in progress_bar(sorted(todo), desc="judging pairs", unit="pair", enabled=progress):
        try:
            labels[(a, b)] = judge.compare(a, b)
        except JudgeError as exc:
            done = [labels.get((x, y), math.nan) if x and y else math.nan
                    for x, y in zip(frame.explanation_a, frame.explanation_b, strict=True)]
            exc.partial = frame.assign(label=done)
            raise
        if log is not None:
            log.append({"explanation_a": a, "explanation_b": b, "label": labels[(a, b)]})
    return [float(labels[(a, b)]) if a and b else math.nan
            for a, b in zip(frame.explanation_a, frame.explanation_b, strict=True)]


def semantic_tables(labelled: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The papers' tables from :func:`label_pairs`' output.

    Returns:
        ``(counts, along)``. ``counts``: one row per ``kind`` and ``layer_b`` with ``n``
        (labelled pairs), ``DIFFERENT``, ``MAYBE``, ``SAME`` (counts), ``unlabelled``,
        ``mean_label`` (1–3) and ``mean_overlap``. ``along``: one row per ``kind`` and
        ``distance`` with ``n``, ``mean_label`` and ``mean_overlap`` (composed vs direct at
        the same distance is the comparison SAE Match reports).
    """
    frame = labelled.assign(labelled=labelled.label.notna())
    for label, name in LABELS.items():
        frame[name] = frame.label == label
    counts = frame.groupby(["kind", "layer_b"], sort=True).agg(
        n=("labelled", "sum"), DIFFERENT=("DIFFERENT", "sum"), MAYBE=("MAYBE", "sum"),
        SAME=("SAME", "sum"), unlabelled=("labelled", lambda s: int((~s).sum())),
        mean_label=("label", "mean"), mean_overlap=("overlap", "mean")).reset_index()
    along = frame.groupby(["kind", "distance"], sort=True).agg(
        n=("labelled", "sum"), mean_label=("label", "mean"),
        mean_overlap=("overlap", "mean")).reset_index()
    for table in (counts, along):
        table["n"] = table["n"].astype(int)
    for name in LABELS.values():
        counts[name] = counts[name].astype(int)
    return counts, along


class SemanticResult(NamedTuple):
    """What :func:`semantic_evaluation` found."""

    pairs: pd.DataFrame
    """Every judged pair with its explanations, overlap and label (:func:`label_pairs`)."""
    counts: pd.DataFrame
    """Counts per label, kind and layer (:func:`semantic_tables`)."""
    along: pd.DataFrame
    """Mean label per kind and distance along the paths (composed vs direct)."""
    method: str
    """How the labels were made: the judge's name, or :data:`PROXY_METHOD`."""


@dataclass(frozen=True)
class SemanticOptions:
    """Sampling and proxy knobs of :func:`semantic_evaluation`."""

    n_paths: int = 100
    """Chains only: how many paths to sample (features of layer ``start`` drawn at random among
    those whose trace keeps a partner up to ``stop``)."""
    seed: int = 0
    """Chains only: seed of that draw."""
    same_at: float = 0.5
    """The proxy's threshold on the token overlap for SAME (module docstring)."""
    maybe_at: float = 0.2
    """The proxy's threshold on the token overlap for MAYBE (module docstring)."""


@accepts_flat_options(SemanticOptions)
def semantic_evaluation(
    source: ChainMatch | FlowGraph,
    *,
    judge: Judge | None = None,
    explanations: Source | None = None,
    top_tokens: Source | None = None,
    start: int | None = None,
    stop: int | None = None,
    direct: Mapping[int, Permutation | MatchResult] | None = None,
    path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    options: SemanticOptions | None = None,
) -> SemanticResult:
    """Sample paths, label their pairs, and tabulate.

    Args:
        source: a chain or a flow graph (:func:`semantic_pairs`).
        judge: as in :func:`label_pairs` (``None``: the offline token-overlap proxy).
        explanations: as in :func:`label_pairs`.
        top_tokens: as in :func:`label_pairs`.
        start: as in :func:`semantic_pairs`.
        stop: as in :func:`semantic_pairs`.
        direct: as in :func:`semantic_pairs`.
        path: as in :func:`label_pairs` (a row log of judged pairs, resumable).
        progress: show a progress bar over judged pairs.
        options: the sampling and proxy knobs (:class:`SemanticOptions`: ``n_paths``, ``seed``,
            ``same_at``, ``maybe_at``). The flat keywords of 0.2 still work until 0.4, with a
            ``DeprecationWarning``.

    Returns:
        A :class:`SemanticResult`.

    Example:
        >>> result = semantic_evaluation(chain, top_tokens=top,   # offline proxy
        ...                              options=SemanticOptions(n_paths=50))
        >>> result = semantic_evaluation(chain, judge=ChatJudge(...),
        ...                              explanations=neuronpedia_explainer(chain))
    """
    opts = resolve_options(SemanticOptions, options)
    pairs = semantic_pairs(source, n_paths=opts.n_paths, start=start, stop=stop, direct=direct,
                           seed=opts.seed)
    labelled = label_pairs(pairs, judge=judge, explanations=explanations, top_tokens=top_tokens,
                           same_at=opts.same_at, maybe_at=opts.maybe_at, path=path,
                           progress=progress)
    counts, along = semantic_tables(labelled)
    method = PROXY_METHOD if judge is None else f"judge: {judge!r}"
    logger.info("semantic evaluation (%s): %d pairs, %d labelled", method, len(labelled),
                int(labelled.label.notna().sum()))
    return SemanticResult(labelled, counts, along, method)
