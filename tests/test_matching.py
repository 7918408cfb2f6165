import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import build_sae, planted_pair
from scipy.optimize import linear_sum_assignment

from sae_match_lens import Permutation, fold
from sae_match_lens import matching as matching_module
from sae_match_lens.assets import load_suite_saes
from sae_match_lens.atomicio import host_id
from sae_match_lens.matching import match, null_max_cost
from sae_match_lens.nulls import chance_confidence
from sae_match_lens.permutation import ProvenanceError


def _manual_cost(sae_a, sae_b, folded=True, w=(1.0, 1.0, 1.0)):
    """Independent cost matrix: summed squared distances of (folded) parameters, in float64."""
    a, b = (fold(sae_a), fold(sae_b)) if folded else (sae_a, sae_b)

    def parts(s):
        return (s.W_dec.double(), s.W_enc.T.double(), s.b_enc.double()[:, None])

    with torch.no_grad():
        return sum(wk * torch.cdist(pa, pb).pow(2) for wk, pa, pb in zip(w, parts(a), parts(b), strict=True))


def test_folded_matching_recovers_a_planted_permutation_exactly_without_noise():
    pair = planted_pair(d_sae=256, noise=0.0, seed=1)
    result = match(pair.sae_a, pair.sae_b, progress=False)
    assert result.permutation == pair.truth
    assert result.certified and result.gap < 1e-3


def test_folded_matching_recovers_99_percent_at_moderate_noise_where_unfolded_fails():
    pair = planted_pair(d_sae=384, noise=0.3, seed=2)
    folded = match(pair.sae_a, pair.sae_b, progress=False).permutation
    unfolded = match(pair.sae_a, pair.sae_b, fold=False, progress=False).permutation
    assert pair.truth.agreement(folded) >= 0.99
    assert pair.truth.agreement(unfolded) < pair.truth.agreement(folded) - 0.2


def test_costs_equal_an_independent_computation():
    sae_a, sae_b = build_sae("jumprelu", seed=0), build_sae("jumprelu", seed=1)
    C = _manual_cost(sae_a, sae_b)
    result = match(sae_a, sae_b, progress=False)
    i = torch.arange(48)
    torch.testing.assert_close(result.cost_F.double(), C[i, result.permutation.indices],
                               rtol=1e-4, atol=1e-5)
    rows, cols = linear_sum_assignment(C.numpy())
    assert result.total_cost == pytest.approx(float(C[rows, cols].sum()), rel=1e-5)


def test_margins_equal_a_brute_force_computation():
    sae_a, sae_b = build_sae("jumprelu", seed=3), build_sae("jumprelu", seed=4)
    C = _manual_cost(sae_a, sae_b)
    result = match(sae_a, sae_b, progress=False)
    for i, j in enumerate(result.permutation.indices.tolist()):
        others = torch.cat([C[i, :j], C[i, j + 1:]])
        expected = float(others.min() - C[i, j])
        assert result.margin_F[i].item() == pytest.approx(expected, abs=2e-7 * float(C.max()))


