"""Certified ``match`` beside the public peer, the naive dense pipeline and one GEMM, in one run.

On one structured pair of JumpReLU SAEs (``planted_chain``: features in clusters, B = A
permuted and noised in folded space, log-normal thresholds; the pair ``bench_match.py`` builds)
with the decoder-only cost (folded decoder rows, squared distances), it times:

1. ``match(sae_a, sae_b, weights=decoder only)`` of this checkout (certified, float64-exact),
   and of earlier checkouts given with ``--tree NAME=PATH`` (e.g. the code before the float64
   certificate: ``git worktree add /tmp/precert a4d9360``), each in a fresh process that
   imports its own ``sae_match_lens``;
2. the public peer, re-created: Rusalev's clustering-sae-project (``src/sae_match.py``): squared
   distances of the decoder rows in blocks of 512 rows, each row's 256 nearest columns kept,
   costs rounded ×1000 to int32, and OR-Tools' ``SimpleMinCostFlow`` on those arcs plus one
   fallback arc ``i → i`` per row at a large cost (so a perfect matching always exists). Its
   arcs go in through OR-Tools' vectorised calls (the original adds them one by one in Python,
   which is slower): the peer timed here is if anything faster than the original;
3. the naive dense pipeline: the full float64 cost matrix (float64 GEMM) and
   ``scipy.optimize.linear_sum_assignment`` (skipped when it does not fit in memory);
4. one full-width float32 GEMM of the same shape (``n × d`` times ``d × n``, numpy's BLAS).

Every result's total cost is recomputed here in float64 from direct differences of the folded
decoder rows (the peer is optimal only within its kNN graph, and on its rounded costs).
Ratios are of times measured in this run. Needs the ``bench`` extra (``pip install
sae-match-lens[bench]``: OR-Tools).

Examples:
    git worktree add --detach /tmp/precert a4d9360
    python benchmarks/bench_peers.py --tree precert=/tmp/precert
    python benchmarks/bench_peers.py --n 65536 --no-peer --no-dense --no-gemm
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_match_lens.adapters import feature_view
from sae_match_lens.matching import available_bytes
from sae_match_lens.solvers.costs import CostWeights, StackedFeatures, edge_costs, stack_features
from sae_match_lens.synthetic import planted_chain

DECODER_ONLY = {"decoder": 1.0, "encoder": 0.0, "b_enc": 0.0}
REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, sys, json, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np, torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
import sae_match_lens
from sae_match_lens.matching import match
path, out = sys.argv[1], sys.argv[2]
saes = []
for i, p in enumerate(torch.load(path)):
    cfg = JumpReLUSAEConfig(d_in=p["W_enc"].shape[0], d_sae=p["W_enc"].shape[1])
    cfg.metadata.hook_name = f"blocks.{i}.hook_resid_post"
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        for name, value in p.items():
            getattr(sae, name).data = value
    saes.append(sae)
t0 = time.perf_counter()
res = match(saes[0], saes[1], weights=WEIGHTS, progress=False)
seconds = time.perf_counter() - t0
np.save(out, res.permutation.indices.numpy())
print(json.dumps({"seconds": seconds, "certified": bool(res.certified), "gap": float(res.gap),
                  "total": float(res.total_cost), "module": sae_match_lens.__file__}))
""".replace("WEIGHTS", repr(DECODER_ONLY))


def timed_match(tree: Path | None, sae_file: Path, out: Path) -> tuple[dict, np.ndarray]:
    """``match`` of the checkout ``tree`` (this one: ``None``) in a fresh process."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    # run outside any checkout: with ``-c`` the working directory comes first on sys.path
    proc = subprocess.run([sys.executable, "-c", CHILD, str(sae_file), str(out)], env=env,
                          capture_output=True, text=True, check=False, cwd=sae_file.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"match in {tree or REPO} failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return info, np.load(out)


def peer_match(Wa: torch.Tensor, Wb: torch.Tensor, knn: int = 256, block: int = 512,
               scale: float = 1000.0) -> np.ndarray:
    """The peer re-created (module doc): kNN squared distances, int32 costs, min-cost flow."""
    from ortools.graph.python import min_cost_flow

    n = Wa.shape[0]
    sq_b = Wb.pow(2).sum(1)
    rows, cols, vals = [], [], []
    for i0 in range(0, n, block):
        blk = Wa[i0:i0 + block]
        dist = blk.pow(2).sum(1, keepdim=True) + sq_b - 2 * blk @ Wb.T
        v, j = torch.topk(dist, knn, largest=False)
        rows.append(torch.arange(i0, i0 + len(blk)).unsqueeze(1).repeat(1, knn).flatten())
        cols.append(j.flatten())
        vals.append(v.flatten())
    r = torch.cat(rows).numpy().astype(np.int32)
    c = torch.cat(cols).numpy().astype(np.int32)
    cost = np.round(torch.cat(vals).numpy() * scale).astype(np.int32)
    inf = min(np.iinfo(np.int32).max // 4, int(cost.max()) * 10 + 1)
    mcf = min_cost_flow.SimpleMinCostFlow()
    mcf.set_nodes_supplies(np.arange(2 * n), np.concatenate([np.ones(n), -np.ones(n)]).astype(np.int64))
    mcf.add_arcs_with_capacity_and_unit_cost(r, n + c, np.ones(len(r), np.int64), cost)
    mcf.add_arcs_with_capacity_and_unit_cost(np.arange(n), n + np.arange(n), np.ones(n, np.int64),
                                             np.full(n, inf, np.int64))
    status = mcf.solve()
    if status != mcf.OPTIMAL:
        raise RuntimeError(f"OR-Tools min-cost flow: status {status}")
    tails = np.concatenate([r, np.arange(n)])  # arcs in the order they were added
    heads = np.concatenate([c, np.arange(n)])
    used = np.flatnonzero(mcf.flows(np.arange(mcf.num_arcs())) > 0)
    perm = np.full(n, -1, np.int64)
    perm[tails[used]] = heads[used]
    return perm


def naive_dense(a: StackedFeatures, b: StackedFeatures) -> np.ndarray:
    """Full float64 cost matrix (float64 GEMM) and scipy's ``linear_sum_assignment``."""
    from scipy.optimize import linear_sum_assignment

    A, B = a.matrix_FK.double().numpy(), b.matrix_FK.double().numpy()
    C = A @ B.T
    del A, B
    C *= -2.0
    C += a.const_F.numpy()[:, None]
    C += b.const_F.numpy()[None, :]
    _, cols = linear_sum_assignment(C)
    return cols


