"""Plans of pair jobs over a stack of SAEs, run locally or on a Ray cluster, into a results store.

A study matches all adjacent pairs of a release and every pair up to a distance ``d``. A *plan*
lists the pair jobs (:class:`PairJob`: source and target :class:`SAERef`, a kind, options);
:func:`batch_match` runs those the store (:class:`~sae_match_lens.batch.store.ResultStore`) does not
hold yet. Each job loads its two SAEs by reference (a release + id, or a directory saved with
``sae.save_model``; no SAE is ever pickled through the scheduler), checks that its memory
estimate fits the free memory of the machine it runs on, folds and solves (on the worker's GPU
when it has one), and writes its result to the store atomically.

Job kinds:

* ``match``: :func:`~sae_match_lens.matching.match` (options: its keyword arguments);
* ``links``: :func:`~sae_match_lens.flow.linking.links` (options: its keyword arguments);
* ``compare``: ``match`` plus two baselines on the same float64 costs, saved in
  ``compare.json``: the total cost of the identity pairing (feature i ↔ feature i, the pairing
  of SAEs trained from a shared initialisation) and of a seeded random permutation, each beside
  the matched total over the same number of pairs.

One option is a test hook for every kind: ``delay_s`` sleeps that many seconds after the
attempt is recorded and before the SAEs are loaded (to kill a worker mid-job in tests). It is
part of the job key like every option.

Backends: ``"local"`` (default) runs the jobs one after another in this process and needs no
Ray. ``"ray"`` runs one Ray task per job (``num_cpus``/``num_gpus`` per task): ``address=None``
starts a local Ray instance, ``"auto"``, ``"host:port"`` or ``"ray://host:port"`` join a running
cluster. A task whose worker process dies is retried by Ray up to ``max_retries`` times; an
exception inside a job is not retried but recorded as the job's error, and the other jobs go on.
The store must be on a file system every node sees (workers write their results themselves).

**Plan files** (YAML, :func:`load_plan`; relative paths are relative to the plan file)::

    # 1. a SAELens release: every pair up to distance 2 of layers 10..14
    release: gemma-scope-2b-pt-res-canonical
    layers: 10-14            # or [10, 11, 12, 13, 14]
    width: 16k               # l0:, hook:, variant: as in resolve_release
    distances: 2             # 1..2; or a list such as [1, 3]
    kind: match              # match | links | compare
    options: {solver: sparse, max_cost: auto}

    # 2. a stack of saved SAE directories ({layer: path}), same keys otherwise
    stack: {3: saes/layer3, 4: saes/layer4, 5: saes/layer5}

    # 3. explicit jobs (refs are {path: DIR} or {release: R, sae_id: ID})
    jobs:
      - source: {path: saes/layer3}
        target: {release: gpt2-small-res-jb, sae_id: blocks.4.hook_resid_pre}
        kind: links
        options: {k: 3}

Example:
    >>> plan = plan_from_release("gemma-scope-2b-pt-res-canonical", range(10, 15), width="16k",
    ...                          distances=range(1, 3))
    >>> report = batch_match(plan, "results/gemma-16k", backend="ray", address="auto")
    >>> report.n_error, ResultStore("results/gemma-16k").chain().trace(42).features
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from tqdm.auto import tqdm

from .plan import (
    JobKind,
    PairJob,
    SAELoader,
    SAERef,
    job_key,
    load_plan,
    plan_from_release,
    plan_pairs,
)
from .store import ResultStore

__all__ = [
    "BatchReport",
    "JobKind",
    "PairJob",
    "SAERef",
    "batch_match",
    "job_key",
    "job_memory_bytes",
    "load_plan",
    "plan_from_release",
    "plan_pairs",
    "shutdown_ray",
]

logger = logging.getLogger(__name__)

RAY_HINT = "install the Ray extra: pip install 'sae-match-lens[ray]'"

# ------------------------------------------------------------------------------ one job


def job_memory_bytes(kind: str, options: Mapping[str, Any], n_a: int, n_b: int,
                     d_in: int, d_out: int | None = None) -> int:
    """Estimated peak memory of one job beyond the loaded SAEs (bytes).

    The folded, stacked features of both SAEs, plus the solver's own need:
    :func:`~sae_match_lens.solvers.sparse.sparse_bytes` on the sparse route, the dense matrix
    ``4·n·n`` (lapjv) or ``3·4·n_a·n_b`` (scipy) on the dense route, the score block buffers for
    links. ``solver="auto"`` is resolved as :func:`~sae_match_lens.matching.match_features`
    resolves it for the size.
    """
    from ..matching import SPARSE_FROM_N
    from ..solvers.screen import block_rows_for
    from ..solvers.sparse import sparse_bytes

    width = (d_out or d_in) + d_in + 1
    features = 2 * (n_a + n_b) * width * 4
    n = max(n_a, n_b)
    if kind == "links":
        rows = options.get("block_rows") or block_rows_for(n)
        return features + 3 * min(rows, n_a) * n_b * 4
    solver = options.get("solver", "auto")
    if solver == "auto":
        small = n < SPARSE_FROM_N and options.get("max_cost") is None
        solver = "lapjv" if small else "sparse"
    if solver == "sparse":
        return features + sparse_bytes(n_a, n_b, int(options.get("k", 16)),
                                       options.get("block_rows"), width,
                                       options.get("screen_dims", "auto"))
    return features + (n * n * 4 if solver == "lapjv" else 3 * n_a * n_b * 4)


def _worker_device() -> str | None:
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _compare_baselines(result: Any, sae_a: Any, sae_b: Any, device: str | None) -> dict[str, Any]:
    """The ``compare`` record: identity and random-permutation totals on the same float64 costs."""
    import numpy as np
    import torch

    from ..adapters import feature_view
    from ..solvers.costs import CostWeights, edge_costs, stack_features

    opts = result.options
    metric = opts.get("metric", "mse")
    w = CostWeights.resolve(opts.get("weights"), metric)
    fold = bool(opts.get("fold", True))
    a = stack_features(feature_view(sae_a, fold=fold), w, metric)
    b = stack_features(feature_view(sae_b, fold=fold), w, metric)
    dev = torch.device(device or "cpu")
    n = min(a.matrix_FK.shape[0], b.matrix_FK.shape[0])
    rows = np.arange(n)
    perm_cols = np.random.default_rng(0).permutation(b.matrix_FK.shape[0])[:n]
    matched = result.permutation.indices.numpy()
    keep = np.flatnonzero(matched >= 0)
    total = float(edge_costs(a, b, keep, matched[keep], dev).sum())
    identity = float(edge_costs(a, b, rows, rows, dev).sum())
    rand = float(edge_costs(a, b, rows, perm_cols, dev).sum())
    return {"matched_pairs": len(keep), "matched_total": total, "identity_pairs": n,
            "identity_total": identity, "random_pairs": n, "random_total": rand,
            "matched_mean": total / max(len(keep), 1), "identity_mean": identity / max(n, 1),
            "random_mean": rand / max(n, 1)}


def run_job(spec: Mapping[str, Any], store_root: str, run: str,
            sae_loader: SAELoader | None = None) -> dict[str, Any]:
    """Run one job (a :func:`_job_spec`) and write its result or its error to the store.

    Every exception is caught and recorded (the job's error); a process killed mid-job
    leaves nothing but a temporary directory that the next writer removes. Returns the record.
    """
    store = ResultStore(store_root, create=False)
    key = spec["key"]
    record: dict[str, Any] = {k: spec[k] for k in ("key", "label", "kind", "source", "target", "options",
                                                    "layer_a", "layer_b", "module_a", "module_b",
                                                    "distance", "source_fingerprint",
                                                    "target_fingerprint")}
    t0 = time.time()
    record.update(host=socket.gethostname(), pid=os.getpid(), started=t0, run=run)
    record["attempt"] = store.begin_attempt(run, key, {"label": spec["label"], "started": t0})
    options = dict(spec["options"])
    write: Callable[[Path], None] | None = None
    try:
        delay = float(options.pop("delay_s", 0) or 0)
        if delay > 0:
            time.sleep(delay)
        device = _worker_device()
        record["device"] = device or "cpu"
        sae_a = SAERef(**spec["source"]).load(sae_loader)
        sae_b = SAERef(**spec["target"]).load(sae_loader)
        t_load = time.time()
        record["seconds_load"] = t_load - t0
        from ..matching import available_bytes

        need = job_memory_bytes(spec["kind"], options, int(sae_a.cfg.d_sae), int(sae_b.cfg.d_sae),
                                int(sae_a.cfg.d_in), getattr(sae_a.cfg, "d_out", None))
        free = available_bytes()
        record["memory_estimate"] = need
        if need > 0.9 * free:
            raise MemoryError(f"needs about {need / 2**30:.2f} GiB but {record['host']} has "
                              f"{free / 2**30:.2f} GiB available; run it on a larger worker or "
                              "use solver='sparse' with a smaller block_rows.")
        if spec["kind"] == "links":
            from ..flow.linking import LinkOptions, links
            from ..options import gather_options
            from .store import save_links

            lk = links(sae_a, sae_b, progress=False,
                       **gather_options(LinkOptions, {**options, "device": device}))

            def write(tmp: Path) -> None:
                save_links(lk, tmp / "links")
        else:
            from ..matching import MatchOptions, match
            from ..options import gather_options

            result = match(sae_a, sae_b, progress=False,
                           **gather_options(MatchOptions, {**options, "device": device}))
            record.update(certified=bool(result.certified), gap=float(result.gap),
                          total_cost=float(result.total_cost),
                          n_matched=int(result.permutation.n_matched), solver=result.solver)
            extra = (_compare_baselines(result, sae_a, sae_b, device)
                     if spec["kind"] == "compare" else None)
            if extra is not None:
                record["compare"] = extra

            def write(tmp: Path) -> None:
                result.save(tmp / "result")
                if extra is not None:
                    (tmp / "compare.json").write_text(json.dumps(extra, indent=1))
        record["seconds_solve"] = time.time() - t_load
        record["status"], record["error"] = "ok", None
    except Exception as exc:  # recorded as the job's error; the run goes on
        logger.warning("job %s failed: %s: %s", spec["label"], type(exc).__name__, exc)
        record.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=8))
        write = None
    record["finished"] = time.time()
    record["seconds"] = record["finished"] - t0
    record["written"] = store.write_job(key, record, write)
    return record


def _job_spec(job: PairJob, key: str, fp_a: str, fp_b: str) -> dict[str, Any]:
    """What travels to a worker: refs, options and the key; never an SAE."""
    return {"key": key, "label": job.label, "kind": job.kind, "source": job.source.as_dict(),
            "target": job.target.as_dict(), "options": dict(job.options),
            "layer_a": job.layer_a, "layer_b": job.layer_b, "module_a": job.module_a,
            "module_b": job.module_b, "distance": job.distance, "source_fingerprint": fp_a,
            "target_fingerprint": fp_b}


# ------------------------------------------------------------------------------ the batch


class BatchReport(NamedTuple):
    """What :func:`batch_match` did."""

    store: ResultStore
    """The results store."""
    records: list[dict[str, Any]]
    """One record per job of the plan, in plan order (a skipped job's is the stored one, with
    ``skipped=True``)."""
    wall_seconds: float
    """Wall time of the run, validation included."""
    backend: str
    """``"local"`` or ``"ray"``."""

    @property
    def n_ok(self) -> int:
        """Jobs that ran and succeeded in this run."""
        return sum(1 for r in self.records if r.get("status") == "ok" and not r.get("skipped"))

    @property
    def n_skipped(self) -> int:
        """Jobs already finished in the store (inputs and options unchanged)."""
        return sum(1 for r in self.records if r.get("skipped"))

    @property
    def n_error(self) -> int:
        """Jobs that failed (their errors are in :attr:`failed`)."""
        return sum(1 for r in self.records if r.get("status") != "ok")

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The records of failed jobs (``label``, ``error``)."""
        return [r for r in self.records if r.get("status") != "ok"]

    def summary(self) -> Any:
        """A table (pandas DataFrame) of the jobs: label, status, seconds, host, attempt,
        certified, error."""
        import pandas as pd

        cols = ["label", "status", "skipped", "seconds", "host", "pid", "attempt", "certified",
                "error"]
        return pd.DataFrame([{c: r.get(c) for c in cols} for r in self.records], columns=cols)


def batch_match(
    plan: Sequence[PairJob],
    store: ResultStore | str | os.PathLike[str],
    *,
    backend: Literal["local", "ray"] = "local",
    address: str | None = None,
    max_retries: int = 3,
    num_cpus: float = 1,
    num_gpus: float = 0,
    sae_loader: SAELoader | None = None,
    connect_timeout: float = 10.0,
    progress: bool = True,
) -> BatchReport:
    """Run the jobs of ``plan`` that ``store`` does not hold yet (module docstring).

    Everything that can be checked before a job starts is checked first: each SAE reference
    exists (its path has a ``cfg.json`` and weights; its release and id are in the registry),
    no two jobs are the same (same kind, inputs and options), the store is of this version, and
    a cluster address answers.

    Args:
        plan: the pair jobs (:func:`plan_pairs`, :func:`plan_from_release`, :func:`load_plan`).
        store: a :class:`~sae_match_lens.batch.store.ResultStore` or its directory (created if new).
        backend: ``"local"`` (in this process, no Ray) or ``"ray"``.
        address: Ray only: ``None`` starts a local instance; ``"auto"``, ``"host:port"`` or
            ``"ray://host:port"`` join a running cluster.
        max_retries: Ray only: how often a job whose worker process died is run again.
        num_cpus: Ray only: CPUs reserved per job.
        num_gpus: Ray only: GPUs reserved per job (the job then solves on the GPU).
        sae_loader: ``(release, sae_id) -> SAE`` for release refs (default
            ``SAE.from_pretrained``); with Ray it must be importable on the workers.
        connect_timeout: Ray only: seconds to wait for a cluster address to answer.
        progress: show a progress bar over jobs.

    Returns:
        A :class:`BatchReport`; the store holds one record per job.

    Raises:
        ValueError: a missing SAE, duplicate jobs, an unknown backend.
        StoreError: a store of another version.
        ConnectionError: an address that does not answer.
        ImportError: ``backend="ray"`` without Ray installed.
    """
    t0 = time.perf_counter()
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}.")
    if backend == "local" and address is not None:
        raise ValueError("address= is for backend='ray'; pass backend='ray' to use a cluster.")
    store = store if isinstance(store, ResultStore) else ResultStore(store)
    specs = _validate(plan)
    records: list[dict[str, Any] | None] = [None] * len(specs)
    pending = []
    for i, spec in enumerate(specs):
        if store.is_finished(spec["key"]):
            records[i] = {**(store.record(spec["key"]) or {}), "skipped": True}
        else:
            pending.append(i)
    logger.info("batch of %d jobs: %d finished in %s, %d to run (%s backend)", len(specs),
                len(specs) - len(pending), store.root, len(pending), backend)
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    bar = tqdm(total=len(specs), initial=len(specs) - len(pending), desc="pair jobs",
               unit="job", disable=not progress)
    try:
        if backend == "local":
            for i in pending:
                records[i] = run_job(specs[i], str(store.root), run, sae_loader)
                bar.update(1)
        elif pending:
            for i, record in _run_ray([specs[i] for i in pending], pending, store, run,
                                      address=address, max_retries=max_retries,
                                      num_cpus=num_cpus, num_gpus=num_gpus,
                                      sae_loader=sae_loader, timeout=connect_timeout):
                records[i] = record
                bar.update(1)
    finally:
        bar.close()
        store.end_run(run)
        store.clean()
    store.write_table()
    report = BatchReport(store, [r or {} for r in records], time.perf_counter() - t0, backend)
    logger.info("batch done in %.1fs: %d ok, %d skipped, %d failed", report.wall_seconds,
                report.n_ok, report.n_skipped, report.n_error)
    return report


