import json
import re

import pytest

from sae_match_lens.assets import load_suite_model, load_suite_saes
from sae_match_lens.cli import main
from sae_match_lens.report import demo as demo_module
from sae_match_lens.report.demo import HubUnavailableError, load_release, parse_layers, run_demo

REPORT_FILES = ["report.md", "results.json", "substitution.png", "agreement_vs_distance.png",
                "match_costs.png", "feature_paths.png"]


def test_quick_demo_writes_every_promised_file(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    assert "Report written to" in capsys.readouterr().out
    for name in REPORT_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=_refuse)
    variants = {row["variant"] for row in results["substitution"]}
    assert {"folded", "raw", "hybrid", "error_preserving", "identity", "sae_b_reconstruction",
            "sae_a_reconstruction", "random_permutation", "unfolded_matching"} <= variants
    assert results["paths"] and all(p["steps"][0]["top_tokens"] for p in results["paths"])
    assert [row["hook_name"] for row in results["scales"]] == results["setting"]["hooks"]
    assert all(row["mean_resid_norm"] > 0 and row["mean_threshold"] > 0 for row in results["scales"])
    report = (tmp_path / "report.md").read_text()
    assert "## Reading" in report and "random permutation" in report
    assert "dropping the block (identity) in" in report and "paper's Figure 1" in report
    assert results["reading"][0] in report


def _refuse(constant):
    raise ValueError(f"results.json holds the non-standard JSON constant {constant}")


def test_release_path_goes_through_the_loaders(tmp_path):
    saes = load_suite_saes("topk")
    calls = []

    def sae_loader(release, sae_id):
        calls.append((release, sae_id))
        return saes[int(sae_id.split("_")[1].split("/")[0])]

    def model_loader(name):
        calls.append(name)
        return load_suite_model()

    summary = run_demo(tmp_path, quick=True, progress=False, release="my-release",
                       sae_id_template="layer_{layer}/width_1k", model_name="tiny", layers=[1, 2, 3],
                       sae_loader=sae_loader, model_loader=model_loader)
    assert calls == [("my-release", "layer_1/width_1k"), ("my-release", "layer_2/width_1k"),
                     ("my-release", "layer_3/width_1k"), "tiny"]
    assert "Report written to" in summary
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["setting"]["hooks"] == [f"blocks.{k}.hook_resid_post" for k in (1, 2, 3)]
    assert saes[1].cfg.metadata.release == "my-release"


def test_a_registry_release_resolves_its_ids_and_model_without_a_template(tmp_path):
    saes = load_suite_saes("jumprelu")
    calls = []

    def sae_loader(release, sae_id):
        calls.append((release, sae_id))
        return saes[int(sae_id.split("/")[0].removeprefix("layer_"))]

    def model_loader(name):
        calls.append(name)
        return load_suite_model()

    run_demo(tmp_path, quick=True, progress=False, release="gemma-scope-2b-pt-res-canonical",
             layers=[1, 2, 3], choices={"width": "16k"}, sae_loader=sae_loader,
             model_loader=model_loader)
    assert calls == [("gemma-scope-2b-pt-res-canonical", f"layer_{k}/width_16k/canonical")
                     for k in (1, 2, 3)] + ["gemma-2-2b"]  # ids and model from the registry
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["setting"]["hooks"] == [f"blocks.{k}.hook_resid_post" for k in (1, 2, 3)]
    assert "steering" not in results  # the steering themes are the default suite's corpus
    with pytest.raises(ValueError, match="widths 16k, 65k"):
        run_demo(tmp_path, quick=True, progress=False, release="gemma-scope-2b-pt-res-canonical",
                 layers=[10, 11], sae_loader=sae_loader, model_loader=model_loader)


