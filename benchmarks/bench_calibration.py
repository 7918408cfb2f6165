"""Calibration and power of the link and match null model on the default suite (not a timing).

Calibration: link each residual SAE ``l`` of the default suite to an SAE *unrelated* to it built
from SAE ``l+1`` three ways (:mod:`sae_match_lens.nulls`): ``isotropic`` (random directions,
the real norms and biases), ``moment-matched`` (every feature drawn with ``l+1``'s joint mean and
covariance of decoder row, encoder column, ``b_enc`` and log θ) and ``permuted`` (``l+1`` in a
randomly permuted residual basis). No feature has a partner, so the fraction kept at
``null_rate=q`` (links) or matched under ``max_cost="auto"`` (match) should be about ``q``;
the five adjacent pairs are pooled (5,120 source features per cell).

Power: the same fractions on the real adjacent residual pairs (JumpReLU and TopK) and on the
residual → MLP-output pairs of each layer (JumpReLU), and the mean top-1 confidence of the real
adjacent JumpReLU links.

Run: ``python benchmarks/bench_calibration.py [--families jumprelu topk] [--rates 0.01 0.05]``
(about two minutes on two CPU cores). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from sae_match_lens import links, match
from sae_match_lens.assets import load_suite_saes
from sae_match_lens.flow.linking import SCORES
from sae_match_lens.nulls import (
    isotropic_sae,
    moment_matched_sae,
    permuted_residual_sae,
)

CONSTRUCTIONS = {"isotropic": isotropic_sae, "moment-matched": moment_matched_sae,
                 "permuted": permuted_residual_sae}
METRICS = ("mse", "cosine")


def kept(sae_a, sae_b, what: str, rate: float) -> tuple[int, int]:
    """(kept, total) source features of one pair at ``rate`` for a link score or a metric."""
    if what in METRICS:
        result = match(sae_a, sae_b, metric=what, max_cost="auto", null_rate=rate,
                       progress=False)
        return result.permutation.n_matched, result.permutation.n_source
    lk = links(sae_a, sae_b, score=what, null_rate=rate, progress=False)
    return int((lk.top1 >= 0).sum()), int(lk.top1.numel())


def pooled(pairs, what: str, rate: float) -> float:
    got = [kept(a, b, what, rate) for a, b in pairs]
    return sum(k for k, _ in got) / sum(n for _, n in got)


def cell(pairs, what: str, rates) -> str:
    return " / ".join(f"{100 * pooled(pairs, what, r):.1f}%" for r in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["jumprelu", "topk"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.01, 0.05])
    parser.add_argument("--seed", type=int, default=0, help="seed of the unrelated SAEs")
    parser.add_argument("--only", nargs="+", default=None,
                        help="scores and metrics (e.g. csls match:mse) to measure; default all")
    parser.add_argument("--skip-power", action="store_true")
    args = parser.parse_args()
    t0 = time.perf_counter()
    whats = args.only or [*SCORES, *(f"match:{m}" for m in METRICS)]
    stacks = {f: load_suite_saes(f) for f in args.families}
    rates = " / ".join(f"{r:g}" for r in args.rates)
    print(f"Calibration: kept fraction of unrelated features at null_rate {rates} "
          "(adjacent residual pairs of the default suite, pooled)\n")
    header = ["score / metric"] + [f"{f} {c}" for f in args.families for c in CONSTRUCTIONS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    unrelated = {(f, c): [(s[i], build(s[i + 1], seed=args.seed + i))
                          for i in range(len(s) - 1)]
                 for f, s in stacks.items() for c, build in CONSTRUCTIONS.items()}
    for what in whats:
        name = what.removeprefix("match:")
        row = [f"`{what}`" if what in SCORES else f"`match(metric=\"{name}\")`"]
        row += [cell(unrelated[(f, c)], name, args.rates)
                for f in args.families for c in CONSTRUCTIONS]
        print("| " + " | ".join(row) + " |", flush=True)
    if not args.skip_power:
        print(f"\nPower: kept fraction of real features at null_rate {rates}\n")
        header = ["score / metric"] + [f"{f} res→res (adjacent)" for f in args.families]
        header += ["jumprelu res→mlp (same layer)", "mean top-1 confidence (jumprelu adjacent)"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        real = {f: [(s[i], s[i + 1]) for i in range(len(s) - 1)] for f, s in stacks.items()}
        res, mlp = load_suite_saes("jumprelu"), load_suite_saes("jumprelu", module="mlp")
        to_mlp = list(zip(res, mlp, strict=True))
        for what in whats:
            name = what.removeprefix("match:")
            row = [f"`{what}`" if what in SCORES else f"`match(metric=\"{name}\")`"]
            row += [cell(real[f], name, args.rates) for f in args.families]
            row.append(cell(to_mlp, name, args.rates))
            if what in SCORES:
                conf = torch.cat([links(a, b, score=name, progress=False).confidence[:, 0]
                                  for a, b in real.get("jumprelu", [])] or [torch.zeros(0)])
                row.append(f"{float(conf.mean()):.3f} ({100 * float((conf >= 0.99).float().mean()):.0f}%"
                           " ≥ 0.99)")
            else:
                conf = torch.cat([match(a, b, metric=name, max_cost="auto",
                                        progress=False).confidence_F
                                  for a, b in real.get("jumprelu", [])] or [torch.zeros(0)])
                conf = conf.nan_to_num(0.0)
                row.append(f"{float(conf.mean()):.3f} (unmatched as 0)")
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
