"""Feature flow: predecessors and their reading, origin groups against direct counts, flow
graphs on planted chains, exports and plot, persistence."""

from __future__ import annotations

import json
import math

import networkx as nx
import pandas as pd
import pytest
import torch

from sae_match_lens.flow.graph import (
    ORIGIN_GROUPS,
    LayerSAEs,
    _reading,
    chance_best_cosine,
    chance_levels,
    chance_share_above,
    flow_graph,
    origin_groups,
    persistence,
    predecessors,
)
from sae_match_lens.flow.linking import links
from tests.helpers import planted_chain
from tests.helpers_tl import random_jumprelu_sae, tiny_model, tiny_tokens


@pytest.fixture(scope="module")
def chain():
    return planted_chain(4, d_in=24, d_sae=64, noise=0.05, seed=4)


def test_reading_follows_the_papers_rule():
    assert _reading(0.9, 0.05, 0.1, 0.5, 0.15) == "carried over"
    assert _reading(0.9, 0.6, 0.1, 0.5, 0.15) == "processed by MLP"
    assert _reading(0.9, 0.6, 0.5, 0.5, 0.15) == "processed by MLP and attention"
    assert _reading(0.9, 0.3, 0.6, 0.5, 0.15) == "processed by attention"
    # a module score above low but below high is neither low nor high: not "processed by"
    assert _reading(0.9, 0.3, 0.2, 0.5, 0.15) == "carried over, weak module link"
    assert _reading(0.2, 0.7, 0.1, 0.5, 0.15) == "born in MLP"
    assert _reading(0.2, 0.1, 0.6, 0.5, 0.15) == "born in attention"
    assert _reading(0.2, 0.1, 0.1, 0.5, 0.15) == "unexplained"
    assert _reading(math.nan, math.nan, 0.6, 0.5, 0.15) == "born in attention"


def test_processed_by_needs_high_module_scores_on_the_default_suite():
    from sae_match_lens.assets import load_suite_stack

    stack = load_suite_stack("jumprelu")
    for layer in [layer for layer in stack if layer - 1 in stack]:
        frame = predecessors(stack, layer, score="decoder_cosine")
        module_best = frame[["s_mlp", "s_attn"]].max(axis=1)
        paper = (frame.s_res >= 0.5) & (module_best >= 0.5)
        processed = frame.reading.str.startswith("processed by")
        assert (processed == paper).all()
        # the former reading took any module score >= 0.15 (below chance) as "processed by"
        former = (frame.s_res >= 0.5) & (module_best >= 0.15)
        assert former.mean() > 0.9 and processed.mean() < 0.6


def test_chance_levels_match_random_unit_vectors():
    generator = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize
    a = unit(torch.randn(2000, 64, generator=generator, dtype=torch.float64), dim=1)
    b = unit(torch.randn(256, 64, generator=generator, dtype=torch.float64), dim=1)
    best = (a @ b.T).max(dim=1).values
    assert chance_best_cosine(256, 64) == pytest.approx(float(best.mean()), abs=0.01)
    for t in (0.3, 0.4, 0.5):
        assert chance_share_above(t, 256, 64) == pytest.approx(float((best >= t).double().mean()),
                                                               abs=0.03)
    assert chance_best_cosine(1024, 128) == pytest.approx(0.283, abs=0.002)
    assert chance_share_above(0.15, 1024, 128) > 0.999 > 1e-5 > chance_share_above(0.5, 1024, 128)
    with pytest.raises(ValueError, match="n_candidates"):
        chance_best_cosine(0, 64)


def test_chance_levels_sit_beside_each_threshold(chain):
    stack = {10 + i: LayerSAEs(res=sae) for i, sae in enumerate(chain.saes)}
    table = chance_levels(stack, 11, thresholds=(0.5, 0.15))
    assert table.module.tolist() == ["res", "res"] and table.threshold.tolist() == [0.5, 0.15]
    assert (table.n_candidates == 64).all() and (table.d_model == 24).all()
    assert table.chance_best_cosine.iloc[0] == pytest.approx(chance_best_cosine(64, 24))
    # the planted partners are far above chance; a random rotation brings them down to it
    assert float(predecessors(stack, 11).s_res.mean()) > 0.9
    assert table.rotated_best_cosine.iloc[0] == pytest.approx(chance_best_cosine(64, 24), abs=0.08)


def test_predecessors_are_the_backward_top1_links(chain):
    stack = {10 + i: LayerSAEs(res=sae) for i, sae in enumerate(chain.saes)}
    frame = predecessors(stack, 11)
    lk = links(chain.saes[0], chain.saes[1], direction="backward", score="decoder_cosine",
               progress=False)
    assert (frame.pred_res.to_numpy() == lk.top1.numpy()).all()
    truth = chain.truths[0].inverse().indices
    assert float((torch.as_tensor(frame.pred_res.to_numpy().copy()) == truth).double().mean()) > 0.95
    assert (frame.pred_mlp == -1).all() and frame.s_mlp.isna().all()
    assert set(frame.reading) <= {"carried over", "unexplained"}
    assert predecessors(stack, 10).s_res.isna().all()  # layer 10 has no R(L-1) here