def gemm_seconds(a: StackedFeatures, b: StackedFeatures) -> float:
    """One full-width float32 GEMM ``A @ Bᵀ`` of the pair's shape."""
    A, B = a.matrix_FK.numpy(), b.matrix_FK.numpy()
    out = np.empty((A.shape[0], B.shape[0]), dtype=np.float32)
    np.matmul(A[:256], B[:256].T)  # BLAS warm-up
    t0 = time.perf_counter()
    np.matmul(A, B.T, out=out)
    return time.perf_counter() - t0


def exact_total(a: StackedFeatures, b: StackedFeatures, cols: np.ndarray) -> float:
    """Float64 total cost of an assignment, from direct differences."""
    rows = np.flatnonzero(cols >= 0)
    return math.fsum(edge_costs(a, b, rows, cols[rows].astype(np.int64), torch.device("cpu")).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="features per SAE")
    parser.add_argument("--d", type=int, default=2304, help="residual width d_in")
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--knn", type=int, default=256, help="the peer's neighbours per row")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="an earlier checkout whose match() is timed too (repeatable)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--no-gemm", action="store_true")
    args = parser.parse_args()
    trees = [(name, Path(path)) for name, path in (t.split("=", 1) for t in args.tree)]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    t = time.perf_counter()
    planted = planted_chain(2, d_in=args.d, d_sae=args.n, noise=args.noise, seed=args.seed)
    truth = planted.truths[0].indices.numpy()
    w = CostWeights(**DECODER_ONLY)
    a, b = (stack_features(feature_view(s), w, "mse") for s in planted.saes)
    print(f"n={args.n} d={args.d}: pair built in {time.perf_counter() - t:.1f}s "
          "(decoder-only cost: folded decoder rows, squared distances)")
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sae_file = Path(tmp) / "pair.pt"
        torch.save([{name: getattr(s, name).data for name in ("W_enc", "W_dec", "b_enc", "b_dec",
                                                              "threshold")}
                    for s in planted.saes], sae_file)
        del planted
        gc.collect()
        for name, tree in [("this checkout", None), *trees]:
            info, cols = timed_match(tree, sae_file, Path(tmp) / "perm.npy")
            note = (f"certified={info['certified']}, gap={info['gap']:.3g}, "
                    f"planted partners {float((cols == truth).mean()):.3f}, code {info['module']}")
            rows.append((f"match ({name})", info["seconds"], exact_total(a, b, cols), note))
            print(f"  {rows[-1][0]}: {info['seconds']:.2f}s, {note}", flush=True)
    if not args.no_peer:
        gc.collect()
        t = time.perf_counter()
        cols = peer_match(a.matrix_FK, b.matrix_FK, knn=args.knn)
        seconds = time.perf_counter() - t
        note = f"kNN K={args.knn} + OR-Tools, planted partners {float((cols == truth).mean()):.3f}"
        rows.append(("peer", seconds, exact_total(a, b, cols), note))
        print(f"  peer: {seconds:.2f}s", flush=True)
    dense_need = 3 * args.n * args.n * 8
    if not args.no_dense and dense_need < 0.7 * available_bytes():
        gc.collect()
        t = time.perf_counter()
        cols = naive_dense(a, b)
        seconds = time.perf_counter() - t
        rows.append(("naive dense (float64 matrix + scipy)", seconds, exact_total(a, b, cols),
                     f"planted partners {float((cols == truth).mean()):.3f}"))
        print(f"  naive dense: {seconds:.2f}s", flush=True)
    elif not args.no_dense:
        print(f"  naive dense: skipped (needs about {dense_need / 2**30:.0f} GiB)")
    gemm = None
    if not args.no_gemm:
        gc.collect()
        gemm = gemm_seconds(a, b)
        print(f"  one float32 GEMM {args.n}x{args.d} @ {args.d}x{args.n}: {gemm:.2f}s", flush=True)
    ours = rows[0][1]
    best = min(r[2] for r in rows)
    print(f"\n{'pipeline':<40} {'seconds':>8} {'ours / it':>9} {'float64 total cost':>22} "
          f"{'excess':>10}")
    for name, seconds, total, _ in rows:
        print(f"{name:<40} {seconds:>8.2f} {ours / seconds:>9.3f} {total:>22.12f} "
              f"{total - best:>10.3g}")
    if gemm is not None:
        print(f"{'one full-width float32 GEMM':<40} {gemm:>8.2f} {ours / gemm:>9.3f}")
    print("\nours / it: this checkout's match() time over the row's time, measured in this run "
          "(< 1: ours is faster). excess: float64 total minus the lowest total of the run. "
          f"load average at the end {os.getloadavg()[0]:.2f}.")
    for name, _, _, note in rows:
        print(f"  {name}: {note}")


if __name__ == "__main__":
    main()
