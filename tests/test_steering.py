"""Steering: interventions against manual arithmetic, flows and schedules, hook hygiene, seeded
generation, proxy scores against brute force, and a sweep that survives an interruption."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from sae_match_lens.chain import match_chain
from sae_match_lens.flow.graph import flow_graph
from sae_match_lens.judging.judge import JudgeError, ScriptedJudge
from sae_match_lens.judging.steering_scores import (
    coherence,
    plot_sweep,
    proxy_scores,
    steering_sweep,
    theme_presence,
)
from sae_match_lens.lens.steering import (
    AddDirection,
    FlowNode,
    RescaleFeatures,
    Schedule,
    flow_interventions,
    flow_nodes,
    generate_steered,
    steer,
    steering_hooks,
)
from sae_match_lens.report.steering_section import (
    _summary,
    _verdicts,
    label_sequences,
    steering_markdown,
    steering_section,
    theme_seeds,
)
from tests.helpers_tl import (
    N_LAYERS,
    random_jumprelu_sae,
    state_at,
    tiny_bridge,
    tiny_model,
    tiny_tokens,
    written_at,
)

HOOK_1 = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens():
    return tiny_tokens()


@pytest.fixture(scope="module")
def saes():
    return {layer: random_jumprelu_sae(f"blocks.{layer}.hook_resid_post", seed=20 + layer)
            for layer in range(N_LAYERS)}


@pytest.fixture(scope="module")
def sae_1(saes):
    return saes[1]


def _no_hooks_left(model):
    return all(not hp.fwd_hooks for hp in model.hook_dict.values())


@torch.no_grad()
def test_rescale_by_one_is_a_no_op_bit_for_bit(model, tokens, saes):
    clean_logits = model(tokens)
    clean = state_at(model, tokens, HOOK_1)
    ivs = [RescaleFeatures(saes[layer], tuple(range(20)), factor=1.0) for layer in range(N_LAYERS)]
    with steer(model, ivs, bos="steer"):
        written = written_at(model, tokens, HOOK_1)
        logits = model(tokens)
    assert torch.equal(written, clean) and torch.equal(logits, clean_logits)


@pytest.mark.parametrize("factor", [0.0, -1.0, 3.0])
@torch.no_grad()
def test_rescale_adds_r_minus_one_times_the_features_decoded_contribution(model, tokens, sae_1,
                                                                         factor):
    features = [3, 7, 11, 40]
    h = state_at(model, tokens, HOOK_1)
    acts = sae_1.encode(h)
    assert bool((acts[1:, 1:, features] != 0).any())  # the features do fire here
    expected = h + (factor - 1.0) * (acts[..., features] @ sae_1.W_dec[features])
    with steer(model, RescaleFeatures(sae_1, features, factor=factor)):
        written = written_at(model, tokens, HOOK_1)
    torch.testing.assert_close(written[:, 1:], expected[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(written[:, 0], h[:, 0], rtol=0, atol=0)  # BOS kept by default
    if factor == 0.0:  # the removed features no longer fire on the edited state... up to the rest
        again = sae_1.encode(written)[:, 1:, features]
        assert float(again.abs().sum()) < float(acts[:, 1:, features].abs().sum())


@torch.no_grad()
def test_bos_is_steered_only_when_asked(model, tokens, sae_1):
    h = state_at(model, tokens, HOOK_1)
    v = sae_1.W_dec[5]
    with steer(model, AddDirection(sae_1, 5, coefficient=2.0, units="raw"), bos="steer"):
        written = written_at(model, tokens, HOOK_1)
    torch.testing.assert_close(written, h + 2.0 * v, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_add_direction_is_exact_and_folded_units_are_raw_times_threshold(model, tokens, sae_1):
    h = state_at(model, tokens, HOOK_1)
    raw = AddDirection(sae_1, (2, 9), coefficient=1.5, units="raw")
    folded = AddDirection(sae_1, (2, 9), coefficient=1.5, units="folded")
    theta = sae_1.threshold.detach()
    torch.testing.assert_close(raw.direction(), sae_1.W_dec[2] + sae_1.W_dec[9])
    torch.testing.assert_close(folded.direction(),
                               theta[2] * sae_1.W_dec[2] + theta[9] * sae_1.W_dec[9])
    for item in (raw, folded):
        with steer(model, item):
            written = written_at(model, tokens, HOOK_1)
        torch.testing.assert_close(written[:, 1:], h[:, 1:] + 1.5 * item.direction(),
                                   rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_where_limits_the_edit_to_positions_where_that_feature_fires(model, tokens, sae_1):
    h = state_at(model, tokens, HOOK_1)
    gate = sae_1.encode(h)[..., 12] != 0
    gate[:, 0] = False
    assert 0 < int(gate.sum()) < gate.numel() - gate.shape[0]
    with steer(model, AddDirection(sae_1, 4, coefficient=3.0, units="raw", where=12)):
        written = written_at(model, tokens, HOOK_1)
    changed = (written - h).abs().amax(-1) > 0
    assert torch.equal(changed, gate)


def test_schedule_values_follow_the_papers_formulas():
    layers, span = [2, 3, 4, 6], (2, 6)
    assert Schedule("constant").values(4.0, layers, span) == dict.fromkeys(layers, 4.0)
    exp = Schedule("exponential", alpha=-0.05).values(4.0, layers, span)
    assert exp == pytest.approx({la: 4.0 * math.exp(-0.05 * la) for la in layers})
    lin = Schedule("linear", end=1.0).values(4.0, layers, span)
    assert lin == pytest.approx({2: 4.0, 3: 3.25, 4: 2.5, 6: 1.0})
    assert Schedule("linear", end=1.0).values(4.0, [3], (3, 3)) == {3: 4.0}
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("cosine")


def test_single_layer_and_cumulative_install_exactly_the_hooks_they_say(model, saes):
    nodes = [(0, 5), (1, 6), (1, 7), (2, 8), (3, 9)]

    def names(**kwargs):
        return [name for name, _ in steering_hooks(model, flow_interventions(saes, nodes, **kwargs))]

    assert names(mode="single", layer=1) == [HOOK_1]
    assert names(mode="cumulative", layer=2) == [f"blocks.{i}.hook_resid_post" for i in (0, 1, 2)]
    assert names(mode="cumulative") == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    rescale = flow_interventions(saes, nodes, mode="single", layer=1, coefficient=0.0)
    assert len(rescale) == 1 and rescale[0].features == (6, 7)  # one hook for the SAE's features
    adds = flow_interventions(saes, nodes, mode="cumulative", kind="add", coefficient=2.0,
                              schedule=Schedule("linear", end=1.0))
    assert [(a.hook_name, a.features, a.coefficient) for a in adds] == [
        ("blocks.0.hook_resid_post", (5,), 2.0), (HOOK_1, (6,), pytest.approx(2 - 1 / 3)),
        (HOOK_1, (7,), pytest.approx(2 - 1 / 3)), ("blocks.2.hook_resid_post", (8,),
                                                  pytest.approx(2 - 2 / 3)),
        ("blocks.3.hook_resid_post", (9,), 1.0)]
    with pytest.raises(ValueError, match="no nodes at layer 5"):
        flow_interventions(saes, nodes, mode="single", layer=5)


@pytest.mark.parametrize("kind,schedule", [("rescale", Schedule("linear", end=1.0)),
                                           ("add", Schedule("exponential", alpha=-0.3))])
@torch.no_grad()
def test_cumulative_steering_is_the_composition_of_the_single_layer_hooks(model, tokens, saes,
                                                                          kind, schedule):
    nodes = [(0, 5), (1, 6), (1, 7), (2, 8), (3, 9)]
    kwargs = {"kind": kind, "coefficient": -2.0, "schedule": schedule}
    cumulative = steering_hooks(model, flow_interventions(saes, nodes, mode="cumulative",
                                                          **kwargs))
    composed = [hook for layer in range(N_LAYERS) for hook in steering_hooks(
        model, flow_interventions(saes, nodes, mode="single", layer=layer, **kwargs))]
    clean = model(tokens)
    steered = model.run_with_hooks(tokens, fwd_hooks=cumulative)
    assert torch.equal(steered, model.run_with_hooks(tokens, fwd_hooks=composed))
    assert float((steered - clean).abs().max()) > 1e-3  # and it does steer


@torch.no_grad()
def test_cumulative_and_single_layer_runs_differ_as_their_hooks_say(model, tokens, saes):
    nodes = [(0, 5), (1, 6), (2, 8)]
    single = flow_interventions(saes, nodes, mode="single", layer=2, kind="add", coefficient=2.0)
    cumulative = flow_interventions(saes, nodes, mode="cumulative", kind="add", coefficient=2.0)
    at_1 = {}
    for name, ivs in (("single", single), ("cumulative", cumulative)):
        with steer(model, ivs):
            at_1[name] = written_at(model, tokens, HOOK_1)
    torch.testing.assert_close(at_1["single"], state_at(model, tokens, HOOK_1))  # untouched at 1
    assert float((at_1["cumulative"] - at_1["single"]).abs().max()) > 0.1


def test_flow_nodes_from_a_graph_a_path_and_ids(saes):
    graph = flow_graph(saes, (1, 3), cut=-1.0, module_min=2.0)
    assert flow_nodes(graph, saes) == sorted(
        FlowNode(int(r.layer), r.module, int(r.feature)) for r in graph.nodes.itertuples())
    chain = match_chain([saes[i] for i in range(N_LAYERS)], progress=False)
    path = chain.trace(3, src=1)
    assert [n.feature for n in flow_nodes(path, saes)] == [s.feature for s in path.steps
                                                            if s.feature >= 0]
    assert flow_nodes(["2/res/4", (1, "res", 3), (0, 1)], saes) == [
        FlowNode(0, "res", 1), FlowNode(1, "res", 3), FlowNode(2, "res", 4)]
    with pytest.raises(KeyError, match="layer 7 has no SAEs"):
        flow_nodes([(7, 1)], saes)
    with pytest.raises(KeyError, match="no mlp SAE"):
        flow_nodes([(1, "mlp", 1)], saes)


def test_bad_input_errors_name_the_sae_and_nothing_is_installed(model, sae_1, tokens):
    with pytest.raises(ValueError, match=r"feature 64 is not a feature of SAE 'blocks\.1\."):
        RescaleFeatures(sae_1, (3, 64), factor=0.0)
    with pytest.raises(ValueError, match="must be finite"):
        RescaleFeatures(sae_1, 3, factor=math.nan)
    with pytest.raises(ValueError, match="not finite"):
        AddDirection(sae_1, 3, coefficient=1e39, units="raw")
    with pytest.raises(TypeError, match="integers"):
        AddDirection(sae_1, (1.5,), coefficient=1.0)
    with pytest.raises(ValueError, match="must be finite"), steer(
            model, flow_interventions({1: sae_1}, [(1, 3)], coefficient=math.inf)):
        pass
    assert _no_hooks_left(model)
    stranger = random_jumprelu_sae("blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match=r"blocks\.9\.hook_resid_post.*not a hook point"), \
            steer(model, [RescaleFeatures(sae_1, 3, 0.0), RescaleFeatures(stranger, 3, 0.0)]):
        pass
    assert _no_hooks_left(model)


def test_non_finite_activations_raise_naming_the_hook_and_hooks_are_removed(model, tokens, sae_1):
    big = RescaleFeatures(sae_1, tuple(range(64)), factor=3e38)
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post.*non-finite"), \
            steer(model, big):
        model(tokens)
    assert _no_hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"), steer(model, RescaleFeatures(sae_1, 3, 0.0)):
        raise RuntimeError("boom")
    assert _no_hooks_left(model)


def test_callers_own_hooks_survive_the_context(model, tokens, sae_1):
    calls = []
    model.add_hook(HOOK_1, lambda x, *, hook: calls.append(1))
    try:
        with steer(model, RescaleFeatures(sae_1, 3, 0.0)):
            model(tokens)
        model(tokens)
        # one call from each forward, one from the BOS reference pass that steer() runs first
        assert len(calls) == 3 and len(model.hook_dict[HOOK_1].fwd_hooks) == 1
    finally:
        model.reset_hooks()


def test_generation_is_seeded_reproducible_and_leaves_the_callers_rng(model, sae_1):
    ivs = [AddDirection(sae_1, 3, coefficient=2.0)]
    kwargs = {"n_samples": 5, "max_new_tokens": 6, "batch_size": 2, "progress": False}
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = generate_steered(model, ["t1 t2", "t3 t4 t5"], ivs, seed=7, **kwargs)
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is untouched
    again = generate_steered(model, ["t1 t2", "t3 t4 t5"], ivs, seed=7, **kwargs)
    other = generate_steered(model, ["t1 t2", "t3 t4 t5"], ivs, seed=8, **kwargs)
    assert first.texts == again.texts and first.texts != other.texts
    assert len(first.texts) == 10 and first.prompt_index == (0,) * 5 + (1,) * 5
    # batches of at most 2 samples per prompt, batch k (over both prompts) seeded with 7 + k
    assert first.seeds == (7, 7, 8, 8, 9, 10, 10, 11, 11, 12)
    assert all(s.numel() == n + 6 for s, n in zip(first.sequences, first.prompt_lengths,
                                                  strict=True))
    with torch.no_grad(), steer(model, ivs):  # log-probs are the steered model's
        seq = first.sequences[3]
        logp = torch.log_softmax(model(seq[None])[0], -1)
    n = first.prompt_lengths[3]
    torch.testing.assert_close(first.logprobs[3], logp[n - 1:-1].gather(-1, seq[n:, None])[:, 0])
    tokens = first.token_frame()
    assert len(tokens) == 60 and tokens.token.tolist()[:6] == first.sequences[0][3:].tolist()


@torch.no_grad()
def test_steered_greedy_generation_with_kv_cache_equals_a_full_recompute_loop(model, sae_1):
    ivs = [RescaleFeatures(sae_1, (1, 2, 3, 4), factor=-3.0), AddDirection(sae_1, 9, 2.0)]
    gen = generate_steered(model, "t1 t2 t3", ivs, max_new_tokens=6, do_sample=False,
                           progress=False)
    seq = model.to_tokens("t1 t2 t3")
    hooks = steering_hooks(model, ivs)
    for _ in range(6):  # no cache: every pass sees the whole sequence, BOS at position 0
        logits = model.run_with_hooks(seq, fwd_hooks=hooks)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(gen.sequences[0], seq[0])


@torch.no_grad()
def test_theme_presence_and_coherence_match_a_brute_force_count(model, saes):
    gen = generate_steered(model, ["t1 t2", "t7"], n_samples=2, max_new_tokens=5, progress=False)
    theme = [(1, 3), (1, 8), (2, 5)]
    frame = theme_presence(model, saes, theme, gen)
    ce = coherence(model, gen)
    for i, (seq, n) in enumerate(zip(gen.sequences, gen.prompt_lengths, strict=True)):
        acts, fired = [], []
        for layer, feature in theme:
            sae = saes[layer]
            a = sae.encode(state_at(model, seq[None], f"blocks.{layer}.hook_resid_post"))[0, n:,
                                                                                       feature]
            acts.append(a / sae.threshold[feature])
            fired.append((a != 0).double())
        assert frame.presence[i] == pytest.approx(float(torch.stack(acts).mean()), rel=1e-5)
        assert frame.theme_rate[i] == pytest.approx(float(torch.stack(fired).mean()))
        logp = torch.log_softmax(model(seq[None])[0], -1)
        manual = -float(logp[n - 1:-1].gather(-1, seq[n:, None]).mean())
        assert ce.ce[i] == pytest.approx(manual, rel=1e-5)
        assert ce.distinct[i] == len(set(seq[n:].tolist())) / 5
    scores = proxy_scores(model, saes, theme, gen, ce_reference=float(ce.ce.mean()))
    expected = [math.exp(-max(0.0, c - float(ce.ce.mean()))) for c in ce.ce]
    assert scores.coherence.tolist() == pytest.approx(expected)
    assert scores.score_suppress.tolist() == pytest.approx(
        ((1 - frame.theme_rate) * scores.coherence).tolist())
    ref = float(frame.theme_rate.median())
    assert 0 < ref < 1
    scaled = proxy_scores(model, saes, theme, gen, ce_reference=float(ce.ce.mean()),
                          rate_reference=ref)
    behaviour = [min(1.0, r / ref) for r in frame.theme_rate]
    assert scaled.behaviour.tolist() == pytest.approx(behaviour)
    assert max(behaviour) == 1.0  # capped
    assert scaled.score_activate.tolist() == pytest.approx(
        [b * c for b, c in zip(behaviour, expected, strict=True)])
    with pytest.raises(ValueError, match="rate_reference"):
        proxy_scores(model, saes, theme, gen, ce_reference=1.0, rate_reference=0.0)


def _sweep(model, saes, path, judge=None):
    return steering_sweep(model, saes, [(1, 3), (2, 5)], ["t1 t2"], path=path,
                          coefficients=[0.0, -2.0], kind="rescale", n_samples=2,
                          max_new_tokens=4, judge=judge, theme="t-words", progress=False)


def test_sweep_resumes_after_an_interruption_with_its_rows_intact(model, saes, tmp_path):
    path = tmp_path / "sweep.jsonl"
    good = {"coherence": 4, "behavioral": 1}
    # 1 baseline + 2 modes x 2 layers x 2 coefficients = 9 settings of 2 samples: fail in row 4
    def crash_after(n):  # the same judge (same script), failing once mid-way
        calls = []

        def scores(prompt, text, theme):
            calls.append(prompt)
            if len(calls) == n + 1:
                raise RuntimeError("judge crashed")
            return good
        return scores

    with pytest.raises(RuntimeError, match="judge crashed"):
        _sweep(model, saes, path, ScriptedJudge(scores=crash_after(7)))
    kept = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert len(kept) == 3 and kept[0]["mode"] == "none"
    with path.open("a") as handle:  # a write torn by a kill
        handle.write('{"mode": "single", "layer": 2, "sche')
    resumed_judge = ScriptedJudge(scores=crash_after(10**6))
    resumed = _sweep(model, saes, path, resumed_judge)
    assert len(resumed_judge.calls) == 2 * (9 - 3)  # finished rows were not recomputed
    for row, stored in zip(resumed.iloc[:3].to_dict("records"), kept, strict=True):
        # the saved rows come back as they were written (pandas reads null as NaN)
        assert {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in row.items()} == stored
    fresh = _sweep(model, saes, tmp_path / "fresh.jsonl", ScriptedJudge(scores=crash_after(-1)))
    assert resumed[["mode", "layer", "schedule", "coefficient", "example"]].equals(
        fresh[["mode", "layer", "schedule", "coefficient", "example"]])
    for column in ("theme_rate", "ce", "score", "judge_score"):
        assert resumed[column].tolist() == pytest.approx(fresh[column].tolist(), nan_ok=True)
    single = resumed[resumed["mode"] == "single"]
    assert single.hooks.tolist() == [[HOOK_1]] * 2 + [["blocks.2.hook_resid_post"]] * 2
    assert resumed.judge_score.iloc[1] == pytest.approx((1 - 0.2) * 0.8)
    assert plot_sweep(resumed, tmp_path / "sweep.png").stat().st_size > 0


def test_sweep_refuses_rows_made_with_other_settings(model, saes, tmp_path):
    path = tmp_path / "sweep.jsonl"
    _sweep(model, saes, path)
    with pytest.raises(ValueError, match="other settings"):
        steering_sweep(model, saes, [(1, 3)], ["t1 t2"], path=path, coefficients=[0.0],
                       n_samples=2, max_new_tokens=4, progress=False)


def test_judge_errors_in_a_sweep_keep_the_rows_written(model, saes, tmp_path):
    path = tmp_path / "sweep.jsonl"
    with pytest.raises(JudgeError, match="not a JSON object"):
        _sweep(model, saes, path, ScriptedJudge(scores=["I refuse to rate this."]))
    assert path.read_text().count("\n") == 1  # only the header: the first row failed


@torch.no_grad()
def test_steering_runs_on_a_transformer_bridge(tokens):
    bridge = tiny_bridge()
    sae = random_jumprelu_sae(HOOK_1, seed=1)
    try:
        h = state_at(bridge, tokens, HOOK_1)
        item = AddDirection(sae, 3, coefficient=50.0, units="raw")
        with steer(bridge, item):
            written = written_at(bridge, tokens, HOOK_1)
        torch.testing.assert_close(written[:, 1:], h[:, 1:] + 50.0 * sae.W_dec[3],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(written[:, 0], h[:, 0])
        kwargs = {"max_new_tokens": 5, "do_sample": False, "progress": False}
        clean = generate_steered(bridge, "t1 t2", **kwargs)
        steered = generate_steered(bridge, "t1 t2", [item], **kwargs)
        assert clean.sequences[0].shape == steered.sequences[0].shape
        assert not torch.equal(clean.sequences[0], steered.sequences[0])
        assert _no_hooks_left(bridge)
    finally:
        bridge.reset_hooks()


class _WordTokenizer:
    """Decodes ids to words of a fixed list (for the source-markup rule)."""

    def __init__(self, words):
        self.words = words

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def test_sequences_are_labelled_by_their_sources_markup():
    words = ["<bos>", "\n 3 And", "unto", "thee", "LORD", "``x``", "::", "plain", "text"]
    tok = _WordTokenizer(words)
    rows = torch.tensor([[0, 1, 2, 3, 7], [0, 5, 6, 7, 8], [0, 2, 3, 4, 6], [0, 7, 8, 7, 8],
                         [0, 2, 7, 5, 8]])
    assert label_sequences(rows, tok) == ["bible", "pydoc", "other", "other", "other"]


@torch.no_grad()
def test_theme_seeds_follow_the_rate_and_selectivity_rule(model, tokens, sae_1):
    labels = ["theme", "rest"] * (tokens.shape[0] // 2)
    acts = sae_1.encode(state_at(model, tokens, HOOK_1))[:, 1:]
    rate = (acts != 0).double().mean(1)  # per sequence
    on = torch.tensor([label == "theme" for label in labels])
    r_theme, r_rest = rate[on].mean(0), rate[~on].mean(0)
    share = r_theme / (r_theme + r_rest).clamp_min(1e-12)
    ok = (r_theme >= 0.05) & (share >= 0.6)
    assert 3 < int(ok.sum()) < sae_1.cfg.d_sae
    seeds = theme_seeds(model, sae_1, tokens, labels, "theme", n_seeds=3, selectivity=0.6)
    best = sorted(torch.nonzero(ok).flatten().tolist(), key=lambda f: -float(r_theme[f]))[:3]
    assert seeds.feature.tolist() == best
    assert seeds.rate_theme.tolist() == pytest.approx(r_theme[best].tolist())
    with pytest.raises(ValueError, match="both theme and other"):
        theme_seeds(model, sae_1, tokens, ["theme"] * tokens.shape[0], "theme", n_seeds=3)


@pytest.mark.slow
def test_the_steering_section_on_the_default_suite_lowers_the_theme_it_removes(tmp_path):
    from sae_match_lens.assets import load_default_suite, load_eval_tokens

    suite, suite_saes = load_default_suite("jumprelu")
    section = steering_section(suite, suite_saes, load_eval_tokens(), suite.tokenizer, tmp_path,
                               quick=True)
    json.dumps(section)  # JSON-able
    table = section["suppress"]["summary"]
    base = next(r for r in table if r["setting"] == "unsteered")
    removed = [r for r in table if r["coefficient"] == 0.0]
    assert {r["setting"].split()[0] for r in removed} == {"single", "cumulative"}
    assert all(r["theme_rate"] < base["theme_rate"] for r in removed)
    lowered = sum(r["theme_rate"] < base["theme_rate"] for r in table if r is not base)
    assert any(s.startswith(f"Suppression (rescale by r, biblical prompts): {lowered} of")
               for s in section["reading"])
    assert all(len(r["examples"]) == 3 for r in table)
    lines = steering_markdown(section)
    assert any(line.startswith("| unsteered") for line in lines)
    assert (tmp_path / "steering_suppress.png").stat().st_size > 0


@torch.no_grad()
def test_theme_presence_reads_token_ids_after_bos(model, tokens, saes):
    theme = [(1, 3), (2, 5)]
    frame = theme_presence(model, saes, theme, tokens[:2])
    for i in range(2):
        fired = [(saes[la].encode(state_at(model, tokens[i:i + 1],
                                           f"blocks.{la}.hook_resid_post"))[0, 1:, f] != 0)
                 for la, f in theme]
        assert frame.theme_rate[i] == pytest.approx(float(torch.stack(fired).double().mean()))
        assert frame.n_tokens[i] == tokens.shape[1] - 1
    with pytest.raises(ValueError, match="BOS in column 0"):
        theme_presence(model, saes, theme, tokens[0])


def test_the_best_proxy_score_is_the_best_of_every_swept_setting():
    def row(mode, layer, coefficient, score, rate=0.1):
        return {"mode": mode, "layer": layer, "coefficient": coefficient, "n_samples": 4,
                "theme_rate": rate, "behaviour": rate, "ce": 3.0, "coherence": 0.9,
                "distinct": 0.8, "score": score, "examples": ["x"]}

    frame = pd.DataFrame([row("none", None, None, 0.1, 0.3), row("single", 2, 0.0, 0.2),
                          row("single", 3, 0.0, 0.7),  # neither seed layer nor last: not paired
                          row("cumulative", 4, 0.0, 0.3)])
    table = _summary(frame, "suppress")
    assert table.setting.tolist()[0] == "unsteered" and table.score.tolist()[1] == 0.7
    lines = _verdicts(table, "suppress", "S", seed_layer=2, last=4)
    assert "best proxy score over all 3 steered settings 0.700 (single layer 3" in lines[1]
    assert "theme rate 0.100 steering layer 2 alone vs 0.100 steering every flow layer up to 4" \
        in lines[2]


def test_the_steering_report_says_how_each_column_is_averaged_and_that_text_is_gibberish():
    rows = [{"setting": "unsteered", "coefficient": None, "n_samples": 4, "theme_rate": 0.2,
             "behaviour": 0.9, "ce": 3.0, "coherence": 0.91, "distinct": 0.8, "score": 0.1,
             "examples": ["a b"]},
            {"setting": "single layer 2", "coefficient": 0.0, "n_samples": 4, "theme_rate": 0.1,
             "behaviour": 0.5, "ce": 3.1, "coherence": 0.8, "distinct": 0.8, "score": 0.4,
             "examples": ["c d"]}]
    part = {"prompts": ["p"], "summary": rows, "heatmap": "h.png"}
    section = {"sequence_labels": {"bible": 1, "pydoc": 1, "other": 0}, "seed_layer": 2,
               "seeds": [], "reading": [], "flow_nodes": ["2/res/5"], "rate_reference": 0.2,
               "suppress": part, "activate": part,
               "semantic": {"method": "proxy", "counts": [], "along": []}}
    text = "\n".join(steering_markdown(section))
    assert "gibberish, steered or not" in text
    assert "every column is a mean over its 4 generations" in text
    assert "standard error of at most 0.25" in text


def test_generate_steered_with_flat_sampling_keywords_warns_and_draws_the_same_texts(model, sae_1):
    from sae_match_lens.lens.steering import SamplingOptions

    ivs = [RescaleFeatures(sae_1, [0, 1], factor=0.0)]
    options = SamplingOptions(max_new_tokens=4, seed=3, batch_size=2, temperature=0.8)
    new = generate_steered(model, "t1 t2", ivs, n_samples=3, options=options, progress=False)
    with pytest.warns(DeprecationWarning, match=r"seed= → options\.seed"):
        old = generate_steered(model, "t1 t2", ivs, n_samples=3, max_new_tokens=4, seed=3,
                               batch_size=2, temperature=0.8, progress=False)
    assert new.texts == old.texts and new.seeds == old.seeds


def test_flow_interventions_take_the_old_kind_keyword_with_a_warning(saes):
    nodes = [FlowNode(1, "res", 3), FlowNode(2, "res", 5)]
    new = flow_interventions(saes, nodes, mode="cumulative", intervention="add", coefficient=2.0)
    with pytest.warns(DeprecationWarning, match=r"kind=\) is intervention="):
        old = flow_interventions(saes, nodes, mode="cumulative", kind="add", coefficient=2.0)
    assert [type(iv) for iv in old] == [type(iv) for iv in new] == [AddDirection, AddDirection]
    assert [iv.hook_name for iv in old] == [iv.hook_name for iv in new]
    with pytest.raises(TypeError, match="both kind= and intervention="):
        flow_interventions(saes, nodes, kind="add", intervention="add")


def test_sweep_options_give_the_rows_of_the_flat_keywords_and_resume_their_log(model, saes,
                                                                               tmp_path):
    """0.2's flat sweep and sampler keywords become SweepOptions (with a warning); the row log
    header is the same, so a log written with the old call resumes with the new one."""
    from sae_match_lens.judging.steering_scores import SweepOptions
    from sae_match_lens.lens.steering import SamplingOptions

    with pytest.warns(DeprecationWarning, match="SweepOptions"):
        old = _sweep(model, saes, tmp_path / "old.jsonl")
    options = SweepOptions(n_samples=2, theme="t-words",
                           sampling=SamplingOptions(max_new_tokens=4))
    kwargs = dict(coefficients=[0.0, -2.0], intervention="rescale", progress=False,
                  options=options)
    new = steering_sweep(model, saes, [(1, 3), (2, 5)], ["t1 t2"], path=tmp_path / "new.jsonl",
                         **kwargs)
    pd.testing.assert_frame_equal(old, new)
    resumed = steering_sweep(model, saes, [(1, 3), (2, 5)], ["t1 t2"],
                             path=tmp_path / "old.jsonl", **kwargs)
    pd.testing.assert_frame_equal(resumed, old)
    with pytest.warns(DeprecationWarning, match="SweepOptions"):
        legacy = steering_sweep(model, saes, [(1, 3), (2, 5)], ["t1 t2"],
                                path=tmp_path / "new.jsonl", coefficients=[0.0, -2.0],
                                n_samples=2, theme="t-words", progress=False,
                                options=SamplingOptions(max_new_tokens=4))
    pd.testing.assert_frame_equal(legacy, new)
