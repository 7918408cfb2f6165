"""Atomic result directories: write a whole directory, or leave the old one exactly as it was.

:func:`write_directory` builds the new contents in a temporary directory beside the target
(``.NAME.HOST.PID.RANDOM.sae-match-tmpdir``), then puts it in place with one rename:

* no directory at the target yet: ``rename(tmp, target)``;
* an earlier save there: on Linux the two are swapped atomically
  (``renameat2(RENAME_EXCHANGE)``) and the old contents deleted; where the file system or the
  system cannot swap, the old directory is first renamed aside
  (``.NAME.HOST.PID.RANDOM.sae-match-old``), the new one renamed in, then the old one deleted;
  if the second rename fails, the old directory is renamed back.

A reader therefore sees the old directory or the new one, never a mix. The durability policy is
:mod:`sae_match_lens.atomicio`'s: every file in the new directory and the directory itself are
``fsync``'ed before the rename, and the parent directory after it. Temporaries of writers that
no longer write are removed by the next save of the same target, judged as
:func:`~sae_match_lens.atomicio.is_abandoned` says (this host's by process id, another host's by
a lease that a live writer keeps fresh while it writes). An existing target that is not a
directory of the same ``kind`` (its manifest says so) is never replaced.

Also here: a strict-JSON encoding of result fields (non-finite floats as ``{"float": "inf"}``)
and a checksum over tensors and JSON fields.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomicio import fsync_directory, fsync_file, keep_fresh, remove_abandoned, temporary_path

__all__ = ["decode_json", "encode_json", "is_replaceable", "tensor_checksum", "write_directory"]

logger = logging.getLogger(__name__)

_TMP = ".sae-match-tmpdir"
_OLD = ".sae-match-old"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _beside(path: Path, suffix: str) -> Path:
    return temporary_path(path, suffix)


def read_versioned_manifest(directory: Path, manifest: str, fmt: str, version: int,
                            error: type[Exception], what: str, redo: str) -> dict[str, Any]:
    """Read ``directory/manifest``, a JSON record with ``format`` and ``format_version``.

    Raises ``error`` (naming ``directory``) when the file is unreadable, of another format
    (``what`` names the expected kind, e.g. "saved chain"), or of another version: a newer one
    asks to upgrade sae_match_lens, an older one says ``redo`` (e.g. "re-run match_chain").
    """
    try:
        record = json.loads((directory / manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise error(f"{directory} is not a readable {what} ({manifest}: {exc}).") from exc
    found = record.get("format") if isinstance(record, dict) else None
    if found != fmt:
        raise error(f"{directory} is not a {what}: its {manifest} says format {found!r}, "
                    f"expected {fmt!r}.")
    got = record.get("format_version")
    if got != version:
        newer = isinstance(got, int) and got > version
        raise error(f"{directory} was saved in {fmt} format version {got!r}, but this "
                    f"sae_match_lens reads version {version}; "
                    + ("upgrade sae_match_lens to read it." if newer else f"{redo} to save it again."))
    return record


def _remove_stale(path: Path) -> None:
    """Delete temporaries (and set-aside old copies) of ``path`` whose writer no longer writes."""
    remove_abandoned(path, (_TMP, _OLD))


def _fsync_tree(directory: Path) -> None:
    """``fsync`` every file below ``directory``, then each directory (deepest first)."""
    folders = []
    for root, _, files in os.walk(directory):
        folders.append(root)
        for name in files:
            fsync_file(os.path.join(root, name))
    for folder in reversed(folders):
        fsync_directory(folder)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where that is not available."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_directory(path: str | os.PathLike[str], write: Callable[[Path], None], *,
                    manifest: str, kind: str) -> Path:
    """Write directory ``path`` atomically: ``write(tmp)`` fills a temporary directory, which
    then replaces ``path`` (module docstring).

    Args:
        path: the directory to (re)write.
        write: fills the (empty) temporary directory it is given.
        manifest: the file name inside the directory that records its ``"format"``.
        kind: the ``"format"`` an existing ``path`` must record to be replaced.

    Raises:
        FileExistsError: ``path`` exists and is not an empty directory nor a directory whose
            manifest records ``kind``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_replaceable(path, manifest, kind)
    _remove_stale(path)
    tmp = _beside(path, _TMP)
    tmp.mkdir()
    try:
        with keep_fresh(tmp):
            write(tmp)
        _fsync_tree(tmp)
        _put_in_place(tmp, path)
        fsync_directory(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_replaceable(path: Path, manifest: str, kind: str) -> bool:
    """Whether ``path`` may be replaced by a new save of ``kind``: it does not exist, is an empty
    folder, or is a folder whose ``manifest`` JSON records ``"format": kind``."""
    if not path.exists() and not path.is_symlink():
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()):
        return True
    try:
        found = json.loads((path / manifest).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        found = None
    return found == kind


def _check_replaceable(path: Path, manifest: str, kind: str) -> None:
    if is_replaceable(path, manifest, kind):
        return
    raise FileExistsError(
        f"{path} exists and is not a saved {kind} (no {manifest} recording it); it is left "
        "untouched. Choose another path or remove it."
    )


def _put_in_place(tmp: Path, path: Path) -> None:
    try:
        os.rename(tmp, path)  # atomic; fails when path is a non-empty directory
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
            raise
    if _exchange(tmp, path):
        return  # tmp now holds the old contents; the caller deletes it
    old = _beside(path, _OLD)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def tensor_checksum(tensors: Mapping[str, torch.Tensor], *records: Any) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes (in name order), then the
    canonical JSON of ``records``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    h.update(json.dumps(list(records), sort_keys=True, allow_nan=False).encode())
    return h.hexdigest()


def encode_json(value: Any) -> Any:
    """Strict-JSON copy of ``value``: non-finite floats as ``{"float": "inf"}``, tuples as lists,
    numpy scalars and tensors as numbers and lists, paths as strings."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, Mapping):
        return {str(k): encode_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode_json(v) for v in value]
    if isinstance(value, np.generic):
        return encode_json(value.item())
    if isinstance(value, torch.Tensor):
        return encode_json(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot store a {type(value).__name__} in a JSON manifest.")


def decode_json(value: Any) -> Any:
    """Inverse of :func:`encode_json` (tuples come back as lists)."""
    if isinstance(value, dict):
        if set(value) == {"float"} and isinstance(value["float"], str):
            return float(value["float"])
        return {k: decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    return value
