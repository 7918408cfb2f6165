"""Cross-entropy, explained variance, KL and firing statistics: one home, one BOS convention.

Every function here takes whole sequences, ``[batch, pos, ...]`` with the BOS token at
position 0, and applies the convention itself, so the callers (``assets.compute_sae_metrics``,
``evaluation.evaluate_substitution``) cannot drift apart:

* **Scored states** are positions ``1 .. pos-1``. The BOS state (position 0) enters no SAE
  statistic: explained variance, squared error, L0, firing.
* **Scored predictions** are the next-token predictions made at positions ``1 .. pos-2``,
  scored against the tokens at ``2 .. pos-1``. The prediction made *at* BOS is excluded, and
  the last position has no next token to score. **CE and KL are both averaged over the scored
  predictions**, so ΔCE and KL of one substitute describe the same predictions (a sequence
  needs ``pos >= 3``).
* **Explained variance** = ``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²``, pooled over the scored states and
  all dimensions, with ``x̄`` the per-dimension mean of ``x`` over the scored states.
* **CE** is the mean next-token cross-entropy in nats; **KL** is the mean
  ``KL(clean ‖ substituted)`` of the next-token distributions, in nats.
* **Firing.** A feature fires when its activation is non-zero (``f != 0``): right for every
  architecture, including AbsTopK SAEs, whose kept activations can be negative.

Everything streams: each function returns a per-batch sum (a float64 Python float) whose count
is known from the shapes, and the small dataclasses (:class:`StateSums`, :class:`FiringSums`)
accumulate over batches, so memory does not grow with the number of tokens.

Example:
    >>> states, sse = StateSums(), 0.0
    >>> for x, x_hat in batches:                    # [batch, pos, d], BOS at position 0
    ...     states.add(x)
    ...     sse += squared_error_sum(x, x_hat)
    >>> explained_variance(sse, states)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BOS_POSITION",
    "FiringSums",
    "StateSums",
    "cross_entropy_sum",
    "explained_variance",
    "fires",
    "kl_sum",
    "next_token_ce",
    "next_token_targets",
    "record_states",
    "scored_predictions",
    "scored_states",
    "squared_error_sum",
    "vocab_dot",
]

BOS_POSITION = 0
"""The position excluded from every statistic (its state and the prediction made there)."""


def _check_sequences(x: torch.Tensor, what: str, min_pos: int) -> None:
    if x.ndim < 2 or x.shape[1] < min_pos:
        raise ValueError(f"{what} must be [batch, pos, ...] with pos >= {min_pos} (position "
                         f"{BOS_POSITION} is BOS), got shape {tuple(x.shape)}.")


def scored_states(x: torch.Tensor) -> torch.Tensor:
    """The states that SAE statistics are pooled over: positions ``1 ..`` of ``[batch, pos, ...]``."""
    _check_sequences(x, "states", 2)
    return x[:, BOS_POSITION + 1 :]


def scored_predictions(x: torch.Tensor) -> torch.Tensor:
    """The predictions CE and KL are averaged over: positions ``1 .. pos-2`` of ``[batch, pos, ...]``."""
    _check_sequences(x, "predictions", 3)
    return x[:, BOS_POSITION + 1 : -1]


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """The tokens the scored predictions are scored against: ``tokens[:, 2:]`` of ``[batch, pos]``."""
    _check_sequences(tokens, "tokens", 3)
    return tokens[:, BOS_POSITION + 2 :]


def fires(acts: torch.Tensor) -> torch.Tensor:
    """Where a feature fires: its activation is non-zero (AbsTopK activations can be negative)."""
    return acts != 0


@dataclass
class StateSums:
    """Running sums of the true states over scored positions: the denominator of explained variance."""

    n: int = 0
    """Number of scored states (tokens) added."""
    sum_x: torch.Tensor | None = None
    """Per-dimension sum of the states, float64 ``[d]`` on the CPU."""
    sumsq: float = 0.0
    """Sum of squared entries of the states."""

    def add(self, x: torch.Tensor) -> None:
        """Add the scored positions of ``x`` (``[batch, pos, d]``, BOS at position 0)."""
        x_Nd = scored_states(x).double().reshape(-1, x.shape[-1])
        self.n += x_Nd.shape[0]
        batch_sum = x_Nd.sum(0).cpu()
        self.sum_x = batch_sum if self.sum_x is None else self.sum_x + batch_sum
        self.sumsq += float(x_Nd.pow(2).sum())

    @property
    def total_variance(self) -> float:
        """``Σ‖x - x̄‖²`` over the scored states (pooled over dimensions)."""
        if self.n == 0 or self.sum_x is None:
            raise ValueError("no states were added (every sequence needs a non-BOS position).")
        return self.sumsq - float(self.sum_x.pow(2).sum()) / self.n


def squared_error_sum(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``Σ‖x - x̂‖²`` over the scored positions of ``[batch, pos, d]`` states (float64)."""
    if x.shape != x_hat.shape:
        raise ValueError(f"states {tuple(x.shape)} and reconstruction {tuple(x_hat.shape)} differ.")
    diff = scored_states(x).double() - scored_states(x_hat).to(x.device).double()
    return float(diff.pow(2).sum())


