"""The demo's feature-flow section: link quality against data-based ceilings, the weight ablation,
transitions vs permutations, predecessor readings and origin groups, one flow graph, persistence
and the causal check, each with sentences computed from its numbers.

:func:`flow_section` runs everything on a stack ``{layer: LayerSAEs}`` (module SAEs optional: the
module parts are skipped, and the report says so, when a layer has only a residual SAE) and
returns a JSON-ready dict; :func:`flow_markdown` turns that dict into report lines.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .adapters import hook_name_of
from .causal import causal_check
from .coactivation import best_partner, coactivation_stats, evaluate_links
from .flow import LayerSAEs, flow_graph, origin_groups, persistence, predecessors
from .linking import SCORES, links
from .matching import MatchResult

__all__ = ["ABLATION", "flow_markdown", "flow_section", "link_quality", "link_verdicts",
           "weight_ablation"]

logger = logging.getLogger(__name__)

OURS = "cosine_density"
"""The package's default link score, the one the verdicts are about."""
PERMUTATION = "sae_match_permutation"
ABLATION: dict[str, dict[str, float]] = {
    "encoder": {"encoder": 1.0}, "decoder": {"decoder": 1.0},
    "all": {"decoder": 1.0, "encoder": 1.0, "b_enc": 1.0},
}
"""Parameter blocks of the matching cost in SAE Match's weight ablation."""
CEILING_TARGET = 0.9
"""The share of the data-based best-partner ceiling the default score aims for."""


def _adjacent(stack: Mapping[int, LayerSAEs]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in itertools.pairwise(stack) if b == a + 1]


def link_quality(model: Any, stack: Mapping[int, LayerSAEs], tokens: torch.Tensor, *,
                 permutations: Mapping[tuple[int, int], MatchResult] | None = None,
                 ablation: bool = True, batch_size: int = 8,
                 progress: bool = False) -> pd.DataFrame:
    """Top-1 link quality of every score (and the SAE Match permutation when given) on every
    adjacent residual pair, with the Jaccard ceilings and the correlation references
    (:func:`~sae_match_lens.coactivation.evaluate_links` with ``ceilings="all"``); with
    ``ablation``, also ``folded_mse`` top-1 links restricted to the :data:`ABLATION` blocks, folded
    and unfolded (methods ``mse_<blocks>_<folded|unfolded>``)."""
    pairs = _adjacent(stack)
    res = {layer: s.res for layer, s in stack.items()}
    methods: dict[str, dict[tuple[int, int], Any]] = {name: {} for name in SCORES}
    for a, b in pairs:
        for score in SCORES:
            methods[score][(a, b)] = links(res[a], res[b], k=1, score=score, progress=False)
        if permutations is not None and (a, b) in permutations:
            methods.setdefault(PERMUTATION, {})[(a, b)] = permutations[(a, b)]
        if ablation:
            for name, weights in ABLATION.items():
                for fold in (True, False):
                    key = f"mse_{name}_{'folded' if fold else 'unfolded'}"
                    methods.setdefault(key, {})[(a, b)] = links(
                        res[a], res[b], k=1, score="folded_mse", weights=weights, fold=fold,
                        progress=False)
    return evaluate_links(model, res, tokens, methods, pairs=pairs, ceilings="all",
                          batch_size=batch_size, progress=progress)


