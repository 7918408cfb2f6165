"""SAELens releases by name: every placeable release in the bundled registry resolves to one SAE
per layer with the hook SAELens gives it; choices are made or listed; stacks load keyed by model
layer (loader substituted), with the Neuronpedia id recorded; an unreachable hub is one sentence."""

from __future__ import annotations

import re
from collections import defaultdict
from unittest import mock

import pytest
import torch
from helpers import build_sae
from huggingface_hub.utils import EntryNotFoundError
from sae_lens.loading import pretrained_sae_loaders
from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from transformer_lens.utils import get_act_name

from sae_match_lens import releases
from sae_match_lens.flow.graph import flow_graph
from sae_match_lens.neuronpedia import feature_url
from sae_match_lens.releases import (
    HubUnavailableError,
    load_module_stack,
    load_release_model,
    load_release_stack,
    parse_layers,
    release_saes,
    resolve_release,
)

REGISTRY = get_pretrained_saes_directory()

OFFLINE_CONFIG_FAMILIES = {"gemma_2", "gemma_2_transcoder", "goodfire", "deepseek_r1", "qwen_scope"}
"""Loader families whose SAELens config (with its hook name) is computed from the names alone, so
SAELens itself says, offline, which hook each SAE id reads."""

NAME_CONFIG_FAMILIES = {"gemma_3"}
"""Loader families whose SAELens config function asks the hub for a config file and tensor shapes,
but takes the hook from the folder name alone: with the hub answering "no config file" and dummy
shapes, SAELens' own function still says which hook each SAE id reads."""


HUB_CONFIG_RULES = [
    ("llama_scope", r"l(?P<layer>\d+)(?P<kind>[rma])_\d+x",
     lambda m: {"r": "hook_resid_post", "m": "hook_mlp_out", "a": "hook_attn_out"}[m["kind"]]),
    ("llama_scope_r1_distill", r"l(?P<layer>\d+)r_.+", "hook_resid_post"),
    ("mwhanna_transcoder", r"layer_(?P<layer>\d+)", "mlp.hook_in"),
    ("dictionary_learning_1", r"resid_post_layer_(?P<layer>\d+)_trainer_\d+", "hook_resid_post"),
]
"""Loader families whose SAELens config reads the hook from a hub file: the rule their
repositories document (Llama Scope's ``L{layer}{R,M,A}`` = residual, MLP-output, attention-output;
mwhanna transcoders read ``blocks.L.mlp.hook_in`` in SAELens' own config function;
dictionary_learning's trainers read the residual stream after their layer)."""


def _gemma_3_config_offline(release: str, sae_id: str) -> dict:
    def no_config(*args, **kwargs):
        raise EntryNotFoundError("no config.json (offline test)")

    shapes = {"w_enc": [4, 8], "w_dec": [8, 4]}
    with mock.patch.object(pretrained_sae_loaders, "hf_hub_download", no_config), \
            mock.patch.object(pretrained_sae_loaders, "get_safetensors_tensor_shapes",
                              lambda *a, **k: shapes):
        return load_sae_config_from_huggingface(release, sae_id)


def _hook_of(cfg: dict) -> str:
    """The hook of a SAELens config dict (newer SAELens versions keep it under ``metadata``)."""
    return cfg.get("hook_name") or cfg["metadata"]["hook_name"]


def hub_hook(release: str, sae_id: str) -> str:
    """The hook SAELens gives the SAE, without the network: its own config function for the
    families in OFFLINE_CONFIG_FAMILIES and NAME_CONFIG_FAMILIES; the id itself for SAELens-format
    releases, which are named by their hook."""
    if REGISTRY[release].conversion_func in OFFLINE_CONFIG_FAMILIES:
        return _hook_of(load_sae_config_from_huggingface(release, sae_id))
    if REGISTRY[release].conversion_func in NAME_CONFIG_FAMILIES:
        return _hook_of(_gemma_3_config_offline(release, sae_id))
    if REGISTRY[release].conversion_func == "connor_rob_hook_z":
        # its config (act_name) is a hub file; the ids are "blocks.L.hook_z", the hook is
        # TransformerLens' name for z
        m = re.fullmatch(r"blocks\.(\d+)\.hook_z", sae_id)
        assert m, sae_id
        return get_act_name("z", int(m[1]))
    for family, pattern, hook in HUB_CONFIG_RULES:
        if REGISTRY[release].conversion_func == family:
            m = re.fullmatch(pattern, sae_id)
            if m:  # otherwise the id is a hook name (below)
                return f"blocks.{int(m['layer'])}.{hook(m) if callable(hook) else hook}"
    # SAELens-format releases are named by their hook, with a width (``_12288``) or a variant
    # (``__name``) appended where a layer has several SAEs
    m = re.fullmatch(r"(blocks\.\d+\.hook_[a-z_]+?)(?:_\d+)?(?:__.+)?", sae_id)
    assert m, sae_id
    return m[1]


