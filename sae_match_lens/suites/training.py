"""Training a suite's SAEs on stored activations, and storing them in a chosen convention.

Two recipes, both with SAELens' own training SAEs and losses (reconstruction MSE plus the
AuxK loss that revives dead features), trained by a plain Adam loop on in-memory activations:

* **(Batch)TopK → JumpReLU.** A :class:`~sae_lens.TopKTrainingSAE` (or a
  :class:`~sae_lens.BatchTopKTrainingSAE`, which keeps ``k`` features active on average over
  each batch and which SAELens saves as JumpReLU with one global threshold) is converted to
  JumpReLU with one threshold *per feature*, calibrated on training vectors: feature ``i``
  gets the threshold at which, under JumpReLU, it fires on exactly as many calibration vectors
  as (Batch)TopK selected it for (:func:`calibrate_thresholds`). Per-feature firing rates, and
  so the mean L0, carry over; what each feature computes when it fires is unchanged.
* **TopK.** A :class:`~sae_lens.TopKTrainingSAE` (exactly ``k`` features per vector), saved as
  SAELens' inference ``TopKSAE``.

Storage conventions of a JumpReLU SAE (same function, different parameters; see
:func:`to_convention`):

* ``"gemma_scope"``: unit-norm decoder rows, thresholds in residual-stream units, so the
  thresholds grow with the residual norm from layer to layer, as in Gemma Scope (the SAE
  Match paper's Figure 1). Folding changes this storage.
* ``"decoder_scale"``: every threshold 1, the scale in the decoder-row norms (the folded
  form; the default suite stores its SAEs close to this). Folding leaves it unchanged.

Inputs are scaled to mean norm ``sqrt(d_in)`` for training, and the scale is folded back into
the weights before saving, so a stored SAE reads raw activations.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CONVENTIONS",
    "calibrate_thresholds",
    "inference_sae",
    "save_sae",
    "to_convention",
    "train_sae",
]

Convention = Literal["gemma_scope", "decoder_scale"]
CONVENTIONS: tuple[str, ...] = ("gemma_scope", "decoder_scale")


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine annealing to a tenth."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * t))


def train_sae(
    acts: torch.Tensor,
    *,
    architecture: Literal["batchtopk", "topk"],
    d_sae: int,
    k: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    metadata: dict[str, Any],
    on_step: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train one SAE on ``acts`` and return its inference parameters and config.

    Args:
        acts: ``[n, d_in]`` training vectors (any float dtype; batches are cast to float32).
        architecture: ``"batchtopk"`` (saved as JumpReLU, thresholds still to calibrate) or
            ``"topk"``.
        d_sae: Number of features.
        k: Active features per vector (TopK) or on average per batch (BatchTopK).
        steps: Adam steps.
        batch: Vectors per step, drawn with replacement (seeded).
        lr: Peak learning rate.
        seed: Seed of the initialisation and of the batches.
        metadata: SAELens metadata fields (``hook_name``, ``model_name``, ...).
        on_step: Called with the number of steps just done, every 10 steps.

    Returns:
        ``(state, cfg)``: the inference state dict (``W_enc [d_in, d_sae]``, ``b_enc``,
        ``W_dec [d_sae, d_in]`` with unit-norm rows, ``b_dec``, and for BatchTopK a global
        ``threshold`` to be replaced by :func:`calibrate_thresholds`) and SAELens' inference
        config dict.
    """
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata, TrainStepInput

    n, d_in = acts.shape
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = acts[torch.randint(0, n, (min(n, 65536),), generator=gen)].float()
    scale = math.sqrt(d_in) / probe.norm(dim=-1).mean().item()
    meta = SAEMetadata(**metadata)
    if architecture == "batchtopk":
        sae: Any = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta)
        )
    elif architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta))
    else:
        raise ValueError(f"architecture must be 'batchtopk' or 'topk'; got {architecture!r}.")
    with torch.no_grad():
        sae.b_dec.copy_(probe.mean(0) * scale)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    window = max(20, steps // 10)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    coefficients = sae.get_coefficients()
    coefficients = {
        name: (c.value if hasattr(c, "value") else c) for name, c in coefficients.items()
    }
    sae.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = acts[idx].float() * scale
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients=coefficients,
                           dead_neuron_mask=since_fired > window, n_training_steps=step,
                           is_logging_step=False)
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            fired = (out.feature_acts > 0).any(0)
            since_fired += 1
            since_fired[fired] = 0
        if on_step is not None and (step + 1) % 10 == 0:
            on_step(10)
    if on_step is not None and steps % 10:
        on_step(steps % 10)
    sae.eval()
    with torch.no_grad():
        sae.fold_activation_norm_scaling_factor(scale)
        state = {k_: v.detach().clone() for k_, v in sae.state_dict().items()}
        sae.process_state_dict_for_saving_inference(state)
    cfg = sae.cfg.get_inference_sae_cfg_dict()
    state = {k_: v.float() for k_, v in state.items()}
    norms = state["W_dec"].norm(dim=1).clamp_min(1e-12)
    _scale_features(state, norms)  # unit-norm decoder rows (the same function)
    return state, cfg


