"""Resumable row logs, keyed on everything that determines their rows.

A :class:`RowLog` is the append-only JSON-lines file behind every loop that must not lose
finished rows: :func:`~sae_match_lens.judging.judge.judge_generations`,
:func:`~sae_match_lens.judging.semantic.label_pairs` (through
:func:`~sae_match_lens.judging.semantic.semantic_evaluation`) and
:func:`~sae_match_lens.judging.steering_scores.steering_sweep`. One ``fsync``'ed line per row, so a crash
loses at most the row being computed; a rerun skips the rows already there.

**What a log is keyed on.** Line 1 is ``{"header": {...}}``: everything that determines the rows,
so that a rerun never reuses rows another judge, model or setting produced:

* the judge's identity (:meth:`~sae_match_lens.judging.judge.Judge.identity`: its class and, for a chat
  judge, model name, endpoint, sampling options and a digest of the prompt templates; for a
  scripted judge, a digest of its script);
* the model's and SAEs' fingerprints (:func:`model_fingerprint`, :func:`sae_fingerprint`:
  class, hook name, parameter names, dtypes and shapes, and a few sampled values of every
  parameter, so another checkpoint of the same architecture differs);
* the loop's options and a digest of its inputs (:func:`digest`).

**On a mismatch the log refuses** (``ValueError``) and names every header field that differs,
with the value in the file and this run's; nothing is read from or written to the file. Give
the run another ``path``, or delete the file to start over. (Refusing rather than silently
starting a new log keeps a user from losing paid-for judge answers by a typo.)

A torn last line, left by a run killed while writing, is dropped on resume by an atomic rewrite
of the finished lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..adapters import hook_name_of
from ..atomicio import write_text

__all__ = ["RowLog", "callable_identity", "digest", "header_differences", "json_value",
           "model_fingerprint", "sae_fingerprint", "weights_fingerprint"]

logger = logging.getLogger(__name__)

SAMPLED_VALUES = 8
"""How many evenly spaced values of each parameter tensor a fingerprint reads."""


def json_value(value: Any) -> Any:
    """A strict-JSON value: non-finite floats become ``None``; numpy/torch scalars become Python."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        with contextlib.suppress(ValueError, AttributeError, RuntimeError):
            value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return value


