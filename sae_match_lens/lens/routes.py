"""Where hooks sit in a TransformerLens model, and running a model around skipped blocks.

:func:`hook_order` ranks hook points in forward order, :func:`validate_route` checks a
substitute's two hooks against a model before anything is installed, and :func:`skip_boundaries`,
:func:`run_to` / :func:`run_from` cut a ``HookedTransformer``'s forward pass at block boundaries
(``stop_at_layer`` / ``start_at_layer``) for the true-skip route
(:func:`~sae_match_lens.lens.hooks.run_skipping`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from ..adapters import describe_sae, hook_order  # hook_order re-exported (its home is adapters)


class BlockSubstitute(Protocol):
    """What a route reads of a prepared substitute (:class:`~sae_match_lens.lens.hooks.BlockSubstitute`
    satisfies it); declared here so that routes need nothing above them."""

    sae_a: Any
    sae_b: Any
    hook_a: str
    hook_b: str
    substitution: Any

__all__ = [
    "BOS_POLICIES",
    "BosPolicy",
    "EvalOptions",
    "check_bos_tokens",
    "check_skippable",
    "embedding_of_bos",
    "hook_order",
    "reads_after_write",
    "resolve_bos_token_id",
    "run_from",
    "run_to",
    "skip_boundaries",
    "starts_with_bos",
    "validate_route",
]

BosPolicy = Literal["keep", "substitute"]
BOS_POLICIES: tuple[str, ...] = ("keep", "substitute")
"""What a substitute does at position 0: ``"keep"`` its true state, or ``"substitute"`` it."""



@dataclass(frozen=True)
class EvalOptions:
    """Tuning knobs of a substituted run and of its evaluation
    (:func:`~sae_match_lens.lens.hooks.run_skipping`,
    :func:`~sae_match_lens.evaluation.evaluate_substitution` and its nnsight twin). The problem
    (model, SAEs, tokens, pairs, variants, route) stays in the functions' signatures."""

    batch_size: int = 8
    """``evaluate_substitution``: sequences per forward pass (memory is bounded by it)."""
    seed: int = 0
    """``evaluate_substitution``: seed of the random-permutation baseline."""
    bos: BosPolicy = "keep"
    """What a substitute does at position 0 (:data:`BOS_POLICIES`): ``"keep"`` (default) its
    true state at B, ``"substitute"`` it too. Position 0 is never scored either way."""
    bos_token_id: int | None = None
    """The BOS id every sequence must start with (default: the model tokenizer's)."""
    check_model: bool = True
    """Refuse SAEs that do not belong to the model (an SAE whose model its name does not
    confirm is probed on the first few sequences); ``False`` skips the check."""

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or \
                self.batch_size < 1:
            raise ValueError(f"EvalOptions.batch_size must be an int >= 1, got {self.batch_size!r}.")
        if self.bos not in BOS_POLICIES:
            raise ValueError(f"EvalOptions.bos must be one of {list(BOS_POLICIES)}, got "
                             f"{self.bos!r}.")
        if self.bos_token_id is not None and (isinstance(self.bos_token_id, bool)
                                              or not isinstance(self.bos_token_id, int)):
            raise TypeError(f"EvalOptions.bos_token_id must be an int or None, got "
                            f"{self.bos_token_id!r}.")


_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def hook_width(model: Any, name: str) -> int | None:
    """The width of the activations at hook ``name`` of a TransformerLens model, or ``None``
    where the hook's width is not known from the config."""
    cfg = model.cfg
    rest = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    if rest in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                "hook_mlp_out", "hook_embed", "hook_pos_embed"):
        return int(cfg.d_model)
    if rest in ("mlp.hook_pre", "mlp.hook_post") and getattr(cfg, "d_mlp", None):
        return int(cfg.d_mlp)
    return None


