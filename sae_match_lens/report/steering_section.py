"""The demo's steering section: steer a theme's feature flow on the default suite and check what
matched features mean, with every sentence computed from the numbers.

**Theme.** The suite's corpus mixes the King James Bible, ``fortunes`` and the Python
documentation. Each held-out sequence is labelled by its source's markup (:func:`label_sequences`):
biblical when KJV markers (a verse number at a line start before a capitalised word, *unto*,
*thee*, *thou*, *thy*, *hath*, *LORD*) occur at least 3 times and no reStructuredText markup
does; Python documentation when reST markup (``::``, double backticks, a ``:role:`` before a
backtick, a ``.. directive``) occurs at least twice and no KJV marker does; other sequences are
neither. Theme seeds are the residual features at the middle layer that fire on at least
``min_rate`` of the theme's tokens and whose firing is at least ``selectivity`` theme-specific
(``rate_theme / (rate_theme + rate_rest) ≥ 0.9``), the most
frequent first (:func:`theme_seeds`; no feature id is chosen by hand). The theme's flow is the
union of the seeds' flow graphs (:func:`~sae_match_lens.flow.graph.flow_graph`).

**Experiments** (:func:`~sae_match_lens.judging.steering_scores.steering_sweep`, row logs under ``out``):
suppression (rescale the flow's features by ``r``, biblical prompts cut from held-out
biblical sequences) and activation (add the flow's folded decoder rows with coefficient ``s``,
prompts cut from Python-documentation sequences), each single-layer vs cumulative, scored with
the judge-free proxies of :mod:`~sae_match_lens.lens.steering` (behaviour normalised by the flow's
firing rate on held-out biblical text). The semantic table labels matched residual features by
top-activating-token overlap (:mod:`~sae_match_lens.judging.semantic`), not by a language-model judge.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..adapters import hook_name_of
from ..chain import ChainMatch, match_chain
from ..flow.graph import LayerSAEs, flow_graph
from ..judging.semantic import SemanticOptions, semantic_evaluation
from ..judging.steering_scores import SweepOptions, plot_sweep, steering_sweep, theme_presence
from ..lens.steering import FlowNode, SamplingOptions, flow_nodes
from ..metrics import fires, record_states
from .flow_section import PAPER_SCORE
from .viewer import top_activating_tokens

__all__ = ["STEERING_DEFAULT", "STEERING_FULL", "STEERING_QUICK", "SteeringSettings",
           "label_sequences", "steering_markdown", "steering_section", "theme_seeds"]

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class SteeringSettings:
    """How much the steering section samples (:data:`STEERING_DEFAULT` is the demo's default)."""

    n_seeds: int
    """Theme seed features (the flow is the union of their flow graphs)."""
    n_samples: int
    """Generations per prompt and setting (two prompts per experiment)."""
    max_new_tokens: int
    """Tokens generated per sample."""
    suppress: tuple[float, ...]
    """Rescale factors ``r`` of the suppression sweep."""
    activate: tuple[float, ...]
    """Added-direction coefficients ``s`` of the activation sweep."""
    every_layer: bool
    """Sweep single-layer and cumulative steering at every layer of the flow (else single-layer
    steering at the seed layer and cumulative steering up to the last one)."""
    semantic_seqs: int
    """Held-out sequences whose top-activating tokens label the matched features."""
    semantic_paths: int
    """Sampled SAE Match paths in the semantic check."""
    n_seqs: int | None = None
    """Held-out sequences used for theme seeds, prompts and reference rates (None: all)."""

    def __post_init__(self) -> None:
        if self.n_seqs is not None and self.n_seqs < 2:
            raise ValueError(f"SteeringSettings.n_seqs must be >= 2 or None, got {self.n_seqs}.")
        for name in ("n_seeds", "n_samples", "max_new_tokens", "semantic_seqs", "semantic_paths"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SteeringSettings.{name} must be >= 1, got {getattr(self, name)}.")
        if not self.suppress or not self.activate:
            raise ValueError("SteeringSettings needs at least one coefficient per sweep.")


STEERING_QUICK = SteeringSettings(3, 4, 16, (0.0, -2.0), (2.0, 6.0), False, 64, 16, 128)
"""The tests' size."""
STEERING_DEFAULT = SteeringSettings(3, 2, 16, (0.0, -2.0), (2.0, 6.0), False, 64, 16, 128)
"""The demo's default: 128 held-out sequences, 5 settings per sweep, 4 generations of 16 tokens
each."""
STEERING_FULL = SteeringSettings(5, 8, 48, (0.0, -1.0, -2.0, -4.0), (1.0, 2.0, 4.0, 8.0), True,
                                 256, 64)
"""``sae-match demo --full``: every flow layer, 4 coefficients, 16 generations of 48 tokens."""

_BIBLE = re.compile(r"^\s*\d+ [A-Z][a-z]|\b(?:unto|thee|thou|thy|hath|LORD)\b", re.MULTILINE)
_PYDOC = re.compile(r"::|``|:\w+:`|^\s*\.\. \w", re.MULTILINE)


def label_sequences(tokens: torch.Tensor, tokenizer: Any) -> list[str]:
    """``"bible"``, ``"pydoc"`` or ``"other"`` for each sequence (rule in the module docstring)."""
    labels = []
    for row in tokens:
        text = tokenizer.decode(row[1:].tolist())
        n_bible, n_pydoc = len(_BIBLE.findall(text)), len(_PYDOC.findall(text))
        labels.append("bible" if n_bible >= 3 and n_pydoc == 0 else
                      "pydoc" if n_pydoc >= 2 and n_bible == 0 else "other")
    return labels


@torch.no_grad()
def _firing_rates(model: Any, sae: Any, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    name = hook_name_of(sae)
    out = []
    for batch in tokens.split(batch_size):
        h = record_states(model, [name], batch)[name]
        acts = sae.encode(h[:, 1:].to(sae.W_enc.device, sae.W_enc.dtype))
        out.append(fires(acts).double().mean(1).cpu())  # per sequence, BOS excluded
    return torch.cat(out)  # [n_seq, d_sae]


def theme_seeds(model: Any, sae: Any, tokens: torch.Tensor, labels: Sequence[str], theme: str, *,
                n_seeds: int, min_rate: float = 0.05, selectivity: float = 0.9,
                batch_size: int = 16) -> pd.DataFrame:
    """The theme's seed features of ``sae`` by the computed criterion (module docstring).

    Returns:
        Up to ``n_seeds`` rows: ``feature``, ``rate_theme``, ``rate_rest``, ``selectivity``,
        most frequent on the theme first.
    """
    is_theme = torch.tensor([label == theme for label in labels])
    if not bool(is_theme.any()) or bool(is_theme.all()):
        raise ValueError(f"the tokens hold {int(is_theme.sum())} {theme!r} sequences of "
                         f"{len(labels)}; theme seeds need both theme and other sequences.")
    rates = _firing_rates(model, sae, tokens, batch_size)
    theme_rate, rest_rate = rates[is_theme].mean(0), rates[~is_theme].mean(0)
    share = theme_rate / (theme_rate + rest_rate).clamp_min(1e-12)
    ok = (theme_rate >= min_rate) & (share >= selectivity)
    order = torch.argsort(torch.where(ok, theme_rate, torch.tensor(-1.0, dtype=theme_rate.dtype)),
                          descending=True)[:n_seeds]
    order = order[ok[order]]
    return pd.DataFrame({"feature": order.numpy(), "rate_theme": theme_rate[order].numpy(),
                         "rate_rest": rest_rate[order].numpy(),
                         "selectivity": share[order].numpy()})


def _prompts(tokens: torch.Tensor, labels: Sequence[str], theme: str, n: int, length: int,
             tokenizer: Any) -> list[str]:
    """Up to ``n`` prompts: in the last sequences of ``theme``, the first ``length``-token window
    that holds a marker of the theme and none of the other source (sequences pack documents)."""
    own, other = (_BIBLE, _PYDOC) if theme == "bible" else (_PYDOC, _BIBLE)
    prompts: list[str] = []
    for i in reversed([i for i, label in enumerate(labels) if label == theme]):
        for start in range(1, tokens.shape[1] - length, length // 2):
            text = tokenizer.decode(tokens[i, start:start + length].tolist())
            if own.search(text) and not other.search(text):
                prompts.append(text)
                break
        if len(prompts) == n:
            break
    return prompts


def _stack(saes: Mapping[int, Any] | Sequence[Any]) -> dict[int, LayerSAEs]:
    items = saes.items() if isinstance(saes, Mapping) else enumerate(saes)
    return {int(k): v if isinstance(v, LayerSAEs) else LayerSAEs(res=v) for k, v in items}


def _setting_name(mode: str, layer: Any) -> str:
    return ("unsteered" if mode == "none" else f"single layer {int(layer)}" if mode == "single"
            else f"cumulative to layer {int(layer)}")


def _summary(frame: pd.DataFrame, goal: str) -> pd.DataFrame:
    """Every swept setting (unsteered first, then by score, best first) with a readable name."""
    table = frame.copy()
    table["setting"] = [_setting_name(m, la) for m, la in zip(table["mode"], table.layer,
                                                              strict=True)]
    base = table[table["mode"] == "none"]
    steered = table[table["mode"] != "none"].sort_values("score", ascending=False, kind="stable")
    table = pd.concat([base, steered], ignore_index=True)
    return table[["setting", "coefficient", "n_samples", "theme_rate", "behaviour", "ce",
                  "coherence", "distinct", "score", "examples"]].assign(goal=goal)


def _verdicts(table: pd.DataFrame, goal: str, what: str, seed_layer: int, last: int) -> list[str]:
    """Sentences over every swept setting of ``table`` (:func:`_summary`)."""
    base = table[table.setting == "unsteered"].iloc[0]
    steered = table[table.setting != "unsteered"]
    lines = []
    better = (steered.theme_rate < base.theme_rate) if goal == "suppress" else (
        steered.theme_rate > base.theme_rate)
    verb = "lowered" if goal == "suppress" else "raised"
    change = steered.theme_rate - base.theme_rate
    largest = float(change.min() if goal == "suppress" else change.max())
    relative = largest / base.theme_rate if base.theme_rate > 0 else math.inf
    lines.append(f"{what}: {int(better.sum())} of {len(steered)} steered settings {verb} the "
                 f"theme rate against the unsteered {base.theme_rate:.3f}"
                 + (f"; the largest change is {largest:+.3f} ({relative:+.0%})." if better.any()
                    else "; steering did not move the theme the intended way here."))
    best = steered.loc[steered.score.idxmax()]
    n = int(base.n_samples) if "n_samples" in table.columns and pd.notna(base.n_samples) else 0
    lines.append(f"{what}: best proxy score over all {len(steered)} steered settings "
                 f"{best.score:.3f} ({best.setting}, coefficient {best.coefficient:g}: theme rate "
                 f"{best.theme_rate:.3f}, coherence {best.coherence:.3f}) vs {base.score:.3f} "
                 "unsteered" + (f" (each a mean of {n} generations)." if n else "."))
    single = steered[steered.setting == f"single layer {seed_layer}"]
    cumulative = steered[steered.setting == f"cumulative to layer {last}"]
    for coefficient in sorted(set(single.coefficient) & set(cumulative.coefficient)):
        s = single[single.coefficient == coefficient].iloc[0]
        c = cumulative[cumulative.coefficient == coefficient].iloc[0]
        if abs(c.theme_rate - s.theme_rate) < 5e-4:  # equal at the printed precision
            stronger = "both move the theme alike"
        else:
            stronger = ("cumulative" if (c.theme_rate < s.theme_rate) == (goal == "suppress")
                        else "single-layer") + " moves the theme more"
        lines.append(f"{what}, coefficient {coefficient:g}: theme rate {s.theme_rate:.3f} "
                     f"steering layer {seed_layer} alone vs {c.theme_rate:.3f} steering every "
                     f"flow layer up to {last} ({stronger}), coherence {s.coherence:.3f} vs "
                     f"{c.coherence:.3f}.")
    return lines


def steering_section(model: Any, saes: Mapping[int, Any] | Sequence[Any], tokens: torch.Tensor,
                     tokenizer: Any, out: str | Path, *, quick: bool = False,
                     progress: bool = False, settings: SteeringSettings | None = None,
                     on_step: Callable[[str, float], None] | None = None,
                     chain: ChainMatch | None = None) -> dict[str, Any]:
    """Run the steering and semantic experiments of the module docstring on the suite.

    Args:
        model: the suite's model.
        saes: residual SAEs by layer (a list or ``{layer: SAE or LayerSAEs}``; module SAEs of a
            ``LayerSAEs`` join the flows).
        tokens: held-out ``[n_seq, pos]`` tokens, BOS first (labelled by source, used for seeds,
            prompts, reference rates and top-activating tokens).
        tokenizer: decodes ``tokens`` (the suite's tokenizer, ``model.tokenizer``).
        out: directory for the sweep logs (resumable) and heat-maps.
        quick: the tests' size (:data:`STEERING_QUICK`) when ``settings`` is not given; otherwise
            :data:`STEERING_FULL`.
        progress: show the library's progress bars.
        settings: how much to sample (overrides ``quick``).
        on_step: called with each step's name and the share of the section done before it.
        chain: the SAE Match chain of the residual SAEs (folded), when already computed; the
            semantic check matches them otherwise.

    Returns:
        A JSON-able dict: theme selection, flow nodes, per experiment every swept setting (with
        three example generations each), the semantic tables, the computed sentences under
        ``"reading"``, the settings and the run time.
    """
    started = time.perf_counter()
    chosen = settings or (STEERING_QUICK if quick else STEERING_FULL)
    step = on_step or (lambda name, done: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stack = _stack(saes)
    step("steering: theme seeds", 0.0)
    if chosen.n_seqs is not None:
        tokens = tokens[:chosen.n_seqs]
    labels = label_sequences(tokens, tokenizer)
    counts = {name: labels.count(name) for name in ("bible", "pydoc", "other")}
    seed_layer = sorted(stack)[len(stack) // 2]
    seeds = theme_seeds(model, stack[seed_layer].res, tokens, labels, "bible",
                        n_seeds=chosen.n_seeds)
    result: dict[str, Any] = {"sequence_labels": counts, "seed_layer": seed_layer,
                              "seeds": seeds.to_dict("records"), "reading": [],
                              "settings": dict(chosen.__dict__)}
    if seeds.empty:
        result["reading"].append(
            f"No residual feature at layer {seed_layer} fires on ≥ 5% of the {counts['bible']} "
            "biblical sequences' tokens with ≥ 90% selectivity, so no theme was steered.")
        return result
    nodes: list[FlowNode] = []
    for feature in seeds.feature:
        graph = flow_graph(stack, (seed_layer, int(feature)), score=PAPER_SCORE)
        nodes += [n for n in flow_nodes(graph, stack) if n not in nodes]
    nodes = sorted(nodes)
    layers = sorted({n.layer for n in nodes})
    last = layers[-1]
    result["flow_nodes"] = ["/".join(map(str, n)) for n in nodes]
    bible = tokens[[i for i, label in enumerate(labels) if label == "bible"]]
    rate_ref = float(theme_presence(model, stack, nodes, bible).theme_rate.mean())
    result["rate_reference"] = rate_ref
    sampling = SamplingOptions(max_new_tokens=chosen.max_new_tokens, temperature=1.0, top_p=0.9,
                               seed=0, batch_size=8)
    # (modes, layers) of each call into the same row log: the compared pair only, or everything
    sweeps = ([(("single", "cumulative"), layers)] if chosen.every_layer else
              [(("single",), [seed_layer]), (("cumulative",), [last])])
    experiments = {
        "suppress": {"kind": "rescale", "coefficients": list(chosen.suppress),
                     "prompt_theme": "bible"},
        "activate": {"kind": "add", "coefficients": list(chosen.activate),
                     "prompt_theme": "pydoc"},
    }
    for k, (goal, spec) in enumerate(experiments.items()):
        step(f"steering: {goal} sweep", 0.45 + 0.2 * k)
        prompts = _prompts(tokens, labels, spec["prompt_theme"], 2, 12, tokenizer)
        for modes, sweep_layers in sweeps:
            frame = steering_sweep(model, stack, nodes, prompts,
                                   path=out / f"steering_{goal}.jsonl",
                                   coefficients=spec["coefficients"], intervention=spec["kind"],
                                   progress=progress,
                                   options=SweepOptions(goal=goal, modes=modes, layers=sweep_layers,
                                                        n_samples=chosen.n_samples,
                                                        rate_reference=rate_ref,
                                                        sampling=sampling))
        plot_sweep(frame, out / f"steering_{goal}.png", value="score",
                   title=f"{goal} the biblical flow: proxy score per layer and coefficient")
        table = _summary(frame, goal)
        what = ("Suppression (rescale by r, biblical prompts)" if goal == "suppress" else
                "Activation (add folded decoder rows, Python-doc prompts)")
        result["reading"] += _verdicts(table, goal, what, seed_layer, last)
        result[goal] = {"prompts": prompts, "coefficients": spec["coefficients"],
                        "summary": table.to_dict("records"),
                        "sweep": frame.drop(columns=["examples"]).to_dict("records"),
                        "heatmap": f"steering_{goal}.png"}
    step("steering: semantic check", 0.85)
    result["semantic"] = _semantic(model, stack, tokens, chosen, progress, chain)
    result["reading"] += result["semantic"]["reading"]
    result["seconds"] = time.perf_counter() - started
    return result


def _semantic(model: Any, stack: Mapping[int, LayerSAEs], tokens: torch.Tensor,
              settings: SteeringSettings, progress: bool,
              chain: ChainMatch | None = None) -> dict[str, Any]:
    res = {layer: stack[layer].res for layer in sorted(stack)}
    if chain is None or list(chain.layers) != list(res):
        chain = match_chain(res, progress=progress)
    by_layer = {layer: LayerSAEs(res=sae) for layer, sae in res.items()}
    sample = tokens[:settings.semantic_seqs]

    def top(keys: list[Any]) -> dict[Any, list[str]]:
        return top_activating_tokens(model, by_layer, sample, keys, k=10, progress=progress)

    found = semantic_evaluation(chain, top_tokens=top, progress=progress,
                                options=SemanticOptions(n_paths=settings.semantic_paths))
    composed = found.along[found.along.kind == "composed"]
    consecutive = found.pairs[found.pairs.kind == "consecutive"]
    reading = [f"Semantic check ({found.method}): of {int(consecutive.label.notna().sum())} "
               f"adjacent SAE Match links on sampled paths, "
               f"{int((consecutive.label == 3).sum())} share half or more of their top-10 "
               f"tokens (SAME), {int((consecutive.label == 1).sum())} share under a fifth "
               f"(DIFFERENT); mean overlap {consecutive.overlap.mean():.3f}."]
    if len(composed) > 1:
        first, far = composed.iloc[0], composed.iloc[-1]
        reading.append(f"Along the composed paths the mean label goes from {first.mean_label:.2f} "
                       f"at distance {int(first.distance)} to {far.mean_label:.2f} at distance "
                       f"{int(far.distance)} (1 = DIFFERENT, 3 = SAME).")
    return {"method": found.method, "counts": found.counts.to_dict("records"),
            "along": found.along.to_dict("records"), "reading": reading,
            "n_paths": settings.semantic_paths, "n_seqs": int(sample.shape[0])}


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "—" if math.isnan(value) else f"{value:.3f}"
        return "—" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


KIND_MEANING = {
    "consecutive": "an SAE Match link between adjacent layers",
    "composed": "the first layer's feature against where the composed links put it at layer_b",
    "direct": "the first layer's feature against its direct match at layer_b",
}
"""What each ``kind`` of the semantic tables compares."""

MAX_ROWS = 10
"""Steered settings listed per sweep in the report (the best by score); all are in the JSON."""


def _standard_error_bound(n: int) -> float:
    """Largest standard error of a mean of ``n`` values in [0, 1] (their SD is at most 0.5)."""
    return 0.5 / math.sqrt(n) if n > 0 else math.nan


def steering_markdown(section: Mapping[str, Any]) -> list[str]:
    """Report lines for :func:`steering_section`'s result."""
    lines = ["## Steering along a feature flow, and what matched features mean", ""]
    labels = section["sequence_labels"]
    lines += [f"Held-out sequences by source markup: {labels['bible']} biblical, "
              f"{labels['pydoc']} Python documentation, {labels['other']} neither. The theme is "
              "biblical text. Theme seeds are the residual features at layer "
              f"{section['seed_layer']} that fire on ≥ 5% of biblical tokens and whose firing "
              "is ≥ 90% biblical (`rate_theme`, `rate_rest`: firing rates on biblical and other "
              "tokens; `selectivity` = rate_theme / (rate_theme + rate_rest)):", ""]
    lines += _table(section["seeds"], ["feature", "rate_theme", "rate_rest", "selectivity"])
    lines += [""] + [f"- {s}" for s in section["reading"]] + [""]
    if "flow_nodes" not in section:
        return lines
    first = section["suppress"]["summary"][0]
    n = int(first.get("n_samples") or 0)
    lines += [f"The theme's flow has {len(section['flow_nodes'])} features (layer/module/"
              "feature): " + ", ".join(section["flow_nodes"]) + ".", "",
              "**The tiny model writes gibberish, steered or not** (see the unsteered examples "
              "below), so these numbers measure which tokens come out, not meaning. No "
              "language-model judge is used; the scores are proxies.", "",
              f"Columns: each row is one setting, and every column is a mean over its {n} "
              "generations. Per generation: theme rate = share of its (token, flow feature) pairs "
              "that fire; behaviour = min(1, theme rate / "
              f"{section['rate_reference']:.3f}) (the flow's firing rate on held-out biblical "
              "text); CE = the unsteered model's cross-entropy (nats) on the generated tokens; "
              "coherence = exp(−max(0, CE − the mean CE of the unsteered generations)); distinct "
              "= share of distinct tokens; score = (1 − behaviour) × coherence (suppression) or "
              "behaviour × coherence (activation). Because coherence is averaged per "
              "generation, the unsteered row's is below 1 whenever some of its generations are "
              "less likely than their mean. Error bars: a mean of "
              f"{n} values in [0, 1] has a standard error of at most "
              f"{_standard_error_bound(n):.2f}, so differences smaller than about twice that are "
              "noise.", ""]
    for goal in ("suppress", "activate"):
        part = section[goal]
        rows = part["summary"]
        steered = [r for r in rows if r["setting"] != "unsteered"]
        shown = [r for r in rows if r["setting"] == "unsteered"] + steered[:MAX_ROWS]
        title = ("Suppression: rescale the flow by r" if goal == "suppress" else
                 "Activation: add the flow's directions with coefficient s")
        lines += [f"### {title}", "", "Prompts: " + "; ".join(f"`{p!r}`" for p in part["prompts"]), "",
                  f"Every swept setting, best score first ({len(steered)} steered"
                  + (f"; the {MAX_ROWS} best are listed, all are in the heat-map "
                     f"`{part['heatmap']}` and `results.json`" if len(steered) > MAX_ROWS else
                     f"; heat-map `{part['heatmap']}`") + "):", ""]
        lines += _table(shown, ["setting", "coefficient", "theme_rate", "behaviour", "ce",
                                "coherence", "distinct", "score"])
        lines += ["", "Generations of the unsteered model and of the best setting:", ""]
        for row in shown[:2]:
            coefficient = row["coefficient"]
            unsteered = coefficient is None or (isinstance(coefficient, float)
                                                and math.isnan(coefficient))
            lines.append(f"- {row['setting']}:" if unsteered
                         else f"- {row['setting']}, coefficient {coefficient:g}:")
            lines += [f"    - {text!r}" for text in row["examples"]]
        lines.append("")
    semantic = section["semantic"]
    kinds = sorted({row["kind"] for row in semantic["counts"]})
    lines += ["### Do matched features mean the same? (offline proxy)", "",
              f"Labels by {semantic['method']} on {semantic.get('n_paths', '?')} sampled paths "
              f"(top-10 tokens over {semantic.get('n_seqs', '?')} held-out sequences): SAME when "
              "the two features' top-10 token sets overlap ≥ 0.5 (Jaccard), MAYBE ≥ 0.2, else "
              "DIFFERENT. This measures shared firing tokens, not meaning. `kind`: "
              + "; ".join(f"{k} = {KIND_MEANING.get(k, k)}" for k in kinds)
              + "; `n` = labelled pairs; `mean_label` on 1 (DIFFERENT) … 3 (SAME); "
              "`mean_overlap` = mean Jaccard of the top-10 token sets.", ""]
    lines += _table(semantic["counts"], ["kind", "layer_b", "n", "DIFFERENT", "MAYBE", "SAME",
                                         "mean_label", "mean_overlap"])
    lines += ["", "By distance along the paths:", "",
              *_table(semantic["along"], ["kind", "distance", "n", "mean_label",
                                          "mean_overlap"]), ""]
    return lines
