"""Causal check of links (Feature Flow's deactivation experiment).

For a target feature ``f`` of SAE ``T`` that fires at a token, and a link method that names its
predecessor(s) ``g`` in SAE ``P`` (reading an earlier hook, e.g. ``R(L−1)``, ``M(L)`` or
``A(L)``): remove the predecessors' contribution at ``P``'s hook at that token only,
``h ← h − (decode(a_g e_g) − decode(0))`` (``a_g`` the predecessor's activation; the exact
decoder contribution, so rescaled TopK SAEs are handled), run the model forward and re-read
``f``. Per method:

* ``success_rate`` = targets whose activation became 0 / targets with an active predecessor;
* ``activation_change`` = mean of ``1 − z_new / z_old`` over the same targets.

Targets are sampled as in the paper: ``positions`` random non-BOS positions per sequence and at
most ``max_targets`` active target features per position. A method gives, per target feature,
``k`` predecessor candidates (``[F_T, k]``, -1 = none); ``mode="all"`` removes every active
candidate (the paper's top-5), ``mode="random"`` one random active candidate among them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch

from ..adapters import describe_sae, hook_name_of, hook_order, validate_sae
from ..metrics import check_saes_fit_model, check_tokens
from ..options import accepts_flat_options, resolve_options
from ..permutation import check_direction
from ..progress import progress_bar
from .coactivation import LinkMethod, link_indices

__all__ = ["CAUSAL_COLUMNS", "EXHAUSTIVE_COLUMNS", "CausalOptions", "best_single_predecessors",
           "causal_check"]

logger = logging.getLogger(__name__)

CAUSAL_COLUMNS: tuple[str, ...] = ("hook_predecessor", "hook_target", "method", "mode",
                                   "n_targets", "success_rate", "activation_change",
                                   "n_sampled")
"""Columns of :func:`causal_check`'s table."""


def _contribution(sae: Any, feature_acts: torch.Tensor) -> torch.Tensor:
    """``decode(f) − decode(0)``: the features' exact additive contribution at the SAE's hook."""
    zero = feature_acts.new_zeros((1, feature_acts.shape[-1]))
    return sae.decode(feature_acts) - sae.decode(zero)


def _start_block(model: Any, hook: str) -> int | None:
    """The block whose input a re-run may start from to reach ``hook`` (a ``HookedTransformer``
    hook inside ``blocks.B``), or None where the whole model must run."""
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer) or not hook.startswith("blocks.") \
            or getattr(model.cfg, "positional_embedding_type", None) == "shortformer":
        return None
    return int(hook.split(".")[1])


def _run(model: Any, tokens: torch.Tensor, hooks: list[tuple[str, Any]], target_hook: str,
         start: tuple[int, torch.Tensor] | None = None) -> None:
    """Run the model up to ``target_hook``'s block; with ``start = (B, resid_pre_B)`` from
    block ``B``'s recorded input instead of from the tokens (the same numbers, fewer blocks)."""
    from transformer_lens import HookedTransformer

    kwargs: dict[str, Any] = {"return_type": None}
    if isinstance(model, HookedTransformer) and target_hook.startswith("blocks."):
        kwargs = {"stop_at_layer": int(target_hook.split(".")[1]) + 1}
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        if start is None:
            model(tokens, **kwargs)
        else:
            model(start[1], start_at_layer=start[0], tokens=tokens, **kwargs)


