"""View any SAELens inference SAE as per-feature tensors, and fold / unfold it.

Conventions (shared by the whole package):

* **Feature axis.** Row ``i`` of every tensor in a :class:`FeatureView` belongs
  to feature ``i``. SAELens stores ``W_enc [d_in, d_sae]`` and
  ``W_dec [d_sae, d_out]``; the view holds ``encoder_FD = W_enc.T`` and
  ``decoder_FO = W_dec`` so both are ``[d_sae, ...]``.
* **Re-parametrisation.** A positive per-feature scale ``s`` acts on an SAE as
  ``encoder column / s``, ``encoder biases / s``, ``threshold / s``,
  ``decoder row * s``. For ReLU, JumpReLU and gated encoders this leaves
  ``decode(encode(x))`` unchanged and divides feature ``i``'s activation by
  ``s_i`` (all three activations are positively homogeneous in the
  pre-activation and its threshold). TopK / AbsTopK SAEs with
  ``rescale_acts_by_decoder_norm=True`` are the exception: their ``encode`` returns
  ``pre-activation × ‖W_dec[i]‖``, which the re-parametrisation leaves unchanged, so
  their activations do **not** change. :func:`folded_activation_factor` is the one
  place that says, per architecture, how an SAE's ``encode`` output relates to
  folded units; everything that moves activations between SAEs uses it.
* **Folding** applies the re-parametrisation with each architecture's *scale
  rule* (:func:`fold_scales`):

  - JumpReLU (SAE or transcoder, per-feature or scalar threshold, including
    BatchTopK SAEs saved as JumpReLU): ``s = threshold`` (the paper's Eq. 4).
    Activations are then in threshold units and every threshold is 1.
  - Architectures without a threshold (standard / ReLU transcoders, gated):
    ``s = 1 / ||W_dec[i]||``, the identity SAELens' ``fold_W_dec_norm`` uses.
    Activations are then in units of the norm of the feature's contribution to
    the output, the only scale such an SAE has. Rows whose decoder is exactly
    zero keep ``s = 1``.
  - TopK / AbsTopK with ``rescale_acts_by_decoder_norm=True``: the same
    decoder-norm rule (exact, as SAELens' own fold shows). Their ``encode`` output
    is already ``pre-activation × ‖W_dec[i]‖``, so it is unchanged by the fold.
  - TopK / AbsTopK without it: ``s = 1``. The top-k selection compares raw
    pre-activations across features, so any non-uniform per-feature scale would
    change which features fire; the raw scale is already the canonical one.

The folded SAE keeps the scales it was folded with (a non-persistent buffer,
``sae_match_fold_scales``) so that :func:`unfold` can invert it exactly.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import (
    SAE,
    GatedSAE,
    JumpReLUSAE,
    JumpReLUSkipTranscoder,
    JumpReLUTranscoder,
    SkipTranscoder,
    StandardSAE,
    TopKSAE,
    TrainingSAE,
    Transcoder,
)
from sae_lens.saes.abstopk_sae import AbsTopKSAE

logger = logging.getLogger(__name__)

FOLD_SCALES_BUFFER = "sae_match_fold_scales"

__all__ = [
    "ARCHITECTURES",
    "IDENTITY_KEYS",
    "RUNTIME_NORMALISATION",
    "ArchitectureSpec",
    "FeatureView",
    "check_no_runtime_normalisation",
    "describe_sae",
    "direction_signature",
    "feature_view",
    "fold",
    "fold_scales",
    "folded_activation_factor",
    "hook_name_of",
    "hook_order",
    "identity_mismatch",
    "layers_from_hooks",
    "model_layer_of",
    "rescale",
    "sae_identity",
    "same_sae",
    "unfold",
    "validate_sae",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """What the adapters need to know about one SAELens architecture."""

    name: str
    """The SAELens architecture string (``cfg.architecture()``)."""
    sae_class: type
    """The SAELens inference class implementing it."""
    bias_names: tuple[str, ...]
    """Per-feature encoder biases, in the order they appear in ``FeatureView.bias_FB``."""
    has_threshold: bool
    """Whether the SAE has a JumpReLU ``threshold`` (fold rule: ``s = threshold``)."""
    scale_rule: str
    """``"threshold"``, ``"decoder_norm"``, or ``"none"`` (see the module docstring)."""


def _spec(name: str, cls: type, bias: tuple[str, ...], threshold: bool, rule: str) -> ArchitectureSpec:
    return ArchitectureSpec(name, cls, bias, threshold, rule)


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec
    for spec in (
        _spec("standard", StandardSAE, ("b_enc",), False, "decoder_norm"),
        _spec("jumprelu", JumpReLUSAE, ("b_enc",), True, "threshold"),
        _spec("gated", GatedSAE, ("b_gate", "b_mag"), False, "decoder_norm"),
        _spec("topk", TopKSAE, ("b_enc",), False, "none"),
        _spec("abstopk", AbsTopKSAE, ("b_enc",), False, "none"),
        _spec("transcoder", Transcoder, ("b_enc",), False, "decoder_norm"),
        _spec("skip_transcoder", SkipTranscoder, ("b_enc",), False, "decoder_norm"),
        _spec("jumprelu_transcoder", JumpReLUTranscoder, ("b_enc",), True, "threshold"),
        _spec("jumprelu_skip_transcoder", JumpReLUSkipTranscoder, ("b_enc",), True, "threshold"),
    )
}
"""Every architecture the adapters understand, keyed by SAELens' architecture name."""


