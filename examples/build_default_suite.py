"""Build the embedded default suite: a small trained LM and two families of trained SAEs.

Everything runs offline on CPU. The text comes from Debian packages:

* ``bible-kjv``: the King James Bible, via ``bible -m 8192 "Gen1:1-Rev22:21"``
  (one document per chapter);
* ``fortunes``: every cookie file in ``/usr/share/games/fortunes`` (one
  document per fortune);
* ``python3.11-doc``: the reStructuredText sources under
  ``/usr/share/doc/python3.11/html/_sources`` (one document per file).

Install them with ``apt-get install -y bible-kjv fortunes python3.11-doc`` (the
script does this itself when run as root with ``--apt``). Every 25th document
of each source is held out; the held-out documents give the evaluation shard
and are never trained on.

Stages:

1. corpus: write the three texts (their sha256 go into the manifest);
2. tokenizer: a byte-level BPE (``tokenizers``) with ``<|bos|>``, ``<|eos|>``
   and ``<|pad|>``, saved as a ``PreTrainedTokenizerFast`` directory;
3. model: a causal ``HookedTransformer`` trained with AdamW; every sequence
   starts with BOS and documents are joined by EOS;
4. SAEs, one per layer at ``blocks.{l}.hook_resid_post``, trained on the
   (float16-rounded) shipped model's activations with SAELens' ``SAETrainer``
   on an in-memory activation iterator:

   * ``topk``: a ``TopKTrainingSAE`` with the dead-latent auxiliary loss;
   * ``jumprelu``: a separately seeded TopK warm start, converted to per-feature
     thresholds (feature ``i``'s threshold is the quantile of its
     pre-activation that reproduces its TopK firing rate), fine-tuned as a
     ``JumpReLUTrainingSAE`` (quadratic L0 penalty around ``--target-l0``,
     pre-activation loss for dead features).

     The thresholds get their own Adam parameter group with ``--threshold-lr-scale``
     times the fine-tuning learning rate. Adam moves each parameter by about one
     learning rate per step, so at the base rate over 150 steps the thresholds
     barely moved while the encoder, driven by the reconstruction loss, shifted the
     pre-activations under them: L0 climbed from the warm start's 32 to 124-157
     whatever the L0 coefficient (1, 10 and 40 gave the same L0 to four digits).
     The earlier suite, without the separate group, had L0 130 on layer 3 (dead
     0.1%). Trying scales on layer 3, measured on the float32 training SAE and
     the held-out activations: scale 10 gives L0 59, dead 1.2%, EV 0.966 (whole shard); scale
     20 gives L0 40 but 11% dead, scale 50 L0 40 with 26% dead (first 64 shard
     sequences); scale 20 with ``--pre-act-loss-coefficient 1e-2`` gives L0 40 with
     8% dead (whole shard). What else was tried before, on layer 3 of an
     earlier model: a lower fine-tune learning rate (2e-4) gave a higher L0
     (150-196); letting the estimator reach the encoder (``--ste-to-input 1``)
     holds L0 at the target but kills about half of the features; re-setting the
     thresholds afterwards to hit the target L0 (``--calibrate-l0 1``) keeps them
     alive but drops explained variance from 0.97 to 0.70. Trained from scratch
     this briefly, JumpReLU SAEs leave about half their features dead.

   Inputs are scaled so the mean norm is ``sqrt(d_model)`` while training, and
   the scale is folded back into the weights.
5. export: model and SAE weights in float16, the tokenizer, the held-out shard
   and ``manifest.json``. All metrics are measured *after* reloading the
   exported files with :mod:`sae_match_lens.assets`, on the held-out shard,
   both on all of it and on the first ``--test-seqs`` sequences (the subset the
   tests recompute).

Usage::

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python examples/build_default_suite.py \\
        --out sae_match_lens/data/default_suite

Flags (defaults in brackets; ``--help`` lists them all):

* ``--out`` [sae_match_lens/data/default_suite] output directory (replaced);
* ``--work`` [/tmp/sae_match_suite_work] scratch directory for the corpus;
* ``--apt`` install missing Debian packages with apt-get;
* ``--resume`` reuse the trained model that an earlier build with the same
  model settings cached in ``--work`` (its recorded training time is reported);
* ``--seed`` [0] base seed for every random choice;
* ``--vocab-size`` [4096], ``--n-layers`` [6], ``--d-model`` [128],
  ``--n-heads`` [4], ``--d-mlp`` [512], ``--n-ctx`` [128];
* ``--lm-steps`` [640], ``--lm-batch`` [16], ``--lm-lr`` [3e-3];
* ``--act-seqs`` [4096] training sequences whose activations train the SAEs;
* ``--d-sae`` [1024], ``--sae-batch`` [4096], ``--topk-k`` [32],
  ``--topk-steps`` [200], ``--warm-steps`` [120], ``--jumprelu-steps`` [150],
  ``--target-l0`` [40], ``--l0-coefficient`` [1.0],
  ``--pre-act-loss-coefficient`` [1e-3], ``--calibrate-l0`` [0],
  ``--ste-to-input`` [0], ``--sae-lr`` [1e-3], ``--jumprelu-lr`` [5e-4],
  ``--threshold-lr-scale`` [10];
* ``--eval-seqs`` [256] held-out sequences shipped, ``--test-seqs`` [32] of
  them measured by the tests;
* ``--threads`` [2] torch threads.

Set ``OMP_WAIT_POLICY=PASSIVE`` before starting: with two threads, torch slows
several-fold when another process shares the cores otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from safetensors.torch import save_file

from sae_match_lens import assets
from sae_match_lens.suites.smollm2 import (  # the text both suites read
    missing_text_packages,
    split_documents,
)

BIBLE_SPEC = "Gen1:1-Rev22:21"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
APT_PACKAGES = ("bible-kjv", "fortunes", "python3.11-doc")
HOLDOUT_EVERY = 25
HOLDOUT_OFFSET = 12
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
MODEL_NAME = "sae-match-lens-default-6l"


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one build (all recorded in the manifest)."""

    out: str = "sae_match_lens/data/default_suite"
    """Output directory; replaced if it exists."""
    work: str = "/tmp/sae_match_suite_work"
    """Scratch directory for the corpus texts."""
    apt: bool = False
    """Install missing Debian packages with apt-get."""
    resume: bool = False
    """Reuse the trained model cached in ``work`` by an earlier build with the same settings."""
    seed: int = 0
    """Base seed for every random choice."""
    vocab_size: int = 4096
    """BPE vocabulary size, special tokens included."""
    n_layers: int = 6
    """Transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per block."""
    d_mlp: int = 512
    """MLP hidden width."""
    n_ctx: int = 128
    """Sequence length, BOS included."""
    lm_steps: int = 640
    """Language-model optimiser steps."""
    lm_batch: int = 16
    """Sequences per language-model step."""
    lm_lr: float = 3e-3
    """Peak language-model learning rate (linear warm-up, cosine decay to 10%)."""
    act_seqs: int = 4096
    """Training sequences whose activations train the SAEs."""
    d_sae: int = 1024
    """Features per SAE."""
    sae_batch: int = 4096
    """Activation vectors per SAE step."""
    topk_k: int = 32
    """k of the TopK family (and of the JumpReLU warm start)."""
    topk_steps: int = 200
    """Steps of each TopK-family SAE."""
    warm_steps: int = 120
    """TopK warm-start steps of each JumpReLU SAE."""
    jumprelu_steps: int = 150
    """JumpReLU fine-tuning steps after the warm start."""
    target_l0: float = 40.0
    """Target L0 of the JumpReLU quadratic sparsity penalty."""
    l0_coefficient: float = 1.0
    """Weight of the JumpReLU sparsity penalty."""
    pre_act_loss_coefficient: float = 1e-3
    """Weight of the pre-activation loss that revives dead JumpReLU features."""
    calibrate_l0: int = 0
    """1: after JumpReLU fine-tuning, re-set the thresholds so the mean L0 is
    ``target_l0`` (every feature keeps its relative firing rate); 0: keep them."""
    ste_to_input: int = 0
    """1: the JumpReLU straight-through estimator also reaches the encoder (not only the
    thresholds), so the sparsity penalty can act through it; 0: thresholds only."""
    sae_lr: float = 1e-3
    """Peak SAE learning rate (cosine decay to 10%)."""
    jumprelu_lr: float = 5e-4
    """Peak learning rate of the JumpReLU fine-tuning (cosine decay to 10%)."""
    threshold_lr_scale: float = 10.0
    """The JumpReLU thresholds' learning rate as a multiple of ``jumprelu_lr`` (their own
    Adam parameter group, same schedule); 1 trains them at the base rate."""
    eval_seqs: int = 256
    """Held-out sequences shipped in the evaluation shard."""
    test_seqs: int = 32
    """Leading shard sequences whose metrics the tests recompute."""
    threads: int = 2
    """Torch intra-op threads."""
    stage: str = "all"
    """``all``: build the whole suite (replacing ``out``); ``modules``: add JumpReLU SAEs at
    every layer's ``hook_mlp_out`` and ``hook_attn_out`` to the suite already in ``out``,
    trained on its shipped model with the residual JumpReLU recipe (model, tokenizer,
    residual SAEs and their manifest entries are kept as they are)."""


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    """Command-line flags, one per :class:`BuildConfig` field."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = BuildConfig()
    for f in fields(BuildConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=f"({f.name})")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"[{default}]")
    return BuildConfig(**vars(parser.parse_args(argv)))


def log(message: str) -> None:
    """Progress line with a wall-clock stamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)



