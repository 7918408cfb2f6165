"""Flow graphs read from a batch results store: plan_flow's jobs, the store's graph equal to the
directly computed one (and computing nothing itself), other scores not used, links for other
SAEs refused, ambiguous stores refused."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import build_sae, planted_chain

from sae_match_lens.batch.plan import PairJob, SAERef, plan_flow
from sae_match_lens.batch.runs import batch_match
from sae_match_lens.batch.store import ResultStore, load_flow_graph
from sae_match_lens.flow.graph import FlowGraph, LayerSAEs, flow_graph
from sae_match_lens.flow.linking import links
from sae_match_lens.vocabulary import DEFAULT_LINK_SCORE

N_LAYERS = 3
MODULE_WIDTHS = {"mlp": 32, "attn": 40}
SEEDS = [(0, 3), (1, 10), (1, 29), (2, 20)]


def _save_flow_stack(root: Path) -> dict[int, dict[str, str]]:
    """A planted module stack on disk: residual SAEs of 48 features, each layer's the previous
    one's permuted plus noise; MLP/attention SAEs whose first 12 decoder rows are (rescaled)
    copies of residual decoder rows of their layer, the rest random."""
    chain = planted_chain(N_LAYERS, d_in=16, d_sae=48, noise=0.05, seed=3)
    gen = torch.Generator().manual_seed(7)
    refs: dict[int, dict[str, str]] = {}
    for layer, res in enumerate(chain.saes):
        saes = {"res": res}
        for i, (module, width) in enumerate(MODULE_WIDTHS.items()):
            sae = build_sae("jumprelu", d_in=16, d_sae=width, seed=10 * layer + i,
                            hook_name=f"blocks.{layer}.hook_{module}_out")
            rows = torch.randperm(48, generator=gen)[:12]
            with torch.no_grad():
                sae.W_dec[:12] = 0.5 * res.W_dec[rows]
            saes[module] = sae
        refs[layer] = {}
        for module, sae in saes.items():
            path = root / f"{module}{layer}"
            sae.save_model(str(path))
            refs[layer][module] = str(path)
    return refs


def _load_stack(refs: dict[int, dict[str, str]]) -> dict[int, LayerSAEs]:
    return {layer: LayerSAEs(**{m: SAERef(path=p).load() for m, p in mods.items()})
            for layer, mods in refs.items()}


def _assert_same_graph(got: FlowGraph, want: FlowGraph) -> None:
    pd.testing.assert_frame_equal(got.nodes, want.nodes, check_exact=True)
    pd.testing.assert_frame_equal(got.edges, want.edges, check_exact=True)
    assert got.options == want.options


def _no_links(*args: object, **kwargs: object) -> None:
    raise AssertionError("flow_graph computed links although the store holds them")


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, str]]:
    return _save_flow_stack(tmp_path_factory.mktemp("flow_saes"))


@pytest.fixture(scope="module")
def stack(refs) -> dict[int, LayerSAEs]:
    return _load_stack(refs)


@pytest.fixture(scope="module")
def store(refs, tmp_path_factory: pytest.TempPathFactory) -> ResultStore:
    root = tmp_path_factory.mktemp("flow_store") / "store"
    report = batch_match(plan_flow(refs), root, backend="local", progress=False)
    assert (report.n_ok, report.n_error) == (len(report.records), 0)
    return ResultStore(root)


def test_plan_flow_lists_both_walks_and_module_links_at_each_layer(refs):
    plan = plan_flow(refs)
    ends = {(j.layer_a, j.module_a, j.layer_b, j.module_b, j.distance) for j in plan}
    assert ends == {(0, "res", 1, "res", 1), (1, "res", 0, "res", -1),
                    (1, "res", 2, "res", 1), (2, "res", 1, "res", -1),
                    *((L, "res", L, m, 0) for L in range(N_LAYERS) for m in ("mlp", "attn"))}
    assert len(plan) == len(ends) == 10
    assert all(j.kind == "links" and j.options == {"k": 1, "score": DEFAULT_LINK_SCORE} for j in plan)
    backward = next(j for j in plan if j.distance == -1 and j.layer_a == 1)
    assert (backward.source, backward.target) == (SAERef(path=refs[1]["res"]),
                                                  SAERef(path=refs[0]["res"]))
    assert len(plan_flow(refs, modules=("mlp",), score="cosine_sum")) == 7
    assert len(plan_flow({L: mods["res"] for L, mods in refs.items()})) == 4
    with pytest.raises(ValueError, match="modules must be a subset"):
        plan_flow(refs, modules=("res",))
    with pytest.raises(ValueError, match="unknown link score"):
        plan_flow(refs, score="cosine")
    with pytest.raises(ValueError, match="needs 'res'"):
        plan_flow({0: {"mlp": refs[0]["mlp"]}})


@pytest.mark.parametrize("seed", SEEDS)
def test_store_flow_graph_equals_the_direct_one_and_computes_nothing(store, stack, seed,
                                                                     monkeypatch):
    direct = flow_graph(stack, seed)
    assert (direct.edges.kind == "res").any()
    monkeypatch.setattr("sae_match_lens.flow.graph.links", _no_links)
    _assert_same_graph(store.flow_graph(stack, seed), direct)
    _assert_same_graph(load_flow_graph(store, stack, seed), direct)


def test_store_flow_graphs_have_module_edges(store, stack, monkeypatch):
    monkeypatch.setattr("sae_match_lens.flow.graph.links", _no_links)
    kinds = set().union(*(store.flow_graph(stack, seed, cut=0.0).edges.kind for seed in SEEDS))
    assert kinds == {"res", "mlp", "attn"}


def test_stored_links_of_another_score_are_not_used(refs, stack, tmp_path, monkeypatch):
    other = ResultStore(tmp_path / "store")
    batch_match(plan_flow(refs, score="cosine_sum"), other, backend="local", progress=False)
    calls: list[tuple[str, str]] = []

    def counted(a, b, **kwargs):
        calls.append((a.cfg.metadata.hook_name, b.cfg.metadata.hook_name))
        return links(a, b, **kwargs)

    seed = (1, 10)
    direct = flow_graph(stack, seed)
    monkeypatch.setattr("sae_match_lens.flow.graph.links", counted)
    _assert_same_graph(other.flow_graph(stack, seed), direct)  # every link recomputed
    assert len(calls) == len(set(calls)) >= 3
    calls.clear()
    other.flow_graph(stack, seed, score="cosine_sum")
    assert calls == []
    wrong = {(1, 2, "res"): links(stack[1].res, stack[2].res, score="cosine_sum", progress=False)}
    with pytest.raises(ValueError, match=re.escape("links_by_key[(1, 2, 'res')]") + ".*scored by"):
        flow_graph(stack, seed, links_by_key=wrong)


def test_stored_links_for_another_sae_are_refused(refs, stack, tmp_path):
    # a job that claims to link residual layer 0 to layer 1 but was run against layer 2's SAE
    liar = PairJob(SAERef(path=refs[0]["res"]), SAERef(path=refs[2]["res"]), "links",
                   {"k": 1, "score": "decoder_cosine"}, layer_a=0, layer_b=1, module_a="res",
                   module_b="res", distance=1)
    bad = ResultStore(tmp_path / "store")
    batch_match([liar], bad, backend="local", progress=False)
    with pytest.raises(ValueError, match=re.escape("(0, 1, 'res')") + ".*target SAE is not"):
        bad.flow_graph(stack, (0, 3), score="decoder_cosine")
    swapped = {(1, 1, "mlp"): links(stack[1].res, stack[1].attn, score="decoder_cosine",
                                    progress=False)}
    with pytest.raises(ValueError, match=re.escape("(1, 1, 'mlp')") + ".*40 target features"):
        flow_graph(stack, (1, 10), cut=2.0, links_by_key=swapped, score="decoder_cosine")
    other_layer = {(1, 1, "mlp"): links(stack[2].res, stack[1].mlp, score="decoder_cosine",
                                        progress=False)}
    with pytest.raises(ValueError, match="source SAE is not the stack's .*hook_name"):
        flow_graph(stack, (1, 10), cut=2.0, links_by_key=other_layer, score="decoder_cosine")


def test_two_stored_results_for_one_key_are_refused_unless_options_choose(refs, stack, tmp_path,
                                                                          monkeypatch):
    plan = plan_flow({0: refs[0], 1: refs[1]}, modules=(), score="decoder_cosine")
    extra = PairJob(plan[0].source, plan[0].target, "links",
                    {"k": 1, "score": "decoder_cosine", "n_null": 256}, layer_a=0, layer_b=1,
                    module_a="res", module_b="res", distance=1)
    two = ResultStore(tmp_path / "store")
    batch_match([*plan, extra], two, backend="local", progress=False)
    with pytest.raises(ValueError, match=r"2 finished k=1 decoder_cosine links results for flow "
                                         r"key \(0, 1, 'res'\).*n_null"):
        two.flow_graph(stack, (0, 3), score="decoder_cosine")
    monkeypatch.setattr("sae_match_lens.flow.graph.links", _no_links)
    chosen = two.flow_graph({0: stack[0].res, 1: stack[1].res}, (0, 3), score="decoder_cosine",
                            options={"k": 1, "score": "decoder_cosine", "n_null": 256})
    assert list(chosen.edges.kind) == ["res"]
    with pytest.raises(ValueError, match="reads k=1"):
        two.flow_graph(stack, (0, 3), score="decoder_cosine",
                       options={"k": 2, "score": "decoder_cosine"})
