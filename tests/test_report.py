"""The report's verdicts follow the numbers (wins, losses, ties), and results.json is strict JSON."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sae_match_lens.report import document as report
from sae_match_lens.report import verdicts
from sae_match_lens.report.verdicts import DELTA_CE_TOL, Tally, tally

VARIANTS = ("folded", "raw", "hybrid", "error_preserving", "identity", "sae_b_reconstruction",
            "sae_a_reconstruction", "random_permutation", "unfolded_matching")


def _strict_loads(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def make_results(ce, *, n_pairs=3, agreement=0.8, below=0.005, by_distance=((2, 0.15), (3, 0.08)),
                 d_sae=1024, scales=None):
    """A results.json-shaped dict with ΔCE per variant: ``ce[variant]`` is one value for every
    pair or a list with one per pair; variants not given get the method's value."""
    rows = []
    for k in range(n_pairs):
        for v in VARIANTS:
            value = ce.get(v, ce["folded"])
            value = value[k] if isinstance(value, list | tuple) else value
            rows.append({"layer_a": k, "layer_b": k + 1, "hook_a": f"blocks.{k}.hook_resid_post",
                         "hook_b": f"blocks.{k + 1}.hook_resid_post", "variant": v,
                         "explained_variance": 0.9 if v != "random_permutation" else -0.1,
                         "delta_ce": value, "kl": value,
                         "coactivation": math.nan if v in ("identity", "sae_a_reconstruction",
                                                           "sae_b_reconstruction") else
                         (0.06 if v == "random_permutation" else 0.5)})
    adjacent = [{"layer_a": k, "layer_b": k + 1, "agreement_folded_unfolded": agreement,
                 "coactivation_folded": 0.5, "coactivation_unfolded": 0.5,
                 "fraction_below_null_threshold": below} for k in range(n_pairs)]
    results = {
        "setting": {"source": "synthetic", "family": "jumprelu", "model": "m", "n_layers": n_pairs + 1,
                    "d_model": 8, "n_saes": n_pairs + 1, "d_sae": d_sae,
                    "hooks": [f"blocks.{k}.hook_resid_post" for k in range(n_pairs + 1)], "n_tokens": 10},
        "substitution": rows, "adjacent": adjacent,
        "composition_by_distance": [{"distance": d, "agreement": a, "agreement_unfolded": a}
                                    for d, a in by_distance],
        "null_rate": 0.01,
    }
    if scales is not None:
        results["scales"] = scales
    return results


def sentence(results, start):
    found = [s for s in verdicts.reading(results) if s.startswith(start)]
    assert len(found) == 1, (start, verdicts.reading(results))
    return found[0]


def test_tally_counts_wins_losses_and_ties_and_skips_missing_values():
    t = tally([0.10, 0.20, 0.30, math.nan, None], [0.20, 0.201, 0.10, 0.1, 0.1], tol=DELTA_CE_TOL)
    assert (t.wins, t.ties, t.losses) == (1, 1, 1) and t.outcome == "mixed"
    assert t.mean_subject == pytest.approx(0.2)
    assert tally([], [], tol=DELTA_CE_TOL).outcome == "none"


@pytest.mark.parametrize(("counts", "outcome"), [
    ((5, 0, 0), "wins"), ((0, 5, 0), "loses"), ((0, 0, 5), "ties"), ((3, 0, 2), "wins"),
    ((1, 0, 4), "ties"), ((2, 2, 1), "mixed"), ((4, 1, 0), "mixed"), ((1, 1, 3), "ties"),
])
def test_tally_outcome_follows_the_per_pair_counts(counts, outcome):
    assert Tally(*counts, 0.0, 0.0).outcome == outcome


def test_a_method_that_loses_to_dropping_the_block_is_told_so_with_counts_and_the_reason():
    results = make_results({"folded": 0.147, "identity": 0.035, "sae_b_reconstruction": 0.042,
                            "sae_a_reconstruction": 0.079, "error_preserving": 0.085,
                            "hybrid": 0.094, "random_permutation": 4.5})
    head = verdicts.reading(results)[0]
    assert "more than simply dropping the block (0.035 nats; worse in 3 of 3 pairs)" in head
    text = sentence(results, "The method loses to dropping the block (identity)")
    assert "in 3 of 3 pairs, mean ΔCE 0.147 vs 0.035 nats" in text
    assert "reconstruction error costs more than skipping a whole block" in text
    assert "the matching error alone also exceeds the cost of skipping the block" in text
    assert sentence(results, "The method beats a random permutation in 3 of 3 pairs")
    assert sentence(results, "The method loses to SAE A's reconstruction used at B in 3 of 3")
    assert sentence(results, "The method is indistinguishable from the same substitute with unfolded")
    ep = sentence(results, "The error-preserving substitute")
    assert "beats the method in 3 of 3 pairs" in ep and "0.085 nats, is the matching error" in ep
    assert "0.062 nats of the method's ΔCE come from SAE A's reconstruction error" in ep


