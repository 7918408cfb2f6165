"""Where built suites and converted models live: the user's cache directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["CACHE_ENV", "suite_cache_dir", "swap_directory"]

CACHE_ENV = "SAE_MATCH_LENS_CACHE"
"""Environment variable naming the cache root (default ``$XDG_CACHE_HOME/sae_match_lens``)."""


def suite_cache_dir(name: str = "smollm2") -> Path:
    """Where ``build_suite(name)`` builds: ``$SAE_MATCH_LENS_CACHE/suites/<name>``.

    Without ``SAE_MATCH_LENS_CACHE``, the cache is ``$XDG_CACHE_HOME/sae_match_lens`` (or
    ``~/.cache/sae_match_lens``).
    """
    base = os.environ.get(CACHE_ENV)
    if base is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = str(Path(xdg) / "sae_match_lens")
    return Path(base) / "suites" / name


def swap_directory(new: Path, target: Path) -> None:
    """Move the complete folder ``new`` to ``target``, replacing what is there.

    The old folder is first renamed aside, so at every moment ``target`` is either the old
    complete folder or the new one; the old one is deleted last.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