def digest(value: Any) -> str:
    """A short SHA-256 digest (16 hex digits) of ``value``'s canonical JSON (``repr`` for what
    JSON cannot hold): for a log header that must change when the inputs do.

    Example:
        >>> digest(["And the LORD said", "def f():"])  # doctest: +SKIP
        '3f0c9a…'
    """
    text = json.dumps(json_value(value), sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def weights_fingerprint(module: Any) -> str:
    """A cheap fingerprint of a module's weights: a digest of every parameter's name, dtype and
    shape and :data:`SAMPLED_VALUES` evenly spaced values of it (no pass over all weights).

    Args:
        module: anything with ``named_parameters()`` (a ``torch.nn.Module``) or
            ``state_dict()``; otherwise the digest covers the class name only.

    Returns:
        16 hex digits.
    """
    if hasattr(module, "named_parameters"):
        tensors = list(module.named_parameters())
    elif hasattr(module, "state_dict"):
        tensors = list(module.state_dict().items())
    else:
        return digest(type(module).__qualname__)
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        if flat.numel():
            index = torch.linspace(0, flat.numel() - 1, min(SAMPLED_VALUES, flat.numel()))
            values = flat[index.round().long().to(flat.device)].to(torch.float64).cpu()
            h.update(values.numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What identifies a model in a log header: its class, its configured name (``cfg.model_name``
    when it has one) and :func:`weights_fingerprint`."""
    cfg = getattr(model, "cfg", None)
    return {"class": type(model).__qualname__, "name": getattr(cfg, "model_name", None),
            "weights": weights_fingerprint(model)}


def sae_fingerprint(sae: Any) -> dict[str, Any]:
    """What identifies an SAE in a log header: its class, hook name, width and
    :func:`weights_fingerprint`."""
    cfg = getattr(sae, "cfg", None)
    return {"class": type(sae).__qualname__, "hook": hook_name_of(sae),
            "d_sae": getattr(cfg, "d_sae", None), "weights": weights_fingerprint(sae)}


def callable_identity(function: Any) -> dict[str, Any]:
    """A function's module, qualified name and a digest of its source (its code object when the
    source cannot be read), for a header that must change when the function does."""
    try:
        body = inspect.getsource(function)
    except (OSError, TypeError):
        code = getattr(function, "__code__", None)
        body = repr((code.co_code, code.co_consts)) if code is not None else repr(function)
    return {"function": f"{getattr(function, '__module__', '?')}."
                        f"{getattr(function, '__qualname__', type(function).__qualname__)}",
            "source": digest(body)}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value:
        return _flatten(dict(enumerate(value)), prefix)
    return {prefix or "(header)": value}


def header_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The header fields that differ, as ``"field: file X, this run Y"`` (nested fields dotted)."""
    old, new = _flatten(recorded), _flatten(wanted)
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
            out.append(f"{key}: file {_short(a)}, this run {_short(b)}")
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) and value == "<absent>" else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class RowLog:
    """An append-only JSON-lines file of finished rows: partial results survive any failure.

    Line 1 is ``{"header": {...}}``: everything that determines the rows (module docstring).
    Every later line is one row, written with a single ``write`` and ``fsync``'ed before the
    loop moves on. Opening an existing file reads its rows (:meth:`done` tells a rerun what to
    skip) after checking that its header equals this run's; a mismatch is refused, naming each
    differing field. A torn last line is dropped by an atomic rewrite of the finished lines.
    Non-finite floats are stored as ``null``.

    Args:
        path: the file (created with its directory when missing).
        key: the row fields that identify a row (for :meth:`done`).
        header: what determines the rows (JSON-able).

    Raises:
        ValueError: the file is not a row log, is damaged, or holds rows made with another
            header (the message names the fields that differ).

    Example:
        >>> log = RowLog("sweep.jsonl", key=("mode", "layer"), header={"seed": 0})
        >>> if not log.done({"mode": "single", "layer": 3}):
        ...     log.append({"mode": "single", "layer": 3, "score": 0.4})
    """

    def __init__(self, path: str | os.PathLike[str], *, key: Sequence[str],
                 header: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.key = tuple(key)
        self.header = json.loads(json.dumps(json_value(dict(header or {}))))
        self.rows: list[dict[str, Any]] = []
        self._keys: set[tuple[Any, ...]] = set()
        if self.path.exists():
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite([])

    def _row_key(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        missing = [k for k in self.key if k not in row]
        if missing:
            raise KeyError(f"row {dict(row)!r} lacks the key fields {missing} of {self.path}.")
        return tuple(json.dumps(json_value(row[k])) for k in self.key)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        lines = [json.dumps({"header": self.header}, allow_nan=False)]
        lines += [json.dumps(row, allow_nan=False) for row in rows]
        write_text(self.path, "\n".join(lines) + "\n")

    def _read(self) -> None:
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        torn = lines[-1] != ""  # the last line never got its newline: a killed write
        complete = lines[:-1]
        if not complete:
            raise ValueError(f"{self.path} is not a row log (no header line); move it away or "
                             "choose another path.")
        try:
            first = json.loads(complete[0])
        except json.JSONDecodeError:
            first = None
        if not isinstance(first, dict) or "header" not in first:
            raise ValueError(f"{self.path} is not a row log written by sae_match_lens (its first "
                             "line is not a header); move it away or choose another path.")
        if first["header"] != self.header:
            differences = header_differences(first["header"], self.header)
            raise ValueError(
                f"{self.path} holds rows made with other settings, so they are not reused: "
                + "; ".join(differences) + ". Give this run another path, or delete the file "
                "to start over.")
        for number, line in enumerate(complete[1:], start=2):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                shown = line if len(line) <= 80 else line[:80] + "…"
                raise ValueError(f"{self.path}, line {number}, is not JSON ({shown!r}); the file "
                                 "was edited or damaged.") from None
            self.rows.append(row)
            self._keys.add(self._row_key(row))
        if torn:
            logger.warning("%s: dropping a torn last line left by an interrupted run (%d "
                           "finished rows kept)", self.path, len(self.rows))
            self._rewrite(self.rows)

    def done(self, row: Mapping[str, Any]) -> bool:
        """Whether a row with the same key fields is already in the log."""
        return self._row_key(row) in self._keys

    def get(self, row: Mapping[str, Any]) -> dict[str, Any] | None:
        """The logged row with the same key fields, or ``None``."""
        key = self._row_key(row)
        return next((r for r in self.rows if self._row_key(r) == key), None)

    def append(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Write one finished row (fsync'ed) and return it as stored."""
        stored = json_value(dict(row))
        line = json.dumps(stored, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.append(stored)
        self._keys.add(self._row_key(stored))
        return stored

    def frame(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The logged rows as a DataFrame."""
        return pd.DataFrame(self.rows, columns=list(columns) if columns is not None else None)
