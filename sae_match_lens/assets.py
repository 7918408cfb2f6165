"""The embedded default suite: a small trained language model and SAEs at its layers' outputs.

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
  (:class:`~sae_lens.TopKSAE`);
* per layer, two more JumpReLU SAEs reading the block's module outputs:
  ``blocks.{l}.hook_mlp_out`` (module ``"mlp"``) and ``blocks.{l}.hook_attn_out``
  (module ``"attn"``). With the residual SAE of the same layer they form the
  stack that :mod:`sae_match_lens.flow.graph` reads (:func:`load_suite_stack`). The
  build script's ``--stage modules`` trains them on the shipped model with the
  residual JumpReLU recipe; the manifest records them under ``"module_saes"``.
  They live beside the residual ones, ``saes/jumprelu/<hook name>/``;
* every SAE stored as float16 (``cfg.json`` + ``sae_weights.safetensors``) and
  loaded as float32;
* a held-out token shard (never seen in training), ``[n_seq, n_ctx]`` with BOS
  in column 0.

Metric conventions (implemented once in :mod:`sae_match_lens.metrics`, shared with
``evaluate_substitution``, the build script, the manifest and the tests):

* **BOS is excluded everywhere.** The BOS position's activation is left
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
    >>> mlp_saes = load_suite_saes("jumprelu", module="mlp")  # blocks.{l}.hook_mlp_out
    >>> stack = load_suite_stack()  # {layer: LayerSAEs(res=..., mlp=..., attn=...)}
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

from .metrics import (
    FiringSums,
    StateSums,
    check_tokens,
    explained_variance,
    next_token_ce,
    squared_error_sum,
)

logger = logging.getLogger(__name__)

SUITE_PACKAGE = "sae_match_lens"
SUITE_DIR = ("data", "default_suite")
FAMILIES: tuple[str, ...] = ("jumprelu", "topk")
SUITE_MODULES: tuple[str, ...] = ("res", "mlp", "attn")
"""What a suite SAE reads: the residual stream, the MLP output or the attention output."""
MODULE_HOOKS: dict[str, str] = {
    "res": "hook_resid_post",
    "mlp": "hook_mlp_out",
    "attn": "hook_attn_out",
}
"""Module -> the hook of ``blocks.{l}`` its SAEs read."""
MODULE_SAES_KEY = "module_saes"
"""Manifest section of the MLP- and attention-output SAEs (written by ``--stage modules``)."""
MANIFEST_FILE = "manifest.json"
MODEL_DIR = "model"
MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
EVAL_TOKENS_FILE = "eval_tokens.safetensors"
EVAL_TOKENS_KEY = "tokens"
SAES_DIR = "saes"

Family = Literal["jumprelu", "topk"]
SuiteModule = Literal["res", "mlp", "attn"]

__all__ = [
    "FAMILIES",
    "MODULE_HOOKS",
    "SUITE_MODULES",
    "SAEMetrics",
    "SuiteFilesMissingError",
    "build_model",
    "compute_model_ce",
    "compute_sae_metrics",
    "default_suite_path",
    "layer_of_hook",
    "load_default_suite",
    "load_eval_tokens",
    "load_manifest",
    "load_suite_model",
    "load_suite_saes",
    "load_suite_stack",
    "next_token_ce",
    "sae_dir_name",
    "suite_hook_names",
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
    loader = load_manifest(root).get("model", {}).get("loader")
    if loader is not None:  # a real-model suite: the model is loaded by its own code
        module_name, _, function = loader.partition(":")
        if not module_name.startswith("sae_match_lens."):
            raise ValueError(f"The suite's manifest names an unknown model loader {loader!r}.")
        import importlib

        return getattr(importlib.import_module(module_name), function)(device=device)
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


def suite_hook_names(
    manifest: dict[str, Any], family: Family = "jumprelu", module: SuiteModule = "res"
) -> list[str]:
    """The hooks read by one family's SAEs of one module, ordered by layer.

    Args:
        manifest: The suite's manifest (:func:`load_manifest`).
        family: ``"jumprelu"`` or ``"topk"``.
        module: ``"res"`` (``hook_resid_post``), ``"mlp"`` (``hook_mlp_out``) or
            ``"attn"`` (``hook_attn_out``).

    Returns:
        ``hook_names[l]`` is the hook of layer ``l``'s SAE.

    Raises:
        ValueError: For an unknown family or module, or a family the suite has no
            SAEs of for ``module``.
        SuiteFilesMissingError: If the suite was built without module SAEs.

    Example:
        >>> suite_hook_names(load_manifest(), "jumprelu", "attn")[:2]
        ['blocks.0.hook_attn_out', 'blocks.1.hook_attn_out']
    """
    families_here = list(manifest["saes"].get("families") or FAMILIES)
    if family not in families_here:
        raise ValueError(f"Unknown SAE family {family!r}; choose one of {families_here}.")
    if module not in SUITE_MODULES:
        raise ValueError(f"Unknown module {module!r}; choose one of {list(SUITE_MODULES)}.")
    if module == "res":
        return list(manifest["saes"]["hook_names"])
    section = manifest.get(MODULE_SAES_KEY)
    if section is None:
        raise SuiteFilesMissingError(
            f"This suite has no {module!r} SAEs (no {MODULE_SAES_KEY!r} section in its "
            f"{MANIFEST_FILE}). Add them with `python examples/build_default_suite.py "
            "--stage modules --out <suite directory>`."
        )
    families = section["families"]
    if family not in families:
        raise ValueError(
            f"The suite has {module!r} SAEs only in the families {sorted(families)}; "
            f"got {family!r}."
        )
    return list(section["hook_names"][module])


def load_suite_saes(
    family: Family = "jumprelu",
    root: str | Path | None = None,
    *,
    module: SuiteModule = "res",
    device: str = "cpu",
) -> list[SAE[Any]]:
    """Load one SAE family of one module, ordered by layer, as float32 SAELens inference SAEs.

    Args:
        family: ``"jumprelu"`` or ``"topk"`` (the MLP and attention SAEs are JumpReLU only).
        root: A suite directory; the packaged suite when ``None``.
        module: ``"res"`` for ``blocks.{l}.hook_resid_post`` (the default), ``"mlp"`` for
            ``blocks.{l}.hook_mlp_out``, ``"attn"`` for ``blocks.{l}.hook_attn_out``.
        device: Torch device.

    Returns:
        ``saes[l]`` reads the ``module`` hook of block ``l``.

    Raises:
        ValueError: For an unknown family or module, a family without SAEs of that
            module, or an SAE stored under a hook it does not read.
        SuiteFilesMissingError: If a file is missing, or the suite has no module SAEs.

    Example:
        >>> [sae.cfg.metadata.hook_name for sae in load_suite_saes(module="mlp")][:2]
        ['blocks.0.hook_mlp_out', 'blocks.1.hook_mlp_out']
    """
    base = _suite_root(root)
    manifest = load_manifest(root)
    hook_names = suite_hook_names(manifest, family, module)
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


def load_suite_stack(
    family: Family = "jumprelu",
    root: str | Path | None = None,
    *,
    modules: tuple[str, ...] = ("mlp", "attn"),
    device: str = "cpu",
) -> dict[int, Any]:
    """Every layer's SAEs as the stack :mod:`sae_match_lens.flow.graph` reads.

    Args:
        family: The family of the residual SAEs (and of the module SAEs, which
            exist for ``"jumprelu"`` only).
        root: A suite directory; the packaged suite when ``None``.
        modules: Which of ``"mlp"`` and ``"attn"`` to load besides the residual SAEs;
            ``()`` loads the residual SAEs alone (the other fields stay ``None``).
        device: Torch device.

    Returns:
        ``{layer: LayerSAEs(res=..., mlp=..., attn=...)}`` (:class:`~sae_match_lens.flow.graph.LayerSAEs`),
        where ``res`` reads ``blocks.{layer}.hook_resid_post``, ``mlp``
        ``blocks.{layer}.hook_mlp_out`` and ``attn`` ``blocks.{layer}.hook_attn_out``.

    Raises:
        ValueError: For an unknown or repeated module, or ``"res"`` among ``modules``.
        SuiteFilesMissingError: If the suite lacks the files or the module SAEs.

    Example:
        >>> from sae_match_lens.flow.graph import predecessors
        >>> stack = load_suite_stack()
        >>> table = predecessors(stack, layer=3)  # R(2), M(3), A(3) -> R(3)
    """
    from .flow.graph import LayerSAEs  # flow sits above assets in the import ladder

    if len(set(modules)) != len(modules) or not set(modules) <= {"mlp", "attn"}:
        raise ValueError(
            f"modules must be distinct names among ['mlp', 'attn'] (the residual SAEs are "
            f"always loaded); got {list(modules)}."
        )
    res = {layer_of_hook(sae.cfg.metadata.hook_name): sae
           for sae in load_suite_saes(family, root, module="res", device=device)}
    extra = {
        m: {layer_of_hook(sae.cfg.metadata.hook_name): sae
            for sae in load_suite_saes(family, root, module=m, device=device)}  # type: ignore[arg-type]
        for m in modules
    }
    for module, saes in extra.items():
        stray = sorted(set(saes) - set(res))
        if stray:
            raise ValueError(
                f"The suite has {module!r} SAEs at layers {stray} without a residual SAE; "
                "rebuild the suite."
            )
    stack = {}
    for layer, sae in res.items():
        parts = {m: saes.get(layer) for m, saes in extra.items()}
        for module, part in {"res": sae, **parts}.items():
            if part is None:
                continue
            expected = f"blocks.{layer}.{MODULE_HOOKS[module]}"
            if part.cfg.metadata.hook_name != expected:
                raise ValueError(
                    f"Layer {layer}'s {module!r} SAE reads {part.cfg.metadata.hook_name!r}; "
                    f"expected {expected!r}."
                )
        stack[layer] = LayerSAEs(res=sae, **parts)
    return stack


def layer_of_hook(hook_name: str) -> int:
    """The block index of a ``blocks.{layer}.<hook>`` name.

    Raises:
        ValueError: If the name does not start with ``blocks.<int>.``.
    """
    parts = hook_name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"{hook_name!r} is not a 'blocks.<layer>.<hook>' hook name.")
    return int(parts[1])


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
    tokens = check_tokens(tokens, model, what="compute_model_ce")
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
    tokens = check_tokens(tokens, model, what="compute_sae_metrics")
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
