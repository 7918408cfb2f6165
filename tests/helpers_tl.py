"""Tiny seeded TransformerLens models and SAELens SAEs for the hooks and evaluation tests.

Everything here is built offline from random weights: a 4-layer ``HookedTransformer``, JumpReLU
SAEs reading its residual stream, planted SAE pairs, and a ``TransformerBridge`` around a tiny
randomly initialised Hugging Face GPT-2 with a word-level tokenizer built in memory.
"""

from __future__ import annotations

import copy

import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_match_lens.permutation import Permutation

N_LAYERS = 4
D_MODEL = 32
N_CTX = 16
D_VOCAB = 50
D_SAE = 64


def tiny_model_config(**overrides: object) -> HookedTransformerConfig:
    """The config of the tiny test model (4 layers, d_model 32, 50-token vocabulary)."""
    kwargs: dict[str, object] = {
        "n_layers": N_LAYERS, "d_model": D_MODEL, "n_ctx": N_CTX, "d_head": 8, "n_heads": 4,
        "d_vocab": D_VOCAB, "act_fn": "gelu", "seed": 0, "device": "cpu",
        "initializer_range": 0.2,
    }
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


def tiny_tokenizer() -> object:
    """A word-level ``PreTrainedTokenizerFast`` built in memory: BOS (= EOS = pad) is id 0,
    ``t1`` .. ``t49`` are ids 1..49. It needs ``add_bos_token=True`` and a ``name_or_path`` so
    that TransformerLens does not try to reload it from the hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, D_VOCAB)}}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", add_bos_token=True, name_or_path="tiny-local-word-level",
    )


def tiny_model(model_class: type = HookedTransformer, **overrides: object) -> HookedTransformer:
    """A seeded random ``HookedTransformer`` (or subclass, e.g. ``HookedSAETransformer``) with the
    in-memory word-level tokenizer (BOS id 0)."""
    model = model_class(tiny_model_config(**overrides))
    model.set_tokenizer(tiny_tokenizer(), default_padding_side="right")
    model.eval()
    return model


def tiny_tokens(n_seq: int = 6, seq_len: int = N_CTX, seed: int = 0) -> torch.Tensor:
    """Random token ids [n_seq, seq_len] whose first column is the BOS id 0."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, D_VOCAB, (n_seq, seq_len), generator=gen)
    tokens[:, 0] = 0
    return tokens


def state_at(model: object, tokens: torch.Tensor, name: str) -> torch.Tensor:
    """The clean activation at hook ``name``."""
    _, cache = model.run_with_cache(tokens, names_filter=[name])  # type: ignore[attr-defined]
    return cache[name]


def written_at(model: object, tokens: torch.Tensor, name: str) -> torch.Tensor:
    """Run the model and return the value that reaches hook ``name`` (after earlier hooks)."""
    seen = {}

    def spy(x: torch.Tensor, *, hook: object) -> None:
        seen["x"] = x.detach().clone()

    model.run_with_hooks(tokens, fwd_hooks=[(name, spy)])  # type: ignore[attr-defined]
    return seen["x"]


def random_jumprelu_sae(
    hook_name: str,
    *,
    d_in: int = D_MODEL,
    d_sae: int = D_SAE,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> JumpReLUSAE:
    """A JumpReLU SAE with random weights and positive thresholds, reading ``hook_name``.

    The encoder is the normalised decoder (scaled per feature), so the SAE reconstructs the
    residual stream reasonably and each feature fires on a good fraction of tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, dtype=str(dtype).removeprefix("torch."))
    cfg.metadata.hook_name = hook_name
    sae = JumpReLUSAE(cfg)
    W_dec = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    scale = torch.exp(0.5 * torch.randn(d_sae, generator=gen, dtype=torch.float64))
    with torch.no_grad():
        sae.W_dec.copy_((W_dec * 0.5).to(dtype))
        sae.W_enc.copy_((W_dec.T / scale[None, :]).to(dtype))
        sae.b_enc.copy_((0.05 * torch.randn(d_sae, generator=gen, dtype=torch.float64)).to(dtype))
        sae.b_dec.copy_((0.05 * torch.randn(d_in, generator=gen, dtype=torch.float64)).to(dtype))
        sae.threshold.copy_((0.2 + 0.3 * torch.rand(d_sae, generator=gen, dtype=torch.float64)
                             / scale).to(dtype))
    return sae


def planted_copy(
    sae: JumpReLUSAE, hook_name: str, *, seed: int = 1
) -> tuple[JumpReLUSAE, Permutation]:
    """A copy of ``sae`` reading ``hook_name`` with features permuted and positively rescaled.

    Returns ``(sae_b, planted)`` where ``planted.indices[i] = j`` says that feature ``i`` of
    ``sae`` is feature ``j`` of ``sae_b``. The two SAEs compute the same reconstruction.
    """
    gen = torch.Generator().manual_seed(seed)
    d_sae = sae.cfg.d_sae
    planted = Permutation.random(d_sae, generator=gen)
    s = torch.exp(torch.randn(d_sae, generator=gen, dtype=torch.float64))
    new = copy.deepcopy(sae)
    new.cfg.metadata.hook_name = hook_name
    inv = planted.inverse().indices
    with torch.no_grad():
        W_enc = sae.W_enc.detach().double() / s[None, :]
        W_dec = sae.W_dec.detach().double() * s[:, None]
        new.W_enc.copy_(W_enc[:, inv].to(sae.W_enc.dtype))
        new.W_dec.copy_(W_dec[inv].to(sae.W_dec.dtype))
        new.b_enc.copy_((sae.b_enc.detach().double() / s)[inv].to(sae.b_enc.dtype))
        new.threshold.copy_((sae.threshold.detach().double() / s)[inv].to(sae.threshold.dtype))
    return new, planted


def layer_saes(hook: str = "hook_resid_post", *, n_layers: int = N_LAYERS) -> list[JumpReLUSAE]:
    """One random SAE per layer, reading ``blocks.{i}.{hook}``."""
    return [random_jumprelu_sae(f"blocks.{i}.{hook}", seed=10 + i) for i in range(n_layers)]


def tiny_bridge() -> object:
    """A ``TransformerBridge`` around a random 4-layer HF GPT-2, built without network access.

    ``TransformerBridge.boot_transformers`` takes a pre-built ``hf_model`` (then it reads the
    config from the model instead of the hub) and a ``tokenizer`` object. The tokenizer is a
    word-level ``PreTrainedTokenizerFast`` made in memory; it needs ``add_bos_token=True`` and
    a ``name_or_path`` so that TransformerLens does not try to reload it from the hub.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    hf_config = GPT2Config(vocab_size=D_VOCAB, n_positions=N_CTX, n_embd=D_MODEL,
                           n_layer=N_LAYERS, n_head=4)
    hf_model = GPT2LMHeadModel(hf_config).eval()
    return TransformerBridge.boot_transformers(
        "gpt2", hf_model=hf_model, tokenizer=tokenizer, device="cpu"
    )
