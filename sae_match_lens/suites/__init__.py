"""Suites: a language model with SAEs at its layers, loaded by name.

* ``"default"``: the embedded toy suite (6-layer model, d_model 128), shipped in the package
  (:mod:`sae_match_lens.assets`); the demo and the tests use it.
* ``"smollm2"``: SmolLM2-135M-Instruct with SAEs trained on it, built on demand into the
  user's cache (``sae-match suite build smollm2``, :func:`build_suite`; the manifest records
  how long each stage took), never shipped: residual SAEs at layers 10-17 (JumpReLU in Gemma Scope's
  convention, the same SAEs with the scale in the decoder norms as a control, and TopK), MLP-
  and attention-output JumpReLU SAEs at layers 12-15. ``"smollm2-small"`` is the test build
  (``--small``).

Every loader keys SAEs by model layer.

Example:
    >>> model, saes = load_suite("default", "jumprelu")
    >>> sorted(saes)[:2], saes[0].cfg.metadata.hook_name
    ([0, 1], 'blocks.0.hook_resid_post')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["SUITES", "build_suite", "load_suite", "load_suite_layers", "suite_root",
           "verify_suite"]

SUITES: tuple[str, ...] = ("default", "smollm2", "smollm2-small")


def suite_root(name: str = "default", root: str | Path | None = None) -> Path | None:
    """The folder of a suite: ``None`` for the embedded default suite, the cache folder of a
    built one (or ``root`` when given).

    Raises:
        ValueError: For an unknown suite name.
        FileNotFoundError: If a real-model suite was not built (or its build did not finish).
    """
    from .build import MANIFEST
    from .cache import suite_cache_dir

    if name not in SUITES:
        raise ValueError(f"Unknown suite {name!r}; choose one of {list(SUITES)}.")
    if name == "default" and root is None:
        return None
    folder = Path(root) if root is not None else suite_cache_dir(name)
    if not (folder / MANIFEST).is_file():
        flag = " --small" if name.endswith("-small") else ""
        raise FileNotFoundError(
            f"The {name!r} suite is not built at {folder} (no {MANIFEST}). Build it with "
            f"`sae-match suite build smollm2{flag}` (it resumes a killed build)."
        )
    return folder


def load_suite_layers(
    name: str = "default",
    family: str = "jumprelu",
    *,
    module: str = "res",
    root: str | Path | None = None,
    device: str = "cpu",
) -> dict[int, Any]:
    """One family's SAEs of one module, keyed by model layer.

    Args:
        name: ``"default"``, ``"smollm2"`` or ``"smollm2-small"``.
        family: ``"jumprelu"`` or ``"topk"``; the SmolLM2 suites also have
            ``"jumprelu_decoder_scale"`` (the JumpReLU SAEs with the scale in the decoder norms).
        module: ``"res"``, ``"mlp"`` or ``"attn"``.
        root: The suite's folder, if not the default place.
        device: Torch device.
    """
    from ..assets import layer_of_hook, load_suite_saes

    saes = load_suite_saes(family, suite_root(name, root), module=module, device=device)  # type: ignore[arg-type]
    return {layer_of_hook(sae.cfg.metadata.hook_name): sae for sae in saes}


def load_suite(
    name: str = "default",
    family: str = "jumprelu",
    *,
    module: str = "res",
    root: str | Path | None = None,
    device: str = "cpu",
) -> tuple[Any, dict[int, Any]]:
    """A suite's model and one family's SAEs of one module, keyed by model layer.

    Args:
        name: ``"default"`` (embedded), ``"smollm2"`` or ``"smollm2-small"`` (built with
            ``sae-match suite build``).
        family: See :func:`load_suite_layers`.
        module: ``"res"``, ``"mlp"`` or ``"attn"``.
        root: The suite's folder, if not the default place.
        device: Torch device.

    Returns:
        ``(model, {layer: sae})``.

    Raises:
        FileNotFoundError: If a real-model suite is not built.
    """
    from ..assets import load_suite_model

    folder = suite_root(name, root)
    saes = load_suite_layers(name, family, module=module, root=root, device=device)
    return load_suite_model(folder, device=device), saes


def build_suite(*args: Any, **kwargs: Any) -> Path:
    """Build a real-model suite (see :func:`sae_match_lens.suites.build.build_suite`)."""
    from .build import build_suite as build

    return build(*args, **kwargs)


def verify_suite(root: str | Path) -> dict[str, Any]:
    """Check a built suite against its manifest (see :func:`sae_match_lens.suites.build.verify_suite`)."""
    from .build import verify_suite as verify

    return verify(root)
