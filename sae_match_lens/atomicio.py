"""Atomic file writes with one durability policy, and temporaries that name their writer.

Every user-visible file the package writes in one piece (saved permutations, HTML views, row
logs, the Neuronpedia cache, a store's table, the CLI's outputs) goes through
:func:`atomic_write` (or :func:`write_text`), which always does the same:

1. create an empty temporary beside the target, ``.NAME.HOST.PID.RANDOM.sae-match-tmp``
   (:func:`temporary_path`), with the permissions the umask gives a new file;
2. let the caller fill it (``write(tmp)``), then give it those permissions again (some writers,
   e.g. safetensors, re-create the file with mode 0600);
3. flush it to disk (``fsync``), move it over the target with one ``os.replace``, and ``fsync``
   the directory where the system supports it, so the rename itself survives a power cut;
4. on any error, ``KeyboardInterrupt`` included, delete the temporary and leave the target as it
   was.

A reader therefore sees the old file or the new one, never a mix.

**Whose temporary is it?** A temporary's name holds its writer's host (:func:`host_id`) and
process id. A temporary left by a killed writer is removed by the next write of the same target
(and by :meth:`~sae_match_lens.batch.store.ResultStore.clean` for a results store), but only once it is
known to be abandoned (:func:`is_abandoned`):

* written on *this* host: abandoned when its process no longer runs;
* written on *another* host (a store on a file system shared by several nodes), or named without
  a host (older versions): abandoned when it has not been modified for :data:`LEASE_SECONDS`.
  A live writer refreshes its temporary's modification time every :data:`HEARTBEAT_SECONDS`
  while it writes (:func:`keep_fresh`), so a slow write on another node is never taken for a
  dead one. The hosts' clocks must agree to well within the lease.

The same names and rules serve temporary *directories*
(:func:`~sae_match_lens.savedir.write_directory`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "HEARTBEAT_SECONDS",
    "LEASE_SECONDS",
    "TEMP_SUFFIX",
    "atomic_write",
    "atomic_write_files",
    "fsync_directory",
    "fsync_file",
    "host_id",
    "is_abandoned",
    "keep_fresh",
    "pid_alive",
    "remove_abandoned",
    "temporary_path",
    "write_text",
]

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".sae-match-tmp"
"""Suffix of a temporary file (directories use their own suffixes, same naming)."""
LEASE_SECONDS = 3600.0
"""A temporary of another host (or without a host in its name) is taken for abandoned once its
modification time is this many seconds old."""
HEARTBEAT_SECONDS = 60.0
"""How often a writer refreshes its temporary's modification time while it writes."""

_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_RANDOM = re.compile(r"^[0-9a-f]{8}$")


def host_id() -> str:
    """This host's name as it appears in temporaries' names (``socket.gethostname()``, with
    every character other than letters, digits, ``-`` and ``_`` replaced by ``_``)."""
    return _HOST_UNSAFE.sub("_", socket.gethostname()) or "localhost"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def temporary_path(path: str | os.PathLike[str], suffix: str = TEMP_SUFFIX) -> Path:
    """A fresh name ``.NAME.HOST.PID.RANDOM{suffix}`` beside ``path`` (nothing is created)."""
    path = Path(path)
    return path.parent / f".{path.name}.{host_id()}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"


def _writer(name: str, suffix: str) -> tuple[str | None, int | None]:
    """``(host, pid)`` of the writer a temporary's name records; host None for a name of the
    older ``.NAME.PID.RANDOM`` form, ``(None, None)`` for a name that is not a temporary."""
    if not name.startswith(".") or not name.endswith(suffix):
        return None, None
    parts = name[: -len(suffix)].rsplit(".", 3)
    if len(parts) == 4 and parts[2].isdigit() and _RANDOM.match(parts[3]) and parts[1] and \
            not _HOST_UNSAFE.search(parts[1]):
        return parts[1], int(parts[2])
    if len(parts) >= 3 and parts[-2].isdigit() and _RANDOM.match(parts[-1]):
        return None, int(parts[-2])
    return None, None


