"""The embedded default suite: a small trained language model and two SAE families.

The suite ships inside the package (``sae_match_lens/data/default_suite``) and
loads without network access. It is built by ``examples/build_default_suite.py``
from Debian text packages (the King James Bible, ``fortunes`` and the Python 3.11
documentation sources); ``manifest.json`` records how, including every metric
quoted below.

Contents:

* a 6-layer causal :class:`~transformer_lens.HookedTransformer` with its own
  byte-level BPE tokenizer (a ``PreTrainedTokenizerFast`` whose BOS token is
  prepended to every sequence);
* one SAE per layer reading ``blocks.{l}.hook_resid_post`` (the residual
  stream after block ``l``), in two families: ``"jumprelu"``
  (:class:`~sae_lens.JumpReLUSAE`, per-feature thresholds) and ``"topk"``
  (:class:`~sae_lens.TopKSAE`). Weights are stored as float16 and loaded as
  float32;
* a held-out token shard (never seen in training), ``[n_seq, n_ctx]`` with BOS
  in column 0.

Metric conventions (implemented once in :mod:`sae_match_lens.metrics`, shared with
``evaluate_substitution``, the build script, the manifest and the tests):

* **BOS is excluded everywhere.** The BOS position's residual stream is left
  untouched when an SAE is spliced in and does not enter any SAE statistic;
  the next-token prediction made *at* the BOS position is not counted in the
  cross-entropy.
* **Explained variance** is pooled over tokens and dimensions:
  ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.
* **L0** is the mean number of non-zero feature activations per token.
* **Dead fraction** is the fraction of features that never fire on the tokens
  measured (so it depends on how many tokens are measured).
* **CE** is the mean next-token cross-entropy in nats; the spliced CE replaces
  the hook's activation by the SAE reconstruction at every non-BOS position.

Example:
    >>> from sae_match_lens.assets import load_default_suite, load_eval_tokens
    >>> model, saes = load_default_suite("jumprelu")
    >>> tokens = load_eval_tokens()[:8]
    >>> metrics = compute_sae_metrics(model, saes[3], tokens)
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import torch
from sae_lens import SAE
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from .metrics import FiringSums, StateSums, explained_variance, next_token_ce, squared_error_sum

logger = logging.getLogger(__name__)

SUITE_PACKAGE = "sae_match_lens"
SUITE_DIR = ("data", "default_suite")
FAMILIES: tuple[str, ...] = ("jumprelu", "topk")
MANIFEST_FILE = "manifest.json"
MODEL_DIR = "model"
MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
EVAL_TOKENS_FILE = "eval_tokens.safetensors"
EVAL_TOKENS_KEY = "tokens"
SAES_DIR = "saes"

Family = Literal["jumprelu", "topk"]

__all__ = [
    "FAMILIES",
    "SAEMetrics",
    "SuiteFilesMissingError",
    "build_model",
    "compute_model_ce",
    "compute_sae_metrics",
    "default_suite_path",
    "load_default_suite",
    "load_eval_tokens",
    "load_manifest",
    "load_suite_model",
    "load_suite_saes",
    "next_token_ce",
    "sae_dir_name",
]


class SuiteFilesMissingError(FileNotFoundError):
    """The packaged default suite (or one of its files) is not installed."""


@dataclass(frozen=True)
class SAEMetrics:
    """How well one SAE reconstructs its hook, measured on a token batch (BOS excluded)."""

    explained_variance: float
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, pooled over tokens and dims."""
    l0: float
    """Mean number of active features per token."""
    dead_fraction: float
    """Fraction of features that never fire on the measured tokens."""
    ce_loss: float
    """Mean next-token CE (nats) with the SAE reconstruction spliced in at its hook."""
    clean_ce_loss: float
    """Mean next-token CE (nats) of the unmodified model on the same tokens."""
    n_tokens: int
    """Number of (non-BOS) token positions the SAE statistics were pooled over."""

    @property
    def delta_ce(self) -> float:
        """Spliced minus clean cross-entropy, in nats."""
        return self.ce_loss - self.clean_ce_loss

    def to_dict(self) -> dict[str, float | int]:
        """Plain-JSON form (as written into the manifest)."""
        return {**asdict(self), "delta_ce": self.delta_ce}


def sae_dir_name(hook_name: str) -> str:
    """Directory name under ``saes/<family>/`` for the SAE reading ``hook_name``."""
    return hook_name


