"""Batch runner and results store: local backend, reruns, failures, bad input, and a real
multi-node Ray cluster on loopback with a worker killed mid-job."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import build_sae

from sae_match_lens.batch import cli as batch_cli
from sae_match_lens.batch.runs import PairJob, SAERef, _validate, batch_match, load_plan, plan_pairs
from sae_match_lens.batch.store import STORE_VERSION, ResultStore, StoreError, load_links
from sae_match_lens.flow.linking import links
from sae_match_lens.matching import MatchResult, match

WIDTHS = {0: 64, 1: 96, 2: 128, 3: 96, 4: 160}


def _save_stack(root: Path, widths: dict[int, int] = WIDTHS, seed: int = 0) -> dict[int, str]:
    stack = {}
    for layer, d_sae in widths.items():
        sae = build_sae("jumprelu", d_in=32, d_sae=d_sae, seed=seed + layer,
                        hook_name=f"blocks.{layer}.hook_resid_post")
        path = root / f"sae{layer}"
        sae.save_model(str(path))
        stack[layer] = str(path)
    return stack


def _load(path: str):
    return SAERef(path=path).load()


def _assert_same_as_serial(store: ResultStore, record: dict) -> None:
    """The stored result of a job equals a serial ``match``/``links`` of the same pair."""
    options = {k: v for k, v in record["options"].items() if k != "delay_s"}
    sae_a, sae_b = _load(record["source"]["path"]), _load(record["target"]["path"])
    if record["kind"] == "links":
        _assert_same_links(store.links_result(record["key"]),
                           links(sae_a, sae_b, progress=False, **options))
    else:
        _assert_same_match(store.match_result(record["key"], source=sae_a, target=sae_b),
                           match(sae_a, sae_b, progress=False, **options))


def _assert_same_match(stored: MatchResult, serial: MatchResult) -> None:
    assert torch.equal(stored.permutation.indices, serial.permutation.indices)
    assert (stored.certified, stored.gap, stored.total_cost) == (
        serial.certified, serial.gap, serial.total_cost)
    assert torch.equal(stored.cost_F.nan_to_num(-1), serial.cost_F.nan_to_num(-1))


def _assert_same_links(stored, serial) -> None:
    assert torch.equal(stored.indices, serial.indices)
    assert torch.equal(stored.scores.nan_to_num(-9), serial.scores.nan_to_num(-9))


_SERIAL_SCRIPT = """
import json, sys
from pathlib import Path
from sae_match_lens.batch.runs import SAERef
from sae_match_lens.flow.linking import links
from sae_match_lens.matching import match
from sae_match_lens.batch.store import save_links
out = Path(sys.argv[2])
for r in json.loads(Path(sys.argv[1]).read_text()):
    opts = {k: v for k, v in r["options"].items() if k != "delay_s"}
    a, b = SAERef(**r["source"]).load(), SAERef(**r["target"]).load()
    if r["kind"] == "links":
        save_links(links(a, b, progress=False, **opts), out / r["key"])
    else:
        match(a, b, progress=False, **opts).save(out / r["key"])