def _sampled_targets(model: Any, predecessor_sae: Any, target_sae: Any, tokens: torch.Tensor,
                     positions: int, max_targets: int, gen: torch.Generator, progress: bool
                     ) -> Iterator[tuple[int, torch.Tensor, int, torch.Tensor, torch.Tensor,
                                         torch.Tensor]]:
    """The paper's target sample: per sequence ``positions`` random non-BOS positions, per
    position at most ``max_targets`` active target features. Yields ``(seq, row, t, f_p, f_t,
    active)``: the sequence's index, its tokens ``[1, pos]`` with the recorded input of the block
    a re-run may start from (:func:`_start_block`; None: from the tokens), the position, both SAEs'
    activations ``[pos, F]`` on the clean run, and the sampled target features. ``gen`` is
    shared with the caller's own draws, in order, so one seed gives one sample."""
    hook_p, hook_t = hook_name_of(predecessor_sae), hook_name_of(target_sae)
    block = _start_block(model, hook_p)
    device = getattr(model.cfg, "device", None)
    for seq in progress_bar(range(tokens.shape[0]), desc="causal check", unit="seq",
                            enabled=progress):
        row = tokens[seq:seq + 1].to(device) if device is not None else tokens[seq:seq + 1]
        states: dict[str, torch.Tensor] = {}

        def record(name: str, store: dict[str, torch.Tensor] = states) -> Any:
            def fn(x: torch.Tensor, *, hook: Any) -> None:
                store[name] = x.detach()
            return fn

        hooks = [(hook_p, record("p")), (hook_t, record("t"))]
        if block is not None:
            hooks.append((f"blocks.{block}.hook_resid_pre", record("start")))
        _run(model, row, hooks, hook_t)
        start = None if block is None else (block, states["start"])
        f_p = predecessor_sae.encode(states["p"].to(predecessor_sae.W_enc.device,
                                                    predecessor_sae.W_enc.dtype))[0]
        f_t = target_sae.encode(states["t"].to(target_sae.W_enc.device, target_sae.W_enc.dtype))[0]
        n_pos = row.shape[1] - 1
        for t in (1 + torch.randperm(n_pos, generator=gen)[: min(positions, n_pos)]).tolist():
            active = torch.nonzero(f_t[t] != 0).flatten()
            if active.numel() == 0:
                continue
            yield seq, (row, start), t, f_p, f_t, active[
                torch.randperm(active.numel(), generator=gen)[:max_targets]]


def _read_after_edit(model: Any, row: tuple[torch.Tensor, Any], t: int, delta: torch.Tensor,
                     predecessor_sae: Any, target_sae: Any) -> torch.Tensor:
    """The target SAE's activations at position ``t`` (``[n_edit, F_T]``) after subtracting
    each row of ``delta`` (``[n_edit, d]``, one forward each, batched) at the predecessor's hook
    at that position only."""
    hook_p, hook_t = hook_name_of(predecessor_sae), hook_name_of(target_sae)
    seen: dict[str, torch.Tensor] = {}

    def edit(x: torch.Tensor, *, hook: Any) -> torch.Tensor:
        x = x.clone()
        x[:, t] -= delta.to(x.device, x.dtype)
        return x

    def read(x: torch.Tensor, *, hook: Any) -> None:
        seen["t"] = x[:, t].detach()

    tokens, start = row
    n = delta.shape[0]
    _run(model, tokens.expand(n, -1), [(hook_p, edit), (hook_t, read)], hook_t,
         None if start is None else (start[0], start[1].expand(n, -1, -1)))
    return target_sae.encode(seen["t"].to(target_sae.W_enc.device, target_sae.W_enc.dtype))


