"""The results store of a batch of pair jobs: one atomic result directory per job, and a table.

A store is a directory (local, or on a file system shared by every node of a cluster)::

    STORE/
      store.json                 format name and version (another version is refused)
      <job key>/                 one per job, written atomically (savedir.write_directory)
        job.json                 the record: status ok/error, error text, timings, host, pid,
                                 attempt, certificate, the SAE references and fingerprints
        result/                  kind "match"/"compare": MatchResult.save output
        links/                   kind "links": links.safetensors + links.json (checksummed)
        compare.json             kind "compare": the baselines (:mod:`sae_match_lens.batch.runs`)
      results.parquet            the table of all records (or results.jsonl without pyarrow),
                                 rewritten atomically by :meth:`ResultStore.write_table`
      .attempts/<run>/<key>/N.json   one file per started attempt (its host and pid); the
                                 attempt number is N; a run removes its own when it ends

A job's key hashes its kind, both SAEs' fingerprints and its options
(:func:`sae_match_lens.batch.runs.job_key`), so a job is *finished* when its directory holds an ``ok``
record; changed inputs or options give a new key and the job is done again. A result directory
is built in a temporary directory beside its place and renamed in: a killed writer leaves no
partial result (its temporary is removed by the next writer of that job or by
:meth:`ResultStore.clean`; a temporary names its writer's host and process, and another host's
temporary is removed only after a lease expires, so a clean on one node spares the live writers
of another).
Two attempts of one job that both finish (a retried task whose first worker was only slow)
leave one directory: the later rename replaces the earlier one whole, and an ``ok`` result is
never replaced by a later error. The table is derived from the records, never the other way.

Example:
    >>> store = ResultStore("results/gemma-16k")
    >>> store.table()[["label", "status", "seconds", "certified"]]
    >>> chain = store.chain()            # the adjacent match results as a ChainMatch
    >>> graph = store.flow_graph(stack, (3, 42))   # a FlowGraph from plan_flow's links jobs
    >>> store.match_result(key).permutation.indices[:10]
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..atomicio import LEASE_SECONDS, TEMP_SUFFIX, atomic_write, is_abandoned, write_text
from ..flow.linking import DEFAULT_LINK_SCORE, Links, LinksFileError
from ..matching import MatchResult
from ..savedir import decode_json, encode_json, write_directory

if TYPE_CHECKING:
    from ..flow.graph import FlowGraph, FlowKey

__all__ = ["JOB_FORMAT", "STORE_FORMAT", "STORE_VERSION", "ResultStore", "StoreError", "load_chain",
           "load_flow_graph"]

logger = logging.getLogger(__name__)

STORE_FORMAT = "sae_match_lens.ResultStore"
STORE_VERSION = 1
"""Version of the store layout; a store of another version is refused with what to do."""
JOB_FORMAT = "sae_match_lens.BatchJob"
_STORE_FILE = "store.json"
_RECORD = "job.json"
_ATTEMPTS = ".attempts"
_TMP_SUFFIXES = (".sae-match-tmpdir", ".sae-match-old", TEMP_SUFFIX)


class StoreError(ValueError):
    """A store directory that cannot be used: another format version, or not a store."""


class ResultStore:
    """A directory of batch results (module docstring); creates it when missing.

    Args:
        root: the store directory.
        create: create ``root`` (and its ``store.json``) when it does not exist yet.

    Raises:
        StoreError: ``root`` was written by another store version, or is a non-empty directory
            that is not a store.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        marker = self.root / _STORE_FILE
        if marker.is_file():
            try:
                info = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise StoreError(f"{marker} is unreadable ({exc}); it is not a usable results "
                                 "store. Use another --store directory.") from exc
            if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
                raise StoreError(f"{self.root} is not a sae_match_lens results store ({marker} "
                                 f"says format {info.get('format') if isinstance(info, dict) else info!r}).")
            version = info.get("version")
            if version != STORE_VERSION:
                newer = isinstance(version, int) and version > STORE_VERSION
                raise StoreError(
                    f"{self.root} is a results store of version {version!r}, but this "
                    f"sae_match_lens reads version {STORE_VERSION}; "
                    + ("upgrade sae_match_lens to use it." if newer else
                       "use a new --store directory (or delete this one) and run the plan again.")
                )
            return
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise StoreError(f"{self.root} exists and is not a results store (no {_STORE_FILE}); "
                             "it is left untouched. Choose another store directory.")
        if not create:
            raise StoreError(f"{self.root} is not a results store (no {_STORE_FILE}).")
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(marker, json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}))

    def __repr__(self) -> str:
        return f"ResultStore({str(self.root)!r})"

    def job_dir(self, key: str) -> Path:
        """The directory of job ``key``."""
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid job key {key!r}.")
        return self.root / key

    def keys(self) -> list[str]:
        """Keys of every job directory with a readable record, sorted."""
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / _RECORD).is_file())

    def record(self, key: str) -> dict[str, Any] | None:
        """The record (``job.json``) of job ``key``; None when there is none or it is unreadable."""
        try:
            record = json.loads((self.job_dir(key) / _RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("format") != JOB_FORMAT:
            return None
        return decode_json(record)

    def records(self) -> list[dict[str, Any]]:
        """All job records, by key."""
        return [r for r in (self.record(k) for k in self.keys()) if r is not None]

    def is_finished(self, key: str) -> bool:
        """Whether job ``key`` has an ``ok`` record and its result files (the job is skipped)."""
        record = self.record(key)
        if record is None or record.get("status") != "ok":
            return False
        d = self.job_dir(key)
        needed = {"match": "result/result.json", "compare": "result/result.json",
                  "links": "links/links.json"}.get(record.get("kind", ""), "")
        return bool(needed) and (d / needed).is_file()

    def write_job(self, key: str, record: Mapping[str, Any],
                  write_result: Callable[[Path], None] | None = None) -> bool:
        """Write job ``key``'s directory atomically: ``write_result(tmp)`` fills the result
        files, then the record is written, then the directory is renamed into place.

        Returns False (and writes nothing) when the job already has an ``ok`` result and this
        record is an error: a finished result is never replaced by a failure.
        """
        path = self.job_dir(key)
        if record.get("status") != "ok" and self.is_finished(key):
            logger.info("job %s already has a result; its failed attempt is not recorded", key)
            return False
        text = json.dumps(encode_json({**record, "format": JOB_FORMAT, "key": key}), indent=1,
                          sort_keys=True, allow_nan=False)

        def write(tmp: Path) -> None:
            if write_result is not None:
                write_result(tmp)
            (tmp / _RECORD).write_text(text, encoding="utf-8")

        write_directory(path, write, manifest=_RECORD, kind=JOB_FORMAT)
        return True

    def begin_attempt(self, run: str, key: str, info: Mapping[str, Any]) -> int:
        """Record that an attempt of job ``key`` started in run ``run``; returns its number (1, 2...).

        The attempt's file holds ``info`` plus the host and pid of the caller (the process
        running the job), so an operator (or a test) can see which process runs which job."""
        folder = self.root / _ATTEMPTS / run / key
        folder.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(encode_json({**info, "host": socket.gethostname(), "pid": os.getpid()}))
        n = 1
        while True:
            try:
                fd = os.open(folder / f"{n}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                n += 1
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
            return n

    def attempts(self, run: str | None = None) -> Iterator[tuple[str, int, dict[str, Any]]]:
        """``(key, attempt, info)`` of every recorded attempt (of run ``run``, or of all runs)."""
        base = self.root / _ATTEMPTS
        for f in sorted(base.glob(f"{run or '*'}/*/*.json")):
            try:
                info = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # being written
            yield f.parent.name, int(f.stem), info

    def end_run(self, run: str) -> None:
        """Remove run ``run``'s attempt files (the records keep each job's attempt number)."""
        shutil.rmtree(self.root / _ATTEMPTS / run, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / _ATTEMPTS).rmdir()

    def clean(self, *, lease: float = LEASE_SECONDS) -> list[Path]:
        """Remove temporaries that killed writers left in the store; returns what was removed.

        A temporary's name records its writer's host and process id
        (:mod:`sae_match_lens.atomicio`). One written on this host is removed when its process
        no longer runs; one written on another host of a shared store only when it has not been
        modified for ``lease`` seconds (live writers refresh it every
        :data:`~sae_match_lens.atomicio.HEARTBEAT_SECONDS` while they write), so a clean on one
        node never deletes the temporary of a writer still running on another.

        Args:
            lease: seconds without modification after which another host's temporary counts as
                abandoned (default :data:`~sae_match_lens.atomicio.LEASE_SECONDS`).
        """
        removed = []
        for entry in self.root.iterdir():
            suffix = next((s for s in _TMP_SUFFIXES if entry.name.endswith(s)), None)
            if suffix is None or not is_abandoned(entry, suffix, lease=lease):
                continue
            logger.info("removing %s, left by an interrupted writer", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        return removed

    def temporaries(self) -> list[Path]:
        """Temporary or set-aside files and directories present in the store (none after a
        clean run)."""
        return [e for e in self.root.iterdir() if e.name.endswith(_TMP_SUFFIXES)]

    def match_result(self, key: str, *, source: Any | None = None,
                     target: Any | None = None) -> MatchResult:
        """The stored :class:`~sae_match_lens.matching.MatchResult` of a match/compare job
        (checksum verified; ``source``/``target`` checked like :meth:`MatchResult.load`)."""
        self._require_ok(key, ("match", "compare"))
        return MatchResult.load(self.job_dir(key) / "result", source=source, target=target)

    def links_result(self, key: str) -> Links:
        """The stored :class:`~sae_match_lens.flow.linking.Links` of a links job (checksum verified)."""
        self._require_ok(key, ("links",))
        return load_links(self.job_dir(key) / "links")

    def _require_ok(self, key: str, kinds: tuple[str, ...]) -> dict[str, Any]:
        record = self.record(key)
        if record is None:
            raise KeyError(f"{self.root} has no job {key!r}; its jobs are listed by store.table().")
        if record.get("status") != "ok":
            raise ValueError(f"job {key} ({record.get('label')}) failed: {record.get('error')}; "
                             "run the plan again to retry it.")
        if record.get("kind") not in kinds:
            raise ValueError(f"job {key} is a {record.get('kind')!r} job, not {' or '.join(kinds)}.")
        return record

    def table(self) -> pd.DataFrame:
        """One row per job record: key, label, kind, status, error, layers, timings, host, pid,
        attempt, certificate (``certified``, ``gap``), ``total_cost``, ``n_matched``."""
        columns = ["key", "label", "kind", "status", "error", "layer_a", "layer_b", "module_a",
                   "module_b", "started", "finished", "seconds", "seconds_load", "seconds_solve",
                   "host", "pid", "attempt", "device", "certified", "gap", "total_cost",
                   "n_matched", "source_fingerprint", "target_fingerprint"]
        rows = [{c: r.get(c) for c in columns} for r in self.records()]
        return pd.DataFrame(rows, columns=columns)

    def write_table(self) -> Path:
        """Write :meth:`table` to ``results.parquet`` (``results.jsonl`` without pyarrow),
        atomically (:func:`~sae_match_lens.atomicio.atomic_write`: a failed write leaves the
        earlier table and no temporary); returns the file."""
        frame = self.table()
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            return atomic_write(self.root / "results.jsonl",
                                lambda tmp: frame.to_json(tmp, orient="records", lines=True))
        return atomic_write(self.root / "results.parquet",
                            lambda tmp: frame.to_parquet(tmp, index=False))

    def chain(self, *, kind: str = "match", module: str | None = None,
              options: Mapping[str, Any] | None = None) -> Any:
        """The stored adjacent match results as a :class:`~sae_match_lens.chain.ChainMatch`
        (:func:`load_chain`)."""
        return load_chain(self, kind=kind, module=module, options=options)

    def flow_graph(self, stack: Mapping[int, Any], seed: tuple[int, int], *,
                   score: str = DEFAULT_LINK_SCORE, cut: float = 0.5, module_min: float = 0.15,
                   max_layers: int | None = None, options: Mapping[str, Any] | None = None,
                   progress: bool = False) -> FlowGraph:
        """The :class:`~sae_match_lens.flow.graph.FlowGraph` of ``seed`` from the stored top-1 links
        (:func:`load_flow_graph`; plan them with :func:`~sae_match_lens.batch.plan.plan_flow`).

        Example:
            >>> ResultStore("results/flow").flow_graph(stack, (3, 42)).edges
        """
        return load_flow_graph(self, stack, seed, score=score, cut=cut, module_min=module_min,
                               max_layers=max_layers, options=options, progress=progress)


def load_chain(store: ResultStore, *, kind: str = "match", module: str | None = None,
               options: Mapping[str, Any] | None = None) -> Any:
    """A :class:`~sae_match_lens.chain.ChainMatch` from a store's adjacent match results.

    Takes the ``ok`` jobs of ``kind`` (``"match"`` or ``"compare"``) between consecutive layers
    of the stack the plan was made from (``distance == 1``; for module stacks, same-module jobs
    of ``module``; with ``options``, jobs run with exactly those options), orders them by layer
    and checks that each step starts where the last ended.

    Raises:
        ValueError: no such jobs, a missing step between two layers, or two results for one
            step (the message says which filter tells them apart).
    """
    from ..chain import ChainMatch

    steps: dict[int, tuple[dict[str, Any], MatchResult]] = {}
    for record in store.records():
        if (record.get("status") != "ok" or record.get("kind") != kind
                or record.get("distance") != 1 or record.get("module_a") != record.get("module_b")
                or (module is not None and record.get("module_a") != module)
                or (options is not None and record.get("options") != dict(options))):
            continue
        layer = record.get("layer_a")
        if layer in steps:
            raise ValueError(f"{store.root} holds two adjacent {kind} results from layer {layer} "
                             f"({steps[layer][0]['label']} with options "
                             f"{steps[layer][0].get('options')}, {record['label']} with "
                             f"{record.get('options')}); pass module= or options=.")
        steps[layer] = (record, store.match_result(record["key"]))
    if not steps:
        raise ValueError(f"{store.root} holds no finished adjacent match jobs (distance 1"
                         f"{', module ' + module if module else ''}); run a plan of kind match.")
    ordered = [steps[k] for k in sorted(steps)]
    layers = [ordered[0][0]["layer_a"]]
    for record, _ in ordered:
        if record["layer_a"] != layers[-1]:
            raise ValueError(f"{store.root}: the chain has no step from layer {layers[-1]} to "
                             f"{record['layer_a']}; its adjacent results start at layers "
                             f"{sorted(steps)}.")
        layers.append(record["layer_b"])
    results = tuple(result for _, result in ordered)
    hooks = [results[0].permutation.source["hook_name"]]
    hooks += [r.permutation.target["hook_name"] for r in results]
    options = dict(ordered[0][0].get("options") or {})
    return ChainMatch(steps=results, hook_names=tuple(hooks), layers=tuple(layers),
                      options=options)


class _StoredLinks(Mapping["FlowKey", Links]):
    """Stored links by flow key, each read from the store (checksum verified) when first used."""

    def __init__(self, store: ResultStore, keys: Mapping[FlowKey, str]) -> None:
        self._store, self._keys = store, dict(keys)
        self._loaded: dict[FlowKey, Links] = {}

    def __getitem__(self, key: FlowKey) -> Links:
        if key not in self._loaded:
            self._loaded[key] = self._store.links_result(self._keys[key])
        return self._loaded[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[FlowKey]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _flow_key(record: Mapping[str, Any]) -> FlowKey | None:
    """The flow key (:data:`~sae_match_lens.flow.graph.FlowKey`) a links job's record stands for, or
    None. A job without modules (a plain ``{layer: SAERef}`` stack) links residual SAEs; a job
    run with ``direction="backward"`` stands for its reverse."""
    la, lb = record.get("layer_a"), record.get("layer_b")
    if not isinstance(la, int) or not isinstance(lb, int):
        return None
    ma, mb = record.get("module_a") or "res", record.get("module_b") or "res"
    if (record.get("options") or {}).get("direction", "forward") == "backward":
        la, lb, ma, mb = lb, la, mb, ma
    if ma == mb == "res" and abs(la - lb) == 1:
        return (la, lb, "res")
    if ma == "res" and mb in ("mlp", "attn") and la == lb:
        return (la, lb, mb)
    return None


def load_flow_graph(
    store: ResultStore,
    stack: Mapping[int, Any],
    seed: tuple[int, int],
    *,
    score: str = DEFAULT_LINK_SCORE,
    cut: float = 0.5,
    module_min: float = 0.15,
    max_layers: int | None = None,
    options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> FlowGraph:
    """A :class:`~sae_match_lens.flow.graph.FlowGraph` whose top-1 links come from a store.

    Takes the ``ok`` ``links`` jobs run with ``k=1`` and ``score`` (options left out count at
    :func:`~sae_match_lens.flow.linking.links`' defaults; with ``options``, only jobs run with
    exactly those options), keys each by its layers and modules (residual ``L → L±1``:
    ``(L, L±1, "res")``; residual ``→`` ``mlp``/``attn`` at one layer: ``(L, L, module)``;
    :func:`~sae_match_lens.batch.plan.plan_flow` plans them all) and passes them to
    :func:`~sae_match_lens.flow.graph.flow_graph` as ``links_by_key``. Each stored link set is read
    (checksum verified) only when the walk reaches it. Links the store lacks (another score, a
    layer not planned) are computed and logged, as ``flow_graph`` does.

    The loaded SAEs are still needed: the graph's hooks, widths and Neuronpedia ids come from
    them, and every stored link set used is checked against them (its recorded source and target
    identities: hook, sizes, architecture, direction signature), so links made for other SAEs
    are refused, never silently used.

    Args:
        store: the results store.
        stack: the loaded SAEs, ``{layer: LayerSAEs}`` (or ``{layer: residual SAE}``).
        seed: ``(layer, feature)`` of the residual seed feature.
        score: as in :func:`~sae_match_lens.flow.graph.flow_graph`.
        cut: as in :func:`~sae_match_lens.flow.graph.flow_graph`.
        module_min: as in :func:`~sae_match_lens.flow.graph.flow_graph`.
        max_layers: as in :func:`~sae_match_lens.flow.graph.flow_graph`.
        progress: as in :func:`~sae_match_lens.flow.graph.flow_graph`.
        options: use only jobs whose options equal these exactly (to choose between stored
            results that differ in other options).

    Raises:
        ValueError: two stored results fit one key within the stack (listed, with how they
            differ), ``options`` naming another score or ``k``, or a stored link set that does
            not fit the stack (from ``flow_graph``).

    Example:
        >>> batch_match(plan_flow(refs), "results/flow", backend="local")
        >>> stack = {L: LayerSAEs(**{m: r.load() for m, r in refs[L].items()}) for L in refs}
        >>> load_flow_graph(ResultStore("results/flow"), stack, (1, 42)).nodes
    """
    from ..flow.graph import as_stack, flow_graph
    from ..flow.linking import links

    defaults = {name: p.default for name, p in inspect.signature(links).parameters.items()}
    if options is not None:
        wanted = {**defaults, **dict(options)}
        if wanted["k"] != 1 or wanted["score"] != score:
            raise ValueError(f"options={dict(options)} say k={wanted['k']}, score="
                             f"{wanted['score']!r}; a flow graph by score={score!r} reads k=1 "
                             f"links by {score!r}.")
    layers = as_stack(stack)
    found: dict[FlowKey, list[dict[str, Any]]] = {}
    for record in store.records():
        opts = record.get("options") or {}
        if (record.get("status") != "ok" or record.get("kind") != "links"
                or opts.get("k", defaults["k"]) != 1
                or opts.get("score", defaults["score"]) != score
                or (options is not None and opts != dict(options))):
            continue
        key = _flow_key(record)
        if key is None or key[0] not in layers or key[1] not in layers or (
                key[2] != "res" and layers[key[0]].get(key[2]) is None):
            continue
        found.setdefault(key, []).append(record)
    for key, records in found.items():
        if len(records) > 1:
            listed = "; ".join(f"{r['key']} ({r.get('label')}, {r.get('source')} -> "
                               f"{r.get('target')}, options {r.get('options')})" for r in records)
            raise ValueError(f"{store.root} holds {len(records)} finished k=1 {score} links "
                             f"results for flow key {key}: {listed}. Pass options= to choose "
                             "one, or keep one stack and one option set per store.")
    logger.info("flow graph from %s: %d stored link sets fit the stack", store.root, len(found))
    stored = _StoredLinks(store, {key: records[0]["key"] for key, records in found.items()})
    return flow_graph(layers, seed, score=score, cut=cut,  # type: ignore[arg-type]
                      module_min=module_min, max_layers=max_layers, progress=progress,
                      links_by_key=stored)


def save_links(lk: Links, directory: Path) -> Path:
    """Write :class:`~sae_match_lens.flow.linking.Links` to ``directory`` (:meth:`Links.save
    <sae_match_lens.flow.linking.Links.save>`)."""
    return lk.save(directory)


def load_links(directory: Path) -> Links:
    """Read :class:`~sae_match_lens.flow.linking.Links` written by :func:`save_links`
    (:meth:`Links.load <sae_match_lens.flow.linking.Links.load>`).

    Raises:
        StoreError: the directory is not readable, current, intact saved links.
    """
    try:
        return Links.load(directory)
    except LinksFileError as exc:
        raise StoreError(f"{exc} (a stored links job: run the plan again to redo it)") from exc