def hook_name_of(sae: Any) -> str:
    """The hook the SAE reads from (``cfg.metadata.hook_name``), or ``"<no hook_name>"``."""
    cfg = getattr(sae, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    if metadata is not None and "hook_name" in metadata and metadata["hook_name"]:
        return str(metadata["hook_name"])
    return "<no hook_name>"


_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.")


_BLOCK_PARTS = re.compile(r"^blocks\.(\d+)\.(.+)$")
_IN_BLOCK_RANK = (("hook_resid_pre", 0), ("ln1.", 1), ("attn.", 1), ("hook_attn", 1),
                  ("hook_q_input", 1), ("hook_k_input", 1), ("hook_v_input", 1),
                  ("hook_resid_mid", 2), ("ln2.", 3), ("mlp.", 3), ("hook_mlp", 3),
                  ("hook_resid_post", 4))


def hook_order(name: str, n_layers: int) -> tuple[int, int]:
    """Where a hook sits in the forward pass: ``(layer, rank within the block)``.

    ``blocks.L.hook_resid_pre`` < ``...attn...`` < ``hook_resid_mid`` < ``...mlp...`` <
    ``blocks.L.hook_resid_post``; embedding hooks come before block 0, everything else outside
    the blocks (``ln_final``, ``unembed``) after the last block.
    """
    m = _BLOCK_PARTS.match(name)
    if m is None:
        return (-1, 0) if "embed" in name and "unembed" not in name else (n_layers, 0)
    layer, rest = int(m.group(1)), m.group(2)
    for prefix, rank in _IN_BLOCK_RANK:
        if rest.startswith(prefix):
            return layer, rank
    return layer, 2


def model_layer_of(sae_or_hook: Any) -> int | None:
    """The model layer an SAE (or a hook name) reads: ``L`` of ``blocks.L.…``; None otherwise.

    Example:
        >>> model_layer_of("blocks.12.hook_resid_post")
        12
    """
    hook = sae_or_hook if isinstance(sae_or_hook, str) or sae_or_hook is None else hook_name_of(sae_or_hook)
    found = _BLOCK_HOOK.match(hook or "")
    return int(found.group(1)) if found else None


def layers_from_hooks(saes: Sequence[Any], *, what: str) -> list[int]:
    """The model layer of each SAE of a list, from its hook name (``blocks.L.…``).

    Args:
        saes: the SAEs.
        what: who asks, for the error messages (e.g. ``"match_chain"``).

    Raises:
        ValueError: an SAE's hook names no block, or two SAEs read the same layer (the message
            names the hooks and says to pass a mapping ``{model layer: SAE}`` instead).

    Example:
        >>> layers_from_hooks([sae_l10, sae_l11], what="match_chain")
        [10, 11]
    """
    hooks = [hook_name_of(sae) for sae in saes]
    layers = [model_layer_of(hook) for hook in hooks]
    unknown = [hook for hook, layer in zip(hooks, layers, strict=True) if layer is None]
    if unknown:
        raise ValueError(
            f"{what}: cannot tell the model layer of {unknown} (a list takes each SAE's layer "
            "from its hook name 'blocks.L.…'); pass a mapping {model layer: SAE} instead."
        )
    seen: dict[int, str] = {}
    for hook, layer in zip(hooks, layers, strict=True):
        if layer in seen:
            raise ValueError(
                f"{what}: '{seen[layer]}' and '{hook}' are both at model layer {layer}; a list "
                "needs one SAE per layer. Pass a mapping {model layer: SAE} instead."
            )
        seen[layer] = hook  # type: ignore[index]
    return layers  # type: ignore[return-value]


def describe_sae(sae: Any) -> str:
    """A short human-readable name for error messages: hook name, architecture, width."""
    cfg = getattr(sae, "cfg", None)
    try:
        arch = cfg.architecture()  # type: ignore[union-attr]
    except Exception:
        arch = type(sae).__name__
    d_sae = getattr(cfg, "d_sae", "?")
    return f"SAE '{hook_name_of(sae)}' ({arch}, d_sae={d_sae})"


def _spec_of(sae: Any) -> ArchitectureSpec:
    if not isinstance(sae, SAE):
        raise TypeError(
            f"expected a SAELens SAE (sae_lens.SAE subclass), got {type(sae).__name__}; "
            "load one with SAE.from_pretrained(...) or SAE.load_from_disk(...)."
        )
    arch = sae.cfg.architecture()
    spec = ARCHITECTURES.get(arch)
    known = ", ".join(sorted(ARCHITECTURES))
    if isinstance(sae, TrainingSAE):
        raise ValueError(
            f"{describe_sae(sae)}: {type(sae).__name__} is a training SAE; sae_match_lens works on "
            "inference SAEs. Save it with save_inference_model() and load the inference SAE with "
            "SAE.load_from_disk()."
        )
    if spec is None:
        raise ValueError(
            f"{describe_sae(sae)}: architecture '{arch}' ({type(sae).__name__}) is not supported "
            f"by sae_match_lens. Supported architectures: {known}."
        )
    if type(sae) is not spec.sae_class:
        raise ValueError(
            f"{describe_sae(sae)}: class {type(sae).__name__} reports architecture '{arch}' but is "
            f"not SAELens' {spec.sae_class.__name__}; a subclass may compute something else, so it "
            f"is refused. Supported architectures: {known}."
        )
    return spec


def feature_thresholds(sae: SAE, spec: ArchitectureSpec) -> torch.Tensor | None:
    """The per-feature threshold θ ``[d_sae]`` of a thresholded SAE (a scalar θ expanded),
    ``None`` for architectures without one.

    Raises:
        ValueError: If the threshold is neither a scalar nor ``[d_sae]``.
    """
    if not spec.has_threshold:
        return None
    theta = sae.threshold.detach()
    d_sae = sae.cfg.d_sae
    if theta.numel() == 1:
        return theta.reshape(()).expand(d_sae)
    if theta.shape != (d_sae,):
        raise ValueError(
            f"{describe_sae(sae)}: threshold has shape {tuple(theta.shape)}, expected ({d_sae},) "
            "or a scalar."
        )
    return theta


def validate_sae(sae: Any) -> ArchitectureSpec:
    """Check that ``sae`` is a supported SAELens SAE with finite, well-shaped parameters.

    Returns its :class:`ArchitectureSpec`. Raises ``TypeError``/``ValueError`` naming the SAE,
    the offending parameter and what to do.
    """
    spec = _spec_of(sae)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    d_out = getattr(sae.cfg, "d_out", d_in)
    expected = {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_out),
        **{name: (d_sae,) for name in spec.bias_names},
    }
    if spec.name == "gated":
        expected["r_mag"] = (d_sae,)
    for name, shape in expected.items():
        tensor = getattr(sae, name)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{describe_sae(sae)}: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                f"from cfg (d_in={d_in}, d_sae={d_sae}, d_out={d_out})."
            )
    names = [*expected, "b_dec"] + (["threshold"] if spec.has_threshold else [])
    for name in names:
        tensor = getattr(sae, name).detach()
        if bool(torch.isfinite(tensor.sum())):
            continue  # a NaN or inf anywhere would make the sum non-finite
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(
                f"{describe_sae(sae)}: parameter {name} has {bad} non-finite (NaN/inf) entries; "
                "the SAE is corrupt or was saved mid-divergence — reload or retrain it."
            )
    return spec