def _validate(plan: Sequence[PairJob]) -> list[dict[str, Any]]:
    """Check every ref and refuse duplicate jobs; the specs (with keys) in plan order."""
    if not all(isinstance(j, PairJob) for j in plan):
        raise TypeError("a plan is a sequence of PairJob (plan_pairs, plan_from_release, load_plan).")
    fingerprints: dict[SAERef, str] = {}
    for job in plan:
        for ref in (job.source, job.target):
            if ref not in fingerprints:
                try:
                    ref.validate()
                except ValueError as exc:
                    raise ValueError(f"job {job.label}: {exc} No job was started.") from None
                fingerprints[ref] = ref.fingerprint()
    specs, seen = [], {}
    for job in plan:
        key = job_key(job, fingerprints[job.source], fingerprints[job.target])
        if key in seen:
            raise ValueError(f"the plan lists the same job twice: {seen[key]} and {job.label} "
                             f"({job.source} -> {job.target}, same kind and options); remove "
                             "one. No job was started.")
        seen[key] = job.label
        specs.append(_job_spec(job, key, fingerprints[job.source], fingerprints[job.target]))
    return specs


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast when ``host:port`` (or ``ray://host:port``) does not accept a connection."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} must be 'auto', 'host:port' or 'ray://host:port'.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r} ({exc}); start it "
                              "with 'ray start --head' or check the address. No job was "
                              "started.") from None


