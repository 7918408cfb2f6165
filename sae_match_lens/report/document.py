"""Plots, ``results.json`` and the Markdown report of a pipeline run (see :mod:`sae_match_lens.report.demo`).

Every function takes plain results (a DataFrame or JSON-able dicts) and writes one file, so the
report can be rebuilt from ``results.json`` alone. The reading (the verdicts) comes from
:mod:`sae_match_lens.report.verdicts`; every figure says in itself what its lines, markers and colours
mean.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from .verdicts import AGREEMENT_TOL, COACTIVATION_TOL, DELTA_CE_TOL, Tolerance, scale_verdict

__all__ = [
    "jsonable",
    "plot_agreement",
    "plot_costs",
    "plot_paths",
    "plot_substitution",
    "write_report",
    "write_results",
]

_METHOD_VARIANTS = ("folded", "raw", "hybrid", "error_preserving")

_VARIANT_STYLE: dict[str, tuple[str, str, str, float]] = {
    # variant: (legend label, colour, marker, marker size)
    "folded": ("folded (the method)", "C0", "o", 8),
    "raw": ("raw transfer units", "C1", "s", 5),
    "hybrid": ("hybrid (cheapest matches via P)", "C2", "^", 7),
    "error_preserving": ("error-preserving (A's error carried)", "C3", "D", 5),
    "identity": ("identity (drop the block)", "C4", "v", 7),
    "sae_b_reconstruction": ("SAE B reconstruction of true state", "C5", "P", 7),
    "sae_a_reconstruction": ("SAE A reconstruction used at B", "C6", "X", 7),
    "random_permutation": ("random permutation", "C7", "*", 9),
    "unfolded_matching": ("unfolded matching", "C8", "h", 4),
}
_SPARE_MARKERS = ("p", "<", ">", "8", "d", "H")

_EV_TOL = Tolerance(0.005)


def jsonable(value: Any) -> Any:
    """``value`` with tensors, arrays and numpy scalars turned into plain Python, and NaN / ±inf
    into ``None``, so that ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):  # torch / numpy, scalar or array
        return jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    raise TypeError(f"cannot write a {type(value).__name__} to results.json: {value!r}")


def write_results(results: Mapping[str, Any], path: Path) -> Path:
    """Write ``results.json`` as strict JSON (NaN and ±inf become ``null``)."""
    path.write_text(json.dumps(jsonable(results), indent=2, allow_nan=False))
    return path


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _style(variant: str, k: int) -> tuple[str, str, str, float]:
    return _VARIANT_STYLE.get(variant, (variant, f"C{k % 10}", _SPARE_MARKERS[k % len(_SPARE_MARKERS)], 6))


def _block(hook: Any) -> str | None:
    found = re.match(r"blocks\.(\d+)\.", str(hook))
    return found.group(1) if found else None


def _pair_labels(table: pd.DataFrame) -> dict[tuple[Any, Any], str]:
    labels = {}
    for row in table.itertuples(index=False):
        a, b = _block(getattr(row, "hook_a", "")), _block(getattr(row, "hook_b", ""))
        labels[(row.layer_a, row.layer_b)] = f"{a}→{b}" if a and b else f"{row.layer_a}→{row.layer_b}"
    return labels


def _hook_kind(hooks: Sequence[Any]) -> str:
    kinds = {str(h).rsplit(".", 1)[-1] for h in hooks}
    return kinds.pop() if len(kinds) == 1 else "hooks"


def _coinciding(frame: pd.DataFrame, tol: Tolerance) -> list[list[str]]:
    """Groups of columns (variants) equal within ``tol`` in every row where both are finite."""
    groups: list[list[str]] = []
    for name in frame.columns:
        for group in groups:
            ref = frame[group[0]]
            pairs = [(a, b) for a, b in zip(frame[name], ref, strict=True) if _finite(a) and _finite(b)]
            if pairs and all(tol.same(a, b) for a, b in pairs):
                group.append(name)
                break
        else:
            groups.append([name])
    return [g for g in groups if len(g) > 1]


