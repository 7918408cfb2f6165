import math

import pytest
from helpers import build_sae, planted_chain

from sae_match_lens import Permutation
from sae_match_lens.chain import compare_composed_direct, match_chain


@pytest.fixture(scope="module")
def chain_and_truth():
    planted = planted_chain(4, d_sae=128, noise=0.05, seed=3)
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


def test_composed_and_direct_matches_agree_on_a_clean_chain(chain_and_truth):
    planted, chain = chain_and_truth
    checks = compare_composed_direct(chain, planted.saes, max_distance=3, progress=False)
    assert [(c.src, c.dst) for c in checks] == [(0, 2), (1, 3), (0, 3)]
    assert all(c.agreement == 1.0 for c in checks)


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


def test_chain_save_writes_one_permutation_per_step(tmp_path, chain_and_truth):
    _, chain = chain_and_truth
    chain.save(tmp_path)
    loaded = Permutation.load(tmp_path / "step_001.safetensors")
    assert loaded == chain.steps[1].permutation


def test_chain_errors_are_clear():
    with pytest.raises(ValueError, match="at least 2 SAEs"):
        match_chain([build_sae("jumprelu")], progress=False)
    planted = planted_chain(3, d_sae=32, seed=1)
    chain = match_chain(planted.saes, progress=False)
    with pytest.raises(ValueError, match="not a layer of this chain"):
        chain.compose(0, 5)
    with pytest.raises(ValueError, match="out of range"):
        chain.trace(32)
    with pytest.raises(ValueError, match="has 'blocks.0.hook_resid_post' at layer 0"):
        compare_composed_direct(chain, planted.saes[::-1], progress=False)