def _run_ray(specs: list[dict[str, Any]], index: list[int], store: ResultStore, run: str, *,
             address: str | None, max_retries: int, num_cpus: float, num_gpus: float,
             sae_loader: SAELoader | None, timeout: float):
    """Run ``specs`` as Ray tasks; yields ``(plan index, record)`` as they finish."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"backend='ray' needs Ray: {RAY_HINT}.") from exc
    if address is not None:
        _check_reachable(address, timeout)
    _ray_session(ray, address)
    task = ray.remote(max_retries=max_retries, retry_exceptions=False, num_cpus=num_cpus,
                      num_gpus=num_gpus)(run_job)
    refs = {task.remote(spec, str(store.root.resolve()), run, sae_loader): (i, spec)
            for i, spec in zip(index, specs, strict=True)}
    waiting = list(refs)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        for ref in done:
            i, spec = refs[ref]
            try:
                record = ray.get(ref)
            except Exception as exc:  # the worker died max_retries + 1 times, or Ray failed
                record = _driver_error(store, spec, run, exc, max_retries)
            yield i, record


class _RaySession:
    """The Ray instance this module started or joined, kept for the rest of the process.

    Starting a local instance and warming its workers (each imports torch, SAELens and this
    package on its first job) costs seconds; a second batch run in the same process reuses
    both. The instance is shut down when the process exits, or when a run asks for another
    address. A Ray instance the caller started (``ray.init`` before the first run) is used as
    it is and never shut down here.
    """

    address: str | None = None
    owned: bool = False


def _ray_session(ray: Any, address: str | None) -> None:
    """Start or join Ray for a run at ``address`` (``None``: a local instance), once per process."""
    import atexit

    if ray.is_initialized():
        if not _RaySession.owned or _RaySession.address == address:
            return
        ray.shutdown()
        _RaySession.owned = False
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                 include_dashboard=False if address is None else None)
    except ConnectionError as exc:
        raise ConnectionError(f"cannot join the Ray cluster at {address!r}: {exc} No job "
                              "was started.") from None
    if not _RaySession.owned:
        atexit.register(shutdown_ray)
    _RaySession.address, _RaySession.owned = address, True


def shutdown_ray() -> None:
    """Shut down the Ray instance that batch runs started or joined (they keep it, and its warm
    workers, for the rest of the process); a Ray instance the caller started is left alone."""
    if not _RaySession.owned:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _RaySession.owned = False


def _driver_error(store: ResultStore, spec: Mapping[str, Any], run: str, exc: BaseException,
                  max_retries: int) -> dict[str, Any]:
    """Record a job that Ray gave up on (its worker kept dying) as the job's error."""
    attempts = [n for key, n, _ in store.attempts(run) if key == spec["key"]]
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    record = {k: spec[k] for k in ("key", "label", "kind", "source", "target", "options", "layer_a",
                                   "layer_b", "module_a", "module_b", "distance",
                                   "source_fingerprint", "target_fingerprint")}
    record.update(status="error", run=run, attempt=max(attempts, default=0),
                  error=f"{type(exc).__name__}: {message} (gave up after {max_retries} retries)",
                  host=None, pid=None, finished=time.time())
    record["written"] = store.write_job(spec["key"], record)
    return record