def _caption(fig: Any, text: str, width: int) -> None:
    fig.text(0.01, 0.01, textwrap.fill(text, width), fontsize=8, va="bottom", ha="left")


def _nice_ticks(lo: float, hi: float) -> list[float]:
    """Log-axis ticks at 1-2-5 × 10^k inside [lo, hi]; finer mantissas when that gives < 3."""
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8), tuple(1 + i / 10 for i in range(90))):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo / 1.001 <= m * 10.0 ** e <= hi * 1.001]
        if len(ticks) >= 3:
            break
    return [float(f"{t:.6g}") for t in ticks]


def _tick_label(v: float) -> str:
    return f"{v:g}"


def plot_substitution(table: pd.DataFrame, path: Path) -> Path:
    """Explained variance and ΔCE per layer pair, one line per variant and baseline.

    Variants far below the others in EV (the random permutation) are left out of the EV panel
    and their range is written in it instead; lines that coincide are shifted sideways a little,
    drawn with different markers, and named in a note.
    """
    labels = _pair_labels(table)
    pairs = list(dict.fromkeys(zip(table.layer_a, table.layer_b, strict=True)))
    variants = list(dict.fromkeys(table.variant))
    wide = {column: table.pivot_table(index=["layer_a", "layer_b"], columns="variant", values=column,
                                      aggfunc="first", dropna=False).reindex(pairs)[variants]
            for column in ("explained_variance", "delta_ce")}
    ev = wide["explained_variance"]
    off_scale = []
    for v in variants:
        others = ev.drop(columns=v)
        lo_others, hi_others = float(others.min().min()), float(others.max().max())
        if _finite(lo_others) and _finite(float(ev[v].max())) and \
                float(ev[v].max()) < lo_others - max(0.1, hi_others - lo_others):
            off_scale.append(v)

    fig, axes = plt.subplots(1, 2, figsize=(14, 6.2))
    x = list(range(len(pairs)))
    spread = 0.3 / max(len(variants) - 1, 1)
    handles = []
    for k, v in enumerate(variants):
        label, colour, marker, size = _style(v, k)
        line = "-" if v in _METHOD_VARIANTS else "--"
        xs = [xi + (k - (len(variants) - 1) / 2) * spread for xi in x]
        for ax, column in zip(axes, ("explained_variance", "delta_ce"), strict=True):
            if column == "explained_variance" and v in off_scale:
                continue
            ax.plot(xs, wide[column][v], linestyle=line, marker=marker, markersize=size, color=colour,
                    markeredgecolor="black" if v == "folded" else colour,
                    linewidth=2 if v == "folded" else 1.2)
        handles.append(Line2D([], [], linestyle=line, marker=marker, markersize=size, color=colour,
                              label=label + (" †" if v in off_scale else "")))
    for ax in axes:
        ax.set_xticks(x, [labels[p] for p in pairs])
        ax.set_xlabel(f"layer pair A→B (blocks of the SAEs' {_hook_kind(table.get('hook_a', []))})")
        ax.grid(alpha=0.3)
    axes[0].set_title("Explained variance of the state at B (higher is better)")
    axes[1].set_title("ΔCE in nats, log scale (lower is better)")
    if off_scale:
        bottom, top = axes[0].get_ylim()
        axes[0].set_ylim(bottom - 0.2 * (top - bottom), top)
        notes = [f"† {_style(v, variants.index(v))[0]}: EV {ev[v].min():.3f} … {ev[v].max():.3f}, "
                 "far below the rest, not drawn here" for v in off_scale]
        axes[0].text(0.02, 0.02, "\n".join(notes), transform=axes[0].transAxes, fontsize=8, va="bottom",
                     bbox={"facecolor": "white", "edgecolor": "grey", "alpha": 0.9})
    ce = wide["delta_ce"].to_numpy().ravel()
    positive = [float(c) for c in ce if _finite(c) and c > 0]
    if positive and all(float(c) > 0 for c in ce if _finite(c)):
        axes[1].set_yscale("log")
        ticks = _nice_ticks(*axes[1].get_ylim())
        axes[1].yaxis.set_major_locator(FixedLocator(ticks))
        axes[1].set_yticklabels([_tick_label(t) for t in ticks])
        axes[1].yaxis.set_minor_locator(NullLocator())
        axes[1].yaxis.set_minor_formatter(NullFormatter())
    elif positive:
        axes[1].set_yscale("symlog", linthresh=min(positive))
    fig.legend(handles=handles, loc="upper center", ncol=5, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.995))
    notes = ["Solid lines: the method (folded) and its variants; dashed lines: baselines. Each "
             "variant's markers are shifted sideways a little so that lines which coincide stay "
             "visible."]
    for name, column, tol, unit in (("EV", "explained_variance", _EV_TOL, ""),
                                    ("ΔCE", "delta_ce", DELTA_CE_TOL, " nats")):
        frame = wide[column].drop(columns=off_scale if column == "explained_variance" else [])
        for group in _coinciding(frame, tol):
            names = "; ".join(_style(v, variants.index(v))[0] for v in group)
            notes.append(f"{name} lines that overlap (within {tol.describe(unit)} in every pair): {names}.")
    _caption(fig, " ".join(notes), 190)
    fig.tight_layout(rect=(0, 0.03 + 0.025 * len(notes), 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_agreement(checks: Sequence[Mapping[str, Any]], path: Path, *, chance: float | None = None) -> Path:
    """Composed-vs-direct agreement against layer distance (one dot per pair, a line through the
    means), folded and unfolded matching, with the chance level ``chance`` (1 / d_sae)."""
    frame = pd.DataFrame(checks)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    series = (("agreement", "folded matching", "o", "C0", -0.04),
              ("agreement_unfolded", "unfolded matching", "x", "C1", 0.04))
    for column, label, marker, colour, dx in series:
        if column not in frame:
            continue
        ax.scatter(frame.distance + dx, frame[column], marker=marker, color=colour, alpha=0.6,
                   label=f"{label}: one pair (A, C)")
        means = frame.groupby("distance")[column].mean()
        ax.plot(means.index + dx, means.values, "-", color=colour, label=f"{label}: mean")
        for d, m in means.items():
            ax.annotate(f"{100 * m:.1f}%", (d + dx, m), xytext=(6 if dx > 0 else -6, 8),
                        textcoords="offset points", fontsize=8, color=colour,
                        ha="left" if dx > 0 else "right")
    if _finite(chance):
        ax.axhline(chance, color="black", linestyle=":", linewidth=1,
                   label=f"chance (1/d_sae = {100 * chance:.2g}%)")
    ax.set_xlabel("distance between A and C in model layers")
    ax.set_ylabel("fraction of A's features whose composed\npartner equals the direct partner")
    values = [float(v) for c in ("agreement", "agreement_unfolded") if c in frame for v in frame[c]
              if _finite(v)]
    ax.set_ylim(0, min(1.02, max(0.25, 1.4 * max(values, default=1.0))))
    distances = sorted(frame.distance.unique()) if len(frame) else []
    ax.set_xticks(distances)
    if distances:
        ax.set_xlim(min(distances) - 0.4, max(distances) + 0.4)
    ax.set_title("Composed vs direct: does P(A→C) = P(B→C)∘P(A→B)?")
    notes = []
    if {"agreement", "agreement_unfolded"} <= set(frame.columns):
        means = frame.groupby("distance")[["agreement", "agreement_unfolded"]].mean()
        if _coinciding(means, AGREEMENT_TOL):
            notes.append(f"Folded and unfolded means coincide (within {100 * AGREEMENT_TOL.absolute:g} "
                         "percentage point at every distance); the two series are shifted sideways.")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if notes:
        _caption(fig, " ".join(notes), 110)
    fig.tight_layout(rect=(0, 0.06 if notes else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_costs(costs: Mapping[str, Sequence[float]], thresholds: Mapping[str, float], path: Path, *,
               null_rate: float | None = None) -> Path:
    """Distribution of matched costs per adjacent pair, with each pair's unmatched threshold."""
    fig, ax = plt.subplots(figsize=(8.5, 5.4))
    finite = [c for values in costs.values() for c in values if _finite(c) and c > 0]
    lo, hi = (min(finite), max(finite)) if finite else (1e-3, 1.0)
    bins = [lo * (hi / lo) ** (i / 60) for i in range(61)] if hi > lo else 30
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    left_out = 0
    for i, (label, values) in enumerate(costs.items()):
        colour = colours[i % len(colours)]
        kept = [v for v in values if _finite(v) and v > 0]
        left_out += len(values) - len(kept)
        threshold = thresholds.get(label)
        below = ""
        if _finite(threshold) and values:
            share = sum(_finite(v) and v < threshold for v in values) / len(values)
            below = f"; threshold {threshold:.3g}, {100 * share:.1f}% of matches below it"
        ax.hist(kept, bins=bins, histtype="step", color=colour, linewidth=1.4,
                label=f"pair {label}{below}")
        if _finite(threshold):
            ax.axvline(threshold, color=colour, linestyle="--", linewidth=1.2)
    ax.set_xscale("log")
    if finite and hi > lo:
        ticks = _nice_ticks(*ax.get_xlim())
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.set_xticklabels([_tick_label(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("match cost of the assigned partner (folded parameters, log scale; lower = closer)")
    ax.set_ylabel("number of features of A")
    ax.set_title("Match costs of the adjacent one-to-one matches")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    rate = f"{100 * null_rate:.2g}%" if _finite(null_rate) else "a small fraction"
    note = (f"Dashed vertical line (same colour as its pair): the data-free unmatched threshold, the "
            f"cost that a chance partner (B's dictionary in a random basis) beats for {rate} of A's "
            "features. A match left of its line is more certain than chance.")
    drawn = [t for t in thresholds.values() if _finite(t) and t > 0]
    if len(drawn) > 1 and max(drawn) / min(drawn) < 1.1:
        note += (f" The thresholds of all pairs lie within {min(drawn):.3g}–{max(drawn):.3g}, so their "
                 "lines overlap; the legend gives each value.")
    if left_out:
        note += f" {left_out} features with no partner or a non-positive cost are not drawn."
    _caption(fig, note, 120)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_paths(paths: Sequence[Mapping[str, Any]], path: Path, *,
               thresholds: Mapping[int, float] | None = None,
               hooks: Sequence[str] | None = None) -> Path:
    """A few traced feature paths: per-link cost (colour and ``c=``), feature ids and
    top-activating tokens; features that never fire on the evaluation text are marked.

    Each step's ``layer`` is a model layer (the x axis). ``thresholds[l]`` is the null
    threshold of the match that leads into model layer ``l``; a link cheaper than it gets a
    ``*``. ``hooks`` (the SAEs' hook names) names the hook kind on the layer axis.
    """
    fig, ax = plt.subplots(figsize=(13, 2.6 + 1.3 * len(paths)))
    costs = [s["cost"] for p in paths for s in p["steps"] if _finite(s.get("cost")) and s["cost"] > 0]
    norm = LogNorm(min(costs), max(costs)) if costs and min(costs) < max(costs) else Normalize(0, 1)
    cmap = plt.get_cmap("viridis")
    n_never = n_points = 0
    for row, p in enumerate(paths):
        y = len(paths) - row
        layers = [s["layer"] for s in p["steps"]]
        ax.plot(layers, [y] * len(layers), "-", color="lightgrey", zorder=0)
        for s in p["steps"]:
            cost = s.get("cost")
            fires = not (_finite(s.get("firing_rate")) and s["firing_rate"] == 0)
            n_never += not fires
            n_points += 1
            colour = cmap(norm(cost)) if _finite(cost) and cost > 0 else "white"
            ax.scatter(s["layer"], y, s=110, color=colour, edgecolors="black", zorder=1,
                       marker="o" if fires else "X", linewidths=1 if fires else 1.5)
            star = ""
            if thresholds is not None and _finite(cost) and _finite(thresholds.get(s["layer"])):
                star = "*" if cost < thresholds[s["layer"]] else ""
            link = f" c={cost:.2g}{star}" if _finite(cost) else " (start)"
            tokens = ", ".join(repr(t) for t in s.get("top_tokens", [])[:3]) if fires else "never fires"
            ax.annotate(f"#{s['feature']}{link}\n{tokens}", (s["layer"], y), xytext=(0, 11),
                        textcoords="offset points", ha="center", fontsize=7)
    ax.set_yticks(range(1, len(paths) + 1),
                  [f"#{p['steps'][0]['feature']} (total c={p['total_cost']:.2g})"
                   if _finite(p.get("total_cost")) else f"#{p['steps'][0]['feature']}"
                   for p in reversed(paths)])
    all_layers = sorted({s["layer"] for p in paths for s in p["steps"]}) or [0]
    ax.set_xticks(all_layers)
    ax.set_xlabel(f"model layer (SAEs at {_hook_kind(hooks)})" if hooks else "model layer")
    ax.set_xlim(min(all_layers) - 0.5, max(all_layers) + 0.5)
    ax.set_ylim(0.5, len(paths) + 0.9)
    ax.set_title("Traced features through the adjacent matches (held-out text)")
    ax.grid(alpha=0.2, axis="x")
    if costs:
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01, fraction=0.03)
        bar.set_label("c = cost of the match from the previous layer (lower = closer)", fontsize=8)
        if isinstance(norm, LogNorm):
            ticks = _nice_ticks(norm.vmin, norm.vmax)
            bar.set_ticks(ticks, labels=[_tick_label(t) for t in ticks])
            bar.ax.yaxis.set_minor_locator(NullLocator())
    note = ("Each row follows one feature of the first SAE through the one-to-one matches of "
            "adjacent layers (the complete paths with the lowest total cost among features that "
            "fire on the evaluation text). Each point: #feature id at that layer; c = cost of the "
            "match that led to it (its colour); below, the feature's top-activating tokens on "
            "held-out text. White point: the start, no incoming match.")
    if thresholds is not None:
        note += " c=…*: cheaper than that pair's data-free null threshold (more certain than chance)."
    if n_never:
        note += (f" X marker: the feature never fires on the evaluation tokens ({n_never} of "
                 f"{n_points} points).")
    _caption(fig, note, 160)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown_table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                cells.append("n/a")
            else:
                cells.append(floatfmt.format(v) if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _scale_section(results: Mapping[str, Any]) -> list[str]:
    scales = results.get("scales") or []
    if not scales:
        return []
    columns = ["layer", "hook_name", "fold_rule", "mean_threshold", "mean_decoder_norm",
               "mean_fold_scale", "fold_scale_cv", "mean_firing_activation", "mean_resid_norm"]
    frame = pd.DataFrame(scales)
    frame = frame[[c for c in columns if c in frame.columns]]
    return ["## Does the SAEs' scale track the residual-stream norm? (the paper's Figure 1)", "",
            "Per SAE: the fold's scale rule (*threshold*: JumpReLU, s = θ; *decoder_norm*: "
            "s = 1/‖W_dec[i]‖; *none*: s = 1), the mean threshold θ (n/a without one), the mean "
            "decoder-row norm, the mean and coefficient of variation (std/mean within the layer) "
            "of the per-feature fold scale s, the mean raw activation of features where they fire, "
            "and the mean L2 norm of the residual stream at the SAE's hook, both on the evaluation "
            "tokens (BOS excluded). r below is the correlation across layers with that norm.", "",
            _markdown_table(frame), "", scale_verdict(scales), ""]


VARIANT_MEANING: dict[str, str] = {
    "folded": "the method: encode at A, permute with the folded match, decode at B",
    "raw": "the same, but the activations are moved in raw instead of folded units",
    "hybrid": "the cheaper half of the matches go through the permutation, the rest are "
              "decoded by A's own decoder",
    "error_preserving": "the method plus A's reconstruction error carried across (separates "
                        "the SAE's error from the matching error)",
    "identity": "drop the blocks: B's state is A's state",
    "sae_b_reconstruction": "B's own SAE reconstruction of the true state (not a substitute: the "
                            "floor of any path through B's SAE)",
    "sae_a_reconstruction": "A's SAE reconstruction used as the state at B",
    "random_permutation": "the method with a random permutation (chance)",
    "unfolded_matching": "the method with a match on raw, unfolded parameters",
}
"""One line per substitution variant of the report."""


def _summary(results: Mapping[str, Any]) -> list[str]:
    """The one-minute summary: the verdicts that matter, with their numbers."""
    reading_ = list(results.get("reading", []))
    picks = [s for s in reading_[:1]]
    picks += [s for s in reading_ if s.startswith("The method") and "random permutation" in s]
    picks += [s for s in reading_ if s.startswith(("Folding changed", "Composed and direct"))]
    flow = results.get("flow") or {}
    flow_reading = list(flow.get("reading", []))
    picks += flow_reading[:1]
    picks += [s for s in flow_reading if s.startswith(("Predecessor reading", "Deactivating"))]
    steering = results.get("steering") or {}
    picks += [s for s in steering.get("reading", []) if "best proxy score" in s]
    picks += [s for s in steering.get("reading", []) if s.startswith("Semantic check")]
    lines = ["## Summary", ""] + [f"- {s}" for s in dict.fromkeys(picks)]
    if steering.get("flow_nodes"):
        lines.append("- The tiny model's generations are gibberish even without steering; the "
                     "steering numbers measure which tokens come out, not meaning.")
    size = results.get("size") or {}
    if size:
        flow_size, steer = size.get("flow", {}), size.get("steering", {})
        lines += ["", f"Size `{size.get('name')}`: {size.get('n_seqs')} held-out sequences "
                  f"({size.get('n_tokens')} tokens) for substitution, links and flows; "
                  f"composition up to distance {size.get('max_distance')}"
                  + (f"; the causal check at {len(flow.get('causal_layers') or [])} target "
                     f"layers on {flow_size.get('causal_seqs')} sequences"
                     if flow.get("causal_layers") else "")
                  + (f"; steering with {len(steer.get('suppress', []))} coefficients per sweep "
                     f"and {2 * int(steer.get('n_samples', 0))} generations of "
                     f"{steer.get('max_new_tokens')} tokens per setting" if steer else "")
                  + ". Each section states its sample and error bars; `sae-match demo --full` "
                  "runs the larger setting."]
    return [*lines, ""]


def write_report(results: Mapping[str, Any], table: pd.DataFrame | None, out: Path) -> Path:
    """Write ``report.md``: a one-minute summary, then every verdict, then the tables with what
    each row and column means.

    ``table`` is the substitution table; None rebuilds it from ``results["substitution"]``.
    """
    s = results["setting"]
    table = pd.DataFrame(results["substitution"]) if table is None else table
    rate = results.get("null_rate")
    rate_text = f"{100 * rate:.2g}%" if _finite(rate) else "a small fraction"
    lines = [
        "# SAE Match report",
        "",
        f"Model: {s['model']} ({s['n_layers']} layers, d_model {s['d_model']}); SAEs: {s['family']} "
        f"family, {s['n_saes']} SAEs with {s['d_sae']} features at `{s['hooks'][0]}` … `{s['hooks'][-1]}`; "
        f"evaluation on {s['n_tokens']} held-out tokens (BOS excluded).",
        "",
    ]
    lines += _summary(results)
    lines += [
        "## Reading",
        "",
        "Each sentence is computed from the tables below. Two ΔCE values count as "
        f"indistinguishable when they differ by at most {DELTA_CE_TOL.describe(' nats')} (the "
        "tables carry no per-token variances); co-activations within "
        f"{COACTIVATION_TOL.describe()}, agreements within {AGREEMENT_TOL.describe()}. "
        "The method is `folded`: encode at A, permute with the folded match, decode at B.",
        "",
    ] + [f"- {sentence}" for sentence in results.get("reading", [])] + [""]
    lines += [
        "## What folding changed",
        "",
        "Adjacent matches with folded vs raw parameters: *agreement* is the fraction of features "
        "that folded and unfolded matching send to the same partner; *coactivation* is "
        "P(f_B[π(i)] fires | f_A[i] fires) (fires: activation ≠ 0) on held-out text for each "
        "permutation; the last column is the "
        "fraction of folded matches cheaper than the data-free unmatched threshold (the cost that "
        f"a chance partner, B's dictionary in a random basis, beats for {rate_text} of A's features).",
        "",
        _markdown_table(pd.DataFrame(results["folding_summary"])),
        "",
    ]
    lines += _scale_section(results)
    variants = list(dict.fromkeys(r["variant"] for r in results["substitution_summary"]))
    lines += ["## Substitution: encode at A → permute → decode at B", "",
              "Mean over adjacent pairs (`explained_variance` of the state at B; `delta_ce` and "
              "`kl` in nats against the unmodified model; `coactivation` as above). Variants:", ""]
    lines += [f"- `{v}`: {VARIANT_MEANING.get(v, v)}" for v in variants] + [""]
    lines += [_markdown_table(pd.DataFrame(results["substitution_summary"])), "",
              "Per pair: `substitution.png` and `results.json`.", ""]
    lines += ["## Composed vs direct matches", "",
              "`agreement` = share of features whose composed chain of adjacent matches ends at "
              "the same feature as the direct match over that distance (mean over start layers; "
              "`agreement_unfolded`: the same with unfolded matching).", "",
              _markdown_table(pd.DataFrame(results["composition_by_distance"])), ""]
    if results.get("flow"):
        from .flow_section import flow_markdown

        lines += flow_markdown(results["flow"], _markdown_table)
    if results.get("steering"):
        from .steering_section import steering_markdown

        lines += steering_markdown(results["steering"])
    steering_files = [f"`{e['heatmap']}`" for e in (results.get("steering") or {}).values()
                      if isinstance(e, dict) and e.get("heatmap")]
    stages = results.get("stage_seconds") or {}
    lines += ["## Files", "",
              "- `results.json`: everything above, machine-readable (strict JSON; missing values are null).",
              "- `substitution.png`: EV and ΔCE per layer pair, the method, its variants and baselines.",
              "- `agreement_vs_distance.png`: composed-vs-direct agreement against distance, with chance.",
              "- `match_costs.png`: match-cost distributions with the data-free unmatched thresholds.",
              "- `feature_paths.png`: traced features with link costs and top-activating tokens.",
              *(["- `flow_graph.png`, `flow_graph.json`: one traced feature flow (picture and "
                 "node-link JSON)."] if results.get("flow") else []),
              *([f"- {', '.join(steering_files)}: steering sweeps (proxy score per layer and "
                 "coefficient); `steering_*.jsonl`: their rows."] if steering_files
                else []),
              "", f"Run time: {results.get('seconds', math.nan):.0f} s"
              + (" (" + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + ")"
                 if stages else "") + ".", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
