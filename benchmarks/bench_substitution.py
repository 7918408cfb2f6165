"""Speed of block substitution: evaluation overhead and the true-skip saving.

Prints, measured in one run on the same random model and tokens:

1. tokens/s of ``evaluate_substitution`` (one pair, one variant, permutation computed beforehand)
   against a clean ``run_with_cache`` of the pair's two hooks, and their ratio;
2. the wall time of ``run_skipping`` (blocks between A and B not computed) against the hook
   route (``substitute``), and the saving.

Timings interleave the contenders and report medians, so load from other processes hits both.

Usage: ``python benchmarks/bench_substitution.py [--layers 6] [--d-model 256] [--d-sae 4096]``
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_match_lens.evaluation import EvalOptions, evaluate_substitution
from sae_match_lens.lens.hooks import block_substitute, run_skipping, substitute
from sae_match_lens.matching import match


def random_sae(hook_name: str, d_in: int, d_sae: int, seed: int) -> JumpReLUSAE:
    """A JumpReLU SAE with random weights and thresholds that let ~5-10% of features fire."""
    gen = torch.Generator().manual_seed(seed)
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook_name
    sae = JumpReLUSAE(cfg)
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T)
        sae.b_enc.zero_()
        sae.threshold.copy_(0.1 + 0.1 * torch.rand(d_sae, generator=gen))
    return sae


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each contender over ``repeats`` interleaved runs (after one warm-up)."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def _metrics(logits_clean: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """The per-batch metric work of one variant: both log-softmaxes, CE, KL by dot products."""
    v = logits.shape[-1]

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a.reshape(-1, 1, v), b.reshape(-1, v, 1)).reshape(a.shape[:-1])

    logp_clean = torch.log_softmax(logits_clean, -1)
    p_clean = logp_clean.exp()
    logp = torch.log_softmax(logits, -1)
    targets = tokens[:, 2:, None]
    ce = logp_clean[:, 1:-1].gather(-1, targets).sum() - logp[:, 1:-1].gather(-1, targets).sum()
    kl = (dot(p_clean, logp_clean) - dot(p_clean, logp))[:, 1:].sum()
    return float(ce + kl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-vocab", type=int, default=8192)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--n-seq", type=int, default=32, help="sequences (tokens = n_seq*seq_len)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=args.layers, d_model=args.d_model, n_ctx=args.seq_len, d_head=64,
        n_heads=args.d_model // 64, d_vocab=args.d_vocab, act_fn="gelu", seed=0, device="cpu",
    )
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(1, args.d_vocab, (args.n_seq, args.seq_len))
    tokens[:, 0] = 0
    n_tokens = tokens.numel()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: "
          f"{args.layers} layers, d_model {args.d_model}, d_vocab {args.d_vocab}; "
          f"SAEs d_sae {args.d_sae}; {n_tokens} tokens in batches of "
          f"{args.batch_size}x{args.seq_len}")

    a, b = args.layers // 2 - 1, args.layers // 2
    sae_a = random_sae(f"blocks.{a}.hook_resid_post", args.d_model, args.d_sae, 1)
    sae_b = random_sae(f"blocks.{b}.hook_resid_post", args.d_model, args.d_sae, 2)
    t0 = time.perf_counter()
    result = match(sae_a, sae_b, progress=False)
    print(f"match({args.d_sae} x {args.d_sae}) once, not counted below: "
          f"{time.perf_counter() - t0:.2f} s")

    names = [sae_a.cfg.metadata.hook_name, sae_b.cfg.metadata.hook_name]
    batches = tokens.split(args.batch_size)

    def clean() -> None:
        with torch.no_grad():
            for batch in batches:
                model.run_with_cache(batch, names_filter=names)

    def evaluate() -> None:
        evaluate_substitution(model, [sae_a, sae_b], tokens, variants=["folded"],
                              permutations={(0, 1): result},
                              options=EvalOptions(batch_size=args.batch_size),
                              progress=False)

    t = interleaved({"clean": clean, "evaluate": evaluate}, args.repeats)
    print(f"\n[1] pair {names[0]} -> {names[1]}, variant 'folded'")
    print(f"  clean run_with_cache of the two hooks: {n_tokens / t['clean']:9.0f} tokens/s")
    print(f"  evaluate_substitution:                 {n_tokens / t['evaluate']:9.0f} tokens/s")
    print(f"  overhead (evaluate / clean wall time): {t['evaluate'] / t['clean']:.2f}x "
          "(target <= 1.3x)")

    batch = batches[0]
    sub = block_substitute(sae_a, sae_b, result)
    start = b + 1
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=names)
        h_A, h_B = cache[names[0]], cache[names[1]]
        f_A = sub.encode_a(h_A)
        h_hat = sub(h_A, f_A=f_A)
        logits = model(batch)
        parts = interleaved({
            "clean forward": lambda: model(batch),
            f"forward from block {start}": lambda: model(h_hat, start_at_layer=start),
            "SAE A encode + move + SAE B decode": lambda: sub(h_A),
            "SAE B encode (co-activation)": lambda: sae_b.encode(h_B),
            "log-softmax, CE, KL (one variant)": lambda: _metrics(logits, logits, batch),
        }, args.repeats)
    print(f"  per batch of {batch.numel()} tokens:")
    for name, seconds in parts.items():
        print(f"    {name:36s} {seconds * 1000:8.1f} ms")
    floor = sum(parts.values()) / parts["clean forward"]
    print(f"  sum of the parts / clean forward: {floor:.2f}x (the work any evaluation of this "
          "pair must do)")

    first, last = 0, args.layers - 2
    skip_a = random_sae(f"blocks.{first}.hook_resid_post", args.d_model, args.d_sae, 3)
    skip_b = random_sae(f"blocks.{last}.hook_resid_post", args.d_model, args.d_sae, 4)
    skip_result = match(skip_a, skip_b, progress=False)

    def hook_route() -> None:
        with torch.no_grad(), substitute(model, skip_a, skip_b, skip_result):
            for batch in batches:
                model(batch, return_type="loss")

    def skip_route() -> None:
        with torch.no_grad():
            for batch in batches:
                run_skipping(model, batch, skip_a, skip_b, skip_result)

    t = interleaved({"hooks": hook_route, "skip": skip_route}, args.repeats)
    print(f"\n[2] substitute blocks {first + 1}..{last} "
          f"({skip_a.cfg.metadata.hook_name} -> {skip_b.cfg.metadata.hook_name}), loss only")
    print(f"  hook route (blocks computed, overwritten): {t['hooks']:.3f} s")
    print(f"  true skip (blocks not computed):           {t['skip']:.3f} s")
    print(f"  saving: {1 - t['skip'] / t['hooks']:.0%} of the hook route's wall time "
          f"({last - first} of {args.layers} blocks skipped)")


if __name__ == "__main__":
    main()