def validate_route(model: Any, sub: BlockSubstitute) -> None:
    """Check, before anything is installed, that ``sub`` can run on ``model``: both hooks exist,
    A precedes B and the SAEs' widths match the model's at those hooks (clear ``ValueError``)."""
    hook_dict = model.hook_dict
    for sae, name in ((sub.sae_a, sub.hook_a), (sub.sae_b, sub.hook_b)):
        if name not in hook_dict:
            close = difflib.get_close_matches(name, list(hook_dict), n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"{describe_sae(sae)}: hook '{name}' is not a hook point of this "
                f"{type(model).__name__} (it has {len(hook_dict)} hook points, e.g. "
                f"'blocks.0.hook_resid_post').{hint}"
            )
        width = hook_width(model, name)
        if width is not None and sae.cfg.d_in != width:
            raise ValueError(
                f"{describe_sae(sae)}: d_in={sae.cfg.d_in} but the model's activation at "
                f"'{name}' has width {width}; this SAE was not trained on this model."
            )
    n_layers = int(model.cfg.n_layers)
    if hook_order(sub.hook_a, n_layers) > hook_order(sub.hook_b, n_layers) and (
        skip_boundaries(sub.hook_a, sub.hook_b) is None
    ):
        raise ValueError(
            f"SAE A's hook '{sub.hook_a}' comes after SAE B's hook '{sub.hook_b}' in the forward "
            f"pass ({describe_sae(sub.sae_a)} -> {describe_sae(sub.sae_b)}); the substitute reads "
            "at A and writes at B, so A must precede B (swap them, and invert the permutation)."
        )


def reads_after_write(model: Any, hook_a: str, hook_b: str) -> bool:
    """True when A's hook fires after B's although both are the same block boundary
    (``blocks.L+1.hook_resid_pre`` after ``blocks.L.hook_resid_post``): then the state at B is
    the state at A, and the hook route reads it at B."""
    n_layers = int(model.cfg.n_layers)
    return hook_order(hook_a, n_layers) > hook_order(hook_b, n_layers)


def resolve_bos_token_id(model: Any, bos_token_id: int | None) -> int:
    """The BOS token id: ``bos_token_id`` if given, else the model tokenizer's.

    Raises:
        ValueError: when neither is known (a model built without a tokenizer).
    """
    if bos_token_id is not None:
        if not isinstance(bos_token_id, int) or bos_token_id < 0:
            raise ValueError(f"bos_token_id must be a token id >= 0, got {bos_token_id!r}.")
        return bos_token_id
    tokenizer = getattr(model, "tokenizer", None)
    found = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if found is None:
        raise ValueError(
            f"cannot tell which token is BOS: this {type(model).__name__} has "
            f"{'no tokenizer' if tokenizer is None else 'a tokenizer without a BOS token'}. "
            "Pass bos_token_id= (the id your sequences start with)."
        )
    return int(found)


def check_bos_tokens(tokens: torch.Tensor, bos_id: int, where: str) -> None:
    """Raise unless every sequence of ``tokens [batch, pos]`` starts with ``bos_id``."""
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"{where}: tokens must be [batch, pos], got shape {tuple(tokens.shape)}.")
    bad = tokens[:, 0] != bos_id
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"{where}: {int(bad.sum())} of {tokens.shape[0]} sequences do not start with the BOS "
            f"token (id {bos_id}); sequence {first} starts with {int(tokens[first, 0])}. The SAEs "
            "are trained without the BOS position and position 0 is treated as BOS, so a first "
            "real token would be mistaken for it: prepend BOS (model.to_tokens(text, "
            "prepend_bos=True)), or pass bos_token_id= if your BOS is another token."
        )


def embedding_of_bos(model: Any, bos_id: int) -> torch.Tensor:
    """The BOS token's embedding row ``W_E[bos_id]`` ([d_model]), what ``hook_embed`` sees at a
    BOS position up to a positive scale (some models scale embeddings); no forward pass is run.
    """
    if "hook_embed" not in model.hook_dict:
        raise ValueError(
            f"this {type(model).__name__} has no 'hook_embed' hook point, so the substitute "
            "cannot check that sequences start with BOS; use bos_token_id= with run_skipping, "
            "or evaluate_substitution, which see the tokens."
        )
    W_E = model.W_E
    if not 0 <= bos_id < W_E.shape[0]:
        raise ValueError(f"bos_token_id {bos_id} is outside the vocabulary (d_vocab={W_E.shape[0]}).")
    return W_E.detach()[bos_id].clone()


