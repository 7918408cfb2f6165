"""Batch runner: a serial loop vs Ray on this machine, on the same plan of pair jobs.

Builds a stack of saved JumpReLU SAEs (``--layers`` layers of ``--d-sae`` features, unrelated
random weights so that every ``match`` does real work, about 5-10 s each on 2 cores), plans every
pair up to ``--distance``, and runs the plan twice into two fresh stores:

* serial: ``batch_match(plan, backend="local")``, one job after another in this process (torch
  uses all cores inside each job);
* Ray: a local Ray instance with ``--cpus`` CPUs, one task per job (one CPU each), started and
  its workers warmed (each imports torch, SAELens and the package, as a long-running cluster's
  workers have) before the clock; start-up and warm-up are reported separately and as ratios.

Prints both wall times, their ratio (Ray / serial; the issue's target is <= 1.15 on 2 cores with
jobs of >= 5 s) and the per-job timeline of each run (start/end offsets, host, pid, attempt).

    python benchmarks/bench_batch.py [--layers 5] [--distance 2] [--d-sae 2048] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import build_sae

from sae_match_lens.batch import BatchReport, batch_match, plan_pairs


def timeline(report: BatchReport, t0: float) -> str:
    lines = [f"  {'job':<18} {'start':>7} {'end':>7} {'secs':>6}  host/pid (attempt)"]
    for r in sorted(report.records, key=lambda r: r.get("started") or 0):
        lines.append(f"  {r['label']:<18} {r['started'] - t0:7.1f} {r['finished'] - t0:7.1f} "
                     f"{r['seconds']:6.1f}  {r['host']}/{r['pid']} ({r['attempt']})"
                     + ("" if r["status"] == "ok" else f"  ERROR {r['error']}"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--distance", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    import ray
    import torch

    root = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    stack = {}
    for layer in range(args.layers):
        sae = build_sae("jumprelu", d_in=args.d_in, d_sae=args.d_sae, seed=layer,
                        hook_name=f"blocks.{layer}.hook_resid_post")
        sae.save_model(str(root / f"sae{layer}"))
        stack[layer] = str(root / f"sae{layer}")
    plan = plan_pairs(stack, args.distance)
    print(f"plan: {len(plan)} match jobs, {args.layers} SAEs of {args.d_sae} features "
          f"(d_in {args.d_in}), distances 1..{args.distance}; torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs")

    t0 = time.time()
    serial = batch_match(plan, root / "serial", progress=False)
    t_serial = time.time() - t0
    print(f"\nserial loop: {t_serial:.1f}s ({serial.n_ok} ok, {serial.n_error} failed)")
    print(timeline(serial, t0))

    t_init0 = time.time()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    t_init = time.time() - t_init0

    @ray.remote(num_cpus=1)
    def warm() -> int:
        # what every job imports first; a cluster's workers stay warm between jobs
        import sae_lens  # noqa: F401

        import sae_match_lens.batch
        import sae_match_lens.matching  # noqa: F401

        time.sleep(1.0)  # hold the CPU so that each warm-up lands on its own worker
        return os.getpid()

    t_warm0 = time.time()
    pids = ray.get([warm.remote() for _ in range(args.cpus)])
    t_warm = time.time() - t_warm0
    print(f"\nRay workers warmed ({len(set(pids))} processes importing torch/sae_lens): "
          f"{t_warm:.1f}s, not included in the ratio, reported below")
    try:
        t0 = time.time()
        on_ray = batch_match(plan, root / "ray", backend="ray", progress=False)
        t_ray = time.time() - t0
    finally:
        ray.shutdown()
    print(f"\nRay local ({args.cpus} CPUs, 1 per job): {t_ray:.1f}s ({on_ray.n_ok} ok, "
          f"{on_ray.n_error} failed); Ray start-up {t_init:.1f}s not included")
    print(timeline(on_ray, t0))
    busy = sum(r["seconds"] for r in on_ray.records)
    print(f"\nratio Ray / serial: {t_ray / t_serial:.2f}x with warm workers (with the worker "
          f"warm-up {(t_ray + t_warm) / t_serial:.2f}x, and Ray start-up too "
          f"{(t_ray + t_warm + t_init) / t_serial:.2f}x); target <= 1.15x")
    print(f"mean job: serial {sum(r['seconds'] for r in serial.records) / len(plan):.1f}s, "
          f"Ray {busy / len(plan):.1f}s (one thread each); Ray busy/wall {busy / t_ray:.2f}")


if __name__ == "__main__":
    main()