def fake_loader(calls: list[tuple[str, str]] | None = None):
    """``(release, sae_id) -> SAE``: a tiny SAE reading the hook the hub's SAE reads, with no
    release metadata (as a custom loader would give)."""

    def load(release: str, sae_id: str):
        if calls is not None:
            calls.append((release, sae_id))
        hook = hub_hook(release, sae_id)
        return build_sae("jumprelu", d_in=16, d_sae=24, hook_name=hook,
                         seed=int(hook.split(".")[1]))

    return load


def _resolve_family_of(entries):
    """One choice (hook, width, variant and, where a layer has several, the L0) and the layers that
    have it, taken from the release's first SAE."""
    e0 = entries[0]
    group = [e for e in entries if (e.site, e.width, e.variant) == (e0.site, e0.width, e0.variant)
             and (not isinstance(e0.l0, str) or e.l0 == e0.l0)]
    per_layer = defaultdict(list)
    for e in group:
        per_layer[e.layer].append(e)
    several = any(len(v) > 1 for v in per_layer.values())
    l0 = e0.l0 if several or isinstance(e0.l0, str) else None
    return dict(hook=e0.site, width=e0.width, variant=e0.variant, l0=l0), sorted(per_layer)


def test_every_placeable_release_resolves_one_sae_per_layer_with_the_hook_saelens_gives_it():
    skipped, checked_against_saelens, multi_layer = {}, 0, 0
    for release, lookup in REGISTRY.items():
        entries = release_saes(release)
        placed = {e.sae_id for e in entries}
        unplaced = [i for i in lookup.saes_map if i not in placed]
        if lookup.conversion_func in releases.UNPLACED_FAMILIES:
            assert not entries
            skipped[release] = releases.UNPLACED_FAMILIES[lookup.conversion_func]
            continue
        # the only ids left out are Gemma Scope's embedding SAEs (hook_embed: no layer)
        assert all(i.startswith("embedding/") for i in unplaced), (release, unplaced[:3])
        assert entries, release
        for e in entries:
            assert e.hook_name.startswith(f"blocks.{e.layer}."), e
            assert e.hook_name == hub_hook(release, e.sae_id), e
            assert e.neuronpedia_id == (lookup.neuronpedia_id.get(e.sae_id) or None)
        if lookup.conversion_func in OFFLINE_CONFIG_FAMILIES | NAME_CONFIG_FAMILIES:
            checked_against_saelens += len(entries)
        choice, layers = _resolve_family_of(entries)
        got = resolve_release(release, layers=layers, **choice)
        assert [r.layer for r in got] == layers, release
        assert len({r.sae_id for r in got}) == len(layers)
        for r in got:
            assert r.sae_id in lookup.saes_map and r.site == choice["hook"], (release, r)
            assert r.hook_name == f"blocks.{r.layer}.{choice['hook']}"
        multi_layer += len(layers) > 1
    assert skipped == {"mntss-gemma-2-2b-2.5m-clt-as-per-layer":
                       "its hooks are only in the repository's config.yaml"}
    assert checked_against_saelens > 2000 and multi_layer > 100


def test_gemma_scope_canonical_resolves_the_documented_ids_and_neuronpedia_ids():
    got = resolve_release("gemma-scope-2b-pt-res-canonical", layers=range(10, 15), width="16k")
    assert [r.sae_id for r in got] == [f"layer_{L}/width_16k/canonical" for L in range(10, 15)]
    assert [r.hook_name for r in got] == [f"blocks.{L}.hook_resid_post" for L in range(10, 15)]
    assert [r.neuronpedia_id for r in got] == [f"gemma-2-2b/{L}-gemmascope-res-16k"
                                               for L in range(10, 15)]
    assert {r.module for r in got} == {"res"}