def default_suite_path() -> Traversable:
    """Location of the packaged default suite.

    Raises:
        SuiteFilesMissingError: If the package was installed without its data
            files (the ``manifest.json`` is the marker).
    """
    root = resources.files(SUITE_PACKAGE)
    for part in SUITE_DIR:
        root = root / part
    if not (root / MANIFEST_FILE).is_file():
        raise SuiteFilesMissingError(
            f"The default suite is not installed: {MANIFEST_FILE!r} not found under {root}. "
            "Reinstall sae_match_lens with its package data, or rebuild the suite with "
            "`python examples/build_default_suite.py --out sae_match_lens/data/default_suite`."
        )
    return root


def _require(path: Traversable, what: str) -> Traversable:
    if not (path.is_file() or path.is_dir()):
        raise SuiteFilesMissingError(
            f"The default suite is incomplete: {what} not found at {path}. "
            "Rebuild it with `python examples/build_default_suite.py`."
        )
    return path


def _suite_root(root: str | Path | None) -> Traversable:
    if root is None:
        return default_suite_path()
    path = Path(root)
    if not (path / MANIFEST_FILE).is_file():
        raise SuiteFilesMissingError(f"No {MANIFEST_FILE!r} in suite directory {path}.")
    return path


def load_manifest(root: str | Path | None = None) -> dict[str, Any]:
    """Read the suite's ``manifest.json`` (build settings, hashes and metrics).

    Args:
        root: A suite directory; the packaged suite when ``None``.
    """
    path = _require(_suite_root(root) / MANIFEST_FILE, "the manifest")
    return json.loads(path.read_text(encoding="utf-8"))


def load_eval_tokens(root: str | Path | None = None) -> torch.Tensor:
    """The held-out evaluation shard as ``int64 [n_seq, n_ctx]``, BOS in column 0.

    Args:
        root: A suite directory; the packaged suite when ``None``.
    """
    path = _require(_suite_root(root) / EVAL_TOKENS_FILE, "the evaluation token shard")
    with resources.as_file(path) as file:
        tensors = load_file(str(file))
    if EVAL_TOKENS_KEY not in tensors:
        raise KeyError(
            f"{EVAL_TOKENS_FILE} holds {sorted(tensors)}; expected a {EVAL_TOKENS_KEY!r} tensor."
        )
    return tensors[EVAL_TOKENS_KEY].long()


def build_model(
    config: dict[str, Any], tokenizer: Any | None = None, *, device: str = "cpu"
) -> HookedTransformer:
    """An untrained :class:`HookedTransformer` from the suite's stored config.

    Args:
        config: Keyword arguments of :class:`HookedTransformerConfig` as stored in
            ``model/config.json`` (plain JSON values only).
        tokenizer: The tokenizer object to attach (TransformerLens cannot rebuild a
            local tokenizer by name on its own).
        device: Torch device for the weights.
    """
    cfg = HookedTransformerConfig(**config, device=device)
    return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)