@dataclass(frozen=True)
class FeatureView:
    """An SAE seen feature by feature: row ``i`` of each tensor is feature ``i``.

    Shape suffixes: F = d_sae, D = d_in, O = d_out (= d_in for SAEs), B = number of
    per-feature encoder biases (1, or 2 for gated: ``b_gate``, ``b_mag``).
    """

    encoder_FD: torch.Tensor
    """Encoder vectors, ``W_enc.T`` ([d_sae, d_in])."""
    decoder_FO: torch.Tensor
    """Decoder vectors, ``W_dec`` ([d_sae, d_out])."""
    bias_FB: torch.Tensor
    """Per-feature encoder biases ([d_sae, B])."""
    threshold_F: torch.Tensor | None
    """JumpReLU thresholds ([d_sae]), or ``None`` for architectures without one."""
    bias_names: tuple[str, ...]
    """Which SAELens parameter each column of ``bias_FB`` comes from."""
    folded: bool
    """Whether the view is in folded units (:func:`fold_scales` applied)."""
    hook_name: str
    """Where the SAE reads (``cfg.metadata.hook_name``)."""

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return self.encoder_FD.shape[0]


def fold_scales(sae: SAE) -> torch.Tensor:
    """The per-feature scale ``s`` [d_sae] that :func:`fold` applies (see module docstring).

    Raises:
        ValueError: for a JumpReLU SAE with a threshold ≤ 0 (naming how many features).
    """
    return _fold_scales(sae, validate_sae(sae))