"""


def _serial_in_one_thread(records: list[dict], tmp_path: Path) -> Path:
    """Serial results of ``records`` computed in a fresh process with OMP_NUM_THREADS=1, the
    setting Ray gives a one-CPU task (the certificate's rounding bound ``gap`` depends on the
    BLAS threading, so the comparison must use the same)."""
    spec, out = tmp_path / "records.json", tmp_path / "serial"
    spec.write_text(json.dumps(records))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _SERIAL_SCRIPT, str(spec), str(out)], check=True,
                   env=env, timeout=300)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    return _save_stack(tmp_path_factory.mktemp("saes"))


def test_local_batch_equals_serial_match_of_every_pair(stack, tmp_path):
    plan = plan_pairs(stack, 2) + plan_pairs(stack, 1, kind="links", options={"k": 2})
    report = batch_match(plan, tmp_path / "store", progress=False)
    assert (report.n_ok, report.n_error, report.n_skipped) == (len(plan), 0, 0)
    store = ResultStore(tmp_path / "store")
    assert len(store.keys()) == len(plan)
    for record in store.records():
        _assert_same_as_serial(store, record)
    assert (tmp_path / "store" / "results.parquet").is_file()
    assert set(store.table().status) == {"ok"}
    assert store.temporaries() == []


def test_store_chain_composes_the_stored_adjacent_matches(stack, tmp_path):
    batch_match(plan_pairs(stack, 2), tmp_path / "store", progress=False)
    chain = ResultStore(tmp_path / "store").chain()
    assert chain.layers == (0, 1, 2, 3, 4)
    serial = [match(_load(stack[i]), _load(stack[i + 1]), progress=False) for i in range(4)]
    for step, ref in zip(chain.steps, serial, strict=True):
        assert torch.equal(step.permutation.indices, ref.permutation.indices)
    assert chain.trace(5).features[:2] == [5, int(serial[0].permutation.indices[5])]


def test_rerun_skips_finished_jobs_and_redoes_changed_inputs_and_options(tmp_path):
    stack = _save_stack(tmp_path / "saes", {0: 64, 1: 64, 2: 64})
    plan = plan_pairs(stack, 1)
    store = tmp_path / "store"
    assert batch_match(plan, store, progress=False).n_ok == 2
    again = batch_match(plan, store, progress=False)
    assert (again.n_skipped, again.n_ok) == (2, 0)
    build_sae("jumprelu", d_in=32, d_sae=64, seed=99,
              hook_name="blocks.2.hook_resid_post").save_model(stack[2])  # new weights at layer 2
    changed = batch_match(plan, store, progress=False)
    assert (changed.n_skipped, changed.n_ok) == (1, 1)
    assert changed.records[1]["label"] == "match L1 -> L2" and not changed.records[1].get("skipped")
    other = batch_match(plan_pairs(stack, 1, options={"max_cost": "auto"}), store, progress=False)
    assert (other.n_skipped, other.n_ok) == (0, 2)
    assert len(ResultStore(store).keys()) == 5


def test_a_failing_job_is_recorded_and_the_others_finish(stack, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(stack[1], bad)
    (bad / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    plan = [*plan_pairs(stack, 1)[:2], PairJob(SAERef(path=str(bad)), SAERef(path=stack[2]))]
    report = batch_match(plan, tmp_path / "store", progress=False)
    assert (report.n_ok, report.n_error) == (2, 1)
    (failed,) = report.failed
    assert failed["source"]["path"] == str(bad) and failed["error"]
    record = ResultStore(tmp_path / "store").record(failed["key"])
    assert record["status"] == "error" and record["error"] == failed["error"]
    retry = batch_match(plan, tmp_path / "store", progress=False)
    assert (retry.n_skipped, retry.n_error) == (2, 1)  # failed jobs are tried again


def test_memory_guard_records_a_job_that_does_not_fit(stack, tmp_path, monkeypatch):
    monkeypatch.setattr("sae_match_lens.matching.available_bytes", lambda: 1000)
    report = batch_match(plan_pairs(stack, 1)[:1], tmp_path / "store", progress=False)
    assert report.n_error == 1 and report.failed[0]["error"].startswith("MemoryError")
    assert "available" in report.failed[0]["error"]


def test_bad_plans_are_refused_before_any_job_starts(stack, tmp_path):
    store = tmp_path / "store"
    plan = plan_pairs(stack, 1)
    with pytest.raises(ValueError, match="same job twice"):
        batch_match([*plan, plan[0]], store, progress=False)
    missing = PairJob(SAERef(path=str(tmp_path / "nowhere")), SAERef(path=stack[0]))
    with pytest.raises(ValueError, match="nowhere.*does not exist"):
        batch_match([*plan, missing], store, progress=False)
    with pytest.raises(ValueError, match="unknown match option"):
        PairJob(SAERef(path=stack[0]), SAERef(path=stack[1]), options={"solvr": "sparse"})
    assert ResultStore(store).keys() == []


def test_a_store_of_another_version_is_refused(stack, tmp_path):
    store = tmp_path / "store"
    ResultStore(store)
    (store / "store.json").write_text(json.dumps({"format": "sae_match_lens.ResultStore",
                                                  "version": STORE_VERSION + 1}))
    with pytest.raises(StoreError, match="upgrade sae_match_lens"):
        batch_match(plan_pairs(stack, 1), store, progress=False)
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a results store"):
        ResultStore(other)


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def test_clean_on_one_host_spares_a_live_writer_on_another_host(tmp_path, monkeypatch):
    """Two simulated hosts share one store: node-a writes a job (slowly, in a thread) while node-b
    cleans. node-a's process id does not run on node-b (the writer is named with a finished
    process's pid), so only the host in the name and the lease keep its temporary alive."""
    from sae_match_lens import atomicio

    host = {"id": "node-a"}
    monkeypatch.setattr("socket.gethostname", lambda: host["id"])
    dead = _dead_pid()
    root = tmp_path / "store"
    store = ResultStore(root)
    inside, release = threading.Event(), threading.Event()

    def slow(tmp: Path) -> None:
        (tmp / "result.bin").write_bytes(b"partial result")
        inside.set()
        release.wait(30)

    real_getpid = os.getpid
    monkeypatch.setattr(os, "getpid", lambda: dead)  # node-a's writer, as node-b sees its pid
    writer = threading.Thread(target=store.write_job, args=(
        "job1", {"status": "ok", "kind": "match", "label": "slow"}, slow))
    writer.start()
    try:
        assert inside.wait(30)
        monkeypatch.setattr(os, "getpid", real_getpid)  # the temporary is named; node-b now
        [live] = store.temporaries()
        assert f".job1.node-a.{dead}." in live.name
        host["id"] = "node-b"
        assert ResultStore(root).clean() == []
        assert (live / "result.bin").read_bytes() == b"partial result"
    finally:
        release.set()
        writer.join()
    assert store.record("job1")["label"] == "slow" and store.temporaries() == []
    # what node-b does remove: node-a's temporary once its lease ran out, its own dead writer's
    now = time.time()
    expired = root / f".job2.node-a.{dead}.0badc0de.sae-match-tmpdir"
    mine = root / f".job3.node-b.{dead}.0badc0de.sae-match-tmpdir"
    fresh = root / f".results.parquet.node-a.{dead}.0badc0de{atomicio.TEMP_SUFFIX}"
    for folder in (expired, mine):
        folder.mkdir()
    fresh.write_bytes(b"")
    old = now - atomicio.LEASE_SECONDS - 60
    os.utime(expired, (old, old))
    assert sorted(ResultStore(root).clean()) == sorted([expired, mine])
    assert store.temporaries() == [fresh]
    assert ResultStore(root).clean(lease=0.0) == [fresh]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_table_write_leaves_the_earlier_table_and_no_temporary(tmp_path, monkeypatch,
                                                                       error):
    import pandas as pd

    store = ResultStore(tmp_path / "store")
    store.write_job("job1", {"status": "error", "kind": "match", "label": "a", "error": "boom"})
    table = store.write_table()
    before = (table.read_bytes(), sorted(os.listdir(store.root)))

    def broken(frame, path, *args, **kwargs):
        Path(path).write_bytes(b"half a table")
        raise error

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    monkeypatch.setattr(pd.DataFrame, "to_json", broken)
    store.write_job("job2", {"status": "error", "kind": "match", "label": "b", "error": "boom"})
    with pytest.raises(type(error)):
        store.write_table()
    assert (table.read_bytes(), sorted(os.listdir(store.root))) == (
        before[0], sorted([*before[1], "job2"]))


