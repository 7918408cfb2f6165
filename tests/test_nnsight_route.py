"""The nnsight route: on tiny GPT-2 and Llama models built from config, every number equals the
TransformerLens route on the same weights; sites, errors and cleanup."""

from __future__ import annotations

import ast
import copy
import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch

from sae_match_lens.evaluation import (
    RESULT_COLUMNS,
    VARIANTS,
    evaluate_substitution,
    evaluate_substitution_nnsight,
)
from sae_match_lens.flow.linking import Transition, links
from sae_match_lens.lens.hooks import METHODS, Substitution, substitute
from sae_match_lens.lens.nnsight import (
    MODULE_PATHS,
    ModuleSite,
    NNsightRoute,
    StateEdit,
    edit_states,
    module_site,
    substitute_nnsight,
)
from sae_match_lens.matching import match
from tests.helpers_tl import D_VOCAB, N_CTX, random_jumprelu_sae, tiny_tokenizer, tiny_tokens

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nnsight") is None,
    reason="nnsight is not installed (pip install 'sae-match-lens[nnsight]')",
)

D_MODEL = 32
N_LAYERS = 3
HOOKS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
NUMERIC = ["explained_variance", "delta_ce", "kl", "coactivation", "ce_clean", "ce_substituted",
           "mse"]


@pytest.fixture(scope="module")
def nnsight():
    # Imported here, not at collection: importing nnsight patches torch.Tensor globally.
    return pytest.importorskip("nnsight", reason="nnsight is not importable")


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=D_VOCAB, n_positions=N_CTX, n_embd=D_MODEL, n_layer=N_LAYERS,
                        n_head=4, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _llama(model_type: str = "llama") -> torch.nn.Module:
    import transformers

    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
             "mistral": ("MistralConfig", "MistralForCausalLM"),
             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, names[0])(
        vocab_size=D_VOCAB, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=N_CTX,
        initializer_range=0.2, bos_token_id=0, eos_token_id=0)  # no pad id: it zeroes its row
    return getattr(transformers, names[1])(config).eval()