def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- corpus


def ensure_packages(install: bool) -> None:
    """Check the Debian text packages, installing them when asked to."""
    missing = missing_text_packages()
    if not missing:
        return
    if not install:
        sys.exit(
            f"Missing Debian packages {missing}. Install them with\n"
            f"  apt-get update && apt-get install -y {' '.join(APT_PACKAGES)}\n"
            "or rerun this script as root with --apt."
        )
    log(f"installing {missing} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def write_sources(work: Path) -> dict[str, Path]:
    """Write the three source texts; return name -> file."""
    work.mkdir(parents=True, exist_ok=True)
    bible = subprocess.run(
        ["bible", "-m", "8192", BIBLE_SPEC], check=True, capture_output=True, text=True
    ).stdout
    fortune_files = sorted(
        p for p in FORTUNE_DIR.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")
    )
    fortunes = "".join(p.read_text(encoding="utf-8", errors="replace") for p in fortune_files)
    pydoc_files = sorted(PYDOC_DIR.rglob("*.txt"))
    separator = "\n\x00\n"
    pydoc = separator.join(p.read_text(encoding="utf-8", errors="replace") for p in pydoc_files)
    paths = {}
    for name, text in (("bible", bible), ("fortunes", fortunes), ("pydoc", pydoc)):
        paths[name] = work / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def split_corpus(sources: dict[str, Path]) -> tuple[list[str], list[str]]:
    """Train / held-out documents: every ``HOLDOUT_EVERY``-th document is held out."""
    train, held_out = [], []
    for name, path in sources.items():
        for i, doc in enumerate(split_documents(name, path.read_text(encoding="utf-8"))):
            (held_out if i % HOLDOUT_EVERY == HOLDOUT_OFFSET else train).append(doc)
    return train, held_out


# -------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int, out_dir: Path) -> Any:
    """Train a byte-level BPE and save it as a ``PreTrainedTokenizerFast`` directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)


def pack(docs: list[str], tokenizer: Any, n_ctx: int) -> torch.Tensor:
    """Join documents with EOS, cut into ``n_ctx - 1`` chunks, prepend BOS to each."""
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(docs):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    body = n_ctx - 1
    n_seq = len(ids) // body
    chunks = torch.tensor(ids[: n_seq * body], dtype=torch.int64).view(n_seq, body)
    bos = torch.full((n_seq, 1), tokenizer.bos_token_id, dtype=torch.int64)
    return torch.cat([bos, chunks], dim=1)


# ------------------------------------------------------------------------------ model


def model_config(cfg: BuildConfig, d_vocab: int) -> dict[str, Any]:
    """``HookedTransformerConfig`` keyword arguments (stored as ``model/config.json``)."""
    return {
        "model_name": MODEL_NAME,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_model // cfg.n_heads,
        "d_mlp": cfg.d_mlp,
        "n_ctx": cfg.n_ctx,
        "d_vocab": d_vocab,
        "act_fn": "gelu_new",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "default_prepend_bos": True,
        "original_architecture": "GPT2LMHeadModel",
        "seed": cfg.seed,
    }


def train_model(cfg: BuildConfig, model: Any, train_tokens: torch.Tensor) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the per-step training losses."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lm_lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, cfg.lm_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.lm_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = []
    model.train()
    start = time.time()
    for step in range(cfg.lm_steps):
        idx = torch.randint(0, train_tokens.shape[0], (cfg.lm_batch,), generator=gen)
        loss = model(train_tokens[idx], return_type="loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == cfg.lm_steps - 1:
            rate = (step + 1) * cfg.lm_batch * cfg.n_ctx / (time.time() - start)
            log(f"  LM step {step:4d}  loss {loss.item():.3f}  ({rate:.0f} tok/s)")
    model.eval()
    return losses


def model_stage_key(cfg: BuildConfig, tokenizer_file: Path) -> str:
    """Hash of the settings and tokenizer that determine the trained model (for ``--resume``)."""
    keys = ("seed", "vocab_size", "n_layers", "d_model", "n_heads", "d_mlp", "n_ctx")
    keys += ("lm_steps", "lm_batch", "lm_lr", "threads")
    record = {k: getattr(cfg, k) for k in keys}
    record["tokenizer_sha256"] = sha256(tokenizer_file)
    blob = json.dumps(record, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def save_model(model: Any, config: dict[str, Any], out: Path) -> None:
    """Float16 weights (parameters only) and the config."""
    model_dir = out / assets.MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().half().contiguous() for n, p in model.named_parameters()}
    save_file(state, str(model_dir / assets.MODEL_WEIGHTS_FILE))
    (model_dir / assets.MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2))


@torch.no_grad()
def collect_activations(
    model: Any, tokens: torch.Tensor, hook_names: list[str], batch: int = 64
) -> dict[str, torch.Tensor]:
    """Activations at every hook for every non-BOS position, ``[n_tokens, d_model]``."""
    chunks: dict[str, list[torch.Tensor]] = {h: [] for h in hook_names}
    for start in range(0, tokens.shape[0], batch):
        _, cache = model.run_with_cache(
            tokens[start : start + batch], names_filter=hook_names, return_type=None
        )
        for h in hook_names:
            chunks[h].append(cache[h][:, 1:].reshape(-1, cache[h].shape[-1]).clone())
    return {h: torch.cat(c) for h, c in chunks.items()}


# ------------------------------------------------------------------------------- SAEs


def batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless random batches (with replacement) from an in-memory activation tensor."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield acts[torch.randint(0, acts.shape[0], (batch,), generator=gen)]


def trainer_config(cfg: BuildConfig, steps: int, lr: float) -> Any:
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    return SAETrainerConfig(
        total_training_samples=steps * cfg.sae_batch,
        train_batch_size_samples=cfg.sae_batch,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(20, steps // 10),
        dead_feature_window=50,
        feature_sampling_window=10**9,
        logger=LoggingConfig(log_to_wandb=False),
        device="cpu",
    )


def sae_metadata(hook_name: str, cfg: BuildConfig) -> Any:
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(
        model_name=MODEL_NAME,
        hook_name=hook_name,
        hook_head_index=None,
        context_size=cfg.n_ctx,
        prepend_bos=True,
        dataset_path="debian:bible-kjv+fortunes+python3.11-doc",
        exclude_special_tokens=True,
    )


def train_topk(cfg: BuildConfig, acts: torch.Tensor, hook_name: str, steps: int, seed: int):
    """A TopK training SAE on (already scaled) activations."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    sae_cfg = TopKTrainingSAEConfig(
        d_in=cfg.d_model,
        d_sae=cfg.d_sae,
        k=cfg.topk_k,
        metadata=sae_metadata(hook_name, cfg),
    )
    sae = TopKTrainingSAE(sae_cfg)
    with torch.no_grad():
        sae.b_dec.copy_(acts[:65536].mean(0))
    trainer = SAETrainer(
        trainer_config(cfg, steps, cfg.sae_lr), sae, batches(acts, cfg.sae_batch, seed)
    )
    return trainer.fit()


