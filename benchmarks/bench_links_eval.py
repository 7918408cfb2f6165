"""Peak memory and time of ``evaluate_links`` at 16k and 65k features, beside earlier code.

Synthetic sparse activations: a small random HookedTransformer (2 layers, d_model 64) and two
JumpReLU SAEs of ``--features`` features reading ``blocks.0`` and ``blocks.1``; B's encoder is
A's plus noise, and every feature's threshold is set so that it fires on about ``--l0 /
--features`` of the tokens (about ``--l0`` features per token). One link method (the planted
identity) is evaluated with the default ceilings (best partner and one-to-one). Each call runs
in a fresh process (this checkout, and each ``--tree NAME=PATH`` checkout, e.g. the code before
sparse counting: ``git worktree add --detach /tmp/today 32b2f01``); the peak resident memory is
sampled every 5 ms during the call, beside the memory before it (model, SAEs, tokens).

Examples:
    python benchmarks/bench_links_eval.py --tree today=/tmp/today
    python benchmarks/bench_links_eval.py --features 65536
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import os, sys, json, time, threading
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig
from sae_match_lens.flow.coactivation import evaluate_links

F, l0, n_seq, seed = (int(v) for v in sys.argv[1:5])
ceilings = sys.argv[5]
torch.manual_seed(seed)
cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=128, d_head=16, n_heads=4,
                              d_vocab=512, act_fn="relu", seed=seed)
model = HookedTransformer(cfg).eval()
tokens = torch.randint(1, 512, (n_seq, 128))
tokens[:, 0] = 0
_, cache = model.run_with_cache(tokens[:16])
W = torch.randn(64, F) / 8.0
saes = []
for layer in range(2):
    sc = JumpReLUSAEConfig(d_in=64, d_sae=F)
    sc.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = JumpReLUSAE(sc)
    w = W if layer == 0 else W + 0.3 * torch.randn(64, F) / 8.0
    x = cache[sc.metadata.hook_name][:, 1:].reshape(-1, 64)
    with torch.no_grad():
        sae.W_enc.data, sae.b_enc.data = w, torch.zeros(F)
        sae.W_dec.data, sae.b_dec.data = w.T.contiguous(), torch.zeros(64)
        pre = x @ w
        sae.threshold.data = torch.quantile(pre, 1 - l0 / F, dim=0).clamp_min(1e-3)
    saes.append(sae)
del cache, pre

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

peak, stop = [rss()], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        stop.wait(0.005)
before = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
table = evaluate_links(model, saes, tokens, {"identity": {(0, 1): torch.arange(F)}},
                       batch_size=8, ceilings=ceilings, progress=False)
seconds = time.perf_counter() - t0
stop.set(); thread.join()
peak[0] = max(peak[0], rss())
row = table.iloc[0]
import sae_match_lens
print(json.dumps({"seconds": seconds, "before": before, "peak": peak[0],
                  "module": sae_match_lens.__file__,
                  "ceiling_best_partner": float(row.ceiling_best_partner),
                  "ceiling_one_to_one": float(row.ceiling_one_to_one),
                  "jaccard": float(row.jaccard), "n_tokens": int(row.n_tokens)}))
"""


def run(tree: Path | None, args: argparse.Namespace, features: int) -> dict | str:
    """One ``evaluate_links`` call of the checkout ``tree`` (this one: ``None``), or the error."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    # run outside any checkout: with ``-c`` the working directory comes first on sys.path
    proc = subprocess.run([sys.executable, "-c", CHILD, str(features), str(args.l0),
                           str(args.sequences), str(args.seed), args.ceilings], env=env,
                          capture_output=True,
                          text=True, check=False, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        return f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--l0", type=int, default=32, help="features firing per token (about)")
    parser.add_argument("--sequences", type=int, default=64, help="sequences of 128 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ceilings", default="both", choices=["both", "best_partner", "none"])
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="an earlier checkout timed too (repeatable)")
    parser.add_argument("--tree-max-features", type=int, default=16384,
                        help="largest size the earlier checkouts are run at (their dense "
                             "F_A x F_B float64 matrix: 2 GiB at 16k, 32 GiB at 65k)")
    args = parser.parse_args()
    trees = [(name, Path(path)) for name, path in (t.split("=", 1) for t in args.tree)]
    print(f"{args.sequences} x 128 tokens, about {args.l0} features firing per token, "
          f"ceilings={args.ceilings!r}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'features':>8} {'code':<16} {'seconds':>8} {'peak GiB':>9} {'+GiB':>6} "
          f"{'best partner':>13} {'one-to-one':>11} {'jaccard':>8}")
    for features in args.features:
        for name, tree in [("this checkout", None), *trees]:
            if tree is not None and features > args.tree_max_features:
                need = features * features * 8 / 2**30
                print(f"{features:>8} {name:<16} not run: its dense co-firing matrix alone "
                      f"needs {need:.0f} GiB")
                continue
            res = run(tree, args, features)
            if isinstance(res, str):
                print(f"{features:>8} {name:<16} {res}")
                continue
            print(f"{features:>8} {name:<16} {res['seconds']:>8.2f} {res['peak'] / 2**30:>9.2f} "
                  f"{(res['peak'] - res['before']) / 2**30:>6.2f} "
                  f"{res['ceiling_best_partner']:>13.6f} {res['ceiling_one_to_one']:>11.6f} "
                  f"{res['jaccard']:>8.6f}  ({res['module']})", flush=True)
    print("peak GiB: resident memory of the process during evaluate_links (model, SAEs and "
          "torch included); +GiB: above the memory just before the call.")


if __name__ == "__main__":
    main()
