"""Speed and memory of certified sparse matching against the naive dense pipeline.

Synthetic, structured SAE pairs in folded units: A's features come in clusters of
``--cluster`` siblings (a shared direction plus spread), encoder vectors are noisy copies of the
decoder rows; B is A permuted with noise on every part (per-feature rescaling is left out: folding
removes it exactly). For each size the script prints the time, peak memory, certification and gap
of ``match_features(..., solver="sparse")``, then times the naive dense pipeline (numpy cost
matrix + ``scipy.optimize.linear_sum_assignment``) in the same process when it fits in memory, and
prints the ratio and both total costs.

Examples:
    python benchmarks/bench_scale.py --sizes 16384
    python benchmarks/bench_scale.py --sizes 65536 --no-dense
    python benchmarks/bench_scale.py --big          # adds n = 262144
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import math
import resource
import threading
import time

import numpy as np
import torch

from sae_match_lens.matching import available_bytes, match_features
from sae_match_lens.solvers.costs import StackedFeatures


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RssSampler:
    """Peak resident memory while a block runs (sampled every 20 ms from /proc/self/statm)."""

    def __enter__(self) -> RssSampler:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as fh:
                self.peak = max(self.peak, int(fh.read().split()[1]) * page)
            self._stop.wait(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def synthetic_pair(n: int, d: int, cluster: int, noise: float, seed: int,
                   chunk: int = 8192) -> tuple[StackedFeatures, StackedFeatures, torch.Tensor]:
    """Stacked ``[decoder | encoder | b_enc]`` features of a structured pair (A, B), built in
    chunks of rows (memory: the two stacked matrices), and the planted permutation."""
    gen = torch.Generator().manual_seed(seed)
    K = 2 * d + 1
    centers = torch.randn(math.ceil(n / cluster), d, generator=gen)
    perm = torch.randperm(n, generator=gen)
    inv = torch.argsort(perm)
    A = torch.empty(n, K)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        dec = centers[torch.arange(r0, r1) // cluster] + 0.6 * torch.randn(r1 - r0, d, generator=gen)
        dec /= dec.norm(dim=1, keepdim=True)
        enc = dec + 0.5 / math.sqrt(d) * torch.randn(r1 - r0, d, generator=gen)
        enc /= enc.norm(dim=1, keepdim=True)
        A[r0:r1, :d], A[r0:r1, d:2 * d] = dec, enc
        A[r0:r1, 2 * d] = 0.1 * torch.randn(r1 - r0, generator=gen)
    B = torch.empty(n, K)
    scale = torch.full((K,), noise / math.sqrt(d))
    scale[2 * d] = 0.1 * noise
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        B[r0:r1] = A[inv[r0:r1]] + scale * torch.randn(r1 - r0, K, generator=gen)

    def const(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[r0:r0 + chunk].double().pow(2).sum(1) for r0 in range(0, n, chunk)])

    return StackedFeatures(A, const(A)), StackedFeatures(B, const(B)), perm


def naive_dense(a, b) -> tuple[float, np.ndarray]:
    """The pipeline a user writes first: numpy cost matrix, then scipy's dense solver."""
    from scipy.optimize import linear_sum_assignment

    A, B = a.matrix_FK.numpy(), b.matrix_FK.numpy()
    C = A @ B.T
    C *= -2.0
    C += a.const_F.numpy().astype(np.float32)[:, None]
    C += b.const_F.numpy().astype(np.float32)[None, :]
    np.maximum(C, 0.0, out=C)
    rows, cols = linear_sum_assignment(C)
    return float(C[rows, cols].astype(np.float64).sum()), cols


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--big", action="store_true", help="also n = 262144")
    parser.add_argument("--d", type=int, default=2304, help="residual width d_in")
    parser.add_argument("--k", type=int, default=16, help="candidates per row and column")
    parser.add_argument("--cluster", type=int, default=8, help="siblings per feature cluster")
    parser.add_argument("--noise", type=float, default=0.6, help="noise norm of B's vectors")
    parser.add_argument("--screen-dims", default="auto", help="'auto', 'none' or an integer")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16",
                                                                    "float16"])
    parser.add_argument("--device", default=None, help="e.g. cuda")
    parser.add_argument("--no-dense", action="store_true", help="skip the naive dense baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="    [%(name)s] %(message)s")
    sizes = list(args.sizes) + ([262144] if args.big else [])
    screen = None if args.screen_dims == "none" else (
        "auto" if args.screen_dims == "auto" else int(args.screen_dims))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}, available {available_bytes() / 2**30:.1f} GiB")
    for n in sizes:
        t = time.perf_counter()
        a, b, perm = synthetic_pair(n, args.d, args.cluster, args.noise, args.seed)
        print(f"\nn={n} d={args.d} K={a.matrix_FK.shape[1]}: data {time.perf_counter() - t:.1f}s, "
              f"rss peak {peak_rss_gib():.2f} GiB")
        t = time.perf_counter()
        with RssSampler() as rss:
            res = match_features(a, b, solver="sparse", k=args.k, screen_dims=screen,
                                 precision=args.precision, device=args.device, progress=False)
        t_sparse = time.perf_counter() - t
        peak_sparse = rss.gib
        recovered = float((res.permutation.indices == perm).float().mean())
        print(f"  sparse: {t_sparse:.1f}s, peak rss during the solve {peak_sparse:.2f} GiB "
              f"(inputs {2 * a.matrix_FK.numel() * 4 / 2**30:.2f} GiB), "
              f"certified={res.certified}, gap={res.gap:.3g}, total={res.total_cost:.6f}, "
              f"planted partners recovered {recovered:.3f}, load {os.getloadavg()[0]:.2f}")
        dense_need = 3 * n * n * 4 + 2 * n * n * 8
        if args.no_dense or dense_need > 0.8 * available_bytes():
            print(f"  dense: skipped (needs about {dense_need / 2**30:.0f} GiB)")
            continue
        t = time.perf_counter()
        with RssSampler() as rss:
            total, cols = naive_dense(a, b)
        t_dense = time.perf_counter() - t
        same = bool((torch.from_numpy(cols) == res.permutation.indices).all())
        print(f"  naive dense (numpy + scipy): {t_dense:.1f}s, peak rss {rss.gib:.2f} GiB, "
              f"total={total:.6f}, same permutation={same}")
        print(f"  speed-up {t_dense / t_sparse:.2f}x, |total difference| "
              f"{abs(total - res.total_cost):.3g}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
