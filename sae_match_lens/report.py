"""Plots and the Markdown report of a pipeline run (see :mod:`sae_match_lens.demo`).

Every function takes plain results (a DataFrame or JSON-able dicts) and writes one file, so the
report can be rebuilt from ``results.json`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd

__all__ = [
    "plot_agreement",
    "plot_costs",
    "plot_paths",
    "plot_substitution",
    "write_report",
]

_METHOD_VARIANTS = ("folded", "raw", "hybrid", "error_preserving")


def _finish(fig: Any, ax: Any, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pair_label(a: Any, b: Any) -> str:
    return f"{a}→{b}"


def plot_substitution(table: pd.DataFrame, path: Path) -> Path:
    """Explained variance and ΔCE per layer pair, one line per variant and baseline."""
    table = table.copy()
    table["pair"] = [_pair_label(a, b) for a, b in zip(table.layer_a, table.layer_b, strict=True)]
    pairs = list(dict.fromkeys(table["pair"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for variant, rows in table.groupby("variant", sort=False):
        rows = rows.set_index("pair").reindex(pairs)
        style = "-o" if variant in _METHOD_VARIANTS else "--s"
        for ax, column in zip(axes, ("explained_variance", "delta_ce"), strict=True):
            ax.plot(pairs, rows[column], style, label=variant, markersize=4)
    axes[0].set_title("Explained variance of the state at B (higher is better)")
    axes[1].set_title("ΔCE in nats (lower is better)")
    axes[0].set_ylim(bottom=max(-1.0, float(table.explained_variance.min()) - 0.05), top=1.02)
    axes[1].set_yscale("symlog", linthresh=0.1)
    for ax in axes:
        ax.set_xlabel("layer pair (A→B)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_agreement(checks: Sequence[dict[str, Any]], path: Path) -> Path:
    """Composed-vs-direct agreement against layer distance (one dot per pair, mean line)."""
    frame = pd.DataFrame(checks)
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label, marker in (("agreement", "composed = direct", "o"),
                                  ("agreement_unfolded", "unfolded: composed = direct", "x")):
        if column not in frame:
            continue
        ax.scatter(frame.distance, frame[column], marker=marker, alpha=0.6, label=label)
        means = frame.groupby("distance")[column].mean()
        ax.plot(means.index, means.values, "-")
    ax.set_xlabel("layer distance (dst − src)")
    ax.set_ylabel("fraction of features")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(sorted(frame.distance.unique()))
    ax.set_title("Does P(A→C) ≈ P(B→C)∘P(A→B)?")
    return _finish(fig, ax, path)


def plot_costs(costs: dict[str, Sequence[float]], thresholds: dict[str, float], path: Path) -> Path:
    """Distribution of matched costs per adjacent pair, with each pair's unmatched threshold."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    finite = [c for values in costs.values() for c in values if math.isfinite(c) and c > 0]
    lo, hi = (min(finite), max(finite)) if finite else (1e-3, 1.0)
    bins = [lo * (hi / lo) ** (i / 60) for i in range(61)] if hi > lo else 30
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, values) in enumerate(costs.items()):
        colour = colours[i % len(colours)]
        ax.hist([v for v in values if math.isfinite(v) and v > 0], bins=bins, histtype="step",
                color=colour, label=label)
        if label in thresholds:
            ax.axvline(thresholds[label], color=colour, linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("match cost of the assigned partner (folded, summed squared distance)")
    ax.set_ylabel("features")
    ax.set_title("Match costs; dashed: data-free unmatched threshold (null model)")
    return _finish(fig, ax, path)


def plot_paths(paths: Sequence[dict[str, Any]], path: Path) -> Path:
    """A few traced feature paths: per-link cost, feature ids and top-activating tokens."""
    fig, ax = plt.subplots(figsize=(12, 1.4 + 1.3 * len(paths)))
    for row, p in enumerate(paths):
        y = len(paths) - row
        layers = [s["layer"] for s in p["steps"]]
        ax.plot(layers, [y] * len(layers), "-", color="grey", zorder=0)
        for s in p["steps"]:
            ax.scatter(s["layer"], y, s=60, zorder=1)
            tokens = ", ".join(repr(t) for t in s.get("top_tokens", [])[:3])
            cost = "" if s["cost"] is None or not math.isfinite(s["cost"]) else f" c={s['cost']:.2g}"
            ax.annotate(f"#{s['feature']}{cost}\n{tokens}", (s["layer"], y), xytext=(0, 9),
                        textcoords="offset points", ha="center", fontsize=7)
    ax.set_yticks(range(1, len(paths) + 1),
                  [f"path of #{p['steps'][0]['feature']}" for p in reversed(paths)])
    ax.set_xlabel("layer")
    all_layers = [s["layer"] for p in paths for s in p["steps"]] or [0]
    ax.set_xlim(min(all_layers) - 0.5, max(all_layers) + 0.5)
    ax.set_ylim(0.5, len(paths) + 0.9)
    ax.set_title("Traced features: id, link cost and top-activating tokens (held-out text)")
    ax.grid(alpha=0.2, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown_table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], table: pd.DataFrame, out: Path) -> Path:
    """Write ``report.md``: setting, tables, and a short reading of them."""
    s = results["setting"]
    lines = [
        "# SAE Match report",
        "",
        f"Model: {s['model']} ({s['n_layers']} layers, d_model {s['d_model']}); SAEs: {s['family']} "
        f"family, {s['n_saes']} SAEs with {s['d_sae']} features at `{s['hooks'][0]}` … `{s['hooks'][-1]}`; "
        f"evaluation on {s['n_tokens']} held-out tokens (BOS excluded).",
        "",
        "## What folding changed",
        "",
        "Adjacent matches with folded vs raw parameters: *agreement* is the fraction of features "
        "that folded and unfolded matching send to the same partner; *coactivation* is "
        "P(f_B[π(i)] > 0 | f_A[i] > 0) on held-out text for each permutation; the last column is the "
        "fraction of folded matches cheaper than the data-free unmatched threshold (the cost that "
        "only 1% of features reach against B's dictionary in a random basis).",
        "",
        _markdown_table(pd.DataFrame(results["folding_summary"])),
        "",
    ]
    lines += ["## Substitution: encode at A → permute → decode at B", "",
              "Mean over adjacent pairs (ΔCE and KL in nats; EV of the state at B):", "",
              _markdown_table(pd.DataFrame(results["substitution_summary"])), "",
              "Per pair:", "",
              _markdown_table(table[["layer_a", "layer_b", "variant", "explained_variance", "delta_ce",
                                     "kl", "coactivation"]]), ""]
    lines += ["## Composed vs direct matches", "",
              _markdown_table(pd.DataFrame(results["composition_by_distance"])), ""]
    lines += ["## Reading", ""] + [f"- {sentence}" for sentence in results["reading"]] + [""]
    lines += ["## Files", "",
              "- `results.json`: everything above, machine-readable.",
              "- `substitution.png`: EV and ΔCE per layer pair for every variant and baseline.",
              "- `agreement_vs_distance.png`: composed-vs-direct agreement against distance.",
              "- `match_costs.png`: match-cost distributions with the unmatched thresholds.",
              "- `feature_paths.png`: traced features with their top-activating tokens.",
              "", f"Run time: {results['seconds']:.0f} s.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
