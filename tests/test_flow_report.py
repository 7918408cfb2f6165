"""The demo's flow section: its sentences follow the numbers (also when the default score loses),
and it runs end to end on a tiny model with residual, MLP and attention SAEs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sae_match_lens.flow.graph import LayerSAEs
from sae_match_lens.matching import match
from sae_match_lens.report.document import _markdown_table
from sae_match_lens.report.flow_section import (
    DATA_REFERENCE,
    causal_layers,
    causal_summary,
    flow_markdown,
    flow_section,
    link_verdicts,
    weight_ablation,
    wilson_interval,
)
from tests.helpers_tl import random_jumprelu_sae, tiny_model, tiny_tokens


def _table(values: dict[str, list[float]], ceiling: float = 0.5) -> pd.DataFrame:
    rows = []
    for method, per_pair in values.items():
        for i, jac in enumerate(per_pair):
            rows.append({"layer_a": i, "layer_b": i + 1, "method": method, "k": 1,
                         "jaccard": jac, "fraction_of_ceiling": jac / ceiling,
                         "reference_correlation_best_partner": 0.45})
    return pd.DataFrame(rows)


def test_link_verdicts_say_where_the_default_score_loses():
    table = _table({"cosine_density": [0.40, 0.30], "decoder_cosine": [0.35, 0.33],
                    "sae_match_permutation": [0.30, 0.20]})
    first, second, third, fourth = link_verdicts(table)
    assert "in 1 of 2 adjacent pairs" in first and "it does not in 1→2" in first
    assert "in 2 of 2" in second and "does not in" not in second
    assert "70.0% of the data-based ceiling" in third and "target" not in third
    assert "below it" in fourth


@pytest.mark.parametrize(("encoder", "decoder", "verdict"),
                         [(0.2, 0.35, "holds"), (0.4, 0.35, "does not fully hold")])
def test_weight_ablation_verdict_follows_the_numbers(encoder, decoder, verdict):
    values = {"mse_encoder_folded": [encoder], "mse_decoder_folded": [decoder],
              "mse_all_folded": [0.355], "mse_encoder_unfolded": [0.1],
              "mse_decoder_unfolded": [0.1], "mse_all_unfolded": [0.1]}
    result = weight_ablation(_table(values))
    assert f"so the finding {verdict}" in result["sentence"]
    assert result["encoder_poor"] == (encoder < 0.35)


def test_flow_section_runs_on_a_stack_with_modules(tmp_path, monkeypatch):
    # random SAEs cannot reconstruct the tiny model's states, so the causal check's fit probe
    # would refuse them; this test is about the section's tables and sentences
    monkeypatch.setattr("sae_match_lens.flow.causal.check_saes_fit_model", lambda *a, **k: None)
    model = tiny_model()
    tokens = tiny_tokens(n_seq=6)
    n = model.cfg.n_layers
    stack = {layer: LayerSAEs(
        res=random_jumprelu_sae(f"blocks.{layer}.hook_resid_post", seed=10 + layer),
        mlp=random_jumprelu_sae(f"blocks.{layer}.hook_mlp_out", seed=40 + layer),
        attn=random_jumprelu_sae(f"blocks.{layer}.hook_attn_out", seed=70 + layer))
        for layer in range(n)}
    perms = {(a, a + 1): match(stack[a].res, stack[a + 1].res, progress=False)
             for a in range(n - 1)}
    result = flow_section(model, stack, tokens, tmp_path, permutations=perms, quick=True)
    assert (tmp_path / "flow_graph.png").stat().st_size > 0
    graph = json.loads((tmp_path / "flow_graph.json").read_text())
    assert len(graph["nodes"]) == result["flow_graph"]["n_nodes"]
    links = pd.DataFrame(result["links"])
    assert {"cosine_density", "decoder_cosine", "sae_match_permutation"} <= set(links.method)
    assert (links.ceiling_best_partner >= links.jaccard - 1e-12).all()
    causal = pd.DataFrame(result["causal"])
    assert set(causal.module) == {"res", "mlp", "attn"}
    assert set(causal[causal.module == "res"].method) >= {"permutation",
                                                           DATA_REFERENCE}
    groups = pd.DataFrame(result["origin_groups"])
    shares = groups.drop(columns=["layer", "n_active"]).sum(axis=1)
    assert ((shares - 1).abs() < 1e-9).all()
    text = "\n".join(flow_markdown(result, _markdown_table))
    for heading in ("Link quality", "Weight ablation", "Transitions", "Origin groups",
                    "Causal check", "Persistence", "Chance level of each threshold"):
        assert heading in text
    assert all(sentence in text for sentence in result["reading"])
    for variant in pd.DataFrame(result["transitions"]).variant.unique():
        assert f"- `{variant}`:" in text  # every row of the transitions table is explained
    assert any(s.startswith("Predecessor reading (the paper's rule") for s in result["reading"])


def test_the_causal_check_is_pooled_with_a_wilson_interval():
    table = pd.DataFrame([
        {"method": "m", "mode": "all", "n_targets": 30, "success_rate": 0.1,
         "activation_change": 0.5},
        {"method": "m", "mode": "all", "n_targets": 10, "success_rate": 0.5,
         "activation_change": 0.9},
        {"method": "m", "mode": "all", "n_targets": 0, "success_rate": float("nan"),
         "activation_change": float("nan")}])
    row = causal_summary(table).iloc[0]
    assert row.n_targets == 40 and row.switched_off == 8 and row.success_rate == 0.2
    assert row.activation_change == pytest.approx((30 * 0.5 + 10 * 0.9) / 40)
    lo, hi = wilson_interval(8, 40)
    assert (row.ci_low, row.ci_high) == (lo, hi) and lo < 0.2 < hi
    # Wilson's interval for 8 of 40 (textbook value 0.105-0.348)
    assert lo == pytest.approx(0.1050, abs=5e-4) and hi == pytest.approx(0.3475, abs=5e-4)


def test_causal_layers_are_spread_over_the_stack():
    stack = dict.fromkeys(range(6))
    assert causal_layers(stack, None) == list(range(6))
    assert causal_layers(stack, 2) == [0, 5]
    assert causal_layers(stack, 3) == [0, 2, 5]
    assert causal_layers(stack, 1) == [3]