def test_an_open_width_is_refused_with_the_widths_listed():
    with pytest.raises(ValueError, match=r"widths 16k, 65k at each of layers 10-14.*pass width="):
        resolve_release("gemma-scope-2b-pt-res-canonical", layers=range(10, 15))
    with pytest.raises(ValueError, match=r"widths 16k, 32k, 65k, 262k, 524k, 1m at layer 12"):
        resolve_release("gemma-scope-2b-pt-res-canonical", layers=[12])
    with pytest.raises(ValueError, match=r"no SAE with width='3k'.*16k"):
        resolve_release("gemma-scope-2b-pt-res-canonical", layers=[12], width="3k")


def test_a_numeric_l0_takes_the_nearest_average_l0_at_each_layer():
    lookup = REGISTRY["gemma-scope-2b-pt-res"]
    got = resolve_release("gemma-scope-2b-pt-res", layers=range(10, 15), width="16k", l0=100)
    for r in got:  # brute force over the registry's ids
        l0s = [int(m[1]) for i in lookup.saes_map
               if (m := re.fullmatch(rf"layer_{r.layer}/width_16k/average_l0_(\d+)", i))]
        assert r.l0 == min(l0s, key=lambda v: abs(v - 100))
        assert r.sae_id == f"layer_{r.layer}/width_16k/average_l0_{int(r.l0)}"
    with pytest.raises(ValueError, match=r"L0s that differ by layer.*pass l0= a number.*canonical"):
        resolve_release("gemma-scope-2b-pt-res", layers=range(10, 15), width="16k")


def test_a_choice_only_one_value_of_covers_every_layer_is_made_and_otherwise_listed():
    assert [r.sae_id for r in resolve_release("gpt2-small-res-jb", layers=[10, 11])] == [
        "blocks.10.hook_resid_pre", "blocks.11.hook_resid_pre"]
    with pytest.raises(ValueError, match=r"hooks hook_resid_post, hook_resid_pre at layer 11"):
        resolve_release("gpt2-small-res-jb", layers=[11])
    (post,) = resolve_release("gpt2-small-res-jb", layers=[11], hook="resid_post")
    assert post.hook_name == "blocks.11.hook_resid_post"
    assert post.neuronpedia_id == "gpt2-small/12-res-jb"
    labels = resolve_release("gemma-scope-2-4b-pt-res", layers=[9, 17], width="16k", l0="small")
    assert [r.sae_id for r in labels] == ["layer_9_width_16k_l0_small", "layer_17_width_16k_l0_small"]


def test_unknown_releases_and_missing_layers_are_named():
    with pytest.raises(KeyError, match="did you mean gemma-scope-2b-pt-res-canonical"):
        resolve_release("gemma-scope-2b-pt-res-canonica")
    with pytest.raises(ValueError, match=r"no SAE at layers 26-27 .*cover layers 0-25"):
        resolve_release("gemma-scope-2b-pt-res-canonical", layers=range(24, 28), width="16k")
    with pytest.raises(ValueError, match="config.yaml"):
        resolve_release("mntss-gemma-2-2b-2.5m-clt-as-per-layer")


def test_a_release_stack_is_keyed_by_model_layer_and_records_where_it_came_from():
    calls = []
    stack = load_release_stack("gemma-scope-2b-pt-res-canonical", layers=[10, 11, 12], width="16k",
                               sae_loader=fake_loader(calls), progress=False)
    assert list(stack) == [10, 11, 12]
    assert calls == [("gemma-scope-2b-pt-res-canonical", f"layer_{L}/width_16k/canonical")
                     for L in (10, 11, 12)]
    for layer, sae in stack.items():
        md = sae.cfg.metadata
        assert md.hook_name == f"blocks.{layer}.hook_resid_post"
        assert (md.release, md.sae_id) == ("gemma-scope-2b-pt-res-canonical",
                                           f"layer_{layer}/width_16k/canonical")
        assert md.neuronpedia_id == f"gemma-2-2b/{layer}-gemmascope-res-16k"