def is_abandoned(entry: str | os.PathLike[str], suffix: str = TEMP_SUFFIX, *,
                 lease: float = LEASE_SECONDS, now: float | None = None) -> bool:
    """Whether the temporary ``entry`` was left by a writer that no longer writes it.

    Written on this host (its name holds :func:`host_id`): when its process no longer runs.
    Written on another host, or named without a host: when its modification time is older than
    ``lease`` seconds (module docstring). A name that is not a temporary is never abandoned.

    Args:
        entry: the temporary file or directory.
        suffix: the temporary's suffix (:data:`TEMP_SUFFIX` for files).
        lease: seconds without modification after which another host's temporary is abandoned.
        now: the current time (``time.time()`` when None).
    """
    entry = Path(entry)
    host, pid = _writer(entry.name, suffix)
    if pid is None:
        return False
    if host == host_id():
        return not pid_alive(pid)
    try:
        modified = entry.lstat().st_mtime
    except FileNotFoundError:
        return False
    return (time.time() if now is None else now) - modified > lease


def remove_abandoned(path: str | os.PathLike[str], suffixes: Sequence[str] = (TEMP_SUFFIX,),
                     *, lease: float = LEASE_SECONDS) -> list[Path]:
    """Delete the abandoned temporaries of ``path`` (:func:`is_abandoned`); returns them."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        for suffix in suffixes:
            if entry.name.endswith(suffix) and is_abandoned(entry, suffix, lease=lease):
                logger.info("removing %s, left by an interrupted write of %s", entry, path)
                _remove(entry)
                removed.append(entry)
                break
    return removed


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


@contextlib.contextmanager
def keep_fresh(path: str | os.PathLike[str], every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Refresh ``path``'s modification time every ``every`` seconds while the block runs (the
    lease of a temporary that another host may judge; module docstring)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            with contextlib.suppress(OSError):
                os.utime(path)

    thread = threading.Thread(target=beat, name="sae-match-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: str | os.PathLike[str]) -> bool:
    """Flush a directory's entries (a rename into it) to disk; False where the system or the file
    system does not support it."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return False
    try:
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _new_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_files(writers: Mapping[str | os.PathLike[str], Callable[[Path], None]]) -> list[Path]:
    """Write several files, each through its temporary, and move them in only once all are
    written (module docstring); on any error every temporary is deleted and no target changes.

    Args:
        writers: target path → ``write(tmp)``, which fills the empty temporary file ``tmp``
            (it may also re-create it, as ``safetensors.save_file`` does).

    Returns:
        The targets, in the order given. They are moved in in that order.
    """
    targets = [Path(p) for p in writers]
    temporaries: list[Path] = []
    mode = _new_mode()
    try:
        for target, write in zip(targets, writers.values(), strict=True):
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned(target)
            tmp = _create_temporary(target)
            temporaries.append(tmp)
            with keep_fresh(tmp):
                write(tmp)
            if stat.S_IMODE(tmp.stat().st_mode) != mode:
                os.chmod(tmp, mode)
            fsync_file(tmp)
        for target, tmp in zip(targets, temporaries, strict=True):
            os.replace(tmp, target)
        for directory in dict.fromkeys(t.parent for t in targets):
            fsync_directory(directory)
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        raise
    return targets


def _create_temporary(target: Path) -> Path:
    while True:
        tmp = temporary_path(target)
        try:
            with open(tmp, "x"):
                return tmp
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary beside it, which then replaces
    ``path`` (module docstring). On any error the temporary is deleted and ``path`` is left as
    it was.

    Args:
        path: the file to (re)write; its directory is created when missing.
        write: fills the empty temporary file it is given.

    Returns:
        ``path``.

    Example:
        >>> atomic_write("graph.graphml", graph.save_graphml)
    """
    return atomic_write_files({path: write})[0]


def write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`); returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))
