"""The ``sae-match`` command: results, one-line user errors, and a light ``--help`` path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import planted_pair

from sae_match_lens import Permutation
from sae_match_lens.cli import main

HEAVY_MODULES = ("torch", "sae_lens", "transformer_lens")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``sae-match ARGS`` in a fresh interpreter, offline."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sae_match_lens.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sae-match: error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], proc.stderr


def heavy_modules_after(code: str) -> list[str]:
    """Which of :data:`HEAVY_MODULES` a fresh interpreter has imported after running ``code``."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_match_command_saves_a_loadable_permutation(tmp_path, capsys):
    pair = planted_pair(d_sae=64, noise=0.1, seed=2)
    pair.sae_a.save_model(tmp_path / "a")
    pair.sae_b.save_model(tmp_path / "b")
    out = tmp_path / "perm.safetensors"
    assert main(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--quiet"]) == 0
    assert "matched 64/64 features" in capsys.readouterr().out
    assert Permutation.load(out, source=pair.sae_a, target=pair.sae_b) == pair.truth


def test_match_command_saves_the_whole_result_which_view_draws(tmp_path, capsys):
    from sae_match_lens import MatchResult

    pair = planted_pair(d_sae=64, noise=0.1, seed=2)
    pair.sae_a.save_model(tmp_path / "a")
    pair.sae_b.save_model(tmp_path / "b")
    out = tmp_path / "result"
    assert main(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "matched 64/64 features" in printed and "gap ≤" in printed and "rounding" in printed
    result = MatchResult.load(out, source=pair.sae_a, target=pair.sae_b)
    assert result.permutation == pair.truth and result.certified
    assert result.cost_F.shape == result.margin_F.shape == result.confidence_F.shape == (64,)
    assert main(["view", str(out), "--out", str(tmp_path / "view.html")]) == 0
    assert (tmp_path / "view.html").stat().st_size > 0


def test_chain_links_and_flow_read_the_default_suite_and_a_local_directory(tmp_path, capsys):
    import pandas as pd

    from sae_match_lens import ChainMatch, FlowGraph
    from sae_match_lens.assets import default_suite_path

    local = str(default_suite_path() / "saes" / "jumprelu")  # residual, MLP and attention SAEs
    assert main(["chain", "--suite", "default", "--layers", "2-4", "--out",
                 str(tmp_path / "chain"), "--quiet"]) == 0
    chain = ChainMatch.load(tmp_path / "chain")
    assert chain.layers == (2, 3, 4)
    assert chain.hook_names == ("blocks.2.hook_resid_post", "blocks.3.hook_resid_post",
                                "blocks.4.hook_resid_post")
    assert json.loads((tmp_path / "chain" / "source.json").read_text())["suite"] == "default"
    assert main(["links", local, "--layers", "0-1", "--k", "2", "--out",
                 str(tmp_path / "links.csv"), "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "links.csv")
    assert set(table.hook_a) == {"blocks.0.hook_resid_post"} and len(table) == 2 * 1024
    assert main(["flow", local, "--layer", "2", "--feature", "17", "--span", "1", "--out",
                 str(tmp_path / "flow.json"), "--quiet"]) == 0
    graph = FlowGraph.load_json(tmp_path / "flow.json")
    assert set(graph.nodes.layer) == {1, 2, 3} and set(graph.nodes.module) == {"res", "mlp", "attn"}
    capsys.readouterr()
    assert main(["chain", "some-release", "--suite", "default", "--out",
                 str(tmp_path / "c2")]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["links", str(tmp_path), "--out", str(tmp_path / "l.csv")]) == 1
    assert "holds no saved SAE" in capsys.readouterr().err
    assert main(["chain", "--suite", "default", "--layers", "4-7", "--out",
                 str(tmp_path / "c3")]) == 1
    assert "no residual SAE at layer(s) [6, 7]" in capsys.readouterr().err


def test_importing_the_cli_does_not_import_torch_or_saelens():
    assert heavy_modules_after("import sae_match_lens.cli") == []


def test_help_is_answered_without_importing_torch_or_saelens():
    code = ("from sae_match_lens.cli import main\n"
            "for argv in (['--help'], ['demo', '--help'], ['match', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0")
    assert heavy_modules_after(code) == []


def test_a_folder_without_cfg_json_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("match", "empty", "empty", "--out", "p.safetensors", cwd=tmp_path)
    assert_user_error(proc, "'empty'", "cfg.json")


def test_a_nonexistent_sae_path_is_one_line_error(tmp_path):
    proc = run_cli("match", "nowhere/sae", "nowhere/sae", "--out", "p.safetensors", cwd=tmp_path)
    assert_user_error(proc, "'nowhere/sae'", "no such directory", "release:sae_id")


def test_an_unknown_release_is_one_line_error(tmp_path):
    proc = run_cli("match", "no-such-release:layer_0", "no-such-release:layer_1",
                   "--out", "p.safetensors", cwd=tmp_path)
    assert_user_error(proc, "no-such-release")


def test_an_out_file_under_a_file_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("")
    proc = run_cli("match", "empty", "empty", "--out", "afile/p.safetensors", cwd=tmp_path)
    assert_user_error(proc, "cannot write --out", "'afile' is a file")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write into a read-only directory")
def test_an_out_in_a_read_only_directory_is_one_line_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        proc = run_cli("demo", "--out", str(locked / "report"), cwd=tmp_path)
    finally:
        locked.chmod(0o700)
    assert_user_error(proc, "not writable")


def test_a_demo_out_that_is_a_file_is_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("")
    proc = run_cli("demo", "--out", "afile", cwd=tmp_path)
    assert_user_error(proc, "'afile'", "not a directory")


def test_bad_layers_are_one_line_error(tmp_path):
    proc = run_cli("demo", "--release", "gemma-scope-2b-pt-res-canonical", "--model", "gemma-2-2b",
                   "--sae-id-template", "layer_{layer}/width_16k/canonical", "--layers", "ten",
                   "--out", "report", cwd=tmp_path)
    assert_user_error(proc, "'10-14' or '3,5,7'", "'ten'")
    assert not (tmp_path / "report").exists()


def test_release_options_without_release_are_one_line_error(tmp_path):
    proc = run_cli("demo", "--layers", "3-5", cwd=tmp_path)
    assert_user_error(proc, "--layers only applies with --release")


def test_match_command_options_reach_match_and_are_recorded(tmp_path, capsys, monkeypatch):
    pair = planted_pair(d_sae=64, noise=0.1, seed=2)
    pair.sae_a.save_model(tmp_path / "a")
    pair.sae_b.save_model(tmp_path / "b")
    import sae_match_lens.matching as matching

    seen = {}
    real = matching.match

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(matching, "match", spy)
    out = tmp_path / "perm.safetensors"
    assert main(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--quiet",
                 "--solver", "scipy", "--metric", "cosine", "--weights", "decoder=1,encoder=0.5",
                 "--max-cost", "auto", "--no-fold", "--device", "cpu"]) == 0
    options = Permutation.load(out).metadata["options"]
    assert options["solver"] == "scipy" and options["metric"] == "cosine"
    assert options["weights"] == {"decoder": 1.0, "encoder": 0.5, "b_enc": 0.0}
    assert options["fold"] is False and isinstance(options["max_cost"], float)
    assert options["null_rate"] == 0.01  # max_cost="auto" went through the null model
    assert seen["options"].device == "cpu"  # device is a MatchOptions knob since 0.3
    assert main(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--quiet",
                 "--max-cost", "0.5", "--solver", "sparse"]) == 0
    options = Permutation.load(out).metadata["options"]
    assert (options["max_cost"], options["solver"], options["fold"]) == (0.5, "sparse", True)


@pytest.mark.parametrize(("flag", "value", "fragment"), [
    ("--solver", "fast", "--solver must be one of auto, lapjv, scipy, sparse"),
    ("--metric", "l1", "--metric must be one of mse, cosine"),
    ("--weights", "decoder", "--weights takes NAME=NUMBER"),
    ("--weights", "decoder=1,bias=2", "--weights takes NAME=NUMBER"),
    ("--max-cost", "cheap", "--max-cost must be 'none', 'auto' or a finite number"),
    ("--device", "gpu0", "--device 'gpu0' is not a torch device"),
])
def test_a_bad_match_option_is_a_one_line_error(tmp_path, capsys, flag, value, fragment):
    assert main(["match", "a", "b", "--out", str(tmp_path / "p.safetensors"), flag, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "p.safetensors").exists()


def test_chain_command_saves_a_chain_at_the_model_layers(tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    import pandas as pd
    from helpers import planted_chain

    import sae_match_lens.cli as cli
    from sae_match_lens import ChainMatch

    planted = planted_chain(3, d_sae=32, noise=0.05, seed=4, first_layer=3)
    entry = namedtuple("Entry", "layer sae_id")

    def fake_stack(args, layers):
        return ([entry(layer, f"layer_{layer}") for layer in layers],
                dict(zip(layers, planted.saes, strict=True)))

    monkeypatch.setattr(cli, "_release_stack", fake_stack)
    out = tmp_path / "chain"
    assert main(["chain", "some-release", "--layers", "3-5", "--out", str(out), "--quiet",
                 "--metric", "cosine", "--max-cost", "auto"]) == 0
    assert "layer 3→4: matched" in capsys.readouterr().out
    chain = ChainMatch.load(out, saes=planted.saes)
    assert chain.layers == (3, 4, 5)
    assert chain.options["metric"] == "cosine" and chain.options["max_cost"] == "auto"
    edges = pd.read_csv(out / "edges.csv")
    assert sorted(set(zip(edges.layer_a, edges.layer_b, strict=True))) == [(3, 4), (4, 5)]
    release = json.loads((out / "release.json").read_text())
    assert release["layers"] == [3, 4, 5] and release["saes"][0]["sae_id"] == "layer_3"
