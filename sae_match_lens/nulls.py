"""The null model behind link confidences and ``max_cost="auto"``, and unrelated-SAE controls.

**What "unrelated" has to keep.** Two SAEs of one model share a lot that has nothing to do with
which features correspond: their dictionaries lean towards a common mean direction and spread
along a common low-rank covariance (the model's anisotropy), each feature's encoder column
points roughly along its decoder row, and feature norms, biases and firing offsets follow each
SAE's own distribution. A null that rotates features into a random basis makes them isotropic
and throws all of that away; against it an unrelated but realistic dictionary beats "chance"
almost always (measured on the default suite: decoder cosine kept 99% of the features of a
moment-matched unrelated SAE at a nominal 1%).

**The null.** Each null feature is a sampled source feature with its *direction* redrawn and
everything else kept:

* its vector blocks (decoder row, encoder column; in the units the score uses) are replaced by
  a draw from a Gaussian with the empirical mean and covariance of the source SAE's *unit*
  blocks, stacked ``[d̂ | ê]`` so the decoder–encoder cross-covariance (each feature's encoder
  points along its decoder) is drawn jointly; each block is renormalised to unit length and
  multiplied by the sampled feature's own block norm;
* its scalar columns (``b_enc`` in a folded cost, the firing-offset z-score of
  ``cosine_density``) are the sampled feature's own.

The Gaussian is sampled as ``μ + Σ_r g_r (u_r − μ) / √m`` over ``m`` fitted rows ``u_r`` with
``g ~ N(0, I)``: exactly the fitted rows' mean and covariance, without forming or factoring a
covariance matrix (``n_null · m · K`` flops). The mean and covariance come from all of the
source's features up to :data:`FIT_ROWS`, else from :data:`FIT_ROWS` of them drawn at random.

So a null feature looks like one of the source SAE's features to every statistic up to second
order (mean direction, covariance, encoder–decoder alignment), with that feature's own norms,
bias and offset, but with no particular partner in the other SAE. What remains shared between
truly related SAEs beyond second moments (features at the same specific directions) is what
the null counts as signal. The best score of each null feature against the real target SAE is
"the best by chance"; a link's confidence is the fraction of those it beats.

**Confidence (one definition for links and matches).** For a link or a matched pair,
``confidence`` is the fraction of best-by-chance values that the pair does strictly better than
(:func:`chance_confidence`): a link's score strictly above, a match's cost strictly below. It is
one minus an empirical p-value against this null, at a resolution of ``1 / n_null`` (2048 null
features by default): 1.0 means no null feature did as well, 0.5 that half of them did. It is
the same quantity in :attr:`Links.confidence <sae_match_lens.flow.linking.Links.confidence>` and
:attr:`MatchResult.confidence_F <sae_match_lens.matching.MatchResult.confidence_F>`; what
differs is the value it is computed on. On the default JumpReLU suite's adjacent pairs a
top-1 link's confidence (``cosine_density``) averages 0.89–0.97 (17–59% of them at 1.0), a
match's (folded ``mse``, dominated by feature norms, which the null keeps) 0.39–0.60: the
match cost has less power against this null, not a different meaning. Neither accounts for the
one-to-one competition of a matching (:func:`~sae_match_lens.matching.null_max_cost`).

**Limits.** The null is marginal over features: the threshold is one quantile over all null
features, so a source feature in a crowded region of the dictionary is kept a little more
often than one in a sparse region, and the calibration holds for the kept *fraction*.
Features with a partner that differs mainly in norm (folded MSE between layers whose residual
norms differ) are not told apart from chance by a norm-keeping null; see the README's
calibration table for the power of each score.

**Controls.** :func:`isotropic_sae`, :func:`moment_matched_sae` and
:func:`permuted_residual_sae` build SAEs unrelated to every other for checking a null. The first
has isotropic directions (the only case a random-basis null gets right); the other two have
realistic geometry: the second draws every feature's
``[decoder row, encoder column, b_enc, log θ]`` from a Gaussian with the real SAE's joint
mean and covariance, the second permutes the residual-stream coordinates of a real SAE (same
spectrum and everything else, unrelated directions).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from .adapters import describe_sae, validate_sae

__all__ = ["FIT_ROWS", "chance_confidence", "isotropic_sae", "moment_matched_sae", "null_surrogates",
           "permuted_residual_sae"]

FIT_ROWS = 16384
"""Source features the null's mean and covariance are fitted on at most (drawn at random
beyond this, so the null costs ``O(n_null · FIT_ROWS · K)`` at any dictionary size)."""


def chance_confidence(values: torch.Tensor, best_by_chance: torch.Tensor, *,
                      higher_is_better: bool) -> torch.Tensor:
    """The confidence of each value against the null (module doc, "Confidence").

    Args:
        values: link scores (``higher_is_better=True``) or matching costs (``False``), any
            shape; NaN where there is no pair.
        best_by_chance: ``[n_null]``: each null feature's best score (or cheapest cost)
            against the target SAE.
        higher_is_better: ``True`` for scores, ``False`` for costs.

    Returns:
        float64, the shape of ``values``: the fraction of ``best_by_chance`` that each value
        does strictly better than (a score strictly above, a cost strictly below); NaN where
        the value is NaN.

    Raises:
        ValueError: ``best_by_chance`` is empty or holds NaN.
    """
    best = best_by_chance.detach().to(torch.float64).flatten()
    if best.numel() == 0 or bool(torch.isnan(best).any()):
        raise ValueError(f"best_by_chance must be a non-empty tensor without NaN "
                         f"({best.numel()} values given).")
    ordered = torch.sort(best).values
    value = values.detach().to(torch.float64)
    flat = value.nan_to_num(0.0).flatten().contiguous()
    if higher_is_better:  # null values strictly below the score
        beaten = torch.searchsorted(ordered, flat, right=False)
    else:  # null values strictly above the cost
        beaten = len(ordered) - torch.searchsorted(ordered, flat, right=True)
    out = (beaten.to(torch.float64) / len(ordered)).reshape(value.shape)
    return out.masked_fill(torch.isnan(value), math.nan)


def null_surrogates(
    matrix_FK: torch.Tensor,
    blocks: Sequence[slice],
    n: int,
    *,
    generator: torch.Generator,
    scalars_F: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Null features drawn from a source SAE's stacked features (module docstring).

    Args:
        matrix_FK: the source's stacked features ``[n_features, K]`` (any float dtype; the
            surrogates come back in it, on its device).
        blocks: column ranges of the vector blocks (decoder, encoder) whose directions are
            redrawn; every other column is a scalar kept from the sampled feature.
        n: null features to draw; feature ``i`` of the result is built from source feature
            ``rows[i]`` (drawn without replacement while the source has features left).
        generator: a seeded CPU generator (every random choice comes from it).
        scalars_F: an optional per-feature scalar ``[n_features]`` kept with each sampled
            feature (``cosine_density``'s offset term).

    Returns:
        ``(rows, surrogates [n, K], scalars [n] or None)``.

    Raises:
        ValueError: a block outside ``matrix_FK`` or overlapping another, or ``n < 1``.
    """
    n_f, width = matrix_FK.shape
    if n < 1:
        raise ValueError(f"need at least one null feature, got n={n}.")
    spans = sorted((b.start, b.stop) for b in blocks)
    for (_, e0), (s1, _) in itertools.pairwise(spans):
        if s1 < e0:
            raise ValueError(f"null blocks overlap: {spans}.")
    if spans and (spans[0][0] < 0 or spans[-1][1] > width):
        raise ValueError(f"null blocks {spans} fall outside the {width} stacked columns.")
    parts = [torch.randperm(n_f, generator=generator) for _ in range(math.ceil(n / n_f))]
    rows = torch.cat(parts)[:n]
    dev = matrix_FK.device
    out = matrix_FK[rows.to(dev)].to(torch.float32, copy=True)
    if spans:
        fit_rows = (torch.arange(n_f) if n_f <= FIT_ROWS
                    else torch.randperm(n_f, generator=generator)[:FIT_ROWS])
        units = _unit_blocks(matrix_FK[fit_rows.to(dev)].to(torch.float32), spans)
        mean = units.mean(dim=0)
        units.sub_(mean)
        g = torch.randn(n, units.shape[0], generator=generator, dtype=torch.float32).to(dev)
        drawn = torch.addmm(mean[None, :], g, units, alpha=1.0 / math.sqrt(units.shape[0]))
        drawn = _unit_blocks(drawn, _packed(spans))
        for (s, e), (ps, pe) in zip(spans, _packed(spans), strict=True):
            norms = torch.linalg.vector_norm(out[:, s:e], dim=1, keepdim=True)
            out[:, s:e] = drawn[:, ps:pe] * norms
    kept = None if scalars_F is None else scalars_F[rows.to(scalars_F.device)].clone()
    return rows, out.to(matrix_FK.dtype), kept