def test_unreachable_hub_is_one_clear_sentence(monkeypatch):
    monkeypatch.setattr(demo_module, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(HubUnavailableError, match="hub is unreachable"):
        load_release("gemma-scope-2b-pt-res-canonical", "layer_{layer}/width_16k/canonical",
                     "gemma-2-2b", [10, 11], progress=False)


def test_cli_reports_an_unreachable_hub_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(demo_module, "hub_reachable", lambda *a, **k: False)
    code = main(["demo", "--release", "gemma-scope-2b-pt-res-canonical", "--sae-id-template",
                 "layer_{layer}/width_16k/canonical", "--model", "gemma-2-2b", "--layers", "10-11",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "error: Cannot load" in err.splitlines()[0] and "Traceback" not in err


@pytest.mark.parametrize(("spec", "layers"), [("10-14", [10, 11, 12, 13, 14]), ("3,5,7", [3, 5, 7])])
def test_layer_specs_parse(spec, layers):
    assert parse_layers(spec) == layers


@pytest.mark.parametrize("spec", ["7", "a-b", "3-"])
def test_bad_layer_specs_are_refused(spec):
    with pytest.raises(ValueError, match="layers"):
        parse_layers(spec)


def _tiny_run(out, *, max_distance=2, progress=False):
    from sae_match_lens.report.demo import run_pipeline
    from tests.helpers_tl import layer_saes, tiny_model, tiny_tokens

    return run_pipeline(tiny_model(), layer_saes(), tiny_tokens(n_seq=4), out, flow=False,
                        max_distance=max_distance, progress=progress)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_rerun_leaves_the_earlier_report_exactly_as_it_was(tmp_path, monkeypatch):
    from sae_match_lens.report import document as report

    out = tmp_path / "report"
    _tiny_run(out)
    before = _snapshot(out)
    assert json.loads(before["results.json"])["format"] == demo_module.REPORT_FORMAT

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "plot_paths", broken)  # fails after every other file is written
    with pytest.raises(RuntimeError, match="plotting failed"):
        _tiny_run(out, max_distance=3)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary left behind


def test_a_rerun_with_other_settings_replaces_the_whole_earlier_run(tmp_path):
    out = tmp_path / "report"
    _tiny_run(out, max_distance=2)
    (out / "flow_graph.json").write_text("{}")  # a file of a run with other sections
    _tiny_run(out, max_distance=3)
    results = json.loads((out / "results.json").read_text())
    assert max(r["distance"] for r in results["composition"]) == 3
    assert not (out / "flow_graph.json").exists()  # nothing of the old run is left to mislead


def test_a_folder_that_is_not_a_demo_report_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                        capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    def no_work(*args, **kwargs):
        raise AssertionError("the suite was loaded although --out was refused")

    monkeypatch.setattr("sae_match_lens.assets.load_default_suite", no_work)
    assert main(["demo", "--quiet", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_the_run_shows_one_progress_display(tmp_path, capsys):
    _tiny_run(tmp_path / "report", progress=True)
    err = capsys.readouterr().err
    bars = [part for part in re.split(r"[\r\n]", err) if "%|" in part]
    assert bars and all(part.startswith("demo") for part in bars)
    assert any("demo: substitution" in part for part in bars)


def test_run_progress_counts_stages_by_weight_and_times_them():
    from sae_match_lens.report.demo import RunProgress

    run = RunProgress({"a": 1.0, "b": 3.0}, enabled=False)
    with run.stage("a"):
        pass
    assert run._bar.n == 1.0
    with run.stage("b") as step:
        step("b: half", 0.5)
        assert run._bar.n == 2.5
    assert run._bar.n == 4.0 and set(run.seconds) == {"a", "b"}
    with pytest.raises(KeyError, match="unknown stage"), run.stage("c"):
        pass
    run.close()


def test_sizes_are_ordered_and_full_is_the_earlier_default():
    from sae_match_lens.report.demo import DEFAULT, FULL, QUICK

    assert FULL.n_seqs == 64 and FULL.flow.causal_layers is None and FULL.steering.every_layer
    assert DEFAULT.n_seqs <= FULL.n_seqs and DEFAULT.flow.causal_layers == 2
    assert QUICK.n_saes == 4
    with pytest.raises(ValueError, match="quick and full"):
        run_demo("unused", quick=True, full=True)
