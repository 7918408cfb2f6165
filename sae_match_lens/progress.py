"""Progress bars of library calls: labelled, and shown only for work that takes a while.

Every long loop of the package takes ``progress: bool`` (``False`` turns its bar off). A bar made
by :func:`progress_bar` appears only once its work has run for :data:`PROGRESS_DELAY` seconds, so
a call that finishes within a couple of seconds prints nothing, and every bar says what it is
doing (its ``desc``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["PROGRESS_DELAY", "progress_bar"]

PROGRESS_DELAY = 2.0
"""Seconds a loop runs before its bar is shown."""


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, enabled: bool = True,
                 **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar labelled ``desc`` that appears after :data:`PROGRESS_DELAY` seconds.

    Args:
        iterable: what to iterate over (or ``None`` and ``total=`` for a bar updated by hand).
        desc: what the loop does, e.g. ``"match costs blocks.3 -> blocks.4"``.
        enabled: ``False`` shows nothing (the caller's ``progress=`` switch).
        **kwargs: passed to ``tqdm`` (``total``, ``unit``, ``leave``, ...).

    Raises:
        ValueError: ``desc`` is empty.

    Example:
        >>> for batch in progress_bar(batches, desc="evaluate links", unit="batch"):
        ...     ...
    """
    if not desc or not desc.strip():
        raise ValueError("a progress bar needs a label (desc=) saying what it is doing.")
    kwargs.setdefault("delay", PROGRESS_DELAY)
    return tqdm(iterable, desc=desc, disable=not enabled, **kwargs)