def _scale_features(state: dict[str, torch.Tensor], s_F: torch.Tensor) -> None:
    """Divide feature i's decoder row by ``s_F[i]`` and multiply its encoder side by it (in place).

    The SAE computes the same function: pre-activations and thresholds scale by ``s_F``,
    decoder rows by ``1/s_F``.
    """
    state["W_dec"] /= s_F[:, None]
    state["W_enc"] *= s_F[None, :]
    state["b_enc"] *= s_F
    if "threshold" in state:
        state["threshold"] *= s_F


@torch.no_grad()
def _pre_acts(state: dict[str, torch.Tensor], x: torch.Tensor, apply_b_dec: bool) -> torch.Tensor:
    sae_in = x.float() - state["b_dec"] if apply_b_dec else x.float()
    return sae_in @ state["W_enc"] + state["b_enc"]


@torch.no_grad()
def calibrate_thresholds(
    state: dict[str, torch.Tensor], cfg: dict[str, Any], acts: torch.Tensor, *, k: int,
    batch: int, selection: Literal["batch", "row"] = "batch",
) -> torch.Tensor:
    """Per-feature JumpReLU thresholds that keep each feature's (Batch)TopK firing rate.

    On the calibration vectors ``acts``, split into batches of ``batch`` as in training,
    BatchTopK (``selection="batch"``) selects the ``k * batch`` largest positive
    pre-activations of each batch, TopK (``selection="row"``) the ``k`` largest of each vector;
    feature ``i`` is selected ``c_i`` times in all. Its threshold is its ``(c_i + 1)``-th largest
    pre-activation over the calibration vectors, so that JumpReLU (fires when the
    pre-activation exceeds the threshold) fires on exactly the ``c_i`` largest (ties aside).
    A feature BatchTopK never selected gets its largest pre-activation (it never fires on
    these vectors); every threshold is at least the smallest positive one, so all are > 0.

    Args:
        state: Inference parameters from :func:`train_sae` (``architecture="batchtopk"``).
        cfg: Its inference config (``apply_b_dec_to_input`` is read).
        acts: ``[n, d_in]`` calibration vectors (training vectors, never held-out ones).
        k: The ``k`` of training.
        batch: The training batch size (matters for ``selection="batch"`` only).
        selection: ``"batch"`` for a BatchTopK-trained SAE, ``"row"`` for a TopK-trained one.

    Returns:
        ``threshold [d_sae]`` (float32, all > 0).
    """
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    n = acts.shape[0] - acts.shape[0] % batch
    if n == 0:
        raise ValueError(f"calibration needs at least one batch of {batch} vectors; got "
                         f"{acts.shape[0]}.")
    pre = torch.cat([
        _pre_acts(state, acts[s : s + batch], apply_b_dec).relu() for s in range(0, n, batch)
    ])
    counts = torch.zeros(pre.shape[1], dtype=torch.long)
    for s in range(0, n, batch):
        block = pre[s : s + batch]
        if selection == "batch":
            top = torch.topk(block.flatten(), k * block.shape[0]).indices
            selected = top[block.flatten()[top] > 0] % block.shape[1]
        else:
            values, idx = torch.topk(block, k, dim=1)
            selected = idx[values > 0]
        counts += torch.bincount(selected.flatten(), minlength=block.shape[1])
    ordered = torch.sort(pre, dim=0, descending=True).values  # [n, F]
    rank = counts.clamp_max(n - 1)
    threshold = ordered.gather(0, rank[None, :])[0]
    positive = threshold[threshold > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1e-6)
    return threshold.clamp_min(floor.item()).float()


def to_convention(
    state: dict[str, torch.Tensor], convention: Convention
) -> dict[str, torch.Tensor]:
    """A JumpReLU state dict re-stored in ``convention`` (same function; a new dict).

    Args:
        state: JumpReLU inference parameters with per-feature ``threshold``.
        convention: ``"gemma_scope"`` (unit-norm decoder rows, thresholds in residual units)
            or ``"decoder_scale"`` (thresholds 1, the scale in the decoder norms).
    """
    out = {k: v.clone().float() for k, v in state.items()}
    if convention == "gemma_scope":
        _scale_features(out, out["W_dec"].norm(dim=1).clamp_min(1e-12))
    elif convention == "decoder_scale":
        _scale_features(out, 1.0 / out["threshold"])
        out["threshold"] = torch.ones_like(out["threshold"])
    else:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}; got {convention!r}.")
    return out


def inference_sae(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Any:
    """A float32 SAELens inference SAE from a state dict and config dict."""
    from sae_lens import SAE

    sae = SAE.from_dict({**cfg, "dtype": "float32", "device": "cpu"})
    sae.load_state_dict({k: v.float() for k, v in state.items()})
    return sae.eval()


def save_sae(state: dict[str, torch.Tensor], cfg: dict[str, Any], directory: Path) -> None:
    """Write ``cfg.json`` and float16 ``sae_weights.safetensors`` into ``directory`` (created)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in state.items()},
              str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(
        json.dumps({**cfg, "dtype": "float32"}, indent=2, default=str), encoding="utf-8"
    )