def _hooked(hf: torch.nn.Module) -> object:
    """The same weights in a HookedTransformer, without weight processing and without the hub:
    a config built from the HF config, TransformerLens' own weight converter."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import (
        convert_gpt2_weights,
        convert_llama_weights,
    )

    c = hf.config
    if c.model_type == "gpt2":
        cfg = HookedTransformerConfig(
            d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
            n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon,
            d_vocab=c.vocab_size, act_fn=c.activation_function, normalization_type="LN",
            original_architecture="GPT2LMHeadModel", device="cpu")
        state = convert_gpt2_weights(hf, cfg)
    else:
        cfg = HookedTransformerConfig(
            d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads,
            n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
            n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps,
            d_vocab=c.vocab_size, act_fn=c.hidden_act, n_key_value_heads=c.num_key_value_heads,
            normalization_type="RMS", positional_embedding_type="rotary",
            rotary_adjacent_pairs=False, rotary_dim=c.hidden_size // c.num_attention_heads,
            rotary_base=c.rope_parameters["rope_theta"], final_rms=True, gated_mlp=True,
            original_architecture="LlamaForCausalLM", device="cpu")
        state = convert_llama_weights(hf, cfg)
    model = HookedTransformer(cfg, tiny_tokenizer(), move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request, nnsight):
    """(name, hf_model, HookedTransformer, nnsight model) on the same weights."""
    hf = _gpt2() if request.param == "gpt2" else _llama()
    return request.param, hf, _hooked(hf), nnsight.TransformersModel(hf, tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def tokens():
    return tiny_tokens(n_seq=4, seq_len=12)


@pytest.fixture(scope="module")
def saes():
    return {
        "r0": random_jumprelu_sae("blocks.0.hook_resid_post", seed=1),
        "r1": random_jumprelu_sae("blocks.1.hook_resid_post", seed=2),
        "p2": random_jumprelu_sae("blocks.2.hook_resid_pre", seed=3),
        "m0": random_jumprelu_sae("blocks.0.hook_mlp_out", seed=4),
        "a1": random_jumprelu_sae("blocks.1.hook_attn_out", seed=5),
    }


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _clean_logits(nnsight, lm, tokens):
    with torch.no_grad(), lm.trace(tokens):
        logits = nnsight.save(lm.output.logits)
    return logits


def test_clean_states_and_logits_equal_the_transformer_lens_model(family, tokens):
    _, _, tl, lm = family
    names = [f"blocks.{layer}.{hook}" for layer in range(N_LAYERS) for hook in HOOKS]
    route = NNsightRoute(lm, [random_jumprelu_sae(n) for n in names])
    states, logits = route.clean(tokens, names)
    with torch.no_grad():
        tl_logits, cache = tl.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(logits, tl_logits, atol=1e-5, rtol=1e-5)
    for name in names:
        torch.testing.assert_close(states[name], cache[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("bos", ["keep", "substitute"])
def test_the_evaluation_table_equals_the_transformer_lens_route(family, saes, tokens, bos):
    _, _, tl, lm = family
    pairs = [("r0", "r1"), ("r1", "p2"), ("r0", "p2"), ("m0", "a1")]
    if bos == "substitute":  # one residual and one attention/MLP pair are enough here
        pairs = [("r0", "r1"), ("m0", "a1")]
    kwargs = {"pairs": pairs, "variants": list(VARIANTS), "batch_size": 3, "progress": False,
              "bos": bos}
    expected = evaluate_substitution(tl, saes, tokens, **kwargs)
    table = evaluate_substitution_nnsight(lm, saes, tokens, **kwargs)
    assert list(table.columns) == list(RESULT_COLUMNS)
    assert len(table) == len(pairs) * len(VARIANTS)
    other = [c for c in RESULT_COLUMNS if c not in NUMERIC]
    pd.testing.assert_frame_equal(table[other], expected[other])
    np.testing.assert_allclose(table[NUMERIC].to_numpy(float), expected[NUMERIC].to_numpy(float),
                               rtol=1e-4, atol=1e-4)
    substituted = table[table.variant != "identity"]
    assert (substituted.kl > 1e-3).all()  # the substitutes really changed the predictions


def test_bos_policy_changes_the_numbers_the_same_way(family, saes, tokens):
    _, _, _, lm = family
    kwargs = {"pairs": [("r0", "r1")], "variants": ["folded"], "progress": False}
    keep = evaluate_substitution_nnsight(lm, saes, tokens, bos="keep", **kwargs)
    sub = evaluate_substitution_nnsight(lm, saes, tokens, bos="substitute", **kwargs)
    assert keep.explained_variance.item() == pytest.approx(sub.explained_variance.item(), abs=1e-6)
    assert abs(keep.kl.item() - sub.kl.item()) > 1e-4  # position 0 is read by every later one


def _maps(sae_a, sae_b):
    result = match(sae_a, sae_b, progress=False)
    transition = Transition.from_links(links(sae_a, sae_b, k=2, progress=False))
    return result, transition


@pytest.mark.parametrize("hooks", [("r0", "r1"), ("m0", "a1"), ("r1", "p2")])
def test_substitute_nnsight_gives_the_logits_of_substitute_on_transformer_lens(
        nnsight, family, saes, tokens, hooks):
    _, _, tl, lm = family
    sae_a, sae_b = saes[hooks[0]], saes[hooks[1]]
    result, transition = _maps(sae_a, sae_b)
    cases = [(Substitution(m), result, bos) for m in METHODS for bos in ("keep", "substitute")]
    cases += [(Substitution("permute", "raw"), result, "keep"),
              (Substitution("error_preserving"), transition, "keep")]
    for spec, mapping, bos in cases:
        with torch.no_grad(), substitute(tl, sae_a, sae_b, mapping, substitution=spec, bos=bos):
            expected = tl(tokens)
        with substitute_nnsight(lm, sae_a, sae_b, mapping, substitution=spec, bos=bos) as sub, \
                torch.no_grad(), sub.trace(tokens):
            logits = nnsight.save(sub.output.logits)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4,
                                   msg=f"{spec} {type(mapping).__name__} bos={bos}")


def test_a_reversed_same_boundary_pair_reads_the_state_at_b(nnsight, family, tokens):
    _, _, tl, lm = family
    sae_a = random_jumprelu_sae("blocks.1.hook_resid_pre", seed=7)
    sae_b = random_jumprelu_sae("blocks.0.hook_resid_post", seed=8)
    result = match(sae_a, sae_b, progress=False)
    with torch.no_grad(), substitute(tl, sae_a, sae_b, result):
        expected = tl(tokens)
    with substitute_nnsight(lm, sae_a, sae_b, result) as sub, torch.no_grad(), sub.trace(tokens):
        logits = nnsight.save(sub.output.logits)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_state_edits_equal_a_transformer_lens_hook_edit(nnsight, family, tokens):
    name, _, tl, lm = family
    path = MODULE_PATHS["gpt2" if name == "gpt2" else "llama"]["hook_resid_post"].format(layer=1)
    v = torch.linspace(-2, 2, D_MODEL)
    for positions, index in ((None, slice(None)), (-1, [11]), (slice(1, None), slice(1, None)),
                             ([2, 5], [2, 5]), (torch.arange(12) % 3 == 0, torch.arange(12) % 3 == 0)):
        def add(x, *, hook, index=index):
            out = x.clone()
            out[:, index] += v
            return out

        with torch.no_grad():
            expected = tl.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", add)])
        edit = StateEdit(path, lambda h: h + v, positions=positions)
        with edit_states(lm, [edit]) as steered, torch.no_grad(), steered.trace(tokens):
            logits = nnsight.save(steered.output.logits)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4, msg=str(positions))


def test_an_explicit_input_path_reads_a_point_the_map_does_not_have(family, tokens):
    name, _, tl, lm = family
    norm = "transformer.h.0.ln_2" if name == "gpt2" else "model.layers.0.post_attention_layernorm"
    sae = random_jumprelu_sae("blocks.0.hook_resid_mid")
    with pytest.raises(ValueError, match=r"'blocks\.0\.hook_resid_mid'.*sae_paths"):
        module_site(lm, sae)
    paths = {"blocks.0.hook_resid_mid": f"{norm}.input"}
    assert module_site(lm, sae, paths) == ModuleSite(norm, "input")
    states, _ = NNsightRoute(lm, [sae], paths).clean(tokens, ["blocks.0.hook_resid_mid"])
    with torch.no_grad():
        _, cache = tl.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_mid"])
    torch.testing.assert_close(states["blocks.0.hook_resid_mid"],
                               cache["blocks.0.hook_resid_mid"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_mapped_llama_family_sites_obey_the_residual_identities(nnsight, tokens, model_type):
    hf = _llama(model_type)
    lm = nnsight.TransformersModel(hf, tokenizer=tiny_tokenizer())
    names = [f"blocks.{layer}.{hook}" for layer in range(N_LAYERS) for hook in HOOKS]
    states, _ = NNsightRoute(lm, [random_jumprelu_sae(n) for n in names]).clean(tokens, names)
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    for layer in range(N_LAYERS):
        s = {hook: states[f"blocks.{layer}.{hook}"] for hook in HOOKS}
        torch.testing.assert_close(s["hook_resid_pre"], hidden[layer])
        torch.testing.assert_close(s["hook_resid_post"], s["hook_resid_pre"] + s["hook_attn_out"]
                                   + s["hook_mlp_out"], atol=1e-5, rtol=1e-5)
        if layer + 1 < N_LAYERS:  # HF's last hidden state is after the final norm
            torch.testing.assert_close(s["hook_resid_post"], hidden[layer + 1])


def test_an_unknown_module_path_is_refused_naming_the_saes_hook(family, saes, tokens):
    _, _, _, lm = family
    paths = {"blocks.0.hook_resid_post": "transformer.h.9"}
    with pytest.raises(ValueError, match=r"SAE 'blocks\.0\.hook_resid_post'.*'transformer\.h\.9' "
                                         r"is not a module"):
        module_site(lm, saes["r0"], paths)
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_post.*transformer\.h\.9"):
        evaluate_substitution_nnsight(lm, saes, tokens, pairs=[("r0", "r1")], sae_paths=paths,
                                      progress=False)


def test_a_wrong_width_and_a_backward_pair_are_refused_before_any_pass(family, saes, tokens):
    _, _, _, lm = family
    narrow = {"a": random_jumprelu_sae("blocks.0.hook_resid_post", d_in=16), "b": saes["r1"]}
    with pytest.raises(ValueError, match=r"d_in=16 but the state at .* has width 32"):
        evaluate_substitution_nnsight(lm, narrow, tokens, variants=["identity"], progress=False)
    backward = {"a": saes["r1"], "b": saes["r0"]}
    with pytest.raises(ValueError, match="A must precede B"):
        evaluate_substitution_nnsight(lm, backward, tokens, progress=False)
    with pytest.raises(ValueError, match="A must precede B"), substitute_nnsight(
            lm, saes["r1"], saes["r0"], match(saes["r1"], saes["r0"], progress=False)):
        pass


def test_nothing_leaks_after_an_exception(nnsight, family, saes, tokens):
    _, hf, _, lm = family
    clean = _clean_logits(nnsight, lm, tokens)
    hooks_before = _hook_count(hf)
    result = match(saes["r0"], saes["r1"], progress=False)
    no_bos = tokens.clone()
    no_bos[:, 0] = 7
    with substitute_nnsight(lm, saes["r0"], saes["r1"], result) as sub:
        with pytest.raises(ValueError, match=r"start with the BOS token \(id 0\)"), \
                torch.no_grad(), sub.trace(no_bos):
            sub.output.logits  # noqa: B018
        with torch.no_grad(), sub.trace(tokens):
            substituted = nnsight.save(sub.output.logits)
        assert (substituted - clean).abs().max() > 1e-3  # the copy is substituted ...
    torch.testing.assert_close(_clean_logits(nnsight, lm, tokens), clean, atol=0, rtol=0)
    torch.testing.assert_close(_clean_logits(nnsight, sub, tokens), clean, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="user error"), \
            substitute_nnsight(lm, saes["r0"], saes["r1"], result) as sub2:
        raise RuntimeError("user error")
    torch.testing.assert_close(_clean_logits(nnsight, sub2, tokens), clean, atol=0, rtol=0)
    whole_model = {"blocks.0.hook_resid_post": "transformer" if hasattr(hf, "transformer")
                   else "model"}  # its output is a ModelOutput, not a state: the probe fails
    with pytest.raises(ValueError, match="not a tensor"):
        evaluate_substitution_nnsight(lm, saes, tokens, pairs=[("r0", "r1")],
                                      sae_paths=whole_model, progress=False)
    assert _hook_count(hf) == hooks_before
    torch.testing.assert_close(_clean_logits(nnsight, lm, tokens), clean, atol=0, rtol=0)


def test_module_site_strings_parse_to_output_or_input():
    assert ModuleSite.parse("transformer.h.3") == ModuleSite("transformer.h.3", "output")
    assert ModuleSite.parse("transformer.h.3.output") == ModuleSite("transformer.h.3", "output")
    assert ModuleSite.parse("model.layers.2.input") == ModuleSite("model.layers.2", "input")
    assert str(ModuleSite("a.b", "input")) == "a.b.input"
    with pytest.raises(ValueError, match="dotted name"):
        ModuleSite.parse("")
    with pytest.raises(ValueError, match="port"):
        ModuleSite("a", "grad")  # type: ignore[arg-type]


def test_a_model_that_is_not_nnsight_is_refused(nnsight, saes, tokens):
    with pytest.raises(TypeError, match="expected an nnsight model"):
        evaluate_substitution_nnsight(torch.nn.Linear(2, 2), saes, tokens, pairs=[("r0", "r1")])


def test_without_nnsight_the_functions_name_the_extra(monkeypatch, saes, tokens):
    monkeypatch.setitem(sys.modules, "nnsight", None)  # import nnsight now raises ImportError
    with pytest.raises(ImportError, match=r"pip install \"sae-match-lens\[nnsight\]\""):
        evaluate_substitution_nnsight(object(), saes, tokens, pairs=[("r0", "r1")])


def test_the_package_imports_nnsight_only_inside_the_nnsight_route_functions():
    package = pathlib.Path(__file__).resolve().parents[1] / "sae_match_lens"
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                if isinstance(node, ast.ImportFrom) and node.level:  # relative: the package's own
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                if any(n.split(".")[0] == "nnsight" for n in names):
                    assert path.relative_to(package).as_posix() == "lens/nnsight.py", path
                    assert node not in top_level, f"{path}: module-level nnsight import"


def test_saes_that_do_not_read_this_model_are_refused_on_the_nnsight_routes(nnsight, family,
                                                                            saes, tokens):
    _, _, _, lm = family
    foreign = {k: copy.deepcopy(saes[k]) for k in ("r0", "r1")}
    with torch.no_grad():
        for sae in foreign.values():  # reconstructions 50x too large: nothing is explained
            sae.W_dec.mul_(50.0)
    result = match(foreign["r0"], foreign["r1"], progress=False)
    with substitute_nnsight(lm, foreign["r0"], foreign["r1"], result) as sub, \
            pytest.raises(ValueError, match=r"explained variance there is -\d+"), \
            torch.no_grad(), sub.trace(tokens):
        sub.output.logits  # noqa: B018
    with pytest.raises(ValueError, match=r"explained variance there is -\d+"):
        evaluate_substitution_nnsight(lm, foreign, tokens, pairs=[("r0", "r1")],
                                      variants=["folded"], progress=False)
    table = evaluate_substitution_nnsight(lm, foreign, tokens, pairs=[("r0", "r1")],
                                          variants=["folded"], progress=False, check_model=False)
    assert table.explained_variance.iloc[0] < -1