def _fold_scales(sae: SAE, spec: ArchitectureSpec) -> torch.Tensor:
    d_sae = sae.cfg.d_sae
    device = sae.W_dec.device
    if spec.scale_rule == "threshold":
        theta = feature_thresholds(sae, spec)
        assert theta is not None  # has_threshold guarantees it
        bad = int((theta <= 0).sum())
        if bad:
            raise ValueError(
                f"{describe_sae(sae)}: {bad} of {d_sae} features have threshold <= 0 "
                f"(min {float(theta.min()):.4g}); folding divides by the threshold, so it needs "
                "every threshold > 0. Fix the thresholds, or match with fold=False."
            )
        return theta.to(torch.float64).clone()
    uses_norm = spec.scale_rule == "decoder_norm" or (
        spec.name in ("topk", "abstopk") and sae.cfg.rescale_acts_by_decoder_norm
    )
    if not uses_norm:
        return torch.ones(d_sae, dtype=torch.float64, device=device)
    norms = sae.W_dec.detach().to(torch.float64).norm(dim=-1)
    zero = norms == 0
    if bool(zero.any()):
        logger.info("%s: %d features have an all-zero decoder row; they keep scale 1.",
                    describe_sae(sae), int(zero.sum()))
    return torch.where(zero, torch.ones_like(norms), 1.0 / norms)


def _encode_absorbs_scale(sae: SAE, spec: ArchitectureSpec) -> bool:
    """TopK / AbsTopK with ``rescale_acts_by_decoder_norm``: ``encode`` multiplies by the
    decoder-row norm, so a re-parametrisation leaves its activations unchanged."""
    return spec.name in ("topk", "abstopk") and bool(sae.cfg.rescale_acts_by_decoder_norm)