@torch.no_grad()
def topk_to_jumprelu(cfg: BuildConfig, topk: Any, acts: torch.Tensor, hook_name: str):
    """JumpReLU training SAE with the TopK SAE's weights and per-feature thresholds.

    Feature ``i``'s threshold is the ``1 - p_i`` quantile of its pre-activation,
    ``p_i`` being its TopK firing rate, so each feature fires about as often as
    before (and the mean L0 stays near ``k``).
    """
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    sample = acts[:32768]
    _, hidden_pre = topk.encode_with_hidden_pre(sample)
    rate = (topk.encode(sample) > 0).float().mean(0)
    sorted_pre = hidden_pre.sort(dim=0).values
    n = sorted_pre.shape[0]
    rank = ((1 - rate) * n).long().clamp(max=n - 1)
    threshold = sorted_pre.gather(0, rank.unsqueeze(0)).squeeze(0)
    floor = threshold[rate > 0].median().item() * 0.05
    threshold = threshold.clamp(min=floor)
    bandwidth = 0.1 * threshold.median().item()
    jr_cfg = JumpReLUTrainingSAEConfig(
        d_in=cfg.d_model,
        d_sae=cfg.d_sae,
        jumprelu_init_threshold=0.0,
        jumprelu_bandwidth=bandwidth,
        jumprelu_sparsity_loss_mode="quadratic",
        jumprelu_ste_to_input=bool(cfg.ste_to_input),
        target_l0=cfg.target_l0,
        l0_coefficient=cfg.l0_coefficient,
        pre_act_loss_coefficient=cfg.pre_act_loss_coefficient,
        metadata=sae_metadata(hook_name, cfg),
    )
    jr = JumpReLUTrainingSAE(jr_cfg)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        getattr(jr, name).copy_(getattr(topk, name))
    jr.threshold.copy_(threshold)
    return jr