def link_verdicts(table: pd.DataFrame) -> list[str]:
    """Sentences computed from :func:`link_quality`'s table: does the default score beat decoder
    cosine and the permutation in every pair, and how close does it come to the ceiling."""
    top = table[table.k == 1].pivot(index=["layer_a", "layer_b"], columns="method",
                                    values="jaccard")
    if OURS not in top:
        return []
    out = []
    n = len(top)
    for rival, label in (("decoder_cosine", "Feature Flow's decoder cosine"),
                         (PERMUTATION, "the SAE Match permutation")):
        if rival not in top:
            continue
        wins = int((top[OURS] > top[rival]).sum())
        losses = [f"{a}→{b}" for (a, b), r in top.iterrows() if not r[OURS] > r[rival]]
        tail = "" if not losses else f"; it does not in {', '.join(losses)}"
        out.append(f"The default link score ({OURS}) has a higher top-1 Jaccard than {label} in "
                   f"{wins} of {n} adjacent pairs (mean {top[OURS].mean():.3f} vs "
                   f"{top[rival].mean():.3f}){tail}.")
    ours = table[(table.method == OURS) & (table.k == 1)]
    frac = float(ours.fraction_of_ceiling.mean())
    met = "meets" if frac >= CEILING_TARGET else "falls short of"
    out.append(f"It reaches {frac:.1%} of the data-based best-partner ceiling on average "
               f"(lowest pair {float(ours.fraction_of_ceiling.min()):.1%}), which {met} the "
               f"{CEILING_TARGET:.0%} target; the best data-free score here is "
               f"{top.mean().idxmax()} ({top.mean().max():.3f}).")
    ref = float(ours.reference_correlation_best_partner.mean())
    if math.isfinite(ref):
        cmp = "above" if top[OURS].mean() > ref else "below"
        out.append(f"Matching on activation correlation instead (a data-based reference) gives "
                   f"{ref:.3f}: the data-free score is {cmp} it.")
    return out


def weight_ablation(table: pd.DataFrame) -> dict[str, Any]:
    """SAE Match's weight ablation on the link metric: mean top-1 Jaccard of ``folded_mse`` links
    on each :data:`ABLATION` block set, folded and unfolded, and whether the paper's finding
    (encoder only poor, decoder only on par with all parameters) holds here (on par: within
    0.01 Jaccard)."""
    rows = table[table.method.str.startswith("mse_") & (table.k == 1)]
    if rows.empty:
        return {}
    mean = rows.groupby("method").jaccard.mean()
    values = {f"{name}_{kind}": float(mean[f"mse_{name}_{kind}"])
              for name in ABLATION for kind in ("folded", "unfolded")}
    enc, dec, full = (values[f"{n}_folded"] for n in ("encoder", "decoder", "all"))
    encoder_poor = enc < min(dec, full)
    decoder_on_par = abs(dec - full) <= 0.01
    sentence = (
        f"Weight ablation (top-1 links by folded squared distance of the chosen blocks): encoder "
        f"only {enc:.3f}, decoder only {dec:.3f}, all parameters {full:.3f}. The paper finds the "
        f"encoder alone poor and the decoder alone on par with all parameters; here the encoder "
        f"alone is {'poorer' if encoder_poor else 'not poorer'} and the decoder alone is "
        f"{'on par with' if decoder_on_par else 'not on par with'} all parameters, so the finding "
        f"{'holds' if encoder_poor and decoder_on_par else 'does not fully hold'}. Unfolded: "
        f"encoder {values['encoder_unfolded']:.3f}, decoder {values['decoder_unfolded']:.3f}, all "
        f"{values['all_unfolded']:.3f}.")
    return {"jaccard": values, "encoder_poor": encoder_poor, "decoder_on_par": decoder_on_par,
            "sentence": sentence}


def _transition_table(model: Any, stack: Mapping[int, LayerSAEs], tokens: torch.Tensor,
                      permutations: Mapping[tuple[int, int], MatchResult] | None,
                      progress: bool) -> pd.DataFrame:
    from .evaluation import Substitution, Variant, evaluate_substitution

    variants = ["folded", "transition_decoder_cosine", "transition_cosine_density",
                Variant("transition_cosine_density_top2", Substitution("permute", "folded"),
                        "links", OURS, 2),
                "identity", "sae_b_reconstruction"]
    res = {layer: s.res for layer, s in stack.items()}
    return evaluate_substitution(model, res, tokens, pairs=_adjacent(stack), variants=variants,
                                 permutations=permutations, batch_size=8, progress=progress)