def test_flow_graph_follows_the_planted_chain_both_ways(chain, tmp_path):
    stack = {i: sae for i, sae in enumerate(chain.saes)}
    feature = 5
    path = [feature]
    for truth in chain.truths:
        path.append(int(truth.indices[path[-1]]))
    graph = flow_graph(stack, (1, path[1]), score="decoder_cosine")
    res = graph.nodes[graph.nodes.module == "res"].sort_values("layer")
    assert list(res.feature) == path
    assert graph.similarity_span == (0, 3)
    assert len(graph.edges) == 3 and (graph.edges.score >= 0.5).all()
    g = graph.to_networkx()
    assert nx.is_directed_acyclic_graph(g) and g.number_of_nodes() == 4
    data = json.loads(graph.save_json(tmp_path / "flow.json").read_text())
    assert len(data["nodes"]) == 4 and len(data["links"]) == 3
    assert nx.read_graphml(graph.save_graphml(tmp_path / "flow.graphml")).number_of_edges() == 3
    assert graph.plot(tmp_path / "flow.png").stat().st_size > 1000
    cut = flow_graph(stack, (1, path[1]), cut=1.01, score="decoder_cosine")  # nothing passes: the seed alone
    assert len(cut.nodes) == 1 and cut.edges.empty


def test_the_flow_figure_marks_the_seed_points_edges_and_keeps_the_html_lanes():
    """The PNG had no seed marker, no edge direction, no width scale, and MLP above the
    residual band where the HTML view puts it below."""
    import matplotlib.pyplot as plt

    from sae_match_lens.assets import load_suite_stack

    stack = load_suite_stack()
    graph = flow_graph({x: stack[x] for x in (1, 2, 3)}, (2, 17))
    assert set(graph.nodes.module) == {"res", "mlp", "attn"}
    fig = graph.figure()
    try:
        ax = fig.axes[0]
        y = {}
        for collection in ax.collections:  # node scatters, one per module, then the seed
            y[collection.get_label()] = collection.get_offsets()[:, 1]
        assert min(y["attention"]) > max(y["residual"]) and min(y["residual"]) > max(y["MLP"])
        seed = [label for label in y if label.startswith("seed")]
        assert seed == [f"seed {graph.options['seed']}"]
        assert list(y[seed[0]]) == [0.0]  # on the residual band
        arrows = [t for t in ax.texts if getattr(t, "arrow_patch", None) is not None]
        assert len(arrows) == len(graph.edges)
        assert {a.arrow_patch.get_arrowstyle().__class__.__name__ for a in arrows} == {"CurveFilledB"}
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert {"score 0.25", "score 0.5", "score 0.75", "score 1"} <= set(legend)
        widths = {t.get_text(): h.get_linewidth()
                  for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles,
                                  strict=True) if t.get_text().startswith("score")}
        assert widths["score 0.25"] < widths["score 0.5"] < widths["score 1"]
        for edge, arrow in zip(graph.edges.itertuples(), arrows, strict=True):
            assert arrow.arrow_patch.get_linewidth() == pytest.approx(0.6 + 4 * edge.score)
    finally:
        plt.close(fig)


def test_module_predecessors_join_the_graph_above_module_min():
    res = [random_jumprelu_sae(f"blocks.{i}.hook_resid_post", seed=i) for i in range(2)]
    mlp = random_jumprelu_sae("blocks.1.hook_mlp_out", seed=1)  # a copy of res[1]: cosine 1
    stack = {0: LayerSAEs(res[0]), 1: LayerSAEs(res[1], mlp=mlp)}
    graph = flow_graph(stack, (1, 7), cut=-2.0, score="decoder_cosine")
    mlp_edges = graph.edges[graph.edges.kind == "mlp"]
    assert list(mlp_edges.source) == ["1/mlp/7"] and mlp_edges.score.iloc[0] == pytest.approx(1.0)
    none = flow_graph(stack, (1, 7), cut=-2.0, module_min=1.5, score="decoder_cosine")
    assert (none.edges.kind != "mlp").all()


