"""Where built suites and converted models live: the user's cache directory."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "suite_cache_dir"]

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
