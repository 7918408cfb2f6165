"""Synthetic SAE stacks with planted feature correspondences (ground truth for matching).

Used by the demo's quick mode, the tests and the benchmarks: a matcher is right exactly when it
recovers the planted permutations.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

from .permutation import Permutation

__all__ = ["PlantedChain", "planted_chain"]


class PlantedChain(NamedTuple):
    """A stack of SAEs built from one another by hidden permutations, rescaling and noise."""

    saes: list[JumpReLUSAE]
    """The SAEs, hook ``blocks.{first_layer + i}.hook_resid_post`` for the ``i``-th."""
    truths: list[Permutation]
    """``truths[k].indices[i]``: SAE k+1's feature that was made from SAE k's feature i."""


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
    first_layer: int = 0,
) -> PlantedChain:
    """JumpReLU SAEs whose features correspond by planted permutations.

    In *folded* space (every threshold 1), layer 0's features are drawn around ``n_clusters``
    centres (feature splitting: siblings differ by ``cluster_spread``); layer l+1's folded
    features are layer l's, permuted, plus Gaussian noise of relative size ``noise``. Each SAE
    is then given its own log-normal thresholds θ (σ = ``scale_sigma``): raw encoder columns and
    biases are the folded ones times θ_i and decoder rows the folded ones divided by θ_i — the
    same function as its folded form. At ``noise=0`` each SAE is an exact re-parametrisation of
    the previous one with its features permuted.

    Args:
        n_layers: number of SAEs.
        d_in: residual width.
        d_sae: features per SAE.
        noise: relative noise added to the folded parameters at each step.
        scale_sigma: σ of the log-normal thresholds.
        n_clusters: number of feature clusters (default ``d_sae // 8``).
        cluster_spread: spread of features around their cluster centre.
        seed: random seed.
        first_layer: the model layer of the first SAE (the others follow one per layer).
    """
    gen = torch.Generator().manual_seed(seed)
    n_clusters = n_clusters or max(1, d_sae // 8)
    scale = 1.0 / math.sqrt(2 * d_in)
    centres = torch.randn(n_clusters, 2 * d_in, generator=gen)
    assign = torch.randint(n_clusters, (d_sae,), generator=gen)
    folded = (centres[assign] + cluster_spread * torch.randn(d_sae, 2 * d_in, generator=gen)) * scale
    del centres
    bias = 0.1 * torch.randn(d_sae, generator=gen)
    b_dec = 0.05 * torch.randn(d_in, generator=gen)

    def make(layer: int) -> JumpReLUSAE:
        cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae)
        cfg.metadata.hook_name = f"blocks.{first_layer + layer}.hook_resid_post"
        sae = JumpReLUSAE(cfg)
        theta = torch.exp(scale_sigma * torch.randn(d_sae, generator=gen))
        with torch.no_grad():
            sae.W_enc.data = (folded[:, :d_in] * theta[:, None]).T.contiguous()
            sae.W_dec.data = folded[:, d_in:] / theta[:, None]
            sae.b_enc.data = bias * theta
            sae.b_dec.data = b_dec.clone()
            sae.threshold.data = theta
        return sae

    saes, truths = [make(0)], []
    for layer in range(1, n_layers):
        perm = torch.randperm(d_sae, generator=gen)
        if noise:
            folded.add_(noise * folded.std() * torch.randn(folded.shape, generator=gen))
            bias = bias + noise * bias.std() * torch.randn(bias.shape, generator=gen)
        moved, moved_bias = torch.empty_like(folded), torch.empty_like(bias)
        moved[perm], moved_bias[perm] = folded, bias
        folded, bias = moved, moved_bias
        saes.append(make(layer))
        truths.append(Permutation(perm, d_sae))
    return PlantedChain(saes, truths)
