import json

import pytest

from sae_match_lens import demo as demo_module
from sae_match_lens.assets import load_suite_model, load_suite_saes
from sae_match_lens.cli import main
from sae_match_lens.demo import HubUnavailableError, load_release, parse_layers, run_demo

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
    monkeypatch.setattr(demo_module, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(HubUnavailableError, match="hub is unreachable"):
        load_release("gemma-scope-2b-pt-res-canonical", "layer_{layer}/width_16k/canonical",
                     "gemma-2-2b", [10, 11], progress=False)


def test_cli_reports_an_unreachable_hub_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(demo_module, "_hub_reachable", lambda *a, **k: False)
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