def _packed(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans laid end to end from column 0 (the layout of :func:`_unit_blocks`' output)."""
    out, col = [], 0
    for s, e in spans:
        out.append((col, col + e - s))
        col += e - s
    return out


def _unit_blocks(matrix: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The spans' columns laid end to end, each span's rows scaled to unit length (a zero row
    stays zero)."""
    tiny = torch.finfo(torch.float32).tiny
    pieces = []
    for s, e in spans:
        block = matrix[:, s:e]
        pieces.append(block / torch.linalg.vector_norm(block, dim=1, keepdim=True).clamp_min(tiny))
    return torch.cat(pieces, dim=1)


_PARAMS = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}


def _plain_parameters(sae: Any, what: str) -> dict[str, torch.Tensor]:
    validate_sae(sae)
    params = dict(sae.named_parameters())
    extra = sorted(set(params) - _PARAMS)
    if extra or not {"W_enc", "W_dec", "b_enc"} <= set(params):
        raise ValueError(
            f"{what} needs an SAE with W_enc, W_dec, b_enc (b_dec, threshold optional), but "
            f"{describe_sae(sae)} has {sorted(params)}; use a standard, JumpReLU or TopK SAE.")
    return params


@torch.no_grad()
def moment_matched_sae(sae: Any, *, seed: int = 0) -> Any:
    """An SAE unrelated to ``sae`` with its geometry up to second moments (a negative control).

    Every feature's ``[W_dec row, W_enc column, b_enc, log θ]`` (θ: JumpReLU threshold, when
    the SAE has one) is drawn from a Gaussian with the joint empirical mean and covariance of
    ``sae``'s features (so the mean direction, the covariance and each feature's
    encoder–decoder alignment are those of ``sae``); ``b_dec`` and the config are kept. No
    feature of the result corresponds to a feature of ``sae`` or of any other SAE.

    Args:
        sae: a standard, JumpReLU or TopK SAELens SAE (or transcoder without skip).
        seed: seed of the draw.

    Returns:
        A new SAE of the same class; ``sae`` is not modified.

    Raises:
        ValueError: an SAE with other parameters (gated, skip transcoders).
    """
    params = _plain_parameters(sae, "moment_matched_sae")
    dec, enc = params["W_dec"].double(), params["W_enc"].double().T
    cols = [dec, enc, params["b_enc"].double()[:, None]]
    theta = params.get("threshold")
    if theta is not None and theta.ndim == 1 and theta.shape[0] == dec.shape[0]:
        cols.append(theta.double().clamp_min(torch.finfo(torch.float64).tiny).log()[:, None])
    else:
        theta = None
    rows = torch.cat(cols, dim=1)
    mean = rows.mean(dim=0)
    centred = rows - mean
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(rows.shape[0], rows.shape[0], generator=gen, dtype=torch.float64)
    drawn = mean + g @ centred / math.sqrt(rows.shape[0] - 1)
    out = copy.deepcopy(sae)
    d_out, d_in = dec.shape[1], enc.shape[1]
    out.W_dec.copy_(drawn[:, :d_out].to(out.W_dec.dtype))
    out.W_enc.copy_(drawn[:, d_out:d_out + d_in].T.to(out.W_enc.dtype))
    out.b_enc.copy_(drawn[:, d_out + d_in].to(out.b_enc.dtype))
    if theta is not None:
        out.threshold.copy_(drawn[:, d_out + d_in + 1].exp().to(out.threshold.dtype))
    return out


@torch.no_grad()
def permuted_residual_sae(sae: Any, *, seed: int = 0) -> Any:
    """``sae`` in a randomly permuted residual basis (a negative control).

    The input coordinates (rows of ``W_enc``) and output coordinates (columns of ``W_dec`` and
    ``b_dec``) are permuted by one random permutation (two independent ones for a transcoder
    whose input and output widths differ). The result computes ``sae``'s function on permuted
    coordinates: the same spectrum, norms, biases, sparsity and encoder–decoder alignment,
    but its directions are unrelated to any other SAE of the model.

    Args:
        sae: a standard, JumpReLU or TopK SAELens SAE (or transcoder without skip).
        seed: seed of the permutation.

    Returns:
        A new SAE of the same class; ``sae`` is not modified.

    Raises:
        ValueError: an SAE with other parameters (gated, skip transcoders).
    """
    params = _plain_parameters(sae, "permuted_residual_sae")
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = params["W_enc"].shape[0], params["W_dec"].shape[1]
    p_in = torch.randperm(d_in, generator=gen)
    p_out = p_in if d_out == d_in else torch.randperm(d_out, generator=gen)
    out = copy.deepcopy(sae)
    out.W_enc.copy_(params["W_enc"][p_in.to(out.W_enc.device)])
    out.W_dec.copy_(params["W_dec"][:, p_out.to(out.W_dec.device)])
    if "b_dec" in params:
        out.b_dec.copy_(params["b_dec"][p_out.to(out.b_dec.device)])
    return out


@torch.no_grad()
def isotropic_sae(sae: Any, *, seed: int = 0, encoder_noise: float = 0.3) -> Any:
    """An SAE with ``sae``'s norms and biases but isotropic directions (a negative control).

    Decoder directions are uniform on the sphere; each encoder column is its decoder direction
    plus Gaussian noise of relative size ``encoder_noise`` (the encoder–decoder alignment real
    SAEs have); the decoder-row norms, encoder-column norms, ``b_enc`` and thresholds are
    ``sae``'s, each shuffled across features; ``b_dec`` is kept.

    Args:
        sae: a standard, JumpReLU or TopK SAELens SAE (``d_in == d_out``).
        seed: seed of the draw.
        encoder_noise: size of the encoder's deviation from its decoder direction, relative to
            a unit vector.

    Returns:
        A new SAE of the same class; ``sae`` is not modified.

    Raises:
        ValueError: an SAE with other parameters, or with ``d_in != d_out``.
    """
    params = _plain_parameters(sae, "isotropic_sae")
    d_in, d_out = params["W_enc"].shape[0], params["W_dec"].shape[1]
    if d_in != d_out:
        raise ValueError(f"isotropic_sae needs d_in == d_out, but {describe_sae(sae)} reads "
                         f"{d_in} and writes {d_out} dims.")
    gen = torch.Generator().manual_seed(seed)
    n = params["W_dec"].shape[0]
    direction = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    encoder = direction + encoder_noise * torch.randn(n, d_in, generator=gen,
                                                      dtype=torch.float64) / math.sqrt(d_in)
    encoder /= encoder.norm(dim=1, keepdim=True)
    dec_norm = params["W_dec"].double().norm(dim=1)[torch.randperm(n, generator=gen)]
    enc_norm = params["W_enc"].double().norm(dim=0)[torch.randperm(n, generator=gen)]
    out = copy.deepcopy(sae)
    out.W_dec.copy_((direction * dec_norm[:, None]).to(out.W_dec.dtype))
    out.W_enc.copy_((encoder * enc_norm[:, None]).T.to(out.W_enc.dtype))
    out.b_enc.copy_(params["b_enc"][torch.randperm(n, generator=gen).to(out.b_enc.device)])
    theta = params.get("threshold")
    if theta is not None and theta.ndim == 1 and theta.shape[0] == n:
        out.threshold.copy_(theta[torch.randperm(n, generator=gen).to(theta.device)])
    return out
