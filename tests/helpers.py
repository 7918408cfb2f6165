"""Builders for tiny SAELens SAEs and planted SAE pairs used across the tests.

``planted_chain`` (re-exported from :mod:`sae_match_lens.synthetic`) builds stacks whose feature
correspondences are known; the tests check that matching recovers them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.abstopk_sae import AbsTopKSAE, AbsTopKSAEConfig

from sae_match_lens import Permutation
from sae_match_lens.synthetic import planted_chain

ALL_ARCHITECTURES = [
    "standard",
    "jumprelu",
    "jumprelu_scalar_threshold",
    "gated",
    "topk",
    "topk_rescaled",
    "abstopk",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
]
__all__ = ["ALL_ARCHITECTURES", "PlantedPair", "build_sae", "planted_chain", "planted_pair", "sample_inputs"]
"""Every SAELens inference architecture the adapters support (with variants worth testing)."""

_CLASSES = {
    "standard": (StandardSAE, StandardSAEConfig),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
    "jumprelu_scalar_threshold": (JumpReLUSAE, JumpReLUSAEConfig),
    "gated": (GatedSAE, GatedSAEConfig),
    "topk": (TopKSAE, TopKSAEConfig),
    "topk_rescaled": (TopKSAE, TopKSAEConfig),
    "abstopk": (AbsTopKSAE, AbsTopKSAEConfig),
    "transcoder": (Transcoder, TranscoderConfig),
    "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
    "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
    "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
}


def build_sae(
    architecture: str = "jumprelu",
    *,
    d_in: int = 16,
    d_sae: int = 48,
    d_out: int = 12,
    hook_name: str = "blocks.0.hook_resid_post",
    seed: int = 0,
) -> SAE:
    """A tiny SAE of the given architecture with random, non-degenerate parameters.

    Thresholds are log-normal and positive, biases non-zero, decoder rows of varied norms, so
    that any mistake in folding shows up in the output.
    """
    cls, cfg_cls = _CLASSES[architecture]
    kwargs: dict = {"d_in": d_in, "d_sae": d_sae}
    if "transcoder" in architecture:
        kwargs.update(d_out=d_out, apply_b_dec_to_input=False)
    if architecture.startswith(("topk", "abstopk")):
        kwargs["k"] = 5
    if architecture == "topk_rescaled":
        kwargs["rescale_acts_by_decoder_norm"] = True
    cfg = cfg_cls(**kwargs)
    cfg.metadata.hook_name = hook_name
    sae = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        sae.W_dec.mul_(torch.exp(torch.randn(d_sae, 1, generator=gen)))
        if hasattr(sae, "threshold"):
            theta = torch.exp(torch.randn(d_sae, generator=gen) * 0.7) * 0.1
            if architecture == "jumprelu_scalar_threshold":
                sae.threshold = torch.nn.Parameter(theta[:1].reshape(()))
            else:
                sae.threshold.copy_(theta)
        if hasattr(sae, "r_mag"):
            sae.r_mag.mul_(0.5)
    return sae


def sample_inputs(sae: SAE, n: int = 64, seed: int = 1) -> torch.Tensor:
    """Random inputs [n, d_in] on a scale where a good share of features fire."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, sae.cfg.d_in, generator=gen) * 2.0


class PlantedPair(NamedTuple):
    """SAE B built from SAE A by a hidden permutation, per-feature rescaling and noise."""

    sae_a: SAE
    sae_b: SAE
    truth: Permutation
    """``truth.indices[i]``: B's feature that was made from A's feature i."""


def planted_pair(**kwargs: float | int | None) -> PlantedPair:
    """Two planted SAEs (see :func:`planted_chain`, whose keyword arguments it takes)."""
    chain = planted_chain(2, **kwargs)  # type: ignore[arg-type]
    return PlantedPair(chain.saes[0], chain.saes[1], chain.truths[0])