def test_a_method_that_wins_is_told_so_and_gets_no_excuses():
    results = make_results({"folded": 0.02, "identity": 0.10, "sae_b_reconstruction": 0.05,
                            "sae_a_reconstruction": 0.08, "error_preserving": 0.02,
                            "hybrid": 0.05, "random_permutation": 4.0, "unfolded_matching": 0.06})
    assert "less than simply dropping the block" in verdicts.reading(results)[0]
    text = sentence(results, "The method beats dropping the block (identity) in 3 of 3 pairs")
    assert "reconstruction error" not in text
    assert "beats SAE B's reconstruction" in sentence(results, "The method beats SAE B's")
    assert "folding before matching pays off" in sentence(results, "The method beats the same substitute")
    assert "carrying SAE A's reconstruction error across changes nothing" in \
        sentence(results, "The error-preserving substitute")
    assert "even the costlier matches help" in sentence(results, "The hybrid substitute")


def test_numbers_equal_within_noise_are_called_indistinguishable():
    results = make_results({"folded": [0.100, 0.200, 0.300], "identity": [0.102, 0.195, 0.305],
                            "random_permutation": [0.101, 0.2, 0.3]})
    assert "indistinguishable from simply dropping the block" in verdicts.reading(results)[0]
    assert "in 3 of 3 pairs" in sentence(results, "The method is indistinguishable from dropping")
    assert "no better than chance" in sentence(results, "The method is indistinguishable from a random")


def test_pairs_that_disagree_are_reported_as_mixed():
    results = make_results({"folded": [0.1, 0.3, 0.2], "identity": [0.2, 0.1, 0.2]})
    text = sentence(results, "The method is mixed against dropping the block")
    assert "better in 1, worse in 1 and indistinguishable in 1 of 3 pairs" in text


def test_missing_baselines_say_not_measured():
    results = make_results({"folded": 0.1})
    results["substitution"] = [r for r in results["substitution"] if r["variant"] != "identity"]
    assert "vs dropping the block (identity): not measured" in " ".join(verdicts.reading(results))


@pytest.mark.parametrize(("below", "words"), [
    (0.005, "few matches are individually certain"), (0.3, "a minority of matches"),
    (0.7, "most matches are individually distinguishable"),
    (0.978, "nearly every match is individually distinguishable"),
])
def test_the_fraction_under_the_null_threshold_decides_the_words(below, words):
    text = sentence(make_results({"folded": 0.1}, below=below), f"{100 * below:.1f}% of adjacent")
    assert words in text and "for 1% of A's features" in text


def test_folding_agreement_and_composition_verdicts_follow_the_numbers():
    same = sentence(make_results({"folded": 0.1}, agreement=1.0), "Folding changed 0.0%")
    assert "agree" in same
    changed = sentence(make_results({"folded": 0.1}, agreement=0.8), "Folding changed 20.0%")
    assert "no better or worse on data" in changed
    minority = sentence(make_results({"folded": 0.1}), "Composed and direct")
    assert "only for a minority of features, far above chance" in minority
    assert "less the further apart" in minority
    chance = sentence(make_results({"folded": 0.1}, by_distance=((2, 0.001),)), "Composed and direct")
    assert "no better than chance" in chance
    most = sentence(make_results({"folded": 0.1}, by_distance=((2, 0.95), (3, 0.92))), "Composed")
    assert "reproduces direct matching" in most and "minority" not in most


def _scales(theta, decoder, norm, rule="threshold", activation=None):
    return [{"layer": k, "hook_name": f"blocks.{k}.hook_resid_post", "fold_rule": rule,
             "mean_threshold": t, "mean_decoder_norm": d, "mean_fold_scale": t if t else 1 / d,
             "fold_scale_cv": 0.1, "mean_resid_norm": n,
             "mean_firing_activation": activation[k] if activation else 1.0}
            for k, (t, d, n) in enumerate(zip(theta, decoder, norm, strict=True))]


def test_scale_verdict_flat_theta_with_growing_decoder_norms():
    text = verdicts.scale_verdict(_scales([0.88, 0.90, 0.92, 0.94], [1.4, 1.9, 2.4, 2.8],
                                          [69, 85, 100, 117]))
    assert "69.0→117 (×1.70)" in text and "θ rises in step with the norm but grows far less" in text
    assert "the scale sits in the decoder norms" in text


def test_scale_verdict_theta_that_tracks_the_norm():
    text = verdicts.scale_verdict(_scales([1.0, 1.5, 2.1, 2.9], [1, 1, 1, 1], [10, 15, 20, 28]))
    assert "θ tracks the norm" in text and "premise holds" in text