def explained_variance(sse: float, states: StateSums) -> float:
    """``1 - sse / Σ‖x - x̄‖²``; NaN when the states have no variance.

    Args:
        sse: summed :func:`squared_error_sum` over the same batches as ``states``.
        states: the true states' running sums.
    """
    total = states.total_variance
    return 1.0 - sse / total if total > 0 else float("nan")


@dataclass
class FiringSums:
    """Running firing counts of one SAE over scored positions: L0 and dead fraction."""

    n: int = 0
    """Number of scored tokens added."""
    n_active: int = 0
    """Number of (token, feature) activations that fire."""
    fired: torch.Tensor | None = None
    """bool ``[d_sae]``: whether each feature fired at least once (CPU)."""

    def add(self, acts: torch.Tensor) -> None:
        """Add the scored positions of ``acts`` (``[batch, pos, d_sae]``, BOS at position 0)."""
        fire_NF = fires(scored_states(acts)).reshape(-1, acts.shape[-1])
        self.n += fire_NF.shape[0]
        self.n_active += int(fire_NF.sum())
        batch_fired = fire_NF.any(0).cpu()
        self.fired = batch_fired if self.fired is None else self.fired | batch_fired

    @property
    def l0(self) -> float:
        """Mean number of firing features per scored token."""
        return self.n_active / self.n if self.n else float("nan")

    @property
    def dead_fraction(self) -> float:
        """Fraction of features that never fired on the scored tokens."""
        if self.fired is None:
            return float("nan")
        return float(1.0 - self.fired.double().mean())


def vocab_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position dot product over the vocabulary, ``[batch, pos, V] x2 -> [batch, pos]``.

    One batched matrix product: no ``[batch, pos, V]`` temporary. ``KL(p ‖ q)`` per position is
    ``dot(p, log p) - dot(p, log q)``; both terms go through this same function, so identical
    distributions give exactly 0.
    """
    v = a.shape[-1]
    return torch.bmm(a.reshape(-1, 1, v), b.reshape(-1, v, 1)).reshape(a.shape[:-1])


def cross_entropy_sum(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token cross-entropy (nats) of the scored predictions.

    Args:
        log_probs: log-softmax of the logits, ``[batch, pos, V]`` (all positions).
        targets: :func:`next_token_targets` of the tokens, ``[batch, pos - 2]``; the count is
            ``targets.numel()``.
    """
    if targets.shape != (log_probs.shape[0], log_probs.shape[1] - 2):
        raise ValueError(f"targets {tuple(targets.shape)} do not match log-probs "
                         f"{tuple(log_probs.shape)}; pass next_token_targets(tokens).")
    picked = scored_predictions(log_probs).gather(-1, targets.to(log_probs.device)[..., None])
    return -float(picked.double().sum())


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) of the scored predictions, and their count.

    Args:
        logits: ``[batch, pos, V]``.
        tokens: ``[batch, pos]`` with BOS in column 0.
    """
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}.")
    targets = next_token_targets(tokens)
    return cross_entropy_sum(torch.log_softmax(logits.float(), dim=-1), targets), targets.numel()


def kl_sum(p_clean: torch.Tensor, neg_entropy_clean: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Summed ``KL(clean ‖ substituted)`` (nats) of the scored predictions.

    Args:
        p_clean: clean next-token probabilities ``[batch, pos, V]``.
        neg_entropy_clean: ``vocab_dot(p_clean, log p_clean)``, ``[batch, pos]`` (computed once
            per batch and shared by every substitute).
        log_probs: the substituted model's log-probabilities ``[batch, pos, V]``.

    The count is the number of scored predictions, ``batch * (pos - 2)``.
    """
    kl_BP = neg_entropy_clean - vocab_dot(p_clean, log_probs)
    return float(scored_predictions(kl_BP).double().sum())


def record_states(model: Any, names: Sequence[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass of ``batch`` recording the activations at hooks ``names`` (no grad)."""
    states: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Any:
        def record(x: torch.Tensor, *, hook: Any) -> None:
            states[name] = x
        return record

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, recorder(n)) for n in names]):
        model(batch, return_type=None)
    missing = [n for n in names if n not in states]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire during the forward pass.")
    return states
