"""Builders for tiny SAELens SAEs and planted SAE pairs used across the tests."""

from __future__ import annotations

import math
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

from sae_match_lens import Permutation, rescale

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
        for name, param in sae.named_parameters():
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


class PlantedChain(NamedTuple):
    """A stack of SAEs built from one another by hidden permutations, rescaling and noise."""

    saes: list[SAE]
    truths: list[Permutation]
    """``truths[l].indices[i]``: SAE l+1's feature made from SAE l's feature i."""


class PlantedPair(NamedTuple):
    """SAE B built from SAE A by a hidden permutation, per-feature rescaling and noise."""

    sae_a: SAE
    sae_b: SAE
    truth: Permutation
    """``truth.indices[i]``: B's feature that was made from A's feature i."""


def planted_chain(
    n_layers: int = 3,
    *,
    d_in: int = 32,
    d_sae: int = 256,
    noise: float = 0.0,
    scale_sigma: float = 2.0,
    n_clusters: int | None = None,
    cluster_spread: float = 0.35,
    seed: int = 0,
) -> PlantedChain:
    """JumpReLU SAEs (hooks ``blocks.{l}.hook_resid_post``) whose features correspond by planted
    permutations.

    In *folded* space (threshold 1), layer 0's features are drawn around ``n_clusters`` centres
    (feature splitting: siblings differ by ``cluster_spread``); layer l+1's folded features are
    layer l's, permuted, plus Gaussian noise of relative size ``noise``. Each SAE is then
    unfolded with its own log-normal per-feature scales (σ = ``scale_sigma``): raw thresholds,
    encoder columns and biases scale by s_i and decoder rows by 1/s_i — the same function. At
    ``noise=0``, each SAE is an exact re-parametrisation of the previous one, permuted.
    """
    gen = torch.Generator().manual_seed(seed)
    n_clusters = n_clusters or max(1, d_sae // 8)
    centres = torch.randn(n_clusters, 2 * d_in, generator=gen)
    assign = torch.randint(n_clusters, (d_sae,), generator=gen)
    folded = centres[assign] + cluster_spread * torch.randn(d_sae, 2 * d_in, generator=gen)
    folded /= math.sqrt(2 * d_in)
    bias = 0.1 * torch.randn(d_sae, generator=gen)
    b_dec = 0.05 * torch.randn(d_in, generator=gen)

    def make(vectors: torch.Tensor, b_enc: torch.Tensor, layer: int) -> SAE:
        cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae)
        cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        sae = JumpReLUSAE(cfg)
        with torch.no_grad():
            sae.W_enc.copy_(vectors[:, :d_in].T)
            sae.W_dec.copy_(vectors[:, d_in:])
            sae.b_enc.copy_(b_enc)
            sae.b_dec.copy_(b_dec)
            sae.threshold.fill_(1.0)
        scales = torch.exp(scale_sigma * torch.randn(d_sae, generator=gen))
        return rescale(sae, 1.0 / scales)  # thresholds become s_i

    saes, truths = [make(folded, bias, 0)], []
    for layer in range(1, n_layers):
        perm = torch.randperm(d_sae, generator=gen)
        nxt, nxt_bias = torch.empty_like(folded), torch.empty_like(bias)
        nxt[perm] = folded + noise * folded.std() * torch.randn(folded.shape, generator=gen)
        nxt_bias[perm] = bias + noise * bias.std() * torch.randn(bias.shape, generator=gen)
        folded, bias = nxt, nxt_bias
        saes.append(make(folded, bias, layer))
        truths.append(Permutation(perm, d_sae))
    return PlantedChain(saes, truths)


def planted_pair(**kwargs: float | int | None) -> PlantedPair:
    """Two planted SAEs (see :func:`planted_chain`, whose keyword arguments it takes)."""
    chain = planted_chain(2, **kwargs)  # type: ignore[arg-type]
    return PlantedPair(chain.saes[0], chain.saes[1], chain.truths[0])
