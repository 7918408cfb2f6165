"""Atomic writes: one durability policy (fsync the file, replace, fsync the directory), nothing
left behind on any error (KeyboardInterrupt included), and temporaries judged abandoned by pid
on their own host and by a lease on another."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae_match_lens import atomicio
from sae_match_lens.atomicio import (
    LEASE_SECONDS,
    TEMP_SUFFIX,
    atomic_write,
    atomic_write_files,
    host_id,
    is_abandoned,
    keep_fresh,
    remove_abandoned,
    temporary_path,
    write_text,
)


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def test_a_write_replaces_the_file_with_umask_permissions_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    assert write_text(target, "first\n") == target
    write_text(target, "second \u00e9\n")
    assert target.read_bytes() == "second \u00e9\n".encode()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(target.parent) == ["out.json"]


def test_a_writer_that_recreates_its_file_with_0600_still_gets_umask_permissions(tmp_path):
    def recreate(tmp: Path) -> None:
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # as safetensors does
        os.write(fd, b"data")
        os.close(fd)

    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "t.bin", recreate)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "t.bin").stat().st_mode) == 0o644


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failing_writer_leaves_the_target_and_no_temporary(tmp_path, error):
    target = tmp_path / "view.html"
    target.write_text("the user's earlier file")

    def fail(tmp: Path) -> None:
        tmp.write_text("half a file")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, fail)
    assert target.read_text() == "the user's earlier file"
    assert os.listdir(tmp_path) == ["view.html"]


def test_several_files_move_in_only_when_all_are_written(tmp_path):
    a, b = tmp_path / "p.safetensors", tmp_path / "p.safetensors.json"
    atomic_write_files({a: lambda t: t.write_text("A1"), b: lambda t: t.write_text("B1")})

    def fail(tmp: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_files({a: lambda t: t.write_text("A2"), b: fail})
    assert (a.read_text(), b.read_text()) == ("A1", "B1")  # neither replaced
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors", "p.safetensors.json"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_the_durability_policy_fsyncs_the_file_then_renames_then_fsyncs_the_directory(
        tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomicio.os, "fsync", fsync)
    monkeypatch.setattr(atomicio.os, "replace", replace)
    target = tmp_path / "table.parquet"
    write_text(target, "rows")
    monkeypatch.undo()
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert Path(events[0][1]).name.startswith(".table.parquet.")  # the temporary, before
    assert events[0][1].endswith(TEMP_SUFFIX)
    assert events[1][1] == str(target) and events[2][1] == str(tmp_path)  # the directory, after


def test_temporaries_name_their_host_and_process(tmp_path, monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "node-7.cluster.example")
    assert host_id() == "node-7_cluster_example"  # no dots: the name stays parseable
    tmp = temporary_path(tmp_path / "a.b.json")
    assert tmp.name.startswith(f".a.b.json.node-7_cluster_example.{os.getpid()}.")
    assert tmp.name.endswith(TEMP_SUFFIX) and not tmp.exists()


def test_own_host_temporaries_are_judged_by_pid_and_others_by_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(atomicio, "host_id", lambda: "node-b")
    dead = _dead_pid()
    now = time.time()

    def make(host: str, pid: int, age: float) -> Path:
        path = tmp_path / f".out.json.{host}.{pid}.{os.urandom(4).hex()}{TEMP_SUFFIX}"
        path.write_text("partial")
        os.utime(path, (now - age, now - age))
        return path

    mine_dead, mine_live = make("node-b", dead, 0), make("node-b", os.getpid(), 10 * LEASE_SECONDS)
    other_fresh = make("node-a", dead, 0.5 * LEASE_SECONDS)  # its pid means nothing here
    other_stale = make("node-a", dead, 2 * LEASE_SECONDS)
    legacy_fresh = tmp_path / f".out.json.{dead}.0badc0de{TEMP_SUFFIX}"  # no host: lease only
    legacy_fresh.write_text("partial")
    assert is_abandoned(mine_dead) and not is_abandoned(mine_live)
    assert not is_abandoned(other_fresh, now=now) and is_abandoned(other_stale, now=now)
    assert not is_abandoned(legacy_fresh, now=now)
    assert not is_abandoned(tmp_path / "out.json")  # not a temporary
    removed = remove_abandoned(tmp_path / "out.json")
    assert sorted(removed) == sorted([mine_dead, other_stale])
    assert {p.name for p in tmp_path.iterdir()} == {mine_live.name, other_fresh.name,
                                                    legacy_fresh.name}


def test_a_writer_keeps_its_temporary_fresh_while_it_writes(tmp_path):
    tmp = tmp_path / "x"
    tmp.write_text("")
    os.utime(tmp, (1_000, 1_000))
    with keep_fresh(tmp, every=0.01):
        for _ in range(500):  # bounded wait for the first heartbeat, not a timing assertion
            if tmp.stat().st_mtime > 1_000:
                break
            time.sleep(0.01)
    assert tmp.stat().st_mtime > time.time() - LEASE_SECONDS  # another host sees a live lease