def starts_with_bos(embedded: torch.Tensor, bos_row: torch.Tensor) -> torch.Tensor:
    """Per sequence of ``embedded [batch, pos, d]`` (``hook_embed``): is position 0 the BOS
    embedding (parallel to ``bos_row``, cosine > 1 - 1e-5)?"""
    first = embedded[:, 0].to(bos_row.device, torch.float32)
    row = bos_row.to(torch.float32)
    cos = torch.nn.functional.cosine_similarity(first, row[None], dim=-1)
    return cos > 1 - 1e-5


def skip_boundaries(hook_a: str, hook_b: str) -> tuple[int, int] | None:
    """Block indices ``(stop_at_layer, start_at_layer)`` for skipping from ``hook_a`` to ``hook_b``.

    ``blocks.L.hook_resid_pre`` is the boundary before block ``L``, ``blocks.L.hook_resid_post``
    the one after it (``L + 1``). Returns ``None`` unless both are such residual hooks with
    A's boundary not after B's.
    """
    bounds = []
    for name in (hook_a, hook_b):
        m = _RESID.match(name)
        if m is None:
            return None
        bounds.append(int(m.group(1)) + (m.group(2) == "post"))
    return (bounds[0], bounds[1]) if bounds[0] <= bounds[1] else None


def check_skippable(model: Any, sub: BlockSubstitute) -> tuple[int, int]:
    """Block boundaries ``(stop, start)`` of a true skip of ``sub`` on ``model``, or a clear error
    (not a ``HookedTransformer``, a method that needs the true state at B, non-residual hooks)."""
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise TypeError(
            f"run_skipping needs a HookedTransformer (start_at_layer/stop_at_layer), got "
            f"{type(model).__name__}; use substitute() / substitution_hooks() instead."
        )
    if sub.substitution.needs_target_state:
        raise ValueError(
            f"substitution '{sub.substitution.method}' reads the true state at '{sub.hook_b}', so "
            "the blocks cannot be skipped; use substitute() instead."
        )
    if getattr(model.cfg, "positional_embedding_type", None) == "shortformer":
        raise ValueError("run_skipping does not support shortformer positional embeddings.")
    bounds = skip_boundaries(sub.hook_a, sub.hook_b)
    if bounds is None:
        raise ValueError(
            f"run_skipping needs residual hooks 'blocks.L.hook_resid_pre' or "
            f"'blocks.L.hook_resid_post' at both ends, got '{sub.hook_a}' -> '{sub.hook_b}'."
        )
    return bounds


def _attention_mask(model: Any, tokens: torch.Tensor) -> torch.Tensor | None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or tokenizer.padding_side != "left":
        return None
    from transformer_lens import utils

    return utils.get_attention_mask(tokenizer, tokens, model.cfg.default_prepend_bos)


def run_to(model: Any, tokens: torch.Tensor, stop: int) -> torch.Tensor:
    """The residual stream of ``model`` at block boundary ``stop`` (before block ``stop``)."""
    return model(tokens, stop_at_layer=stop, attention_mask=_attention_mask(model, tokens))


def run_from(model: Any, tokens: torch.Tensor, resid: torch.Tensor, start: int, *,
              return_type: str = "logits", loss_per_token: bool = False) -> Any:
    """Run a ``HookedTransformer`` from block ``start`` on the residual stream ``resid``
    (``tokens`` give the loss targets and the attention mask)."""
    return model(resid, start_at_layer=start, tokens=tokens, return_type=return_type,
                 loss_per_token=loss_per_token, attention_mask=_attention_mask(model, tokens))