def test_origin_groups_equal_a_direct_count():
    model = tiny_model()
    tokens = tiny_tokens(n_seq=4)
    stack = {0: LayerSAEs(random_jumprelu_sae("blocks.0.hook_resid_post", seed=1)),
             1: LayerSAEs(random_jumprelu_sae("blocks.1.hook_resid_post", seed=2),
                          mlp=random_jumprelu_sae("blocks.1.hook_mlp_out", seed=3),
                          attn=random_jumprelu_sae("blocks.1.hook_attn_out", seed=4))}
    table = origin_groups(model, stack, tokens, layers=[1], batch_size=3)
    pred = predecessors(stack, 1)
    _, cache = model.run_with_cache(tokens)

    def fire(sae):
        h = cache[sae.cfg.metadata.hook_name][:, 1:]
        return (sae.encode(h) != 0).reshape(-1, sae.cfg.d_sae)

    target = fire(stack[1].res)
    r = fire(stack[0].res)[:, torch.as_tensor(pred.pred_res.to_numpy())]
    m = fire(stack[1].mlp)[:, torch.as_tensor(pred.pred_mlp.to_numpy())]
    a = fire(stack[1].attn)[:, torch.as_tensor(pred.pred_attn.to_numpy())]
    expect = {
        "From RES": r & ~m & ~a, "From MLP": ~r & m & ~a, "From ATT": ~r & ~m & a,
        "From RES & MLP": r & m & ~a, "From RES & ATT": r & ~m & a, "From MLP & ATT": ~r & m & a,
        "From RES & MLP & ATT": r & m & a, "From nowhere": ~r & ~m & ~a,
    }
    n = int(target.sum())
    assert table.n_active.item() == n
    for group in ORIGIN_GROUPS:
        assert table[group].item() == pytest.approx(float((expect[group] & target).sum()) / n)
    assert sum(table[g].item() for g in ORIGIN_GROUPS) == pytest.approx(1.0)


def test_persistence_counts_surviving_links(chain):
    stack = dict(enumerate(chain.saes))
    frame = persistence(stack, score="decoder_cosine")
    first = frame[frame.layer == 0]
    assert (first.survives <= 3).all() and float((first.survives == 3).mean()) > 0.9
    assert (frame[frame.layer == 3].survives == 0).all()
    assert (persistence(stack, cut=1.01, score="decoder_cosine").survives == 0).all()


def test_flow_graph_save_then_load_gives_the_graph_back_and_checks_the_stack(tmp_path):
    from sae_match_lens.assets import load_suite_stack
    from sae_match_lens.flow.graph import FlowGraph
    from sae_match_lens.permutation import ProvenanceError

    stack = load_suite_stack()
    sub = {x: stack[x] for x in (1, 2, 3)}
    graph = flow_graph(sub, (2, 17))
    assert graph.save(tmp_path / "flow.json") == tmp_path / "flow.json"
    back = FlowGraph.load(tmp_path / "flow.json", stack=sub)
    def rows(frame, columns, key):
        return frame[columns].sort_values(key).reset_index(drop=True)

    pd.testing.assert_frame_equal(rows(back.nodes, graph.nodes.columns, ["node"]),
                                  rows(graph.nodes, graph.nodes.columns, ["node"]), check_dtype=False)
    pd.testing.assert_frame_equal(rows(back.edges, graph.edges.columns, ["source", "target"]),
                                  rows(graph.edges, graph.edges.columns, ["source", "target"]),
                                  check_dtype=False)
    assert back.options == json.loads(json.dumps(graph.options, default=str))
    assert FlowGraph.load_json(graph.save_json(tmp_path / "old.json")).edges.shape == graph.edges.shape
    swapped = {1: stack[2], 2: stack[1], 3: stack[3]}  # the right SAEs at the wrong layers
    with pytest.raises(ProvenanceError, match=r"layer 1 read at blocks\.1\..*blocks\.2\."):
        FlowGraph.load(tmp_path / "flow.json", stack=swapped)
    with pytest.raises(ProvenanceError, match="no SAE there"):
        FlowGraph.load(tmp_path / "flow.json", stack={x: stack[x] for x in (2, 3)})


def test_flow_graph_load_refuses_a_corrupt_foreign_or_newer_file_naming_it(chain, tmp_path):
    from sae_match_lens.flow.graph import FlowGraph, FlowGraphFileError

    stack = dict(enumerate(chain.saes))
    seed = (1, int(chain.truths[0].indices[5]))
    path = flow_graph(stack, seed, score="decoder_cosine").save(tmp_path / "flow.json")
    record = json.loads(path.read_text())
    record["links"][0]["score"] += 0.25
    path.write_text(json.dumps(record))
    with pytest.raises(FlowGraphFileError, match=r"flow\.json: checksum mismatch"):
        FlowGraph.load(path)
    record["format_version"] = 7
    path.write_text(json.dumps(record))
    with pytest.raises(FlowGraphFileError, match=r"flow\.json was saved in .* version 7.*upgrade"):
        FlowGraph.load(path)
    (tmp_path / "other.json").write_text(json.dumps({"format": "x", "nodes": [], "links": []}))
    with pytest.raises(FlowGraphFileError, match=r"other\.json is not a FlowGraph.*'x'"):
        FlowGraph.load(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FlowGraphFileError, match=r"bad\.json is not a FlowGraph JSON file"):
        FlowGraph.load(tmp_path / "bad.json")
