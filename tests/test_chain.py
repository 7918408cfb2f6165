import logging
import math

import pytest
import torch
from helpers import build_sae, planted_chain

from sae_match_lens import Permutation
from sae_match_lens.chain import ChainFileError, ChainMatch, compare_composed_direct, match_chain
from sae_match_lens.permutation import ProvenanceError


@pytest.fixture(scope="module")
def chain_and_truth():
    planted = planted_chain(4, d_sae=128, noise=0.05, seed=3)
    return planted, match_chain(planted.saes, progress=False)


@pytest.fixture(scope="module")
def late_chain():
    """A planted chain at model layers 3, 4, 5 (hooks blocks.3 .. blocks.5)."""
    planted = planted_chain(3, d_sae=64, noise=0.05, seed=7, first_layer=3)
    return planted, match_chain(planted.saes, progress=False)


def test_adjacent_matches_recover_the_planted_permutations(chain_and_truth):
    planted, chain = chain_and_truth
    for step, truth in zip(chain.steps, planted.truths, strict=True):
        assert step.permutation == truth


def test_composition_equals_the_composed_planted_truth(chain_and_truth):
    planted, chain = chain_and_truth
    t0, t1, t2 = planted.truths
    assert chain.compose(0, 3) == t2 @ t1 @ t0
    assert chain.compose(1, 3) == t2 @ t1
    assert chain.compose(2, 2) == Permutation.identity(128)
    assert chain.compose(3, 0) == (t2 @ t1 @ t0).inverse()


def test_trace_follows_a_feature_with_per_step_costs(chain_and_truth):
    planted, chain = chain_and_truth
    path = chain.trace(17, src=0, dst=3)
    expected = [17]
    for truth in planted.truths:
        expected.append(int(truth.indices[expected[-1]]))
    assert path.features == expected and path.complete
    assert math.isnan(path.steps[0].cost)
    assert [s.hook_name for s in path.steps] == [f"blocks.{k}.hook_resid_post" for k in range(4)]
    costs = [float(chain.steps[k].cost_F[expected[k]]) for k in range(3)]
    assert [s.cost for s in path.steps[1:]] == costs
    assert path.total_cost == pytest.approx(sum(costs))


def test_paths_table_agrees_with_trace(chain_and_truth):
    _, chain = chain_and_truth
    table = chain.paths(1, 3)
    assert table.shape == (128, 3)
    assert table[5].tolist() == chain.trace(5, 1, 3).features


def test_edge_table_lists_every_link(chain_and_truth):
    _, chain = chain_and_truth
    edges = chain.edges()
    assert len(edges) == 3 * 128
    assert set(edges.columns) >= {"layer_a", "layer_b", "feature_a", "feature_b", "cost", "margin"}
    row = edges[(edges.layer_a == 1) & (edges.feature_a == 9)].iloc[0]
    assert row.feature_b == int(chain.steps[1].permutation.indices[9])
    assert row.confidence == float(chain.steps[1].confidence_F[9])  # match computes it by default


def test_a_chain_at_layers_3_to_5_speaks_in_model_layers(late_chain):
    planted, chain = late_chain
    t3, t4 = planted.truths
    assert chain.layers == (3, 4, 5)
    path = chain.trace(11)
    assert [s.layer for s in path.steps] == [3, 4, 5]
    assert path.features == [11, int(t3.indices[11]), int(t4.indices[t3.indices[11]])]
    assert chain.trace(11, src=4).features == [11, int(t4.indices[11])]
    assert chain.compose(3, 5) == t4 @ t3 and chain.compose(4, 5) == t4
    assert chain.paths(4).tolist() == torch.stack([torch.arange(64), t4.indices], 1).tolist()
    edges = chain.edges()
    assert sorted(set(zip(edges.layer_a, edges.layer_b, strict=True))) == [(3, 4), (4, 5)]
    assert (edges[edges.layer_a == 4].hook_a == "blocks.4.hook_resid_post").all()
    with pytest.raises(ValueError, match=r"its model layers are \[3, 4, 5\]"):
        chain.compose(0, 1)


def test_a_mapping_gives_the_layers_and_a_list_takes_them_from_the_hook_names(late_chain):
    planted, chain = late_chain
    mapped = match_chain({5: planted.saes[2], 3: planted.saes[0], 4: planted.saes[1]},
                         progress=False)
    assert mapped.layers == chain.layers == (3, 4, 5)
    assert all(a.permutation == b.permutation for a, b in zip(mapped.steps, chain.steps,
                                                              strict=True))
    hookless = [build_sae(hook_name=f"resid_{k}", seed=k) for k in range(2)]
    assert match_chain({7: hookless[0], 9: hookless[1]}, progress=False).layers == (7, 9)
    with pytest.raises(ValueError, match=r"resid_0.*pass a mapping"):
        match_chain(hookless, progress=False)


def test_a_mapping_whose_keys_contradict_the_hook_names_is_refused(late_chain):
    planted, _ = late_chain
    with pytest.raises(ValueError, match=r"key 0 holds SAE 'blocks.3.hook_resid_post'.*layer 3"):
        match_chain({0: planted.saes[0], 1: planted.saes[1]}, progress=False)
    with pytest.raises(TypeError, match="model layers"):
        match_chain({"a": planted.saes[0], "b": planted.saes[1]}, progress=False)


