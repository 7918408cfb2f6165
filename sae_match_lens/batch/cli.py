"""``sae-match batch PLAN.yaml --store DIR [--ray ADDRESS]``: run a plan of pair jobs.

Standard library only at import time, so ``sae-match --help`` does not import torch or Ray;
:func:`run` imports :mod:`sae_match_lens.batch.runs` when the command runs. Wired into
:mod:`sae_match_lens.cli` with ``batch_cli.add_parser(sub)``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]

EXIT_FAILED_JOBS = 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``batch`` subcommand to ``subparsers`` (its ``func`` is :func:`run`)."""
    p = subparsers.add_parser(
        "batch", help="run a plan of pair jobs (match/links/compare) into a results store, "
        "locally or on a Ray cluster",
        description="Run the jobs of a YAML plan (see sae_match_lens.batch.runs for the format) that "
        "the store does not hold yet; finished jobs with unchanged inputs and options are skipped.")
    p.add_argument("plan", help="the plan file (YAML): release:, stack: or jobs:")
    p.add_argument("--store", required=True, help="results store directory (created if new; on "
                   "a file system every Ray node sees)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run on Ray: 'auto', HOST:PORT or ray://HOST:PORT joins a cluster, "
                   "'local' starts a local Ray instance (default: no Ray, one job at a time)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="Ray: times a job whose worker died is run again (default: %(default)s)")
    p.add_argument("--cpus", type=float, default=1.0,
                   help="Ray: CPUs reserved per job (default: %(default)s)")
    p.add_argument("--gpus", type=float, default=0.0,
                   help="Ray: GPUs per job; jobs then solve on the GPU (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the plan, print the summary table; 1 when a job failed, else 0."""
    from .runs import batch_match, load_plan

    plan = load_plan(args.plan)
    backend = "local" if args.ray is None else "ray"
    address = None if args.ray in (None, "local") else args.ray
    try:
        report = batch_match(plan, args.store, backend=backend, address=address,
                             max_retries=args.max_retries, num_cpus=args.cpus,
                             num_gpus=args.gpus,
                             progress=not args.quiet)
    except ImportError as exc:  # --ray without Ray: a user error, reported in one line
        raise ValueError(str(exc)) from None
    table = report.summary()
    table["seconds"] = table["seconds"].map(lambda v: "" if v is None or v != v else f"{v:.1f}")
    shown = table.drop(columns=["error"]).fillna("")
    print(shown.to_string(index=False))
    print(f"\n{len(report.records)} jobs: {report.n_ok} ok, {report.n_skipped} skipped "
          f"(already in the store), {report.n_error} failed; {report.wall_seconds:.1f}s "
          f"({backend}). Store: {report.store.root}")
    if report.failed:
        print("\nfailed jobs (run the plan again to retry them):")
        for r in report.failed:
            print(f"  {r.get('label')}: {r.get('error')}")
        return EXIT_FAILED_JOBS
    return 0