def load_suite_model(root: str | Path | None = None, *, device: str = "cpu") -> HookedTransformer:
    """Load the suite's language model (float32) with its tokenizer attached.

    Args:
        root: A suite directory; the packaged suite when ``None``.
        device: Torch device.
    """
    from transformers import AutoTokenizer

    base = _suite_root(root)
    config_file = _require(base / MODEL_DIR / MODEL_CONFIG_FILE, "the model config")
    weights_file = _require(base / MODEL_DIR / MODEL_WEIGHTS_FILE, "the model weights")
    tokenizer_dir = _require(base / TOKENIZER_DIR, "the tokenizer directory")
    with ExitStack() as stack:
        tok_path = stack.enter_context(resources.as_file(tokenizer_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
        config = json.loads(config_file.read_text(encoding="utf-8"))
        model = build_model(config, tokenizer, device=device)
        weights_path = stack.enter_context(resources.as_file(weights_file))
        state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    expected = {name for name, _ in model.named_parameters()}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(
            f"Model weights do not match the config: missing {missing[:5]}, unexpected "
            f"{extra[:5]} ({len(missing)} missing, {len(extra)} unexpected)."
        )
    model.load_state_dict(state, strict=False)
    model.eval()
    return model


def load_suite_saes(
    family: Family = "jumprelu", root: str | Path | None = None, *, device: str = "cpu"
) -> list[SAE[Any]]:
    """Load one SAE family, ordered by layer, as float32 SAELens inference SAEs.

    Args:
        family: ``"jumprelu"`` or ``"topk"``.
        root: A suite directory; the packaged suite when ``None``.
        device: Torch device.
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown SAE family {family!r}; choose one of {list(FAMILIES)}.")
    base = _suite_root(root)
    manifest = load_manifest(root)
    hook_names = manifest["saes"]["hook_names"]
    saes: list[SAE[Any]] = []
    for hook_name in hook_names:
        sae_dir = _require(
            base / SAES_DIR / family / sae_dir_name(hook_name), f"the {family} SAE for {hook_name}"
        )
        with resources.as_file(sae_dir) as path:
            sae = SAE.load_from_disk(str(path), device=device, dtype="float32")
        if sae.cfg.metadata.hook_name != hook_name:
            raise ValueError(
                f"SAE stored for {hook_name!r} reads {sae.cfg.metadata.hook_name!r} instead."
            )
        sae.eval()
        saes.append(sae)
    return saes


def load_default_suite(
    family: Family = "jumprelu", *, device: str = "cpu"
) -> tuple[HookedTransformer, list[SAE[Any]]]:
    """Load the packaged model and one SAE family (one SAE per layer, ordered by layer).

    Args:
        family: ``"jumprelu"`` (per-feature thresholds) or ``"topk"``.
        device: Torch device.

    Returns:
        ``(model, saes)`` where ``saes[l]`` reads ``blocks.{l}.hook_resid_post``.

    Raises:
        SuiteFilesMissingError: If the package data is not installed.
        ValueError: For an unknown family.

    Example:
        >>> model, saes = load_default_suite("topk")
        >>> [sae.cfg.metadata.hook_name for sae in saes][:2]
        ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown SAE family {family!r}; choose one of {list(FAMILIES)}.")
    model = load_suite_model(device=device)
    return model, load_suite_saes(family, device=device)


def _batches(tokens: torch.Tensor, batch_size: int, progress: bool, desc: str):
    if tokens.ndim != 2 or tokens.shape[1] < 3:
        raise ValueError(f"tokens must be [n_seq, n_ctx >= 3]; got {tuple(tokens.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}.")
    starts = range(0, tokens.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield tokens[start : start + batch_size]


@torch.no_grad()
def compute_model_ce(
    model: HookedTransformer,
    tokens: torch.Tensor,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``tokens``, BOS prediction excluded.

    Args:
        model: The language model.
        tokens: ``[n_seq, n_ctx]`` with BOS in column 0.
        batch_size: Sequences per forward pass.
        progress: Show a progress bar.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in _batches(tokens, batch_size, progress, "model CE"):
        batch = batch.to(device)
        s, n = next_token_ce(model(batch, return_type="logits"), batch)
        total, count = total + s, count + n
    return total / count


@torch.no_grad()
def compute_sae_metrics(
    model: HookedTransformer,
    sae: SAE[Any],
    tokens: torch.Tensor,
    *,
    batch_size: int = 32,
    clean_ce_loss: float | None = None,
    progress: bool = False,
) -> SAEMetrics:
    """Measure one SAE on ``tokens``: explained variance, L0, dead fraction and spliced CE.

    The SAE reads ``sae.cfg.metadata.hook_name``; its reconstruction replaces the
    activation there at every non-BOS position, and the model's cross-entropy is
    measured with that substitution. See the module docstring for the conventions.

    Args:
        model: The language model the SAE was trained on.
        sae: A SAELens inference SAE.
        tokens: ``[n_seq, n_ctx]`` with BOS in column 0.
        batch_size: Sequences per forward pass.
        clean_ce_loss: The model's own CE on the same tokens, if already known
            (otherwise it is computed).
        progress: Show a progress bar.

    Raises:
        KeyError: If the SAE's hook is not a hook point of the model.
    """
    hook_name = sae.cfg.metadata.hook_name
    if hook_name not in model.hook_dict:
        raise KeyError(
            f"SAE hook {hook_name!r} is not a hook point of the model "
            f"(e.g. {list(model.hook_dict)[:3]})."
        )
    if clean_ce_loss is None:
        clean_ce_loss = compute_model_ce(model, tokens, batch_size=batch_size, progress=progress)
    device = next(model.parameters()).device
    states, firing, sse = StateSums(), FiringSums(), 0.0

    def splice(activation: torch.Tensor, *, hook: Any) -> torch.Tensor:
        del hook
        nonlocal sse
        acts = sae.encode(activation)
        x_hat = sae.decode(acts)
        states.add(activation)
        sse += squared_error_sum(activation, x_hat)
        firing.add(acts)
        out = activation.clone()
        out[:, 1:] = x_hat[:, 1:].to(activation.dtype)
        return out

    total, count = 0.0, 0
    for batch in _batches(tokens, batch_size, progress, f"SAE metrics {hook_name}"):
        batch = batch.to(device)
        logits = model.run_with_hooks(batch, return_type="logits", fwd_hooks=[(hook_name, splice)])
        s, n = next_token_ce(logits, batch)
        total, count = total + s, count + n
    return SAEMetrics(
        explained_variance=explained_variance(sse, states),
        l0=firing.l0,
        dead_fraction=firing.dead_fraction,
        ce_loss=total / count,
        clean_ce_loss=float(clean_ce_loss),
        n_tokens=states.n,
    )