def _transition_verdict(table: pd.DataFrame) -> str:
    mean = table.groupby("variant", sort=False)[["explained_variance", "delta_ce", "kl"]].mean()
    perm, ff = mean.loc["folded"], mean.loc["transition_decoder_cosine"]
    ours = mean.loc["transition_cosine_density"]
    best = mean.loc[["folded", "transition_decoder_cosine", "transition_cosine_density",
                     "transition_cosine_density_top2"]].delta_ce.idxmin()
    anchors = []
    for name, label in (("identity", "skipping the block (identity)"),
                        ("sae_b_reconstruction", "B's own reconstruction of the true state")):
        if name in mean.index:
            better = mean.loc[name].delta_ce < mean.loc[best].delta_ce
            anchors.append(f"{label} costs {mean.loc[name].delta_ce:.3f} nats, "
                           f"{'less' if better else 'no less'} than the best substitute")
    return (f"Substituting through a many-to-one transition (B's folded activation j = sum of A's "
            f"folded activations linked to j): Feature Flow's top-1 decoder-cosine transition has "
            f"mean EV {ff.explained_variance:.3f} and ΔCE {ff.delta_ce:.3f} nats, the "
            f"{OURS} transition EV {ours.explained_variance:.3f} / ΔCE {ours.delta_ce:.3f}, the "
            f"SAE Match permutation EV {perm.explained_variance:.3f} / ΔCE {perm.delta_ce:.3f}; "
            f"the lowest ΔCE is {best}'s" + (f"; {'; '.join(anchors)}." if anchors else "."))


def _pick_seed(stack: Mapping[int, LayerSAEs], survival: pd.DataFrame,
               fire_counts: Mapping[int, torch.Tensor]) -> tuple[int, int]:
    """The first layer's feature whose chain survives longest, ties broken by firing count."""
    layer = min(stack)
    rows = survival[survival.layer == layer].copy()
    rows["fires"] = fire_counts[layer][torch.as_tensor(rows.feature.to_numpy().copy())].numpy()
    best = rows.sort_values(["survives", "fires"], ascending=False).iloc[0]
    return layer, int(best.feature)


def _fire_counts(model: Any, stack: Mapping[int, LayerSAEs], tokens: torch.Tensor,
                 batch_size: int) -> dict[int, torch.Tensor]:
    from .coactivation import record_states
    from .metrics import fires, scored_states

    names = [hook_name_of(s.res) for s in stack.values()]
    counts = {layer: torch.zeros(s.res.cfg.d_sae, dtype=torch.int64) for layer, s in stack.items()}
    for batch in tokens.split(batch_size):
        states = record_states(model, names, batch)
        for layer, s in stack.items():
            h = scored_states(states[hook_name_of(s.res)])
            counts[layer] += fires(s.res.encode(h)).reshape(-1, s.res.cfg.d_sae).sum(0).cpu()
    return counts


def _causal_table(model: Any, stack: Mapping[int, LayerSAEs], tokens: torch.Tensor,
                  permutations: Mapping[tuple[int, int], MatchResult] | None, *, n_seqs: int,
                  positions: int, max_targets: int, progress: bool) -> pd.DataFrame:
    """Feature Flow's deactivation experiment for every layer and predecessor module."""
    frames = []
    for layer, here in stack.items():
        sources = {"res": stack[layer - 1].res if layer - 1 in stack else None,
                   "mlp": here.mlp, "attn": here.attn}
        toks = tokens[:n_seqs]
        for module, pred in sources.items():
            if pred is None:
                continue
            methods: dict[str, Any] = {}
            if module == "res" and permutations is not None and (layer - 1, layer) in permutations:
                perm = permutations[(layer - 1, layer)]
                perm = perm.permutation if isinstance(perm, MatchResult) else perm
                methods["permutation"] = perm.inverse()
            for score in ("decoder_cosine", OURS):
                methods[f"{score} top-1"] = links(here.res, pred, k=1, score=score,
                                                  progress=False)
            top5 = links(here.res, pred, k=5, score=OURS, progress=False)
            methods[f"{OURS} top-5"] = top5
            stats = coactivation_stats(model, here.res, pred, toks, progress=False)
            methods[DATA_REFERENCE] = best_partner(stats)
            common = {"positions": positions, "max_targets": max_targets, "progress": progress}
            every = causal_check(model, pred, here.res, toks, methods, mode="all", **common)
            one = causal_check(model, pred, here.res, toks, {f"{OURS} top-5, random one": top5},
                               mode="random", **common)
            frame = pd.concat([every, one], ignore_index=True)
            frame.insert(0, "module", module)
            frame.insert(0, "layer", layer)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


DATA_REFERENCE = "best partner by co-firing (data-based reference)"
"""The causal table's data-based method: each target's best partner by Jaccard of firing sets.
Co-firing is not causation, so it is a reference, not a ceiling, for the deactivation test."""