def test_plan_file_stack_jobs_and_modules(stack, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    rel = {k: os.path.relpath(v, tmp_path) for k, v in stack.items()}
    plan_file.write_text("stack:\n" + "".join(f"  {k}: {v}\n" for k, v in rel.items())
                         + "distances: 2\nkind: compare\noptions: {solver: scipy}\n")
    jobs = load_plan(plan_file)
    assert jobs == plan_pairs(stack, 2, kind="compare", options={"solver": "scipy"})
    plan_file.write_text(f"jobs:\n  - source: {{path: {rel[0]}}}\n    target: {rel[1]}\n"
                         "    kind: links\n    options: {k: 3}\n")
    (job,) = load_plan(plan_file)
    assert (job.kind, job.options, job.target.path) == ("links", {"k": 3}, stack[1])
    plan_file.write_text("stack: {}\njobs: []\n")
    with pytest.raises(ValueError, match="exactly one of"):
        load_plan(plan_file)
    modules = {layer: {"res": SAERef(path=p), "mlp": SAERef(path=p)} for layer, p in stack.items()}
    flow = plan_pairs(modules, 1, modules=[("res", "res"), ("mlp", "res")])
    assert len(flow) == 4 + 5 and {j.distance for j in flow} == {0, 1}


def test_cli_batch_prints_summary_and_fails_on_a_failed_job(stack, tmp_path, capsys):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("stack:\n" + "".join(f"  {k}: {v}\n" for k, v in stack.items())
                         + "kind: compare\n")
    parser = argparse.ArgumentParser()
    batch_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["batch", str(plan_file), "--store", str(tmp_path / "s"), "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "4 jobs: 4 ok, 0 skipped" in out and "compare L0 -> L1" in out
    compare = json.loads(next((tmp_path / "s").glob("*/compare.json")).read_text())
    assert compare["matched_mean"] <= compare["random_mean"]
    bad = tmp_path / "bad"
    shutil.copytree(stack[0], bad)
    (bad / "sae_weights.safetensors").write_bytes(b"junk")
    plan_file.write_text(f"jobs:\n  - {{source: {bad}, target: {stack[1]}}}\n")
    args = parser.parse_args(["batch", str(plan_file), "--store", str(tmp_path / "s"), "--quiet"])
    assert args.func(args) == 1
    assert "failed jobs" in capsys.readouterr().out


def test_batch_cli_imports_no_heavy_module():
    code = ("import sys, sae_match_lens.batch.cli; "
            "print(sorted(m for m in ('torch', 'ray', 'sae_lens') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ Ray

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray tests need Ray: pip install 'sae-match-lens[ray]'")


RAY_CLI = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head node and one worker node on loopback, one CPU each; torn down with ray stop."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    # Ray enables token authentication when ~/.ray/auth_token exists; give every process of the
    # test cluster (head, worker node, this driver) one explicit token so it never depends on
    # what an earlier Ray run left in the home directory.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY_CLI, "start", "--head", "--port", str(port), "--node-ip-address",
                        "127.0.0.1", "--include-dashboard=false", "--temp-dir", temp, *common],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([RAY_CLI, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address",
                        "127.0.0.1", *common], check=True, env=env, capture_output=True,
                       timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        from sae_match_lens.batch.runs import shutdown_ray

        shutdown_ray()  # batch runs keep their Ray connection for the process
        subprocess.run([RAY_CLI, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.slow
@needs_ray
def test_ray_cluster_survives_a_killed_worker_and_stores_one_result_per_job(stack, tmp_path,
                                                                            cluster):
    plan = plan_pairs(stack, 3) + plan_pairs(stack, 1, kind="links", options={"k": 2})
    slow = plan_pairs(stack, 1, options={"delay_s": 3})[1]  # the job whose worker is killed
    plan.append(slow)
    assert len(plan) >= 12
    store = ResultStore(tmp_path / "store")
    slow_key = _validate([slow])[0]["key"]
    killed: list[int] = []

    def kill_first_attempt_of_slow_job() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            for key, attempt, info in store.attempts():
                if key == slow_key and attempt == 1:
                    time.sleep(0.5)  # mid-job: it sleeps 3 s before loading
                    os.kill(info["pid"], signal.SIGKILL)
                    killed.append(info["pid"])
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_first_attempt_of_slow_job, daemon=True)
    killer.start()
    report = batch_match(plan, store, backend="ray", address=cluster, max_retries=2,
                         progress=False)
    killer.join(timeout=5)
    assert killed, "the slow job's worker was never seen"
    assert (report.n_ok, report.n_error) == (len(plan), 0)
    records = {r["key"]: r for r in store.records()}
    assert len(records) == len(plan) == len(store.keys())  # one result per job, no duplicates
    assert store.temporaries() == [] and not (store.root / ".attempts").exists()
    slow_record = records[slow_key]
    assert slow_record["attempt"] >= 2 and slow_record["pid"] != killed[0]
    assert len({r["pid"] for r in records.values()}) >= 2  # both nodes worked
    serial = _serial_in_one_thread(list(records.values()), tmp_path)
    for key, record in records.items():
        if record["kind"] == "links":
            _assert_same_links(store.links_result(key), load_links(serial / key))
        else:
            _assert_same_match(store.match_result(key), MatchResult.load(serial / key))


@pytest.mark.slow
@needs_ray
def test_ray_unreachable_address_fails_fast_and_leaves_the_store_empty(stack, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot reach the Ray cluster"):
        batch_match(plan_pairs(stack, 1), tmp_path / "store", backend="ray",
                    address=f"127.0.0.1:{_free_port()}", connect_timeout=2, progress=False)
    assert time.perf_counter() - t0 < 10
    assert ResultStore(tmp_path / "store").keys() == []


@needs_ray
@pytest.mark.slow
def test_a_second_local_ray_run_reuses_the_instance_and_its_warm_workers(stack, tmp_path):
    import ray

    from sae_match_lens.batch.runs import shutdown_ray

    plan = plan_pairs(stack, 1)
    shutdown_ray()  # an earlier test's cluster connection, kept for the process
    assert not ray.is_initialized()
    try:
        first = batch_match(plan, tmp_path / "one", backend="ray", progress=False)
        assert ray.is_initialized(), "the local instance is kept for the next run"
        second = batch_match(plan, tmp_path / "two", backend="ray", progress=False)
        pids_first = {r["pid"] for r in first.records}
        pids_second = {r["pid"] for r in second.records}
        assert first.n_ok == second.n_ok == len(plan)
        assert pids_second <= pids_first, "the second run started new workers"
    finally:
        shutdown_ray()
    assert not ray.is_initialized()
