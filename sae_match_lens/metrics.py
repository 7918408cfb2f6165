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

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BOS_POSITION",
    "MIN_PROBE_EXPLAINED_VARIANCE",
    "PROBE_SEQUENCES",
    "FiringSums",
    "StateSums",
    "check_reconstruction",
    "check_saes_fit_model",
    "check_tokens",
    "cross_entropy_sum",
    "explained_variance",
    "fires",
    "kl_sum",
    "model_device",
    "model_name_of",
    "next_token_ce",
    "next_token_targets",
    "record_states",
    "scored_activations",
    "scored_predictions",
    "scored_states",
    "squared_error_sum",
    "token_batches",
    "unverified_saes",
    "vocab_dot",
    "vocab_size_of",
]

logger = logging.getLogger(__name__)

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
    tokens = check_tokens(tokens, what="next_token_targets")
    _check_sequences(tokens, "tokens", 3)
    return tokens[:, BOS_POSITION + 2 :]


def fires(acts: torch.Tensor) -> torch.Tensor:
    """Where a feature fires: its activation is non-zero (AbsTopK activations can be negative)."""
    return acts != 0


def scored_activations(sae: Any, h: torch.Tensor) -> torch.Tensor:
    """``[tokens, F]`` activations of ``sae`` on the scored positions (:func:`scored_states`) of
    recorded states ``h`` ``[batch, pos, d_in]``, computed on the SAE's device and dtype."""
    x = scored_states(h).to(sae.W_enc.device, sae.W_enc.dtype)
    return sae.encode(x).reshape(-1, sae.cfg.d_sae)


def token_batches(tokens: torch.Tensor | Iterable[torch.Tensor], batch_size: int
                  ) -> tuple[Iterable[torch.Tensor], int | None]:
    """``[n_seq, pos]`` tokens split into ``batch_size`` sequences (with their count), or an
    iterable of ``[batch, pos]`` batches used as given (count unknown).

    Raises:
        ValueError: If a tensor of tokens is not ``[batch, pos]`` (or ``[pos]``).
    """
    if isinstance(tokens, torch.Tensor):
        toks = tokens[None] if tokens.ndim == 1 else tokens
        if toks.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}.")
        return toks.split(batch_size), math.ceil(toks.shape[0] / batch_size)
    return tokens, None


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
    targets = check_tokens(targets, vocab_size=int(log_probs.shape[-1]), what="cross_entropy_sum")
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
    tokens = check_tokens(tokens, vocab_size=int(logits.shape[-1]), what="next_token_ce")
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


def model_device(model: Any) -> Any:
    """The device a model's config names (``model.cfg.device``), ``None`` when it names none."""
    return getattr(getattr(model, "cfg", None), "device", None)


