"""Batch runner: a serial loop vs Ray on this machine, on the same plan of pair jobs.

Builds a stack of saved JumpReLU SAEs (``--layers`` layers of ``--d-sae`` features, unrelated
random weights so that every ``match`` does real work, about 5-10 s each on 2 cores), plans every
pair up to ``--distance``, and runs the plan twice into two fresh stores:

* serial: ``batch_match(plan, backend="local")``, one job after another in this process (torch
  uses all cores inside each job);
* Ray, cold: the first ``batch_match(plan, backend="ray")`` of the process, which starts a local
  Ray instance with this machine's CPUs and its workers (each imports torch, SAELens and the package
  on its first job) inside the clock, one task per job (one CPU each);
* Ray, warm: a second run in the same process, which reuses the instance and its warm workers
  (batch runs keep them for the process).

Prints the wall times, both ratios (Ray / serial; target <= 1.15 on 2 cores with jobs of >= 5 s)
and the per-job timeline of each run (start/end offsets, host, pid, attempt).

    python benchmarks/bench_batch.py [--layers 5] [--distance 2] [--d-sae 2048]
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

from sae_match_lens.batch.runs import BatchReport, batch_match, plan_pairs


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
    args = ap.parse_args()
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

    from sae_match_lens.batch.runs import shutdown_ray

    # batch_match starts the local instance itself (all of this machine's CPUs)
    times = {}
    reports = {}
    try:
        for run in ("cold", "warm"):
            t0 = time.time()
            reports[run] = batch_match(plan, root / f"ray_{run}", backend="ray", progress=False)
            times[run] = time.time() - t0
            print(f"\nRay local, {run} ({os.cpu_count()} CPUs, 1 per job): {times[run]:.1f}s "
                  f"({reports[run].n_ok} ok, {reports[run].n_error} failed)")
            print(timeline(reports[run], t0))
    finally:
        shutdown_ray()
    on_ray, t_ray = reports["warm"], times["warm"]
    busy = sum(r["seconds"] for r in on_ray.records)
    print(f"\nratio Ray / serial: cold start {times['cold'] / t_serial:.2f}x (first run of the "
          f"process: Ray start-up and worker imports included), warm {t_ray / t_serial:.2f}x "
          "(second run, same process); target <= 1.15x")
    print(f"mean job: serial {sum(r['seconds'] for r in serial.records) / len(plan):.1f}s, "
          f"Ray {busy / len(plan):.1f}s (one thread each); Ray busy/wall {busy / t_ray:.2f}")


if __name__ == "__main__":
    main()