def folded_activation_factor(sae: SAE) -> torch.Tensor:
    """The per-feature factor [d_sae] (float64) that takes ``sae.encode(x)`` into folded units.

    ``fold(sae).encode(x) == sae.encode(x) * folded_activation_factor(sae)`` for every
    supported architecture:

    * ``1 / fold_scales(sae)`` for ReLU, JumpReLU, gated SAEs and transcoders, and plain TopK
      (whose fold scale is 1);
    * ``1`` for TopK / AbsTopK with ``rescale_acts_by_decoder_norm=True``: their ``encode`` is
      already ``pre-activation × ‖W_dec[i]‖``, i.e. in unit-decoder-norm (folded) units.

    Moving activations from SAE A into SAE B "in folded units" is therefore
    ``f_B_raw[P(i)] = f_A_raw[i] · factor_A[i] / factor_B[P(i)]``, which equals
    ``fold(B).decode``-ready units for B and is what :mod:`sae_match_lens.lens.hooks` does.
    """
    spec = validate_sae(sae)
    if _encode_absorbs_scale(sae, spec):
        return torch.ones(sae.cfg.d_sae, dtype=torch.float64, device=sae.W_dec.device)
    return 1.0 / _fold_scales(sae, spec)


RUNTIME_NORMALISATION = ("constant_norm_rescale", "layer_norm")
"""``normalize_activations`` settings whose SAE keeps per-input state between ``encode`` and
``decode`` (a norm coefficient, or a mean and a standard deviation)."""


def check_no_runtime_normalisation(sae: SAE, role: str) -> None:
    """Refuse an SAE that normalises its input at run time, for substitution and steering.

    With ``normalize_activations`` = ``constant_norm_rescale`` or ``layer_norm`` SAELens stores a
    per-input coefficient in ``encode`` and uses it in ``decode``. Decoding SAE A's permuted
    activations with SAE B then needs B's coefficient of an input it never saw (SAELens crashes,
    or uses the coefficient of the true state at B, which leaks it into the substitute). There is
    no data-free choice that is right, so such SAEs are refused here; matching their parameters
    is still allowed. ``expected_average_only_in`` and ``covariance_whitening`` are statistics that
    SAELens folds into the weights at load time; left unfolded, the SAE expects inputs that the
    model does not produce, so they are refused too.
    """
    setting = getattr(sae.cfg, "normalize_activations", "none")
    if setting in (None, "none"):
        return
    if setting in RUNTIME_NORMALISATION:
        raise ValueError(
            f"{describe_sae(sae)} ({role}) normalises its input at run time "
            f"(normalize_activations={setting!r}): its decode needs a coefficient computed from "
            "the input of its own encode, which a substitute does not have. Use an SAE trained "
            "without run-time normalisation (normalize_activations='none')."
        )
    raise ValueError(
        f"{describe_sae(sae)} ({role}) has normalize_activations={setting!r} that was not folded "
        "into its weights, so it expects inputs the model does not produce. Fold it first "
        "(SAE.fold_activation_norm_scaling_factor(...) or fold_activation_whitening(...)), "
        "which sets normalize_activations='none'."
    )