def train_jumprelu(cfg: BuildConfig, acts: torch.Tensor, hook_name: str, seed: int):
    """TopK warm start, conversion to per-feature thresholds, JumpReLU fine-tuning."""
    from sae_lens.training.sae_trainer import SAETrainer

    warm = train_topk(cfg, acts, hook_name, cfg.warm_steps, seed)
    jr = topk_to_jumprelu(cfg, warm, acts, hook_name)
    trainer_cfg = trainer_config(cfg, cfg.jumprelu_steps, cfg.jumprelu_lr)
    trainer = SAETrainer(trainer_cfg, jr, batches(acts, cfg.sae_batch, seed + 1))
    trainer.optimizer, trainer.lr_scheduler = threshold_optimizer(
        jr, trainer_cfg, cfg.threshold_lr_scale
    )
    jr = trainer.fit()
    if cfg.calibrate_l0:
        calibrate_thresholds(jr, acts[-32768:], cfg.target_l0)
    with torch.no_grad():
        positive = jr.threshold[jr.threshold > 0]
        jr.threshold.clamp_(min=positive.min().item() if positive.numel() else 1e-3)
    return jr


def threshold_optimizer(jr: Any, trainer_cfg: Any, threshold_lr_scale: float) -> tuple[Any, Any]:
    """Adam with the thresholds in their own parameter group at ``threshold_lr_scale`` x lr.

    Replaces the single-group optimiser that ``SAETrainer`` builds. Adam moves each
    parameter by about one learning rate per step, so at the base rate the thresholds
    barely move while the encoder shifts the pre-activations under them. The schedule
    matches the trainer's (linear warm-up, cosine decay to ``lr_end / lr``) but is a
    multiplier, so each group decays to the same fraction of its own peak.
    """
    threshold = jr.threshold
    others = [p for p in jr.parameters() if p is not threshold]
    optimizer = torch.optim.Adam(
        [
            {"params": others, "lr": trainer_cfg.lr},
            {"params": [threshold], "lr": trainer_cfg.lr * threshold_lr_scale},
        ],
        betas=(trainer_cfg.adam_beta1, trainer_cfg.adam_beta2),
    )
    steps = trainer_cfg.total_training_steps
    warm = trainer_cfg.lr_warm_up_steps
    floor = trainer_cfg.lr_end / trainer_cfg.lr

    def factor(step: int) -> float:
        if step < warm:
            return 1 / warm + (1 - 1 / warm) * step / max(warm - 1, 1)
        progress = min((step - warm) / max(steps - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def calibrate_thresholds(jr: Any, sample: torch.Tensor, target_l0: float) -> None:
    """Re-set every threshold so the mean L0 on ``sample`` is ``target_l0``.

    Each feature keeps its share of the firing: its new rate is its current rate
    times one common factor, ``target_l0 / L0``, and its threshold becomes the
    matching quantile of its pre-activation. A feature that fires keeps firing.
    """
    hidden_pre = jr.encode_with_hidden_pre(sample)[1].float()
    rate = (hidden_pre > jr.threshold).float().mean(0)
    factor = target_l0 / rate.sum().item()
    new_rate = (rate * factor).clamp(max=1.0)
    n = hidden_pre.shape[0]
    rank = ((1 - new_rate) * n).long().clamp(max=n - 1)
    sorted_pre = hidden_pre.sort(dim=0).values
    calibrated = sorted_pre.gather(0, rank.unsqueeze(0)).squeeze(0)
    fires = rate > 0
    jr.threshold[fires] = calibrated[fires].clamp(min=0.0)


def save_sae(training_sae: Any, scale: float, sae_dir: Path) -> None:
    """Fold the input scale into the weights and save the inference SAE in float16."""
    training_sae.fold_activation_norm_scaling_factor(scale)
    state = training_sae.state_dict()
    training_sae.process_state_dict_for_saving_inference(state)
    sae_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().half().contiguous() for k, v in state.items()},
        str(sae_dir / "sae_weights.safetensors"),
    )
    inference_cfg = training_sae.cfg.get_inference_sae_cfg_dict()
    inference_cfg["dtype"] = "float32"
    (sae_dir / "cfg.json").write_text(json.dumps(inference_cfg, indent=2, default=str))