def test_a_loaded_sae_reading_another_hook_is_refused():
    def wrong(release, sae_id):
        return build_sae("jumprelu", d_in=16, d_sae=24, hook_name="blocks.3.hook_resid_post")

    with pytest.raises(ValueError, match=r"reads 'blocks\.3\.hook_resid_post'.*'blocks\.10"):
        load_release_stack("gemma-scope-2b-pt-res-canonical", layers=[10], width="16k",
                           sae_loader=wrong, progress=False)


def test_an_unreachable_hub_is_one_sentence(monkeypatch):
    monkeypatch.setattr(releases, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(HubUnavailableError, match="Cannot load gemma-scope-2b-pt-res-canonical: the "
                       "Hugging Face hub is unreachable") as info:
        load_release_stack("gemma-scope-2b-pt-res-canonical", layers=[10, 11], width="16k",
                           progress=False)
    assert "\n" not in str(info.value) and str(info.value).count(". ") == 0


def test_module_stacks_pair_residual_mlp_and_attention_releases():
    stack = load_module_stack("gpt2-small-resid-post-v5-32k", mlp_release="gpt2-small-mlp-out-v5-32k",
                              attn_release="gpt2-small-attn-out-v5-32k", layers=[4, 5, 6],
                              sae_loader=fake_loader(), progress=False)
    assert list(stack) == [4, 5, 6]
    for layer, here in stack.items():
        assert here.res.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert here.mlp.cfg.metadata.hook_name == f"blocks.{layer}.hook_mlp_out"
        assert here.attn.cfg.metadata.hook_name == f"blocks.{layer}.hook_attn_out"
    graph = flow_graph(stack, (5, 3), cut=-1.0, module_min=-1.0)
    assert set(graph.nodes.module) == {"res", "mlp", "attn"}
    for row in graph.nodes.itertuples():
        npid = stack[row.layer].get(row.module).cfg.metadata.neuronpedia_id
        assert npid and row.neuronpedia_url == feature_url(npid, row.feature)
    gemma = load_module_stack("gemma-scope-2b-pt-res-canonical",
                              mlp_release="gemma-scope-2b-pt-mlp-canonical", layers=[3, 4],
                              width="16k", sae_loader=fake_loader(), progress=False)
    assert gemma[4].mlp.cfg.metadata.neuronpedia_id == "gemma-2-2b/4-gemmascope-mlp-16k"
    assert gemma[4].attn is None


def test_gemma_scope_attention_saes_read_hook_z_and_are_refused_for_flows():
    with pytest.raises(ValueError, match=r"gemma-scope-2b-pt-att-canonical cannot be the attn release"
                       r".*attn\.hook_z.*before W_O"):
        load_module_stack("gemma-scope-2b-pt-res-canonical",
                          attn_release="gemma-scope-2b-pt-att-canonical", layers=[3], width="16k",
                          sae_loader=fake_loader(), progress=False)
    with pytest.raises(ValueError, match=r"gpt2-small-res-jb has no SAE with hook='hook_resid_post' "
                       r"at layers 3; its hook values there are hook_resid_pre"):
        load_module_stack("gpt2-small-res-jb", layers=[3], sae_loader=fake_loader())


def test_the_release_model_is_loaded_with_the_registry_name_and_options(monkeypatch):
    assert load_release_model("gemma-scope-2b-pt-res-canonical", model_loader=lambda n: n) == "gemma-2-2b"
    seen = {}
    monkeypatch.setattr(releases, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(releases, "default_model_loader",
                        lambda name, **kw: seen.update(name=name, kwargs=kw) or torch.nn.Identity())
    load_release_model("gpt2-small-res-jb")
    assert seen == {"name": "gpt2-small", "kwargs": {"center_writing_weights": True}}


@pytest.mark.parametrize(("spec", "minimum", "layers"), [("10-14", 2, [10, 11, 12, 13, 14]),
                                                         ("3,5,7", 2, [3, 5, 7]), ("7", 1, [7])])
def test_layer_specs_parse(spec, minimum, layers):
    assert parse_layers(spec, minimum=minimum) == layers


def test_too_few_layers_are_refused():
    with pytest.raises(ValueError, match="fewer than 2 layers"):
        parse_layers("7")
