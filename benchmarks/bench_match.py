"""Time and peak memory of ``match`` beside scipy's dense ``linear_sum_assignment``.

For each size it builds a synthetic, structured pair of JumpReLU SAEs (features in clusters,
B = A permuted, noised in folded space and re-parametrised with log-normal thresholds), then
in the same run:

1. ``match(sae_a, sae_b)`` — blockwise folded cost matrix + exact solve; wall time and the peak
   resident memory of the process while it runs (sampled every 5 ms);
2. the reference: the same cost matrix, solved by ``scipy.optimize.linear_sum_assignment``;
   its solve time, the ratio, and whether both total costs agree.

Usage::

    python benchmarks/bench_match.py                 # n ∈ {4096, 16384} × d ∈ {768, 2304}
    python benchmarks/bench_match.py --sizes 4096 --dims 768
    python benchmarks/bench_match.py --no-scipy      # skip the (slow) reference solve

Target (2 cores): n=16384, d=2304 exact in ≤ 40 s and ≤ 2.5 GB peak.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import math
import threading
import time

import torch
from sae_lens import JumpReLUSAE

from sae_match_lens.adapters import feature_view
from sae_match_lens.matching import MatchOptions, match
from sae_match_lens.solvers.costs import CostWeights, cost_blocks, stack_features
from sae_match_lens.synthetic import planted_chain


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled)."""

    def __enter__(self) -> PeakMemory:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def synthetic_pair(
    n: int, d: int, *, noise: float = 0.3, seed: int = 0
) -> tuple[JumpReLUSAE, JumpReLUSAE, torch.Tensor]:
    """Two JumpReLU SAEs whose features correspond by a hidden permutation (returned)."""
    planted = planted_chain(2, d_in=d, d_sae=n, noise=noise, seed=seed)
    return planted.saes[0], planted.saes[1], planted.truths[0].indices


def reference_scipy(
    sae_a: JumpReLUSAE, sae_b: JumpReLUSAE
) -> tuple[float, float, float, torch.Tensor]:
    """The same folded cost matrix solved by scipy: (matrix s, solve s, total cost, column of each row)."""
    from scipy.optimize import linear_sum_assignment

    t0 = time.perf_counter()
    w = CostWeights()
    a = stack_features(feature_view(sae_a), w, "mse")
    b = stack_features(feature_view(sae_b), w, "mse")
    C = torch.empty(a.matrix_FK.shape[0], b.matrix_FK.shape[0])
    for _ in cost_blocks(a, b, out=C):
        pass
    del a, b
    C_np = C.numpy()
    t1 = time.perf_counter()
    rows, cols = linear_sum_assignment(C_np)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, float(C_np[rows, cols].astype("float64").sum()), torch.from_numpy(cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 2304])
    parser.add_argument("--no-scipy", action="store_true", help="skip the reference solve")
    parser.add_argument("--solver", default="auto", choices=["auto", "lapjv", "scipy", "sparse"],
                        help="solver of match() (default: %(default)s)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}")
    header = (f"{'n':>6} {'d':>5} | {'match s':>8} {'peak GB':>8} {'+GB':>6} "
              f"{'recall':>6} {'cert':>5} {'solver':>6} | "
              f"{'C s':>6} {'scipy s':>8} {'ratio':>6} {'same cost':>9}")
    print(header)
    print("-" * len(header))
    for d in args.dims:
        for n in args.sizes:
            sae_a, sae_b, perm = synthetic_pair(n, d)
            gc.collect()
            base = rss_bytes()
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                result = match(sae_a, sae_b, options=MatchOptions(solver=args.solver), progress=False)
                seconds = time.perf_counter() - t0
            recall = float((result.permutation.indices == perm).float().mean())
            line = (f"{n:>6} {d:>5} | {seconds:>8.2f} {mem.peak / 1e9:>8.2f} "
                    f"{(mem.peak - base) / 1e9:>6.2f} {recall:>6.3f} {result.certified!s:>5} "
                    f"{result.solver:>6} | ")
            if args.no_scipy:
                print(line + "   (skipped)", flush=True)
                continue
            ours_cost, ours_perm = result.total_cost, result.permutation.indices
            del result
            gc.collect()
            matrix_s, scipy_s, scipy_cost, scipy_cols = reference_scipy(sae_a, sae_b)
            same = math.isclose(ours_cost, scipy_cost, rel_tol=1e-6, abs_tol=1e-6)
            same_perm = torch.equal(ours_perm, scipy_cols.to(torch.int64))
            ratio = (matrix_s + scipy_s) / seconds
            print(line + f"{matrix_s:>6.2f} {scipy_s:>8.2f} {ratio:>6.2f} {same!s:>9} "
                  f"(ours {ours_cost:.8g}, scipy {scipy_cost:.8g}, same permutation {same_perm})",
                  flush=True)
            del sae_a, sae_b
            gc.collect()
    print("match s: whole match() call (fold, cost matrix, solve, dual certificate); peak GB: "
          "process RSS during match(); +GB: above the RSS with both SAEs built; C s / scipy s: the "
          "reference pipeline (same cost matrix, then scipy's linear_sum_assignment); ratio: "
          "reference total / match s.")


if __name__ == "__main__":
    main()