# ------------------------------------------------------------------------------ build


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in APT_PACKAGES:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True
        )
        out[pkg] = result.stdout.strip() or "unknown"
    return out


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(cfg: BuildConfig) -> dict[str, Any]:
    t0 = time.time()
    timings: dict[str, float] = {}
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out, work = Path(cfg.out), Path(cfg.work)
    staging = Path(
        tempfile.mkdtemp(prefix="default_suite_", dir=out.parent if out.parent.exists() else None)
    )

    ensure_packages(cfg.apt)
    sources = write_sources(work)
    train_docs, held_docs = split_corpus(sources)
    log(f"corpus: {len(train_docs)} train / {len(held_docs)} held-out documents")

    tokenizer = train_tokenizer(train_docs, cfg.vocab_size, staging / assets.TOKENIZER_DIR)
    train_tokens = pack(train_docs, tokenizer, cfg.n_ctx)
    held_tokens = pack(held_docs, tokenizer, cfg.n_ctx)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    train_tokens = train_tokens[torch.randperm(train_tokens.shape[0], generator=gen)]
    held_tokens = held_tokens[torch.randperm(held_tokens.shape[0], generator=gen)]
    if held_tokens.shape[0] < cfg.eval_seqs:
        raise ValueError(f"only {held_tokens.shape[0]} held-out sequences; need {cfg.eval_seqs}")
    eval_tokens = held_tokens[: cfg.eval_seqs]
    save_file(
        {
            assets.EVAL_TOKENS_KEY: eval_tokens.to(
                torch.int16 if cfg.vocab_size < 2**15 else torch.int32
            )
        },
        str(staging / assets.EVAL_TOKENS_FILE),
    )
    timings["corpus_and_tokenizer_s"] = time.time() - t0
    log(
        f"tokens: {train_tokens.numel():,} train, {held_tokens.numel():,} held-out "
        f"(vocab {len(tokenizer)})"
    )

    config = model_config(cfg, len(tokenizer))
    model = assets.build_model(config, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer_file = staging / assets.TOKENIZER_DIR / "tokenizer.json"
    cache = work / f"model_{model_stage_key(cfg, tokenizer_file)}"
    reused = cfg.resume and (cache / "lm.json").is_file()
    if reused:
        log(f"reusing the model stage cached in {cache}")
        shutil.copytree(cache / assets.MODEL_DIR, staging / assets.MODEL_DIR)
        lm_record = json.loads((cache / "lm.json").read_text())
        lm_losses = lm_record["losses"]
        timings["lm_training_s"] = lm_record["seconds"]
    else:
        log(f"training a {cfg.n_layers}-layer model with {n_params:,} parameters")
        t = time.time()
        lm_losses = train_model(cfg, model, train_tokens)
        timings["lm_training_s"] = time.time() - t
        save_model(model, config, staging)
        if cache.exists():
            shutil.rmtree(cache)
        shutil.copytree(staging / assets.MODEL_DIR, cache / assets.MODEL_DIR)
        (cache / "lm.json").write_text(
            json.dumps({"losses": lm_losses, "seconds": timings["lm_training_s"]})
        )
    (staging / assets.MANIFEST_FILE).write_text("{}")
    model = assets.load_suite_model(staging)
    hook_names = [f"blocks.{layer}.hook_resid_post" for layer in range(cfg.n_layers)]
    (staging / assets.MANIFEST_FILE).write_text(json.dumps({"saes": {"hook_names": hook_names}}))

    t = time.time()
    clean_ce = assets.compute_model_ce(model, eval_tokens, progress=True)
    test_tokens = eval_tokens[: cfg.test_seqs]
    clean_ce_test = assets.compute_model_ce(model, test_tokens)
    log(f"held-out CE {clean_ce:.4f} nats (test subset {clean_ce_test:.4f})")

    act_tokens = train_tokens[: cfg.act_seqs]
    acts = collect_activations(model, act_tokens, hook_names)
    timings["activations_s"] = time.time() - t
    log(f"activations: {acts[hook_names[0]].shape[0]:,} vectors per hook")

    sae_records: dict[str, dict[str, Any]] = {"jumprelu": {}, "topk": {}}
    t = time.time()
    for layer, hook_name in enumerate(hook_names):
        x = acts[hook_name]
        scale = math.sqrt(cfg.d_model) / x[:65536].norm(dim=-1).mean().item()
        x_scaled = x * scale
        seed = cfg.seed + 1000 * (layer + 1)
        for family in assets.FAMILIES:
            ts = time.time()
            if family == "topk":
                sae = train_topk(cfg, x_scaled, hook_name, cfg.topk_steps, seed + 10)
            else:
                sae = train_jumprelu(cfg, x_scaled, hook_name, seed + 20)
            save_sae(
                sae, scale, staging / assets.SAES_DIR / family / assets.sae_dir_name(hook_name)
            )
            sae_records[family][hook_name] = {
                "seed": seed + (10 if family == "topk" else 20),
                "input_scale": scale,
                "train_seconds": round(time.time() - ts, 1),
            }
            log(f"  {family:8s} SAE {hook_name} trained in {time.time() - ts:.0f}s")
        del acts[hook_name]
    timings["sae_training_s"] = time.time() - t

    t = time.time()
    for family in assets.FAMILIES:
        saes = assets.load_suite_saes(family, staging)  # type: ignore[arg-type]
        for sae in saes:
            hook_name = sae.cfg.metadata.hook_name
            full = assets.compute_sae_metrics(model, sae, eval_tokens, clean_ce_loss=clean_ce)
            test = assets.compute_sae_metrics(model, sae, test_tokens, clean_ce_loss=clean_ce_test)
            sae_records[family][hook_name].update(
                architecture=sae.cfg.architecture(),
                metrics=full.to_dict(),
                test_subset_metrics=test.to_dict(),
            )
            log(
                f"  {family:8s} {hook_name}: EV {full.explained_variance:.3f}  "
                f"L0 {full.l0:.1f}  dead {full.dead_fraction:.3f}  "
                f"CE {full.ce_loss:.3f} (+{full.delta_ce:.3f})"
            )
    timings["evaluation_s"] = time.time() - t
    timings["wall_this_run_s"] = time.time() - t0
    timings["total_s"] = timings["wall_this_run_s"] + (timings["lm_training_s"] if reused else 0.0)

    manifest = {
        "description": (
            "Default suite of sae_match_lens: a small causal HookedTransformer trained on "
            "Debian text packages, and one JumpReLU and one TopK SAE per residual-stream "
            "layer. Metrics are measured on the held-out shard (BOS excluded) after "
            "reloading the float16 files as float32."
        ),
        "build_config": asdict(cfg),
        "build_command": " ".join(sys.argv),
        "torch_version": torch.__version__,
        "sae_lens_version": _version("sae-lens"),
        "transformer_lens_version": _version("transformer-lens"),
        "tokenizers_version": _version("tokenizers"),
        "corpus": {
            "sources": {
                name: {"file": path.name, "sha256": sha256(path), "bytes": path.stat().st_size}
                for name, path in sources.items()
            },
            "debian_packages": package_versions(),
            "bible_command": f'bible -m 8192 "{BIBLE_SPEC}"',
            "held_out_rule": f"document index % {HOLDOUT_EVERY} == {HOLDOUT_OFFSET}, per source",
            "train_documents": len(train_docs),
            "held_out_documents": len(held_docs),
            "train_tokens": int(train_tokens.numel()),
            "held_out_tokens": int(held_tokens.numel()),
        },
        "tokenizer": {
            "kind": "byte-level BPE (tokenizers), PreTrainedTokenizerFast",
            "vocab_size": len(tokenizer),
            "bos_token": BOS,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token": EOS,
            "pad_token": PAD,
        },
        "model": {
            "config": config,
            "n_parameters": n_params,
            "training": {
                "steps": cfg.lm_steps,
                "batch_sequences": cfg.lm_batch,
                "tokens_seen": cfg.lm_steps * cfg.lm_batch * cfg.n_ctx,
                "final_train_loss_mean_last_20": sum(lm_losses[-20:]) / len(lm_losses[-20:]),
            },
            "held_out_ce": clean_ce,
            "test_subset_ce": clean_ce_test,
        },
        "eval_tokens": {
            "file": assets.EVAL_TOKENS_FILE,
            "n_seq": int(eval_tokens.shape[0]),
            "n_ctx": int(eval_tokens.shape[1]),
            "test_subset_n_seq": cfg.test_seqs,
        },
        "saes": {
            "hook_names": hook_names,
            "hook_point": "resid_post (the residual stream after each block)",
            "d_sae": cfg.d_sae,
            "activation_vectors_per_hook": int(act_tokens.shape[0] * (cfg.n_ctx - 1)),
            "families": sae_records,
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "model_stage_reused": reused,
    }
    (staging / assets.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(staging), str(out))
    log(f"wrote {out} ({dir_size(out) / 1e6:.2f} MB) in {timings['total_s'] / 60:.1f} min")
    return manifest


def train_tokens_of_suite(cfg: BuildConfig, out: Path, tokenizer: Any) -> tuple[torch.Tensor, Any]:
    """The training sequences of the suite in ``out``, packed with its shipped tokenizer and
    shuffled as :func:`build` shuffles them; also the corpus record (hashes of the sources)."""
    sources = write_sources(Path(cfg.work))
    train_docs, _ = split_corpus(sources)
    train_tokens = pack(train_docs, tokenizer, cfg.n_ctx)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    train_tokens = train_tokens[torch.randperm(train_tokens.shape[0], generator=gen)]
    record = {name: sha256(path) for name, path in sources.items()}
    return train_tokens, record


def build_modules(cfg: BuildConfig) -> dict[str, Any]:
    """``--stage modules``: JumpReLU SAEs at every block's MLP and attention outputs.

    The suite in ``cfg.out`` keeps everything it has; the new SAEs go to
    ``saes/jumprelu/blocks.L.hook_mlp_out`` and ``.../blocks.L.hook_attn_out`` and the manifest
    gains a ``"module_saes"`` section (hook names, per-SAE seed, input scale, training time and
    metrics on the held-out shard, the corpus hashes they were trained on). The new suite is
    written beside ``out`` and swapped in at the end, so a failed run leaves ``out`` as it was.
    """
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    manifest = assets.load_manifest(out)
    built = manifest["build_config"]
    for key in ("seed", "n_layers", "d_model", "n_ctx", "act_seqs"):
        if built[key] != getattr(cfg, key):
            raise ValueError(f"--{key.replace('_', '-')} {getattr(cfg, key)} differs from the "
                             f"suite's {built[key]} (its manifest's build_config).")
    ensure_packages(cfg.apt)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / assets.TOKENIZER_DIR), local_files_only=True)
    train_tokens, corpus = train_tokens_of_suite(cfg, out, tokenizer)
    shipped = {k: v["sha256"] for k, v in manifest["corpus"]["sources"].items()}
    same_corpus = corpus == shipped
    if not same_corpus:
        log(f"warning: the corpus differs from the one the suite was built on "
            f"({sorted(k for k in corpus if corpus[k] != shipped.get(k))} changed: other Debian "
            "package versions); the module SAEs are trained on this one and the manifest says so")
    model = assets.load_suite_model(out)
    eval_tokens = assets.load_eval_tokens(out)
    test_tokens = eval_tokens[: cfg.test_seqs]
    clean_ce = manifest["model"]["held_out_ce"]
    clean_ce_test = manifest["model"]["test_subset_ce"]
    act_tokens = train_tokens[: cfg.act_seqs]

    staging = Path(tempfile.mkdtemp(prefix="default_suite_", dir=out.parent))
    shutil.rmtree(staging)
    shutil.copytree(out, staging)
    hook_names = {m: [f"blocks.{layer}.{assets.MODULE_HOOKS[m]}" for layer in range(cfg.n_layers)]
                  for m in ("mlp", "attn")}
    records: dict[str, dict[str, Any]] = {}
    t_act = t_train = 0.0
    for layer in range(cfg.n_layers):
        t = time.time()
        hooks = [hook_names[m][layer] for m in ("mlp", "attn")]
        acts = collect_activations(model, act_tokens, hooks)
        t_act += time.time() - t
        for module_index, hook_name in enumerate(hooks):
            x = acts.pop(hook_name)
            scale = math.sqrt(cfg.d_model) / x[:65536].norm(dim=-1).mean().item()
            seed = cfg.seed + 1000 * (layer + 1) + 100 * (module_index + 1) + 20
            ts = time.time()
            sae = train_jumprelu(cfg, x * scale, hook_name, seed)
            save_sae(sae, scale, staging / assets.SAES_DIR / "jumprelu" / assets.sae_dir_name(hook_name))
            records[hook_name] = {"seed": seed, "input_scale": scale,
                                  "train_seconds": round(time.time() - ts, 1)}
            t_train += time.time() - ts
            log(f"  jumprelu SAE {hook_name} trained in {time.time() - ts:.0f}s")
    manifest[assets.MODULE_SAES_KEY] = {
        "hook_names": hook_names,
        "families": {"jumprelu": records},
    }
    (staging / assets.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    t = time.time()
    for module in ("mlp", "attn"):
        for sae in assets.load_suite_saes("jumprelu", staging, module=module):  # type: ignore[arg-type]
            hook_name = sae.cfg.metadata.hook_name
            full = assets.compute_sae_metrics(model, sae, eval_tokens, clean_ce_loss=clean_ce)
            test = assets.compute_sae_metrics(model, sae, test_tokens, clean_ce_loss=clean_ce_test)
            records[hook_name].update(architecture=sae.cfg.architecture(), metrics=full.to_dict(),
                                      test_subset_metrics=test.to_dict())
            log(f"  jumprelu {hook_name}: EV {full.explained_variance:.3f}  L0 {full.l0:.1f}  "
                f"dead {full.dead_fraction:.3f}  CE {full.ce_loss:.3f} (+{full.delta_ce:.3f})")
    manifest[assets.MODULE_SAES_KEY].update({
        "description": ("JumpReLU SAEs at every block's MLP output (hook_mlp_out) and attention "
                        "output (hook_attn_out), trained on the shipped model with the residual "
                        "JumpReLU recipe (TopK warm start, per-feature thresholds, fine-tuning)."),
        "d_sae": cfg.d_sae,
        "activation_vectors_per_hook": int(act_tokens.shape[0] * (cfg.n_ctx - 1)),
        "build_config": asdict(cfg),
        "build_command": " ".join(sys.argv),
        "corpus_sha256": corpus,
        "same_corpus_as_suite": same_corpus,
        "timings_s": {"activations_s": round(t_act, 1), "sae_training_s": round(t_train, 1),
                      "evaluation_s": round(time.time() - t, 1),
                      "total_s": round(time.time() - t0, 1)},
    })
    (staging / assets.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old)
    log(f"added {len(records)} module SAEs to {out} ({dir_size(out) / 1e6:.2f} MB) "
        f"in {(time.time() - t0) / 60:.1f} min")
    return manifest


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main(argv: list[str] | None = None) -> None:
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("warning: OMP_WAIT_POLICY=PASSIVE is not set; torch may slow down badly.")
    cfg = parse_args(argv)
    if cfg.stage not in ("all", "modules"):
        raise SystemExit(f"--stage must be 'all' or 'modules', got {cfg.stage!r}")
    if cfg.stage == "all":
        build(cfg)
    build_modules(cfg)


if __name__ == "__main__":
    main()