def _checked_inputs(model: Any, predecessor_sae: Any, target_sae: Any, tokens: torch.Tensor,
                    methods: Mapping[str, LinkMethod], *, what: str, label: str,
                    check_model: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The checks :func:`causal_check` and :func:`best_single_predecessors` share: both SAEs,
    the tokens, the predecessor reading before the target, each method's direction and shape
    (``[F_T, k]`` indices into the predecessor SAE) and, with ``check_model``, that the SAEs
    belong to ``model``. Returns the checked tokens and each method's candidate indices."""
    for sae in (predecessor_sae, target_sae):
        validate_sae(sae)
    tokens = check_tokens(tokens, model, what=what)
    hook_p, hook_t = hook_name_of(predecessor_sae), hook_name_of(target_sae)
    n_layers = int(model.cfg.n_layers)
    if not hook_order(hook_p, n_layers) < hook_order(hook_t, n_layers):
        raise ValueError(f"the predecessor {describe_sae(predecessor_sae)} must read before the "
                         f"target {describe_sae(target_sae)}.")
    cands = {}
    for name, method in methods.items():
        check_direction(method, target_sae, predecessor_sae,
                        what=f"{what} {label} {name!r} (each target feature's predecessors)")
        idx = link_indices(method)
        if idx.shape[0] != target_sae.cfg.d_sae or bool((idx >= predecessor_sae.cfg.d_sae).any()):
            raise ValueError(f"{label} {name!r}: predecessor links of shape {tuple(idx.shape)} do "
                             f"not fit target {describe_sae(target_sae)} -> predecessor "
                             f"{describe_sae(predecessor_sae)} (expected [{target_sae.cfg.d_sae}, k]).")
        cands[name] = idx
    if check_model:
        check_saes_fit_model(model, [predecessor_sae, target_sae], tokens, what=what)
    return tokens, cands


@dataclass(frozen=True)
class CausalOptions:
    """Sampling knobs of :func:`causal_check` (which tokens and targets it intervenes on)."""

    positions: int = 5
    """Random non-BOS positions sampled per sequence."""
    max_targets: int = 25
    """Active target features sampled per position."""
    seed: int = 0
    """Seed of the sampling (positions, targets, and ``mode="random"``'s candidate)."""
    check_model: bool = True
    """Refuse SAEs that do not belong to the model: a recorded model name that differs from
    ``model.cfg.model_name``, or, where either is unknown, an explained variance below
    :data:`~sae_match_lens.metrics.MIN_PROBE_EXPLAINED_VARIANCE` on the first few sequences
    (:func:`~sae_match_lens.metrics.check_saes_fit_model`); ``False`` skips the check."""

    def __post_init__(self) -> None:
        for name in ("positions", "max_targets"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CausalOptions.{name} must be an int >= 1, got {value!r}.")


@accepts_flat_options(CausalOptions)
@torch.no_grad()
def causal_check(
    model: Any,
    predecessor_sae: Any,
    target_sae: Any,
    tokens: torch.Tensor,
    methods: Mapping[str, LinkMethod],
    *,
    mode: Literal["all", "random"] = "all",
    progress: bool = True,
    options: CausalOptions | None = None,
) -> pd.DataFrame:
    """Deactivate each target's predecessor(s) at the target's token and measure the effect.

    Args:
        model: the TransformerLens model.
        predecessor_sae: the SAE of the predecessors (its hook must fire before the target's).
        target_sae: the SAE of the target features.
        tokens: ``[n_seq, pos]`` integer token ids with BOS at position 0
            (:func:`~sae_match_lens.metrics.check_tokens`).
        methods: ``{name: links}`` giving each *target* feature's predecessor candidates in the
            predecessor SAE: ``Links`` from ``links(target_sae, predecessor_sae)`` or
            ``links(predecessor_sae, target_sae, direction="backward")``, a permutation
            target→predecessor, or an int64 tensor ``[F_T]`` / ``[F_T, k]``. Links and
            permutations that record their SAEs must run from ``target_sae`` to
            ``predecessor_sae``; the forward ``links(predecessor_sae, target_sae)`` is refused
            with a message saying how to reverse it
            (:func:`~sae_match_lens.permutation.check_direction`).
        mode: ``"all"`` removes every active candidate; ``"random"`` one random active one.
        progress: show a progress bar.
        options: the sampling knobs (:class:`CausalOptions`: positions per sequence, targets
            per position, seed, the model check). The flat keywords of 0.2 (``positions=``,
            ``max_targets=``, ``seed=``, ``check_model=``) still work until 0.4, with a
            ``DeprecationWarning``.

    Returns:
        One row per method with :data:`CAUSAL_COLUMNS`.

    Raises:
        TypeError, ValueError: bad tokens, SAEs that do not fit each other, the model or the
            methods (a link set made for other SAEs, or running the other way).
    """
    opts = resolve_options(CausalOptions, options)
    positions, max_targets, seed, check_model = (opts.positions, opts.max_targets, opts.seed,
                                                 opts.check_model)
    if mode not in ("all", "random"):
        raise ValueError(f"mode must be 'all' or 'random', got {mode!r}.")
    tokens, cands = _checked_inputs(model, predecessor_sae, target_sae, tokens, methods,
                                    what="causal_check", label="method", check_model=check_model)
    hook_p, hook_t = hook_name_of(predecessor_sae), hook_name_of(target_sae)
    gen = torch.Generator().manual_seed(seed)
    sums = {name: {"n": 0, "deact": 0, "change": 0.0} for name in cands}
    n_sampled = 0
    for _, row, t, f_p, f_t, active in _sampled_targets(model, predecessor_sae, target_sae, tokens,
                                                     positions, max_targets, gen, progress):
        n_sampled += int(active.numel())
        for name, idx in cands.items():
            edits, targets = [], []
            for f in active.tolist():
                cand = idx[f]
                cand = cand[cand >= 0]
                cand = cand[f_p[t, cand.to(f_p.device)] != 0] if cand.numel() else cand
                if cand.numel() == 0:
                    continue
                if mode == "random":
                    cand = cand[torch.randint(cand.numel(), (1,), generator=gen)]
                acts = torch.zeros(predecessor_sae.cfg.d_sae, dtype=f_p.dtype,
                                   device=f_p.device)
                acts[cand.to(f_p.device)] = f_p[t, cand.to(f_p.device)]
                edits.append(_contribution(predecessor_sae, acts[None])[0])
                targets.append(f)
            if not edits:
                continue
            z_new = _read_after_edit(model, row, t, torch.stack(edits), predecessor_sae,
                                     target_sae)
            rows = torch.arange(len(targets))
            tgt = torch.tensor(targets)
            new = z_new[rows, tgt.to(z_new.device)].double().cpu()
            old = f_t[t, tgt.to(f_t.device)].double().cpu()
            s = sums[name]
            s["n"] += len(targets)
            s["deact"] += int((new == 0).sum())
            s["change"] += float((1 - new / old).sum())
    out = []
    for name, s in sums.items():
        n = s["n"]
        out.append({"hook_predecessor": hook_p, "hook_target": hook_t, "method": name,
                    "mode": mode, "n_targets": n,
                    "success_rate": s["deact"] / n if n else math.nan,
                    "activation_change": s["change"] / n if n else math.nan,
                    "n_sampled": n_sampled})
    return pd.DataFrame(out, columns=list(CAUSAL_COLUMNS))


_CHUNK = 64
"""Predecessor removals per forward pass in :func:`best_single_predecessors`."""

EXHAUSTIVE_COLUMNS: tuple[str, ...] = ("seq", "position", "target", "best_predecessor",
                                       "activation_change", "deactivated",
                                       "n_active_predecessors")
"""Columns of :func:`best_single_predecessors`' table (one row per sampled target)."""


@accepts_flat_options(CausalOptions)
@torch.no_grad()
def best_single_predecessors(
    model: Any,
    predecessor_sae: Any,
    target_sae: Any,
    tokens: torch.Tensor,
    *,
    links: Mapping[str, LinkMethod] | None = None,
    progress: bool = True,
    options: CausalOptions | None = None,
) -> pd.DataFrame:
    """Feature Flow's exhaustive upper bound: for each sampled target, the single active
    predecessor whose removal changes it most.

    At every sampled position each active predecessor feature is removed on its own (one forward
    pass each, batched) and every target feature is re-read, so a target's best
    single predecessor is found by trying them all, with no link score involved. The targets are
    those :func:`causal_check` samples with the same options (``mode="all"``), so the two tables
    compare target by target. Its success rate and mean
    activation change bound what any single-predecessor link method can reach on the sample
    (Feature Flow reports 0.83 / 73% against top-1 decoder cosine's 0.75 / 65%): a link method
    far below this bound loses on its links; a bound that is itself low says the targets do not
    hang on one predecessor feature.

    Args:
        model: the TransformerLens model.
        predecessor_sae: the SAE of the predecessors (its hook must fire before the target's).
        target_sae: the SAE of the target features.
        tokens: ``[n_seq, pos]`` integer token ids with BOS at position 0.
        links: optional ``{name: links}`` as :func:`causal_check`'s ``methods`` (each target
            feature's predecessor candidates); for each, the table gains ``<name>_change``, the
            activation change from removing that method's top-1 candidate alone (NaN where it is
            not active at the token), so a link method and the bound compare on the same
            targets.
        progress: show a progress bar.
        options: the target sample and the model check (:class:`CausalOptions`, as in
            :func:`causal_check`; default: its defaults).

    Returns:
        One row per sampled target with :data:`EXHAUSTIVE_COLUMNS` (and a ``<name>_change``
        column per entry of ``links``): ``best_predecessor`` is -1 (and ``activation_change``
        NaN) where no predecessor feature is active at that token; the success rate is
        ``frame.deactivated[frame.best_predecessor >= 0].mean()``.

    Raises:
        TypeError, ValueError: bad tokens, or SAEs that do not fit each other or the model.
    """
    opts = resolve_options(CausalOptions, options)
    positions, max_targets, seed, check_model = (opts.positions, opts.max_targets, opts.seed,
                                                 opts.check_model)
    tokens, cands = _checked_inputs(model, predecessor_sae, target_sae, tokens, links or {},
                                    what="best_single_predecessors", label="links",
                                    check_model=check_model)
    top1 = {name: idx[:, 0] if idx.dim() == 2 else idx for name, idx in cands.items()}
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for seq, row, t, f_p, f_t, active in _sampled_targets(
            model, predecessor_sae, target_sae, tokens, positions, max_targets, gen, progress):
        preds = torch.nonzero(f_p[t] != 0).flatten()
        old = f_t[t, active].double().cpu()
        if preds.numel() == 0:
            rows += [{"seq": seq, "position": t, "target": int(f), "best_predecessor": -1,
                      "activation_change": math.nan, "deactivated": False,
                      "n_active_predecessors": 0} | {f"{name}_change": math.nan for name in top1}
                     for f in active.tolist()]
            continue
        changes = []
        for part in preds.split(_CHUNK):
            acts = torch.zeros((part.numel(), predecessor_sae.cfg.d_sae), dtype=f_p.dtype,
                               device=f_p.device)
            acts[torch.arange(part.numel()), part] = f_p[t, part]
            z_new = _read_after_edit(model, row, t, _contribution(predecessor_sae, acts),
                                     predecessor_sae, target_sae)
            changes.append(1 - z_new[:, active.to(z_new.device)].double().cpu() / old)
        change = torch.cat(changes)  # [n_pred, n_targets]
        best_change, best = change.max(dim=0)
        slot = {int(g): i for i, g in enumerate(preds.tolist())}
        for i, f in enumerate(active.tolist()):
            row_out = {"seq": seq, "position": t, "target": int(f),
                       "best_predecessor": int(preds[best[i]]),
                       "activation_change": float(best_change[i]),
                       "deactivated": bool(best_change[i] >= 1.0),
                       "n_active_predecessors": int(preds.numel())}
            for name, idx in top1.items():
                j = slot.get(int(idx[f]))
                row_out[f"{name}_change"] = math.nan if j is None else float(change[j, i])
            rows.append(row_out)
    return pd.DataFrame(rows, columns=[*EXHAUSTIVE_COLUMNS, *(f"{n}_change" for n in top1)])