def _causal_verdict(table: pd.DataFrame) -> str:
    mean = table.groupby("method", sort=False).success_rate.mean()
    data = mean.get(DATA_REFERENCE, math.nan)
    free = mean.drop(DATA_REFERENCE, errors="ignore")
    best = free.idxmax()
    relation = ("above" if data > free.max() else "below" if data < free.max() else "equal to")
    return (f"Deactivating predecessors: the best data-free method is {best} (mean success rate "
            f"{free.max():.1%}); the data-based best partner by co-firing reaches {data:.1%}, "
            f"{relation} it (co-firing is a reference here, not a causal ceiling); "
            + ", ".join(f"{m} {v:.1%}" for m, v in free.items()) + ".")


def flow_section(model: Any, stack: Mapping[int, LayerSAEs], tokens: torch.Tensor,
                 out: str | Path, *,
                 permutations: Mapping[tuple[int, int], MatchResult] | None = None,
                 quick: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run the flow analyses on ``stack`` (``{layer: LayerSAEs}``) and draw ``flow_graph.png``.

    Args:
        model: the TransformerLens model.
        stack: the SAEs per model layer; MLP/attention SAEs optional.
        tokens: held-out ``[n_seq, pos]`` tokens with BOS at position 0.
        out: the report directory (the flow graph picture and JSON go there).
        permutations: SAE Match results of the adjacent residual pairs (compared as a method).
        quick: fewer tokens in the causal check.
        progress: show progress bars.

    Returns:
        A dict with the tables (as records) and the computed sentences under ``"reading"``.
    """
    out = Path(out)
    stack = dict(sorted(stack.items()))
    has_modules = any(s.mlp is not None or s.attn is not None for s in stack.values())
    links_table = link_quality(model, stack, tokens, permutations=permutations,
                               progress=progress)
    ablation = weight_ablation(links_table)
    transitions = _transition_table(model, stack, tokens, permutations, progress)
    survival = persistence(stack)
    seed = _pick_seed(stack, survival, _fire_counts(model, stack, tokens, 8))
    graph = flow_graph(stack, seed)
    graph.plot(out / "flow_graph.png", title=f"Flow of residual feature {seed[1]} from layer "
               f"{seed[0]} (decoder cosine, cut 0.5, modules ≥ 0.15)")
    graph.save_json(out / "flow_graph.json")
    histogram = (survival.groupby("layer").survives.value_counts().rename("n_features")
                 .reset_index().sort_values(["layer", "survives"]))
    first = survival[survival.layer == min(stack)].survives
    span = len([layer for layer in stack if layer > min(stack)])
    reach_end = float((first >= span).mean()) if span else math.nan
    reading = link_verdicts(links_table)
    if ablation:
        reading.append(ablation["sentence"])
    reading.append(_transition_verdict(transitions))
    reading.append(f"Top-1 decoder-cosine chains cut at 0.5 from layer {min(stack)}: "
                   f"{reach_end:.1%} reach the last layer ({span} links; the histogram is censored "
                   f"there)" + (f", the others stop after {float(first[first < span].mean()):.2f} "
                                f"links on average" if bool((first < span).any()) else "") +
                   ". The paper reports features persisting about 5 layers in 26-layer "
                   f"Gemma 2; with {len(stack)} layers this model cannot show more than {span}.")
    result: dict[str, Any] = {
        "links": links_table.to_dict(orient="records"),
        "ablation": ablation,
        "transitions": transitions.to_dict(orient="records"),
        "persistence": histogram.to_dict(orient="records"),
        "flow_graph": {"seed": list(seed), "n_nodes": len(graph.nodes),
                       "n_edges": len(graph.edges)},
        "has_modules": has_modules,
    }
    if has_modules:
        later = [layer for layer in stack if layer - 1 in stack]
        groups = origin_groups(model, stack, tokens, layers=later)
        readings = pd.concat([predecessors(stack, layer) for layer in later])
        shares = (readings.groupby("layer").reading.value_counts(normalize=True)
                  .rename("share").reset_index())
        causal = _causal_table(model, stack, tokens, permutations, n_seqs=4 if quick else 8,
                               positions=3 if quick else 4, max_targets=8 if quick else 16,
                               progress=progress)
        result.update(origin_groups=groups.to_dict(orient="records"),
                      readings=shares.to_dict(orient="records"),
                      causal=causal.to_dict(orient="records"))
        born = groups[[c for c in groups.columns if c == "From nowhere"]].mean().iloc[0]
        reading.append(f"Origin groups: on average {born:.1%} of active residual features have no "
                       "active top-1 predecessor in R(L−1), M(L) or A(L) at the same token ('From "
                       "nowhere').")
        reading.append(_causal_verdict(causal))
    else:
        reading.append("The SAEs have no MLP or attention SAEs, so predecessor readings, origin "
                       "groups and the causal check across modules are not shown.")
    result["reading"] = reading
    return result


def flow_markdown(result: Mapping[str, Any], fmt: Any) -> list[str]:
    """Report lines for :func:`flow_section`'s result; ``fmt`` renders a DataFrame as a table."""
    links_table = pd.DataFrame(result["links"])
    main = links_table[~links_table.method.str.startswith("mse_")]
    summary = (main.groupby("method", sort=False)[
        ["jaccard", "p_b_given_a", "p_a_given_b", "distinct_targets", "fraction_of_ceiling"]]
        .mean().reset_index())
    summary["distinct_targets"] = summary.distinct_targets.round(1).astype(str)  # a mean count
    ceilings = (links_table.groupby(["layer_a", "layer_b"])[
        ["ceiling_best_partner", "ceiling_one_to_one", "reference_correlation_best_partner",
         "reference_correlation_one_to_one"]].first().reset_index())
    lines = ["## Feature flow: many-to-one links across layers and modules", ""]
    lines += [f"- {s}" for s in result["reading"]] + [""]
    lines += ["### Link quality (top-1, held-out tokens)", "",
              "Per source feature firing ≥ 5 times: Jaccard of its firing set with its linked "
              "target's, P(B|A), P(A|B), and how many distinct targets the links reach; "
              "`fraction_of_ceiling` = Jaccard / the data-based best-partner ceiling. Mean over "
              "adjacent residual pairs:", "", fmt(summary), "",
              "Data-based ceilings (Jaccard of the best partner and of the best one-to-one "
              "assignment on Jaccard) and references (the same matchers on activation "
              "correlation), per pair:", "", fmt(ceilings), ""]
    if result.get("ablation"):
        ab = result["ablation"]["jaccard"]
        frame = pd.DataFrame([{"blocks": n, "folded": ab[f"{n}_folded"],
                               "unfolded": ab[f"{n}_unfolded"]} for n in ABLATION])
        lines += ["### Weight ablation (top-1 Jaccard)", "", fmt(frame), ""]
    tr = pd.DataFrame(result["transitions"])
    lines += ["### Transitions vs the permutation (substitution at B)", "",
              fmt(tr.groupby("variant", sort=False)[["explained_variance", "delta_ce", "kl",
                                                      "coactivation"]].mean().reset_index()), ""]
    if result.get("has_modules"):
        groups = pd.DataFrame(result["origin_groups"])
        lines += ["### Origin groups per layer (share of active residual features)", "",
                  fmt(groups), ""]
        readings = pd.DataFrame(result["readings"]).pivot(index="layer", columns="reading",
                                                          values="share").fillna(0.0)
        lines += ["### Data-free predecessor readings per layer (share of features; decoder "
                  "cosine, high 0.5, low 0.15)", "", fmt(readings.reset_index()), ""]
        causal = pd.DataFrame(result["causal"])
        lines += ["### Causal check (deactivate predecessors at the token)", "",
                  "Success rate = targets whose activation became 0; activation change = mean "
                  "1 − z_new/z_old, over targets with an active predecessor.", "",
                  fmt(causal[["layer", "module", "method", "mode", "n_targets", "success_rate",
                              "activation_change"]]), ""]
    hist = pd.DataFrame(result["persistence"]).pivot(index="layer", columns="survives",
                                                     values="n_features").fillna(0).astype(int)
    lines += ["### Persistence (features per start layer by layers survived)", "",
              fmt(hist.reset_index()), "",
              f"`flow_graph.png`: the flow of residual feature {result['flow_graph']['seed'][1]} "
              f"from layer {result['flow_graph']['seed'][0]} ({result['flow_graph']['n_nodes']} "
              f"nodes, {result['flow_graph']['n_edges']} edges; also `flow_graph.json`).", ""]
    return lines