def test_scale_verdict_without_threshold_names_the_decoder_norm_and_the_activations():
    text = verdicts.scale_verdict(_scales([None] * 3, [1.0, 1.0, 1.0], [69, 90, 117],
                                          rule="decoder_norm", activation=[2.0, 2.6, 3.4]))
    assert text.startswith("These SAEs have no threshold θ")
    assert "decoder-row norm 1.000→1.000" in text and "does not move with the norm" in text
    assert "the scale sits in the activations" in text


def test_reading_includes_the_scale_verdict_when_scales_were_measured():
    results = make_results({"folded": 0.1}, scales=_scales([0.9, 0.9], [1, 2], [50, 100]))
    assert any("residual-stream norm" in s for s in verdicts.reading(results))


def test_results_json_is_strict_and_turns_nan_and_inf_into_null(tmp_path):
    results = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "t": torch.tensor([1.0, math.nan]),
               "n": np.float64("nan"), "i": np.int64(3), "nested": {"x": (np.float32(2.0), None)}}
    path = report.write_results(results, tmp_path / "results.json")
    loaded = _strict_loads(path.read_text())
    assert loaded == {"a": None, "b": [None, None, 1.5], "t": [1.0, None], "n": None, "i": 3,
                      "nested": {"x": [2.0, None]}}


def test_the_report_and_plots_rebuild_from_strict_results_json(tmp_path):
    results = make_results({"folded": 0.147, "identity": 0.035, "random_permutation": 4.5},
                           scales=_scales([0.9, 0.91, 0.92, 0.93], [1, 2, 3, 4], [10, 20, 30, 40]))
    results["reading"] = verdicts.reading(results)
    table = pd.DataFrame(results["substitution"])
    results["substitution_summary"] = (table.groupby("variant", sort=False)[
        ["explained_variance", "delta_ce", "kl", "coactivation"]].mean().reset_index().to_dict("records"))
    results["folding_summary"] = results["adjacent"]
    results["composition"] = [{"src": 0, "dst": 2, "distance": 2, "agreement": 0.1,
                               "agreement_unfolded": 0.1}]
    loaded = _strict_loads(report.write_results(results, tmp_path / "results.json").read_text())
    md = report.write_report(loaded, None, tmp_path).read_text()
    assert "n/a" in md and "paper's Figure 1" in md and "loses to dropping the block" in md
    report.plot_substitution(pd.DataFrame(loaded["substitution"]), tmp_path / "s.png")
    report.plot_agreement(loaded["composition"], tmp_path / "a.png", chance=1 / 1024)
    report.plot_costs({"0→1": [0.1, 1.0, math.nan]}, {"0→1": 0.5}, tmp_path / "c.png", null_rate=0.01)
    steps = [{"layer": 0, "feature": 3, "cost": None, "firing_rate": 0.1, "top_tokens": ["a"]},
             {"layer": 1, "feature": 5, "cost": 0.4, "firing_rate": 0.0, "top_tokens": []}]
    report.plot_paths([{"steps": steps, "total_cost": 0.4}], tmp_path / "p.png", thresholds={1: 0.5},
                      hooks=loaded["setting"]["hooks"])
    for name in ("s.png", "a.png", "c.png", "p.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_the_report_opens_with_a_summary_of_the_verdicts_that_matter(tmp_path):
    results = make_results({"folded": 0.147, "identity": 0.035, "random_permutation": 4.5})
    results["reading"] = verdicts.reading(results)
    table = pd.DataFrame(results["substitution"])
    results["substitution_summary"] = (table.groupby("variant", sort=False)[
        ["explained_variance", "delta_ce", "kl", "coactivation"]].mean().reset_index()
        .to_dict("records"))
    results["folding_summary"] = results["adjacent"]
    results["size"] = {"name": "default", "n_seqs": 16, "n_tokens": 2032, "max_distance": 2,
                       "flow": {}, "steering": {}}
    md = report.write_report(results, None, tmp_path).read_text()
    summary = md[md.index("## Summary"):md.index("## Reading")]
    assert md.index("## Summary") < md.index("## Reading") < md.index("## What folding changed")
    assert results["reading"][0] in summary  # the headline with its numbers
    assert "random permutation" in summary
    assert "Size `default`: 16 held-out sequences (2032 tokens)" in summary
    for variant in table.variant.unique():  # every row of the substitution table is explained
        assert f"- `{variant}`:" in md
    results["steering"] = {"reading": ["Suppression (x): best proxy score over all 4 steered "
                                       "settings 0.5 (…)", "Semantic check (proxy): 3 of 4"],
                           "flow_nodes": ["3/res/1"]}
    summary = "\n".join(report._summary(results))
    assert "best proxy score over all" in summary and "Semantic check" in summary
    assert "gibberish even without steering" in summary