@pytest.mark.parametrize("n", [3, 5, 6])
def test_assignment_is_optimal_by_brute_force_on_tiny_inputs(n):
    sae_a, sae_b = build_sae("standard", d_sae=n, seed=n), build_sae("standard", d_sae=n, seed=n + 10)
    C = _manual_cost(sae_a, sae_b).numpy()
    best = min(sum(C[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
    for solver in ("lapjv", "scipy"):
        assert match(sae_a, sae_b, solver=solver, progress=False).total_cost == pytest.approx(best, rel=1e-5)


def test_lapjv_and_scipy_agree_on_a_larger_instance():
    pair = planted_pair(d_sae=300, noise=1.0, seed=5)
    lap = match(pair.sae_a, pair.sae_b, solver="lapjv", progress=False)
    ref = match(pair.sae_a, pair.sae_b, solver="scipy", progress=False)
    assert lap.total_cost == pytest.approx(ref.total_cost, rel=1e-5)
    assert lap.solver == "lapjv" and ref.solver == "scipy"


def test_max_cost_solves_the_partial_matching_optimally_by_brute_force():
    n = 5
    sae_a, sae_b = build_sae("jumprelu", d_sae=n, seed=7), build_sae("jumprelu", d_sae=n, seed=8)
    C = _manual_cost(sae_a, sae_b).numpy()
    lam = float(np.median(C))
    best = np.inf
    for p in itertools.permutations(range(-1, n), n):  # -1 entries: unmatched
        used = [j for j in p if j >= 0]
        if len(used) != len(set(used)):
            continue
        best = min(best, sum(C[i, j] if j >= 0 else lam for i, j in enumerate(p)))
    for solver in ("lapjv", "scipy"):
        result = match(sae_a, sae_b, max_cost=lam, solver=solver, progress=False)
        unmatched = n - result.permutation.n_matched
        assert result.total_cost + lam * unmatched == pytest.approx(best, rel=1e-5)
        assert torch.isnan(result.cost_F[~result.matched]).all()
        assert (result.cost_F[result.matched] < lam).all()


def test_max_cost_leaves_features_without_partners_unmatched():
    pair = planted_pair(d_sae=256, noise=0.2, seed=6)
    foreign = planted_pair(d_sae=256, seed=99).sae_b
    with torch.no_grad():  # replace B's partners of A's first 40 features by unrelated features
        targets = pair.truth.indices[:40]
        pair.sae_b.W_enc[:, targets] = foreign.W_enc[:, targets]
        pair.sae_b.W_dec[targets] = foreign.W_dec[targets]
    result = match(pair.sae_a, pair.sae_b, max_cost="auto", progress=False)
    assert result.max_cost is not None and result.max_cost > 0
    unmatched = ~result.matched
    assert unmatched[:40].float().mean() >= 0.9
    assert unmatched[40:].float().mean() <= 0.02
    assert pair.truth.agreement(result.permutation) >= 0.8
    full = match(pair.sae_a, pair.sae_b, progress=False)
    assert full.permutation.n_matched == 256 and full.max_cost is None


def test_null_max_cost_sits_between_true_and_chance_costs():
    pair = planted_pair(d_sae=256, noise=0.2, seed=11)
    lam = null_max_cost(pair.sae_a, pair.sae_b)
    result = match(pair.sae_a, pair.sae_b, progress=False)
    assert result.cost_F.max() < lam < result.cost_F.mean() * 50


@pytest.mark.parametrize(("n_a", "n_b"), [(40, 64), (64, 40)])
def test_unequal_widths_give_an_optimal_rectangular_assignment(n_a, n_b):
    sae_a, sae_b = build_sae("jumprelu", d_sae=n_a, seed=1), build_sae("jumprelu", d_sae=n_b, seed=2)
    C = _manual_cost(sae_a, sae_b).numpy()
    rows, cols = linear_sum_assignment(C)
    for solver in ("lapjv", "scipy"):
        result = match(sae_a, sae_b, solver=solver, progress=False)
        assert result.permutation.n_source == n_a and result.permutation.n_target == n_b
        assert result.permutation.n_matched == min(n_a, n_b)
        assert result.total_cost == pytest.approx(float(C[rows, cols].sum()), rel=1e-5)


def test_rectangular_planted_subset_is_recovered():
    pair = planted_pair(d_sae=128, noise=0.1, seed=3)
    keep = torch.arange(0, 128, 2)  # A keeps every other feature
    sub = build_sae("jumprelu", d_in=32, d_sae=64)
    with torch.no_grad():
        sub.W_enc.copy_(pair.sae_a.W_enc[:, keep])
        sub.W_dec.copy_(pair.sae_a.W_dec[keep])
        sub.b_enc.copy_(pair.sae_a.b_enc[keep])
        sub.threshold.copy_(pair.sae_a.threshold[keep])
    result = match(sub, pair.sae_b, progress=False)
    assert torch.equal(result.permutation.indices, pair.truth.indices[keep])


def test_cosine_metric_recovers_the_planted_permutation():
    pair = planted_pair(d_sae=256, noise=0.1, seed=4)
    result = match(pair.sae_a, pair.sae_b, metric="cosine", progress=False)
    assert pair.truth.agreement(result.permutation) >= 0.99
    assert result.options["weights"] == {"decoder": 1.0, "encoder": 1.0, "b_enc": 0.0}


def test_cost_weights_select_blocks():
    sae_a, sae_b = build_sae("jumprelu", seed=0), build_sae("jumprelu", seed=1)
    C = _manual_cost(sae_a, sae_b, w=(1.0, 0.0, 0.0))
    result = match(sae_a, sae_b, weights={"decoder": 1.0}, progress=False)
    rows, cols = linear_sum_assignment(C.numpy())
    assert result.total_cost == pytest.approx(float(C[rows, cols].sum()), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": {"b_dec": 1.0}}, "unknown cost weight"),
        ({"weights": {"decoder": 0.0}}, "at least one cost weight"),
        ({"weights": {"decoder": -1.0}}, "finite number >= 0"),
        ({"metric": "cosine", "weights": {"b_enc": 1.0}}, "scalar b_enc has none"),
        ({"metric": "l1"}, "metric must be"),
        ({"solver": "hungarian"}, "solver must be"),
        ({"max_cost": float("nan")}, "max_cost must be"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        match(build_sae("jumprelu"), build_sae("jumprelu", seed=1), progress=False, **kwargs)


def test_mismatched_d_in_names_both_saes():
    a = build_sae("jumprelu", d_in=16, hook_name="blocks.1.hook_resid_post")
    b = build_sae("jumprelu", d_in=24, hook_name="blocks.2.hook_resid_post")
    pattern = r"blocks\.1\.hook_resid_post.*d_in=16.*blocks\.2\.hook_resid_post.*d_in=24"
    with pytest.raises(ValueError, match=pattern):
        match(a, b, progress=False)


def test_nan_weights_and_bad_thresholds_are_refused():
    a, b = build_sae("jumprelu"), build_sae("jumprelu", seed=1, hook_name="blocks.3.hook_resid_post")
    with torch.no_grad():
        b.threshold[5] = -0.5
    with pytest.raises(ValueError, match=r"blocks\.3\.hook_resid_post.*1 of 48 features have threshold <= 0"):
        match(a, b, progress=False)
    assert match(a, b, fold=False, progress=False).permutation.n_matched == 48
    with torch.no_grad():
        b.b_enc[0] = float("inf")
    with pytest.raises(ValueError, match="b_enc has 1 non-finite"):
        match(a, b, fold=False, progress=False)


def test_memory_guard_refuses_before_allocating(monkeypatch):
    monkeypatch.setattr(matching_module, "available_bytes", lambda: 1024)
    with pytest.raises(MemoryError, match=r"needs about .* GiB, but only .* GiB is available"):
        match(build_sae("jumprelu"), build_sae("jumprelu", seed=1), progress=False)


def test_result_records_provenance_and_saves_with_it(tmp_path):
    pair = planted_pair(d_sae=64, seed=8)
    result = match(pair.sae_a, pair.sae_b, progress=False)
    meta = result.permutation.metadata
    assert meta["source"]["hook_name"] == "blocks.0.hook_resid_post"
    assert meta["target"]["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["options"]["fold"] is True
    path = result.permutation.save(tmp_path / "p.safetensors")
    assert Permutation.load(path, source=pair.sae_a, target=pair.sae_b) == result.permutation


def _assert_same_result(loaded, result):
    assert loaded.permutation == result.permutation
    assert loaded.permutation.metadata == result.permutation.metadata
    for name in ("cost_F", "margin_F", "confidence_F"):
        a, b = getattr(loaded, name), getattr(result, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype == torch.float64
        assert a.numpy().tobytes() == b.numpy().tobytes()  # bit for bit, NaNs included
    for name in ("total_cost", "max_cost", "certified", "gap", "solver", "options"):
        assert getattr(loaded, name) == getattr(result, name), name
    assert set(loaded._fields) == set(result._fields)


@pytest.mark.parametrize("max_cost", [None, "auto"])
def test_match_result_save_load_round_trip_keeps_every_field_exactly(tmp_path, max_cost):
    pair = planted_pair(d_sae=96, noise=0.3, seed=4)
    result = match(pair.sae_a, pair.sae_b, progress=False, max_cost=max_cost)
    assert result.confidence_F is not None  # computed by default at this size
    if max_cost is None:  # and a result without one round-trips too
        result = result._replace(confidence_F=None)
    directory = result.save(tmp_path / "r")
    assert directory == tmp_path / "r"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporaries left behind
    assert sorted(p.name for p in directory.iterdir()) == ["result.json", "result.safetensors"]
    loaded = matching_module.MatchResult.load(directory, source=pair.sae_a, target=pair.sae_b)
    _assert_same_result(loaded, result)
    assert loaded.to_frame().equals(result.to_frame())


def test_match_result_round_trip_keeps_an_infinite_gap_in_strict_json(tmp_path):
    pair = planted_pair(d_sae=32, seed=2)
    result = match(pair.sae_a, pair.sae_b, progress=False)._replace(gap=float("inf"), certified=False)
    directory = result.save(tmp_path / "r")
    json.loads((directory / "result.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    loaded = matching_module.load_match_result(directory)
    assert loaded.gap == float("inf") and loaded.certified is False


def test_a_loaded_result_still_refuses_other_saes(tmp_path):
    pair = planted_pair(d_sae=32, seed=2)
    other = planted_pair(d_sae=32, seed=9)
    directory = match(pair.sae_a, pair.sae_b, progress=False).save(tmp_path / "r")
    with pytest.raises(ProvenanceError, match="source"):
        matching_module.MatchResult.load(directory, source=other.sae_a)
    with pytest.raises(ProvenanceError, match="target"):
        matching_module.MatchResult.load(directory, target=other.sae_b)
    with pytest.raises(ProvenanceError, match="has 32 source features"):
        matching_module.MatchResult.load(directory, source=build_sae("jumprelu", seed=0))
    loaded = matching_module.MatchResult.load(directory)
    with pytest.raises(ProvenanceError):
        loaded.permutation.check_saes(other.sae_a, pair.sae_b)
    loaded.permutation.check_saes(pair.sae_a, pair.sae_b)


def _rewrite_manifest(directory, edit):
    record = json.loads((directory / "result.json").read_text())
    edit(record)
    (directory / "result.json").write_text(json.dumps(record))


@pytest.mark.parametrize(("version", "advice"), [(2, "upgrade sae_match_lens"), (0, "re-run")])
def test_load_refuses_another_format_version_and_says_what_to_do(tmp_path, version, advice):
    pair = planted_pair(d_sae=16, seed=2)
    directory = match(pair.sae_a, pair.sae_b, progress=False).save(tmp_path / "r")
    _rewrite_manifest(directory, lambda r: r.update(format_version=version))
    with pytest.raises(matching_module.MatchResultFileError,
                       match=f"version {version}, but this sae_match_lens reads version 1; {advice}"):
        matching_module.MatchResult.load(directory)


def test_load_refuses_tampered_mixed_missing_and_foreign_saves(tmp_path):
    pair = planted_pair(d_sae=32, seed=2)
    result = match(pair.sae_a, pair.sae_b, progress=False)
    directory = result.save(tmp_path / "r")
    _rewrite_manifest(directory, lambda r: r["fields"].update(total_cost=0.0))
    with pytest.raises(matching_module.MatchResultFileError, match="checksum"):
        matching_module.MatchResult.load(directory)
    result.save(directory)
    other = result._replace(cost_F=result.cost_F * 2).save(tmp_path / "other")
    (other / "result.safetensors").replace(directory / "result.safetensors")
    with pytest.raises(matching_module.MatchResultFileError, match="checksum"):
        matching_module.MatchResult.load(directory)
    with pytest.raises(matching_module.MatchResultFileError, match="does not exist"):
        matching_module.MatchResult.load(tmp_path / "missing")
    perm_file = result.permutation.save(tmp_path / "p.safetensors")
    with pytest.raises(matching_module.MatchResultFileError, match="Permutation.load"):
        matching_module.MatchResult.load(perm_file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(matching_module.MatchResultFileError, match="not a readable"):
        matching_module.MatchResult.load(tmp_path / "empty")


def test_save_over_an_earlier_save_replaces_it_and_refuses_a_foreign_directory(tmp_path):
    pair = planted_pair(d_sae=32, seed=2)
    result = match(pair.sae_a, pair.sae_b, progress=False)
    directory = result.save(tmp_path / "r")
    changed = result._replace(total_cost=1.5, solver="scipy")
    changed.save(directory)
    _assert_same_result(matching_module.MatchResult.load(directory), changed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="left untouched"):
        result.save(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_failed_save_keeps_the_previous_save_exactly(tmp_path, monkeypatch, where):
    from sae_match_lens import savedir

    pair = planted_pair(d_sae=32, seed=2)
    result = match(pair.sae_a, pair.sae_b, progress=False)
    directory = result.save(tmp_path / "r")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    if where == "write":
        monkeypatch.setattr(matching_module, "save_file", broken)
    else:
        monkeypatch.setattr(savedir, "_exchange", lambda a, b: False)  # the portable route
        real_rename = os.rename

        def rename(src, dst):  # the new directory cannot move in once the old one is aside
            if str(src).endswith(".sae-match-tmpdir") and not os.path.exists(dst):
                raise OSError("disk full")
            return real_rename(src, dst)

        monkeypatch.setattr(savedir.os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        result._replace(total_cost=1.0).save(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_save_removes_temporaries_of_a_killed_save(tmp_path):
    pair = planted_pair(d_sae=16, seed=2)
    result = match(pair.sae_a, pair.sae_b, progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".r.{host_id()}.{dead}.0badc0de.sae-match-tmpdir"  # this host's
    stale.mkdir()
    (stale / "result.json").write_text("{")
    result.save(tmp_path / "r")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_to_frame_has_one_row_per_source_feature_with_partner_cost_margin_and_confidence():
    pair = planted_pair(d_sae=48, noise=0.2, seed=3)
    result = match(pair.sae_a, pair.sae_b, progress=False, max_cost="auto")
    frame = result.to_frame()
    assert len(frame) == 48 and list(frame.feature_a) == list(range(48))
    assert (frame.feature_b.to_numpy() == result.permutation.indices.numpy()).all()
    assert (frame.matched == (frame.feature_b >= 0)).all()
    assert np.array_equal(frame.cost.to_numpy(), result.cost_F.numpy(), equal_nan=True)
    assert np.array_equal(frame.margin.to_numpy(), result.margin_F.numpy())
    assert np.array_equal(frame.confidence.to_numpy(), result.confidence_F.numpy(), equal_nan=True)
    assert frame.hook_a.unique().tolist() == ["blocks.0.hook_resid_post"]
    assert frame.layer_a.unique().tolist() == [0] and frame.layer_b.unique().tolist() == [1]
    assert frame.neuronpedia_url_a.isna().all()  # the tiny SAEs have no Neuronpedia id
    no_confidence = result._replace(confidence_F=None).to_frame()
    assert list(no_confidence.columns) == list(frame.columns)
    assert no_confidence.confidence.isna().all()


def test_to_frame_gives_neuronpedia_urls_when_the_identities_carry_ids():
    pair = planted_pair(d_sae=16, seed=3)
    result = match(pair.sae_a, pair.sae_b, progress=False)
    md = dict(result.permutation.metadata)
    md["source"] = {**md["source"], "neuronpedia_id": "gpt2-small/0-res-jb"}
    md["target"] = {**md["target"], "neuronpedia_id": "gpt2-small/1-res-jb"}
    perm = Permutation(torch.tensor([3, -1, *range(4, 18)]), 18, md)
    frame = result._replace(permutation=perm).to_frame()
    assert frame.neuronpedia_url_a[1] == "https://www.neuronpedia.org/gpt2-small/0-res-jb/1"
    assert frame.neuronpedia_url_b[0] == "https://www.neuronpedia.org/gpt2-small/1-res-jb/3"
    assert frame.neuronpedia_url_b.isna().tolist() == [False, True, *[False] * 14]
    assert frame.neuronpedia_id_b.unique().tolist() == ["gpt2-small/1-res-jb"]


def test_confidence_is_the_fraction_of_chance_costs_above_each_pair():
    pair = planted_pair(d_sae=64, noise=0.2, seed=5)
    result = match(pair.sae_a, pair.sae_b, progress=False, max_cost="auto")
    w = matching_module.CostWeights.resolve(None, "mse")
    stacked = tuple(matching_module.stack_features(matching_module.feature_view(s, fold=True), w, "mse")
                    for s in (pair.sae_a, pair.sae_b))
    best = matching_module.null_costs(*stacked, columns=matching_module._block_columns(w, 32, 32),
                                      metric="mse", n_rows=2048, seed=0).numpy()
    for i, c in enumerate(result.cost_F.tolist()):
        expected = float((best > c).mean()) if not math.isnan(c) else math.nan
        assert result.confidence_F[i].item() == pytest.approx(expected, nan_ok=True)
    recomputed = match(pair.sae_a, pair.sae_b, progress=False).with_confidence(pair.sae_a,
                                                                               pair.sae_b)
    ok = result.matched
    assert torch.equal(recomputed.confidence_F[ok], result.confidence_F[ok])


def test_match_computes_confidence_by_default_with_the_definition_links_use(monkeypatch):
    """One meaning of confidence: the share of best-by-chance values a pair does strictly better
    than, set by match() without being asked where it is cheap, the same function as links'."""
    stack = load_suite_saes("jumprelu")
    result = match(stack[2], stack[3], progress=False)
    assert result.confidence_F is not None and result.confidence is result.confidence_F
    again = result._replace(confidence_F=None).with_confidence(stack[2], stack[3])
    assert torch.equal(again.confidence_F, result.confidence_F)
    assert 0.3 < float(result.confidence_F.mean()) < 0.8  # folded mse: little power (nulls doc)
    best = torch.tensor([1.0, 2.0, 2.0, 3.0])  # ties count as not beaten, either direction
    values = torch.tensor([2.0, 0.5, 3.5, math.nan])
    cost = chance_confidence(values, best, higher_is_better=False)
    score = chance_confidence(values, best, higher_is_better=True)
    assert cost[:3].tolist() == [0.25, 1.0, 0.0] and score[:3].tolist() == [0.25, 0.0, 1.0]
    assert math.isnan(cost[3]) and math.isnan(score[3])
    assert torch.allclose(matching_module.null_confidence(values, best), cost, equal_nan=True)
    monkeypatch.setattr(matching_module, "CONFIDENCE_MAX_N", 1000)  # above it: not by default
    assert match(stack[2], stack[3], progress=False).confidence_F is None


def test_planted_partners_beat_chance_and_unrelated_pairs_do_not():
    pair = planted_pair(d_sae=64, noise=0.05, seed=6)
    planted = match(pair.sae_a, pair.sae_b, progress=False).with_confidence(pair.sae_a,
                                                                            pair.sae_b)
    assert float(planted.confidence_F.min()) == 1.0
    unrelated = planted_pair(d_sae=64, noise=0.05, seed=7)
    forced = match(pair.sae_a, unrelated.sae_b, progress=False).with_confidence(pair.sae_a,
                                                                                unrelated.sae_b)
    assert float(forced.confidence_F.median()) < 0.9
    with pytest.raises(ProvenanceError):
        planted.with_confidence(pair.sae_a, unrelated.sae_b)
