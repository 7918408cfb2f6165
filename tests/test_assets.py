"""The packaged default suite loads offline and reproduces its manifest."""

from __future__ import annotations

import math
import socket
from typing import Any

import pytest
import torch
from sae_lens import JumpReLUSAE, TopKSAE

from sae_match_lens import assets

EXPECTED_CLASS = {"jumprelu": JumpReLUSAE, "topk": TopKSAE}
# Recomputation runs the same code on the same float32 weights; differences come
# only from floating-point summation order (thread count), which can flip a
# JumpReLU feature sitting exactly at its threshold.
EV_TOL = 2e-3
CE_TOL = 5e-3
L0_REL_TOL = 1e-2
DEAD_TOL = 5e-3


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Any:
    """Refuse every network connection while this module runs."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access attempted while loading the default suite")

    patch = pytest.MonkeyPatch()
    patch.setattr(socket.socket, "connect", refuse)
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
    patch.undo()


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return assets.load_manifest()


@pytest.fixture(scope="module")
def suites() -> dict[str, tuple[Any, list[Any]]]:
    model, jumprelu = assets.load_default_suite("jumprelu")
    return {"jumprelu": (model, jumprelu), "topk": (model, assets.load_suite_saes("topk"))}


@pytest.fixture(scope="module")
def test_tokens(manifest: dict[str, Any]) -> torch.Tensor:
    return assets.load_eval_tokens()[: manifest["eval_tokens"]["test_subset_n_seq"]]


def test_eval_tokens_start_with_bos(manifest: dict[str, Any]) -> None:
    tokens = assets.load_eval_tokens()
    assert tokens.dtype == torch.int64
    assert tuple(tokens.shape) == (
        manifest["eval_tokens"]["n_seq"],
        manifest["eval_tokens"]["n_ctx"],
    )
    assert (tokens[:, 0] == manifest["tokenizer"]["bos_token_id"]).all()
    assert int(tokens.max()) < manifest["tokenizer"]["vocab_size"]


def test_model_matches_its_stored_config(suites, manifest: dict[str, Any]) -> None:
    model, _ = suites["jumprelu"]
    config = manifest["model"]["config"]
    assert model.cfg.n_layers == config["n_layers"] >= 6
    assert 128 <= model.cfg.d_model == config["d_model"] <= 256
    assert model.cfg.d_vocab == manifest["tokenizer"]["vocab_size"]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tokenizer_prepends_bos(suites, manifest: dict[str, Any]) -> None:
    model, _ = suites["jumprelu"]
    tokens = model.to_tokens("In the beginning God created the heaven and the earth.")
    assert tokens[0, 0].item() == manifest["tokenizer"]["bos_token_id"]
    assert (tokens[0, 1:] != manifest["tokenizer"]["bos_token_id"]).all()
    assert "beginning" in model.to_string(tokens[0, 1:])


@pytest.mark.parametrize("family", assets.FAMILIES)
def test_every_layer_has_an_inference_sae_at_its_hook(
    suites, manifest: dict[str, Any], family: str
) -> None:
    model, saes = suites[family]
    assert len(saes) == model.cfg.n_layers
    for layer, sae in enumerate(saes):
        hook_name = f"blocks.{layer}.hook_resid_post"
        assert type(sae) is EXPECTED_CLASS[family]
        assert sae.cfg.metadata.hook_name == hook_name
        assert hook_name in model.hook_dict
        assert sae.cfg.metadata.model_name == manifest["model"]["config"]["model_name"]
        assert sae.cfg.d_in == model.cfg.d_model
        assert sae.W_enc.dtype == torch.float32
    if family == "jumprelu":
        assert all(bool((sae.threshold > 0).all()) for sae in saes)


def test_model_held_out_loss_matches_manifest(
    suites, manifest: dict[str, Any], test_tokens: torch.Tensor
) -> None:
    model, _ = suites["jumprelu"]
    ce = assets.compute_model_ce(model, test_tokens)
    assert ce == pytest.approx(manifest["model"]["test_subset_ce"], abs=CE_TOL)
    assert math.isfinite(manifest["model"]["held_out_ce"])
    assert manifest["model"]["held_out_ce"] < math.log(manifest["tokenizer"]["vocab_size"])


@pytest.mark.parametrize("family", assets.FAMILIES)
def test_sae_metrics_reproduce_the_manifest(
    suites, manifest: dict[str, Any], test_tokens: torch.Tensor, family: str
) -> None:
    model, saes = suites[family]
    clean = manifest["model"]["test_subset_ce"]
    records = manifest["saes"]["families"][family]
    for sae in saes:
        expected = records[sae.cfg.metadata.hook_name]["test_subset_metrics"]
        got = assets.compute_sae_metrics(model, sae, test_tokens, clean_ce_loss=clean)
        name = f"{family} {sae.cfg.metadata.hook_name}"
        assert got.n_tokens == expected["n_tokens"], name
        assert got.explained_variance == pytest.approx(
            expected["explained_variance"], abs=EV_TOL
        ), name
        assert got.l0 == pytest.approx(expected["l0"], rel=L0_REL_TOL), name
        assert got.dead_fraction == pytest.approx(expected["dead_fraction"], abs=DEAD_TOL), name
        assert got.ce_loss == pytest.approx(expected["ce_loss"], abs=CE_TOL), name


def test_jumprelu_family_is_alive_and_faithful_on_the_full_shard(
    manifest: dict[str, Any],
) -> None:
    for hook_name, record in manifest["saes"]["families"]["jumprelu"].items():
        metrics = record["metrics"]
        assert metrics["dead_fraction"] < 0.1, hook_name
        assert metrics["explained_variance"] >= 0.9, hook_name


def test_jumprelu_family_l0_is_in_the_target_range(manifest: dict[str, Any]) -> None:
    for hook_name, record in manifest["saes"]["families"]["jumprelu"].items():
        assert 20 <= record["metrics"]["l0"] <= 100, hook_name


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown SAE family"):
        assets.load_default_suite("gated")  # type: ignore[arg-type]


def test_missing_suite_directory_raises_a_clear_error(tmp_path) -> None:
    with pytest.raises(assets.SuiteFilesMissingError, match=r"manifest\.json"):
        assets.load_manifest(tmp_path)
    (tmp_path / assets.MANIFEST_FILE).write_text(
        '{"saes": {"hook_names": ["blocks.0.hook_resid_post"]}}'
    )
    with pytest.raises(assets.SuiteFilesMissingError, match="jumprelu SAE"):
        assets.load_suite_saes("jumprelu", tmp_path)
    with pytest.raises(assets.SuiteFilesMissingError, match="model config"):
        assets.load_suite_model(tmp_path)


@pytest.mark.parametrize("module", ["mlp", "attn"])
def test_module_saes_read_their_block_outputs_and_reproduce_the_manifest(
    suites, manifest: dict[str, Any], test_tokens: torch.Tensor, module: str
) -> None:
    model, _ = suites["jumprelu"]
    saes = assets.load_suite_saes("jumprelu", module=module)  # type: ignore[arg-type]
    records = manifest[assets.MODULE_SAES_KEY]["families"]["jumprelu"]
    clean = manifest["model"]["test_subset_ce"]
    assert len(saes) == model.cfg.n_layers
    for layer, sae in enumerate(saes):
        hook_name = f"blocks.{layer}.{assets.MODULE_HOOKS[module]}"
        assert type(sae) is JumpReLUSAE and sae.cfg.metadata.hook_name == hook_name
        assert hook_name in model.hook_dict and sae.cfg.d_in == model.cfg.d_model
        assert bool((sae.threshold > 0).all()), hook_name
        expected = records[hook_name]["test_subset_metrics"]
        got = assets.compute_sae_metrics(model, sae, test_tokens, clean_ce_loss=clean)
        assert got.explained_variance == pytest.approx(expected["explained_variance"], abs=EV_TOL)
        assert got.l0 == pytest.approx(expected["l0"], rel=L0_REL_TOL), hook_name
        assert got.ce_loss == pytest.approx(expected["ce_loss"], abs=CE_TOL), hook_name
        full = records[hook_name]["metrics"]  # alive and faithful on the whole shard
        assert full["dead_fraction"] < 0.2 and full["explained_variance"] >= 0.8, hook_name


def test_the_suite_stack_pairs_each_layers_residual_mlp_and_attention_saes() -> None:
    stack = assets.load_suite_stack()
    assert sorted(stack) == list(range(6))
    for layer, saes in stack.items():
        assert saes.res.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert saes.mlp.cfg.metadata.hook_name == f"blocks.{layer}.hook_mlp_out"
        assert saes.attn.cfg.metadata.hook_name == f"blocks.{layer}.hook_attn_out"
    residual_only = assets.load_suite_stack(modules=())
    assert residual_only[2].mlp is None and residual_only[2].attn is None
    with pytest.raises(ValueError, match="modules must be distinct"):
        assets.load_suite_stack(modules=("res",))


def test_a_suite_without_module_saes_says_how_to_add_them(tmp_path) -> None:
    (tmp_path / assets.MANIFEST_FILE).write_text(
        '{"saes": {"hook_names": ["blocks.0.hook_resid_post"]}}'
    )
    with pytest.raises(assets.SuiteFilesMissingError, match="--stage modules"):
        assets.load_suite_saes("jumprelu", tmp_path, module="mlp")