def test_a_list_out_of_layer_order_or_with_a_repeated_layer_is_refused(late_chain):
    planted, _ = late_chain
    with pytest.raises(ValueError, match=r"increasing layer order.*blocks.4.*pass a mapping"):
        match_chain(planted.saes[::-1], progress=False)
    twin = build_sae(d_in=32, d_sae=64, hook_name="blocks.3.hook_resid_pre")
    with pytest.raises(ValueError, match=r"both at model layer 3.*Pass a mapping"):
        match_chain([twin, planted.saes[0]], progress=False)


def test_save_and_load_round_trip_exactly(tmp_path, late_chain):
    planted, chain = late_chain
    chain = match_chain(planted.saes, max_cost="auto", metric="cosine", progress=False)
    path = chain.save(tmp_path / "chain", extra_files={"notes.txt": "hello"})
    assert sorted(p.name for p in path.iterdir()) == ["chain.json", "notes.txt", "step_003_004",
                                                      "step_004_005"]
    for loaded in (ChainMatch.load(path), ChainMatch.load(path, saes=planted.saes)):
        assert loaded.layers == chain.layers and loaded.hook_names == chain.hook_names
        assert loaded.options == chain.options
        for a, b in zip(loaded.steps, chain.steps, strict=True):
            assert a.permutation == b.permutation and a.options == b.options
            for name in ("cost_F", "margin_F", "confidence_F"):
                x, y = getattr(a, name), getattr(b, name)
                assert x.dtype == y.dtype and torch.equal(x.isnan(), y.isnan())
                assert torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))  # bit for bit
            assert (a.total_cost, a.max_cost, a.certified, a.gap) == (
                b.total_cost, b.max_cost, b.certified, b.gap)
    with pytest.raises(ProvenanceError, match=r"at model layers \[3, 4, 5\].*\[3, 4\]"):
        ChainMatch.load(path, saes=planted.saes[:2])
    with pytest.raises(ChainFileError, match="does not exist"):
        ChainMatch.load(tmp_path / "nowhere")


def test_a_failed_save_leaves_the_earlier_one_intact(tmp_path, late_chain, monkeypatch):
    _, chain = late_chain
    path = chain.save(tmp_path / "chain")
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    import sae_match_lens.matching as matching

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(matching, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        chain.save(path)
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["chain"]


def test_composed_and_direct_matches_agree_on_a_clean_chain(chain_and_truth):
    planted, chain = chain_and_truth
    checks = compare_composed_direct(chain, planted.saes, max_distance=3, progress=False)
    assert [(c.src, c.dst) for c in checks] == [(0, 2), (1, 3), (0, 3)]
    assert all(c.agreement == 1.0 for c in checks)


def test_compare_composed_direct_reuses_the_recorded_options(late_chain, caplog):
    planted, _ = late_chain
    chain = match_chain(dict(zip((3, 4, 5), planted.saes, strict=True)), metric="cosine",
                        progress=False)
    assert chain.options["metric"] == "cosine"
    (check,) = compare_composed_direct(chain, planted.saes, progress=False)
    assert (check.src, check.dst, check.distance) == (3, 5, 2)
    assert check.direct.options["metric"] == "cosine"
    assert check.direct.options["weights"] == chain.options["weights"]
    with caplog.at_level(logging.WARNING, logger="sae_match_lens.chain"):
        (check,) = compare_composed_direct(chain, planted.saes, metric="mse", progress=False)
    assert check.direct.options["metric"] == "mse"
    assert "metric='mse' overrides the chain's recorded metric='cosine'" in caplog.text


def test_agreement_of_composition_falls_with_distance_under_noise():
    planted = planted_chain(4, d_sae=128, noise=3.0, seed=5)
    chain = match_chain(planted.saes, progress=False)
    truth_03 = planted.truths[2] @ planted.truths[1] @ planted.truths[0]
    adjacent = planted.truths[0].agreement(chain.compose(0, 1))
    distant = truth_03.agreement(chain.compose(0, 3))
    assert distant < adjacent


def test_broken_links_end_a_path():
    planted = planted_chain(3, d_sae=64, noise=0.5, seed=2)
    chain = match_chain(planted.saes, max_cost=1e-9, progress=False)  # nothing is cheap enough
    path = chain.trace(0)
    assert not path.complete and path.features[1:] == [-1, -1] and math.isnan(path.total_cost)


def test_chain_errors_are_clear():
    with pytest.raises(ValueError, match="at least 2 SAEs"):
        match_chain([build_sae("jumprelu")], progress=False)
    planted = planted_chain(3, d_sae=32, seed=1)
    chain = match_chain(planted.saes, progress=False)
    with pytest.raises(ValueError, match="not a layer of this chain"):
        chain.compose(0, 5)
    with pytest.raises(ValueError, match="out of range"):
        chain.trace(32)
    other = build_sae(d_in=32, d_sae=32, hook_name="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="has 'blocks.0.hook_resid_post' at layer 0"):
        compare_composed_direct(chain, {0: other, 1: planted.saes[1], 2: planted.saes[2]},
                                progress=False)
    with pytest.raises(ValueError, match=r"model layers \[0, 1, 2\].*\[0, 1\]"):
        compare_composed_direct(chain, planted.saes[:2], progress=False)