def record_states(model: Any, names: Sequence[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass of ``batch`` (moved to :func:`model_device` first) recording the
    activations at hooks ``names`` (no grad)."""
    device = model_device(model)
    if device is not None:
        batch = batch.to(device)
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


def vocab_size_of(model: Any) -> int | None:
    """The number of token ids ``model`` embeds (``cfg.d_vocab`` of a TransformerLens model,
    ``config.vocab_size`` of a Hugging Face / nnsight one), or ``None`` when it does not say."""
    for holder, name in ((getattr(model, "cfg", None), "d_vocab"),
                         (getattr(model, "config", None), "vocab_size")):
        value = getattr(holder, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _checked_token_tensor(tokens: Any, vocab_size: int | None, what: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        hint = ("convert a list of ids with torch.tensor([ids]), or tokenize text with "
                "model.to_tokens(text)" if isinstance(tokens, list | tuple)
                else "tokenize text with model.to_tokens(text)")
        raise TypeError(f"{what}: tokens must be a torch integer tensor [batch, pos] of token ids, "
                        f"got a {type(tokens).__name__}; {hint}.")
    if tokens.dtype.is_floating_point or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{what}: tokens must be integer token ids (torch.int64), got dtype "
                        f"{tokens.dtype}; token ids are indices into the vocabulary, not values "
                        "(convert with tokens.long() only if they are whole numbers).")
    toks = tokens[None] if tokens.ndim == 1 else tokens
    if toks.ndim != 2:
        raise ValueError(f"{what}: tokens must be [batch, pos] (or one sequence [pos]), got shape "
                         f"{tuple(tokens.shape)}.")
    if toks.numel():
        low, high = int(toks.min()), int(toks.max())
        if low < 0:
            seq, pos = (int(i) for i in torch.nonzero(toks < 0)[0])
            raise ValueError(f"{what}: token ids must be >= 0, but tokens[{seq}, {pos}] = "
                             f"{int(toks[seq, pos])} (min {low}).")
        if vocab_size is not None and high >= vocab_size:
            seq, pos = (int(i) for i in torch.nonzero(toks >= vocab_size)[0])
            raise ValueError(f"{what}: token ids must be below the model's vocabulary size "
                             f"{vocab_size}, but tokens[{seq}, {pos}] = {int(toks[seq, pos])} "
                             f"(max {high}); were they made by another model's tokenizer?")
    return toks


def check_tokens(tokens: Any, model: Any = None, *, vocab_size: int | None = None,
                 what: str = "tokens") -> Any:
    """Check token ids before any forward pass; the one validation every entry point that takes
    tokens uses.

    Token ids must be an integer tensor ``[batch, pos]`` (one sequence ``[pos]`` becomes
    ``[1, pos]``) with ids in ``0 .. vocab_size - 1``. A Python list, float or bool tokens,
    negative ids and ids beyond the vocabulary are refused with a message saying what was
    expected (instead of an ``IndexError`` deep inside the model). An iterable of ``[batch, pos]``
    batches (a list or tuple of tensors, a generator) is checked batch by batch: a list or tuple
    at once, anything else lazily as it is consumed.

    Args:
        tokens: the token ids, or an iterable of batches of them.
        model: the model they are for; its vocabulary size (:func:`vocab_size_of`) bounds the
            ids unless ``vocab_size`` is given.
        vocab_size: the number of token ids (``None``: from ``model``; no upper bound when
            neither says).
        what: who asks, for the messages (e.g. ``"causal_check"``).

    Returns:
        The checked tokens: a 2-D tensor for a tensor, a list for a list or tuple of batches,
        else a generator that checks each batch as it yields it.

    Raises:
        TypeError: not a tensor (or iterable of tensors), or not integer ids.
        ValueError: a wrong shape, a negative id, or an id ``>= vocab_size``.

    Example:
        >>> check_tokens(torch.tensor([[0, 5, 7]]), model, what="my_function")
    """
    if vocab_size is None and model is not None:
        vocab_size = vocab_size_of(model)
    if isinstance(tokens, torch.Tensor):
        return _checked_token_tensor(tokens, vocab_size, what)
    if isinstance(tokens, list | tuple):
        if not tokens or not all(isinstance(t, torch.Tensor) for t in tokens):
            return _checked_token_tensor(tokens, vocab_size, what)  # raises: a list of ids
        return [_checked_token_tensor(t, vocab_size, what) for t in tokens]
    if isinstance(tokens, str | bytes | Mapping) or not isinstance(tokens, Iterable):
        return _checked_token_tensor(tokens, vocab_size, what)  # raises TypeError

    def checked(batches: Iterable[Any]) -> Iterator[torch.Tensor]:
        for batch in batches:
            yield _checked_token_tensor(batch, vocab_size, what)

    return checked(tokens)


MIN_PROBE_EXPLAINED_VARIANCE = -1.0
"""The explained variance below which an SAE is taken not to read this model's states
(:func:`check_reconstruction`). At ``−1`` the reconstruction error is twice the states' own
variance around their mean: the SAE describes something else. Measured on the default suite
(4 held-out sequences, BOS excluded): its SAEs on their own model 0.96–0.97 (0.87–0.95 even at
the next layer's hook); the same SAEs on a randomly initialised model of the same configuration
−4.7 to −14.4. Randomly initialised SAEs at their own hooks of a random model score −0.7 to
0.3: an SAE that reconstructs poorly is not refused for that alone, so the threshold is below 0
(no better than the mean)."""

_UNNAMED_MODELS = frozenset({"", "custom"})
"""``cfg.model_name`` values that name no model (TransformerLens' default for a model built from
a config)."""


def model_name_of(model: Any) -> str | None:
    """The name of the model's weights: ``cfg.model_name`` (TransformerLens), or the Hugging Face
    ``config.name_or_path`` (nnsight, transformers); ``None`` when unnamed (``"custom"``)."""
    name = getattr(getattr(model, "cfg", None), "model_name", None)
    if not name:
        config = getattr(model, "config", None)
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not isinstance(name, str) or name.strip().lower() in _UNNAMED_MODELS:
        return None
    return name.strip()


def _canonical_model_name(name: str) -> str:
    """``gpt2-small`` and ``gpt2``, ``gemma-2-2b`` and ``google/gemma-2-2b`` compare equal:
    TransformerLens' alias table, then the last path component, lower case."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        name = get_official_model_name(name)
    except Exception:  # not a TransformerLens name (a local or custom model): compare as given
        pass
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def _sae_model_name(sae: Any) -> str | None:
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    name = metadata.get("model_name") if hasattr(metadata, "get") else None
    return name.strip() if isinstance(name, str) and name.strip() else None


def unverified_saes(model: Any, saes: Iterable[Any], *, what: str) -> list[Any]:
    """Compare each SAE's recorded model (``cfg.metadata.model_name``) with ``model``'s name.

    Names are compared after TransformerLens' aliases (``gpt2-small`` is ``gpt2``) and without an
    organisation prefix (``google/gemma-2-2b`` is ``gemma-2-2b``).

    Returns:
        The SAEs whose model could not be confirmed by name (the SAE records none, or the model
        is unnamed, e.g. built from a config): :func:`check_reconstruction` probes them.

    Raises:
        ValueError: an SAE records another model than ``model``'s (naming both); pass
            ``check_model=False`` to the entry point when the SAEs are known to transfer (e.g.
            base-model SAEs on the instruction-tuned model).
    """
    model_name = model_name_of(model)
    unverified = []
    for sae in saes:
        recorded = _sae_model_name(sae)
        if recorded is None or model_name is None:
            unverified.append(sae)
            continue
        if _canonical_model_name(recorded) != _canonical_model_name(model_name):
            from .adapters import describe_sae

            raise ValueError(
                f"{what}: {describe_sae(sae)} was trained on the model '{recorded}' "
                f"(cfg.metadata.model_name), but the model here is '{model_name}' "
                "(cfg.model_name). Load the SAEs made for this model, or pass check_model=False "
                "if you know these SAEs transfer to it."
            )
    return unverified


@torch.no_grad()
def check_reconstruction(saes: Iterable[Any], states: Mapping[str, torch.Tensor], *, what: str,
                         min_explained_variance: float = MIN_PROBE_EXPLAINED_VARIANCE) -> None:
    """Refuse SAEs that cannot reconstruct this model's states at their hooks.

    Each SAE reconstructs ``states[its hook name]`` (``[batch, pos, d]``, BOS at position 0);
    its explained variance (the package's convention: pooled over the scored positions and all
    dimensions, BOS excluded) must reach ``min_explained_variance``
    (:data:`MIN_PROBE_EXPLAINED_VARIANCE`). A few sequences are enough: an SAE used on a model it
    does not belong to misses by a wide margin.

    Raises:
        ValueError: an SAE's explained variance is below the threshold (the message gives the
            measured value, the hook and the number of tokens it was measured on).
    """
    from .adapters import describe_sae, hook_name_of

    for sae in saes:
        hook = hook_name_of(sae)
        if hook not in states:
            continue
        x = states[hook]
        if x.ndim != 3 or x.shape[1] < 2:
            continue
        x = x.detach().to(sae.W_dec.device, sae.W_dec.dtype)
        sums = StateSums()
        sums.add(x)
        x_hat = sae.decode(sae.encode(x))
        ev = explained_variance(squared_error_sum(x, x_hat), sums)
        logger.debug("%s: %s explains %.3f of the states at its hook on %d tokens", what,
                     describe_sae(sae), ev, sums.n)
        if not ev >= min_explained_variance:
            raise ValueError(
                f"{what}: {describe_sae(sae)} does not reconstruct this model's states at "
                f"'{hook}': its explained variance there is {ev:.3f} on {sums.n} tokens (BOS "
                f"excluded), below {min_explained_variance:g}, so it was not trained on this "
                "model (or reads another hook). Use the SAEs made for this model, or pass "
                "check_model=False to skip this check."
            )


PROBE_SEQUENCES = 4
"""Sequences of the user's tokens :func:`check_saes_fit_model` probes with."""


def check_saes_fit_model(model: Any, saes: Sequence[Any], tokens: torch.Tensor, *, what: str,
                         min_explained_variance: float = MIN_PROBE_EXPLAINED_VARIANCE) -> None:
    """Refuse SAEs that do not belong to ``model`` (a TransformerLens model).

    Where an SAE records its model and the model is named, the names must agree
    (:func:`unverified_saes`); the others are probed on the first :data:`PROBE_SEQUENCES`
    sequences of ``tokens`` (one forward pass; :func:`check_reconstruction`).

    Raises:
        ValueError: see :func:`unverified_saes` and :func:`check_reconstruction`.
    """
    unverified = unverified_saes(model, saes, what=what)
    if not unverified:
        return
    from .adapters import hook_name_of

    toks = tokens[None] if tokens.ndim == 1 else tokens
    batch = toks[:PROBE_SEQUENCES]
    names = list(dict.fromkeys(hook_name_of(sae) for sae in unverified))
    states = record_states(model, names, batch)
    check_reconstruction(unverified, states, what=what,
                         min_explained_variance=min_explained_variance)
