"""Semantic evaluation: pairs sampled along chains and flow graphs, labels from a scripted judge
and from the token-overlap proxy against the planted truth, partial results kept."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sae_match_lens.chain import match_chain
from sae_match_lens.flow.graph import flow_graph
from sae_match_lens.judging.judge import JudgeError, ScriptedJudge
from sae_match_lens.judging.semantic import (
    PAIR_COLUMNS,
    PROXY_METHOD,
    context_explanations,
    label_pairs,
    neuronpedia_explainer,
    semantic_evaluation,
    semantic_pairs,
    token_overlap,
)
from sae_match_lens.neuronpedia import (
    Explanation,
    FeatureExplanations,
    NeuronpediaUnavailableError,
)
from tests.helpers import planted_chain

N_LAYERS = 4


@pytest.fixture(scope="module")
def planted():
    return planted_chain(N_LAYERS, d_in=16, d_sae=48, noise=2.0, n_clusters=6, seed=3)


@pytest.fixture(scope="module")
def chain(planted):
    return match_chain(planted.saes, progress=False)


@pytest.fixture(scope="module")
def origin(planted):
    """``origin[(layer, "res", f)]``: the layer-0 feature that feature f of ``layer`` was made from."""
    out = {}
    current = torch.arange(48)  # current[i]: the feature at this layer made from layer-0 feature i
    for layer in range(N_LAYERS):
        for i, f in enumerate(current.tolist()):
            out[(layer, "res", f)] = i
        if layer < N_LAYERS - 1:
            current = planted.truths[layer].indices[current]
    return out


def _truth_tokens(origin):
    return lambda keys: {k: [f"ctx [w{origin[k]}] (1.0)", f"ctx [v{origin[k]}] (0.5)"]
                         for k in keys}


def test_pairs_follow_the_chain_and_its_composition(chain):
    pairs = semantic_pairs(chain, n_paths=10, start=0, seed=1)
    assert pairs.path.nunique() == 10
    assert (pairs.kind == "consecutive").sum() == 10 * (N_LAYERS - 1)
    assert (pairs.kind == "composed").sum() == 10 * (N_LAYERS - 1)
    for row in pairs[pairs.kind == "composed"].itertuples():
        assert row.feature_b == int(chain.compose(0, row.layer_b).indices[row.feature_a])
    for row in pairs[pairs.kind == "consecutive"].itertuples():
        assert row.distance == 1
        assert row.feature_b == int(chain.steps[row.layer_a].permutation.indices[row.feature_a])
    assert pairs.equals(semantic_pairs(chain, n_paths=10, seed=1))  # seeded
    assert not pairs.equals(semantic_pairs(chain, n_paths=10, seed=2))
    with pytest.raises(ValueError, match="start < stop"):
        semantic_pairs(chain, start=3)


def test_the_proxy_labels_match_a_brute_force_count(chain, origin):
    result = semantic_evaluation(chain, top_tokens=_truth_tokens(origin), n_paths=20,
                                 progress=False)
    assert result.method == PROXY_METHOD
    pairs = result.pairs
    same = [origin[(a, "res", fa)] == origin[(b, "res", fb)] for a, fa, b, fb in
            zip(pairs.layer_a, pairs.feature_a, pairs.layer_b, pairs.feature_b, strict=True)]
    assert pairs.label.tolist() == [3.0 if s else 1.0 for s in same]  # overlap 1 or 0
    assert 0 < sum(same) < len(same)  # the noisy chain gets some links wrong
    for row in result.counts.itertuples():
        rows = [s for s, k, lb in zip(same, pairs.kind, pairs.layer_b, strict=True)
                if k == row.kind and lb == row.layer_b]
        assert (row.n, row.SAME, row.DIFFERENT, row.MAYBE) == (len(rows), sum(rows),
                                                               len(rows) - sum(rows), 0)


def test_a_judge_labels_explanations_and_direct_matches_compare_with_composed(chain, planted,
                                                                             origin):
    table = {k: f"concept {i}" for k, i in origin.items()}
    judge = ScriptedJudge(comparisons=lambda a, b: 3 if a == b else 1)
    truth_0_to_3 = planted.truths[0]
    for step in planted.truths[1:]:
        truth_0_to_3 = step @ truth_0_to_3
    result = semantic_evaluation(chain, judge=judge, explanations=table, n_paths=15,
                                 direct={N_LAYERS - 1: truth_0_to_3}, progress=False)
    assert result.method.startswith("judge: ")
    along = result.along.set_index(["kind", "distance"])
    assert along.loc[("direct", N_LAYERS - 1), "mean_label"] == 3.0  # the planted direct map
    composed = result.pairs[(result.pairs.kind == "composed")
                            & (result.pairs.distance == N_LAYERS - 1)]
    expected = sum(3 if table[(0, "res", a)] == table[(N_LAYERS - 1, "res", b)] else 1
                   for a, b in zip(composed.feature_a, composed.feature_b, strict=True))
    assert along.loc[("composed", N_LAYERS - 1), "mean_label"] == pytest.approx(
        expected / len(composed))
    assert len(judge.calls) == len(set(zip(result.pairs.explanation_a, result.pairs.explanation_b,
                                           strict=True)))  # each distinct pair asked once


def test_a_failing_judge_keeps_the_labelled_pairs_and_a_rerun_resumes(chain, origin, tmp_path):
    table = {k: f"concept {i}" for k, i in origin.items()}
    pairs = semantic_pairs(chain, n_paths=6, seed=0)
    def fails_at(n):  # one judge (the same script) that goes away once, after n answers
        calls = []

        def compare(a, b):
            calls.append(a)
            if len(calls) == n + 1:
                raise JudgeError("judge went away")
            return 2 if len(calls) <= n else 1
        return compare

    path = tmp_path / "labels.jsonl"
    with pytest.raises(JudgeError, match="went away") as info:
        label_pairs(pairs, judge=ScriptedJudge(comparisons=fails_at(3)), explanations=table,
                    path=path, progress=False)
    assert int(info.value.partial.label.notna().sum()) >= 3
    assert len(path.read_text().splitlines()) == 1 + 3
    again = ScriptedJudge(comparisons=fails_at(-1))
    done = label_pairs(pairs, judge=again, explanations=table, path=path, progress=False)
    assert done.label.notna().all()
    asked = len(set(zip(done.explanation_a, done.explanation_b, strict=True)))
    assert len(again.calls) == asked - 3  # the three logged labels were not asked again


def test_a_flow_graph_gives_its_edges_and_its_composed_chain(planted):
    stack = dict(enumerate(planted.saes))
    graph = flow_graph(stack, (0, 5), cut=-1.0)
    pairs = semantic_pairs(graph)
    assert len(pairs[pairs.kind == "consecutive"]) == len(graph.edges)
    res = sorted(graph.nodes[graph.nodes.module == "res"].layer)
    assert pairs[pairs.kind == "composed"].layer_b.tolist() == res[1:]
    with pytest.raises(ValueError, match="direct matches are for chains"):
        semantic_pairs(graph, direct={1: planted.truths[0]})


def test_overlap_and_context_explanations_read_top_token_entries():
    assert token_overlap(["a [LORD] (3.1)", "b [God] (2)"], ["[lord] (1.2)"]) == 0.5
    assert token_overlap(["x"], ["y"]) == 0.0
    assert context_explanations({(1, "res", 2): ["the [LORD] (3.1)"], (1, "res", 3): []}) == {
        (1, "res", 2): 'fires most strongly on the bracketed token in: "the [LORD]"',
        (1, "res", 3): None}
    with pytest.raises(ValueError, match="pass top_tokens"):
        label_pairs(pd.DataFrame(columns=list(PAIR_COLUMNS)))


def test_neuronpedia_explanations_are_used_when_reachable(monkeypatch):
    def fake(npid, features, **options):
        if npid == "offline/0-res":
            raise NeuronpediaUnavailableError("no network")
        return {f: FeatureExplanations(npid, f, "url",
                                       (Explanation(f"feature {f} of {npid}", None, None),), True)
                for f in features}

    monkeypatch.setattr("sae_match_lens.judging.semantic.explanations", fake)
    explain = neuronpedia_explainer({0: "offline/0-res", 1: "model/1-res", 2: None})
    assert explain([(0, "res", 4), (1, "res", 5), (2, "res", 6)]) == {
        (1, "res", 5): "feature 5 of model/1-res"}


def test_flat_sampling_knobs_warn_and_equal_semantic_options(chain, origin):
    from sae_match_lens.judging.semantic import SemanticOptions

    top = _truth_tokens(origin)
    with pytest.warns(DeprecationWarning, match=r"n_paths= → options\.n_paths"):
        old = semantic_evaluation(chain, top_tokens=top, n_paths=12, seed=3, same_at=0.6,
                                  progress=False)
    new = semantic_evaluation(chain, top_tokens=top, progress=False,
                              options=SemanticOptions(n_paths=12, seed=3, same_at=0.6))
    pd.testing.assert_frame_equal(old.pairs, new.pairs)
    reseeded = semantic_evaluation(chain, top_tokens=top, progress=False,
                                   options=SemanticOptions(n_paths=12, seed=4, same_at=0.6))
    assert not reseeded.pairs.equals(new.pairs)  # the seed reaches the draw