def _scaled(param: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (param.detach().to(torch.float64) * factor).to(param.dtype)


def rescale(sae: SAE, scales_F: torch.Tensor) -> SAE:
    """Return a copy of ``sae`` re-parametrised by positive per-feature scales ``s``.

    Encoder column ``i``, feature ``i``'s encoder biases and threshold are divided by ``s_i``,
    decoder row ``i`` is multiplied by ``s_i``. The copy computes the same ``decode(encode(x))``.
    Its activations are the originals divided by ``s`` for ReLU, JumpReLU, gated and
    plain TopK SAEs, and unchanged for TopK / AbsTopK SAEs with
    ``rescale_acts_by_decoder_norm=True`` (their ``encode`` multiplies by the decoder norm,
    which absorbs ``s``). :func:`folded_activation_factor` gives the factor for any SAE.
    The input is not modified.

    Raises:
        ValueError: if ``s`` has the wrong shape or is not finite and positive, or if the
            architecture's output would change (non-uniform scales on a TopK SAE without
            ``rescale_acts_by_decoder_norm``).
    """
    spec = validate_sae(sae)
    d_sae = sae.cfg.d_sae
    s = torch.as_tensor(scales_F).detach().to(device=sae.W_dec.device, dtype=torch.float64)
    if s.shape != (d_sae,):
        raise ValueError(f"{describe_sae(sae)}: scales have shape {tuple(s.shape)}, expected ({d_sae},).")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(
            f"{describe_sae(sae)}: scales must be finite and > 0; "
            f"{int((~torch.isfinite(s) | (s <= 0)).sum())} entries are not."
        )
    if (
        spec.name in ("topk", "abstopk")
        and not sae.cfg.rescale_acts_by_decoder_norm
        and not bool((s == s[0]).all())
    ):
        raise ValueError(
            f"{describe_sae(sae)}: a TopK SAE without rescale_acts_by_decoder_norm ranks raw "
            "pre-activations, so non-uniform per-feature scales would change its output."
        )
    new = copy.deepcopy(sae)
    new._buffers.pop(FOLD_SCALES_BUFFER, None)  # a re-parametrised copy is no longer a fold() result
    with torch.no_grad():
        new.W_enc.data = _scaled(sae.W_enc, 1.0 / s[None, :])
        new.W_dec.data = _scaled(sae.W_dec, s[:, None])
        for name in spec.bias_names:
            getattr(new, name).data = _scaled(getattr(sae, name), 1.0 / s)
        if spec.has_threshold:
            theta = feature_thresholds(sae, spec)
            assert theta is not None
            new.threshold = torch.nn.Parameter(
                _scaled(theta.contiguous(), 1.0 / s), requires_grad=sae.threshold.requires_grad
            )
    return new


def _record_fold_scales(sae: SAE, scales_F: torch.Tensor | None) -> SAE:
    sae._buffers.pop(FOLD_SCALES_BUFFER, None)
    if scales_F is not None:
        sae.register_buffer(FOLD_SCALES_BUFFER, scales_F, persistent=False)
    return sae


def fold(sae: SAE) -> SAE:
    """Return the folded copy of ``sae`` (threshold units for JumpReLU; see module docstring).

    The SAE's output is unchanged. Its activations are ``sae.encode(x) *
    folded_activation_factor(sae)``: divided by :func:`fold_scales` for every architecture
    except TopK / AbsTopK with ``rescale_acts_by_decoder_norm=True``, whose activations the
    fold leaves as they are. The input SAE is not modified; :func:`unfold` inverts the
    result exactly.

    Example:
        >>> folded = fold(sae)
        >>> torch.testing.assert_close(folded.decode(folded.encode(x)), sae.decode(sae.encode(x)))
    """
    s = fold_scales(sae)
    previous = getattr(sae, FOLD_SCALES_BUFFER, None)
    total = s if previous is None else previous.to(s) * s
    return _record_fold_scales(rescale(sae, s), total)


def unfold(sae: SAE, scales_F: torch.Tensor | None = None) -> SAE:
    """Invert :func:`fold`: return a copy with the original parametrisation.

    Args:
        sae: an SAE returned by :func:`fold` (it remembers its fold scales), or any SAE if
            ``scales_F`` is given.
        scales_F: the scales it was folded with; default: the ones :func:`fold` recorded.

    Raises:
        ValueError: if the SAE carries no fold scales and none are given (fold scales are
            not written by ``save_model``; keep the original SAE, or pass the scales).
    """
    if scales_F is None:
        scales_F = getattr(sae, FOLD_SCALES_BUFFER, None)
        if scales_F is None:
            raise ValueError(
                f"{describe_sae(sae)} was not produced by sae_match_lens.fold() in this process "
                "(the fold scales are not saved with the SAE). Keep the original SAE, or call "
                "unfold(sae, scales_F=fold_scales(original))."
            )
    return _record_fold_scales(rescale(sae, 1.0 / torch.as_tensor(scales_F).to(torch.float64)), None)


def feature_view(sae: SAE, *, fold: bool = True, dtype: torch.dtype = torch.float32,
                 encoder: bool = True) -> FeatureView:
    """Per-feature tensors of ``sae``, folded (default) or raw, without copying the SAE.

    Args:
        sae: any supported SAELens inference SAE.
        fold: apply the architecture's fold scale rule (:func:`fold_scales`).
        dtype: dtype of the returned tensors; the scaling is done in this dtype (one rounding
            per entry), so the view costs one copy of the encoder and decoder.
        encoder: ``False`` leaves the encoder out (``encoder_FD`` is then an empty
            ``[d_sae, 0]`` tensor): for costs that give it no weight, it saves the transposed
            copy of ``W_enc`` (:func:`~sae_match_lens.solvers.costs.stack_features` refuses such
            a view for a cost that weighs the encoder).

    Returns:
        A :class:`FeatureView` whose tensors live on the SAE's device.
    """
    spec = validate_sae(sae)
    biases = torch.stack([getattr(sae, n).detach() for n in spec.bias_names], dim=1).to(dtype)
    theta = feature_thresholds(sae, spec)
    theta = None if theta is None else theta.to(dtype)
    w_enc, w_dec = sae.W_enc.detach(), sae.W_dec.detach()
    if not encoder:
        enc = torch.empty((sae.cfg.d_sae, 0), dtype=dtype, device=w_enc.device)
    if fold:
        s = _fold_scales(sae, spec)
        s_dt, inv = s.to(dtype), (1.0 / s).to(dtype)
        # the scaled tensors are the copies (the same roundings as a copy scaled in place)
        if encoder:
            enc = torch.empty((sae.cfg.d_sae, w_enc.shape[0]), dtype=dtype, device=w_enc.device)
            torch.mul(w_enc.T.to(dtype), inv[:, None], out=enc)
        dec = torch.empty(w_dec.shape, dtype=dtype, device=w_dec.device)
        torch.mul(w_dec.to(dtype), s_dt[:, None], out=dec)
        biases.mul_(inv[:, None])
        theta = None if theta is None else theta * inv
    else:
        if encoder:
            enc = w_enc.T.to(dtype, copy=True, memory_format=torch.contiguous_format)
        dec = w_dec.to(dtype, copy=True)
    return FeatureView(
        encoder_FD=enc.contiguous(),
        decoder_FO=dec.contiguous(),
        bias_FB=biases.contiguous(),
        threshold_F=None if theta is None else theta.contiguous(),
        bias_names=spec.bias_names,
        folded=fold,
        hook_name=hook_name_of(sae),
    )


def _sampled_rows(d_sae: int) -> torch.Tensor:
    return torch.arange(0, d_sae, max(1, d_sae // 256))


def _leading_coordinates(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` columns of ``torch.argsort(x, dim=1, descending=True, stable=True)``
    (ties: the lower index first) without sorting whole rows.

    ``torch.topk`` gives each row's ``n``-th largest value ``t``; a row with exactly ``n``
    entries ``≥ t`` (and no NaN) has those as its leading entries, ordered here by value, then
    index. Any other row (ties at ``t``, NaN) is sorted in full.

    Args:
        x: a 2-D tensor.
        n: how many leading columns (at most ``x.shape[1]``).

    Returns:
        Indices [rows, n] (int64).
    """
    if n >= x.shape[1] or x.shape[0] == 0:
        return torch.argsort(x, dim=1, descending=True, stable=True)[:, :n]
    above = x >= torch.topk(x, n, dim=1).values[:, -1:]
    simple = (above.sum(dim=1) == n) & ~torch.isnan(x).any(dim=1)
    out = torch.empty((x.shape[0], n), dtype=torch.int64, device=x.device)
    if bool(simple.any()):
        idx = torch.nonzero(above[simple])[:, 1].view(-1, n)  # ascending index within each row
        by_value = torch.argsort(x[simple].gather(1, idx), dim=1, descending=True, stable=True)
        out[simple] = idx.gather(1, by_value)
    if not bool(simple.all()):
        out[~simple] = torch.argsort(x[~simple], dim=1, descending=True, stable=True)[:, :n]
    return out


def direction_signature(sae: SAE) -> str:
    """A fingerprint of the SAE that folding and any positive per-feature rescaling keep.

    For a strided sample of at most ~256 features it hashes, for the decoder row and the encoder
    column, the indices of the three largest-magnitude coordinates and their signs. Multiplying
    a vector by a positive number (with rounding) never reverses the order of its coordinates'
    magnitudes nor flips a sign, so ``fold(sae)``, ``unfold`` and :func:`rescale` give the same
    signature, while another SAE (another layer, another training run) almost surely does not.
    """
    spec = _spec_of(sae)
    rows = _sampled_rows(sae.cfg.d_sae)
    digest = hashlib.sha256()
    for vectors in (sae.W_dec.detach()[rows], sae.W_enc.detach()[:, rows].T):
        v = vectors.to(torch.float64).cpu()
        order = _leading_coordinates(v.abs(), 3)
        signs = torch.gather(torch.sign(v), 1, order)
        digest.update(order.numpy().astype("int64").tobytes())
        digest.update(signs.numpy().astype("int8").tobytes())
    digest.update(spec.name.encode())
    return digest.hexdigest()[:16]


def sae_identity(sae: SAE) -> dict[str, Any]:
    """A JSON-able record that identifies an SAE: hook, sizes, release/id, weight fingerprints.

    ``fingerprint`` hashes a strided sample (at most ~256 rows) of ``W_dec``, ``W_enc`` and the
    encoder biases exactly as stored, so it is cheap at any width and changes with any re-training,
    folding or editing of the sampled features (saved files are checked against it).
    ``directions`` (:func:`direction_signature`) is kept by folding and rescaling; it is what
    :func:`same_sae` compares when a permutation is used with SAEs, so a permutation made on
    folded SAEs works with the unfolded originals and vice versa. ``release``, ``sae_id``,
    ``model_name`` and ``neuronpedia_id`` come from the SAE's metadata (None when unset); they are
    descriptive and not compared (records saved before ``neuronpedia_id`` existed lack it).
    """
    spec = _spec_of(sae)
    md = sae.cfg.metadata
    rows = _sampled_rows(sae.cfg.d_sae)
    digest = hashlib.sha256()
    parts = [sae.W_dec.detach()[rows], sae.W_enc.detach()[:, rows]]
    parts += [getattr(sae, n).detach()[rows] for n in spec.bias_names]
    for t in parts:
        digest.update(t.to(torch.float32).contiguous().cpu().numpy().tobytes())
    return {
        "hook_name": hook_name_of(sae),
        "architecture": spec.name,
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "release": md.get("release"),
        "sae_id": md.get("sae_id"),
        "model_name": md.get("model_name"),
        "neuronpedia_id": md.get("neuronpedia_id"),
        "fingerprint": digest.hexdigest()[:16],
        "directions": direction_signature(sae),
    }


IDENTITY_KEYS = ("hook_name", "d_sae", "d_in", "architecture", "directions")
"""The fields of :func:`sae_identity` that must agree for an SAE to be "the same SAE" as a
recorded one (:func:`same_sae`); the exact ``fingerprint`` is not among them, folding changes it."""


def identity_mismatch(recorded: Any, actual: Any) -> str | None:
    """Why two identity records (:func:`sae_identity`) describe different SAEs, or ``None``.

    Only fields present in both records are compared (hand-made records may hold fewer).
    """
    if not recorded or not actual:
        return None
    for key in IDENTITY_KEYS:
        a, b = recorded.get(key), actual.get(key)
        if a is not None and b is not None and a != b:
            return f"{key} {a!r} vs {b!r}"
    return None


def same_sae(recorded: Any, sae: SAE) -> str | None:
    """Why ``sae`` is not the SAE described by the identity record ``recorded``, or ``None``."""
    return identity_mismatch(recorded, sae_identity(sae))
