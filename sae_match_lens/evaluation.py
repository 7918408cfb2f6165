"""Measure what substituting blocks costs: explained variance, ΔCE, KL, co-activation.

:func:`evaluate_substitution` streams token batches through the model once per batch (the clean
pass, recording the states at every SAE's hook and the clean logits), then, for every pair
(A, B) and every :class:`Variant`, computes the substitute from the recorded states and runs
the model from B onwards. Only running sums are kept, so memory does not grow with the number
of tokens.

Metrics (position 0, the BOS position, is excluded from all of them):

* ``explained_variance``: ``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²`` with ``x`` the true state at B,
  ``x̂`` the substitute and ``x̄`` the per-dimension mean of ``x`` over all scored tokens;
  pooled over tokens and dimensions.
* ``delta_ce``: mean next-token cross-entropy (nats) with the substitute minus without.
* ``kl``: mean ``KL(clean ‖ substituted)`` over the same predictions as ``delta_ce`` (metrics.py).
* ``coactivation``: ``P(f_B[π(i)] fires | f_A[i] fires)`` with ``f_A = SAE_A.encode(h_A)``,
  ``f_B = SAE_B.encode(true h_B)``, averaged over matched source features that fire at least
  once (NaN for variants that use no permutation). A feature fires when its activation is
  non-zero (AbsTopK activations can be negative).

**BOS.** Every sequence must start with the model's BOS token (checked). By default
(``bos="keep"``) position 0 keeps its true state at B in every substituted run, as the SAEs are
trained without it; ``bos="substitute"`` substitutes it too (it is still not scored).

**Provenance.** Permutations passed in ``permutations`` are checked against the pair's SAEs
(:func:`~sae_match_lens.permutation.check_direction`): one made for other SAEs, or running from
B to A, is refused naming both hooks (a reversed one with how to reverse it).

**Model.** The SAEs must belong to the model (``check_model=True``): a recorded
``cfg.metadata.model_name`` must name the model, and where either name is unknown the first
batch measures each SAE's explained variance at its hook
(:func:`~sae_match_lens.metrics.check_reconstruction`; refused below
:data:`~sae_match_lens.metrics.MIN_PROBE_EXPLAINED_VARIANCE`). Tokens are checked first
(:func:`~sae_match_lens.metrics.check_tokens`).

The substituted run starts at B's block boundary (``start_at_layer``) on a ``HookedTransformer``
whose SAEs read ``hook_resid_pre`` / ``hook_resid_post``; elsewhere (``TransformerBridge``, other
hooks) the whole model runs with a hook writing the substitute at B. Both give the same numbers.
How states are read and the substitute written is a :class:`ModelRoute`; a model of another
library plugs in through its own (nnsight: :mod:`~sae_match_lens.lens.nnsight`).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import pandas as pd
import torch

from .adapters import feature_view
from .flow.coactivation import sae_pairs
from .flow.linking import DEFAULT_LINK_SCORE, SCORES, Transition, links
from .lens.hooks import BlockSubstitute, Substitution, block_substitute
from .lens.routes import (
    BOS_POLICIES,
    EvalOptions,
    check_bos_tokens,
    resolve_bos_token_id,
    run_from,
    skip_boundaries,
    validate_route,
)
from .matching import MatchOptions, MatchResult, match
from .metrics import (
    StateSums,
    check_reconstruction,
    check_tokens,
    cross_entropy_sum,
    explained_variance,
    fires,
    kl_sum,
    scored_activations,
    scored_states,
    squared_error_sum,
    token_batches,
    unverified_saes,
    vocab_dot,
)
from .options import accepts_flat_options, gather_options, resolve_options
from .permutation import Permutation, check_direction
from .progress import progress_bar
from .solvers.costs import CostWeights, Metric, stack_features

if TYPE_CHECKING:
    from .lens.nnsight import ModuleSite

__all__ = [
    "DEFAULT_VARIANTS",
    "RESULT_COLUMNS",
    "VARIANTS",
    "EvalOptions",
    "ModelRoute",
    "PermutationSource",
    "Variant",
    "evaluate_substitution",
    "evaluate_substitution_nnsight",
    "pair_costs",
]

logger = logging.getLogger(__name__)

PermutationSource = Literal["matched", "unfolded", "random", "links"]
Route = Literal["auto", "skip", "hooks"]


@runtime_checkable
class ModelRoute(Protocol):
    """How :func:`evaluate_substitution` reads states from a model and writes a substitute into it.

    This is the only part of an evaluation that depends on the model's library; the variants, the
    substitutes and the metrics are shared. The TransformerLens route is built from ``route=``
    (``"auto"``, ``"skip"``, ``"hooks"``); :class:`~sae_match_lens.lens.nnsight.NNsightRoute` is
    the route for an nnsight model. States are keyed by the SAEs' hook names
    (``cfg.metadata.hook_name``); a route says where a hook name sits in its model.
    """

    device: Any
    """Where token batches are moved before a forward pass (``None``: left where they are)."""

    def check(self, sub: BlockSubstitute) -> None:
        """Raise, before any forward pass, unless ``sub`` can read at A and write at B here."""
        ...

    def clean(self, batch: torch.Tensor, names: Sequence[str]
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One clean forward pass of ``batch``: the states at the hook ``names`` and the logits."""
        ...

    def substituted(self, batch: torch.Tensor, hook_a: str, hook_b: str,
                    h_hat: torch.Tensor) -> torch.Tensor:
        """The logits of ``batch`` with ``h_hat`` as the state at ``hook_b`` (``sub`` checked)."""
        ...


@dataclass(frozen=True)
class Variant:
    """One row kind of the evaluation table: a substitution and where its permutation comes from.

    Example:
        >>> Variant("hybrid_q90", Substitution("hybrid", quantile=0.9))
    """

    name: str
    """The ``variant`` column's value."""
    substitution: Substitution = field(default_factory=Substitution)
    """How the state at B is computed (:class:`~sae_match_lens.lens.hooks.Substitution`)."""
    permutation: PermutationSource = "matched"
    """``"matched"``: ``match(sae_a, sae_b)`` (or the permutation passed in); ``"unfolded"``:
    ``match(..., fold=False)``; ``"random"``: a seeded random one-to-one map; ``"links"``: a
    many-to-one transition from :func:`~sae_match_lens.flow.linking.links` (``link_score``,
    ``link_k``): B's folded activation j is the sum of A's folded activations linked to j."""
    link_score: str = DEFAULT_LINK_SCORE
    """``"links"`` only: the link score (:data:`~sae_match_lens.flow.linking.SCORES`)."""
    link_k: int = 1
    """``"links"`` only: links per source feature (binarised top-k transition)."""

    def __post_init__(self) -> None:
        if self.permutation not in ("matched", "unfolded", "random", "links"):
            raise ValueError(
                f"variant {self.name!r}: permutation must be 'matched', 'unfolded', 'random' or "
                f"'links', got {self.permutation!r}."
            )
        if self.permutation == "links":
            if self.link_score not in SCORES:
                raise ValueError(f"variant {self.name!r}: unknown link_score {self.link_score!r}; "
                                 f"valid: {list(SCORES)}.")
            if not isinstance(self.link_k, int) or self.link_k < 1:
                raise ValueError(f"variant {self.name!r}: link_k must be >= 1, got {self.link_k!r}.")

    @property
    def source_key(self) -> str:
        """Which map the variant uses (variants with the same key share it)."""
        if self.permutation == "links":
            return f"links:{self.link_score}:{self.link_k}"
        return self.permutation


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("folded", Substitution("permute", "folded")),
        Variant("raw", Substitution("permute", "raw")),
        Variant("hybrid", Substitution("hybrid", "folded", quantile=0.5)),
        Variant("error_preserving", Substitution("error_preserving", "folded")),
        Variant("identity", Substitution("identity")),
        Variant("sae_b_reconstruction", Substitution("sae_b_reconstruction")),
        Variant("sae_a_reconstruction", Substitution("sae_a_reconstruction")),
        Variant("random_permutation", Substitution("permute", "folded"), "random"),
        Variant("unfolded_matching", Substitution("permute", "folded"), "unfolded"),
        Variant("transition_decoder_cosine", Substitution("permute", "folded"), "links",
                "decoder_cosine", 1),
        Variant("transition_cosine_density", Substitution("permute", "folded"), "links",
                "cosine_density", 1),
    )
}
"""The built-in variants. ``folded`` is the method; ``raw`` changes only the transfer units,
``random_permutation`` / ``unfolded_matching`` only the permutation (folded transfer), so each
baseline differs from ``folded`` in one thing."""

DEFAULT_VARIANTS: tuple[str, ...] = tuple(v for v in VARIANTS if not v.startswith("transition_"))
"""Every built-in variant except the many-to-one transitions (``transition_decoder_cosine``:
Feature Flow's binarised top-1 decoder-cosine transition; ``transition_cosine_density``: the same
with this package's default link score), which are asked for by name."""

RESULT_COLUMNS: tuple[str, ...] = (
    "layer_a", "layer_b", "hook_a", "hook_b", "variant", "method", "transfer", "permutation",
    "explained_variance", "delta_ce", "kl", "coactivation", "ce_clean", "ce_substituted",
    "mse", "n_matched", "n_tokens", "note",
)
"""Columns of :func:`evaluate_substitution`'s table, in order."""


@dataclass
class _Sums:
    """Running sums for one (pair, variant) row."""

    sse: float = 0.0
    ce: float = 0.0
    kl: float = 0.0


@dataclass
class _PairSums:
    """Running sums shared by every variant of one pair."""

    states: StateSums = field(default_factory=StateSums)
    fire_a: dict[str, torch.Tensor] = field(default_factory=dict)
    both: dict[str, torch.Tensor] = field(default_factory=dict)


def _resolve_variants(variants: Iterable[str | Variant]) -> list[Variant]:
    out = []
    for v in variants:
        if isinstance(v, Variant):
            out.append(v)
        elif v in VARIANTS:
            out.append(VARIANTS[v])
        else:
            raise ValueError(f"unknown variant {v!r}; built-in variants: {list(VARIANTS)}, or "
                             "pass a Variant.")
    names = [v.name for v in out]
    if len(set(names)) != len(names) or not out:
        raise ValueError(f"variants must be non-empty with distinct names, got {names}.")
    return out


def _random_permutation(n_source: int, n_target: int, seed: int) -> Permutation:
    gen = torch.Generator().manual_seed(seed)
    indices = torch.full((n_source,), -1, dtype=torch.int64)
    n = min(n_source, n_target)
    sources = torch.randperm(n_source, generator=gen)[:n]
    indices[sources] = torch.randperm(n_target, generator=gen)[:n]
    return Permutation(indices, n_target)


def pair_costs(
    sae_a: Any, sae_b: Any, permutation: Permutation, *, fold: bool | None = None,
    weights: CostWeights | Mapping[str, float] | None = None, metric: Metric | None = None,
) -> torch.Tensor:
    """The matching cost of each source feature's assigned pair (float64; NaN: unmatched).

    Used for the ``hybrid`` method when only a :class:`Permutation` (no ``MatchResult``) is known.
    ``fold``, ``weights`` and ``metric`` default to the options the permutation was matched with
    (recorded by :func:`~sae_match_lens.matching.match` in its metadata), else to ``match``'s
    defaults (folded, all blocks, ``mse``), so the costs are those the matching minimised.
    """
    recorded = permutation.metadata.get("options") or {}
    fold = bool(recorded.get("fold", True)) if fold is None else fold
    metric = recorded.get("metric", "mse") if metric is None else metric
    if weights is None:
        weights = recorded.get("weights")
    w = CostWeights.resolve(weights, metric)  # type: ignore[arg-type]
    a = stack_features(feature_view(sae_a, fold=fold), w, metric)  # type: ignore[arg-type]
    b = stack_features(feature_view(sae_b, fold=fold), w, metric)  # type: ignore[arg-type]
    cost = torch.full((permutation.n_source,), float("nan"), dtype=torch.float64)
    ok = permutation.matched
    rows = a.matrix_FK.to(torch.float64)[ok]
    cols = b.matrix_FK.to(torch.float64).to(rows.device)[permutation.indices[ok]]
    # C_ij = const_i + const_j - 2 <a_i, b_j> (mse: the squared distance; cosine: Σw(1 - cos))
    cost[ok] = (a.const_F.to(rows.device)[ok] + b.const_F.to(rows.device)[permutation.indices[ok]]
                - 2.0 * (rows * cols).sum(dim=1)).cpu()
    if metric == "mse":
        cost[ok] = (rows - cols).pow(2).sum(dim=1).cpu()  # direct differences: no cancellation
    return cost


def _permutations(
    sae_a: Any, sae_b: Any, sources: set[str], given: Permutation | MatchResult | None,
    match_options: Mapping[str, Any], seed: int, progress: bool,
) -> dict[str, tuple[Permutation, torch.Tensor | None]]:
    """Each permutation source needed → (permutation, cost_F or None)."""
    out: dict[str, tuple[Permutation, torch.Tensor | None]] = {}
    for source in sorted(sources):
        if source == "matched" and given is not None:
            result = given
        elif source in ("matched", "unfolded"):
            result = match(sae_a, sae_b, **gather_options(
                MatchOptions, {**match_options, "fold": source == "matched", "progress": progress}))
        else:
            result = _random_permutation(sae_a.cfg.d_sae, sae_b.cfg.d_sae, seed)
        if isinstance(result, MatchResult):
            out[source] = (result.permutation, result.cost_F)
        else:
            out[source] = (result, None)
    return out


@accepts_flat_options(EvalOptions)
def evaluate_substitution(
    model: Any,
    saes: Sequence[Any] | Mapping[Hashable, Any],
    tokens: torch.Tensor | Iterable[torch.Tensor],
    *,
    pairs: Sequence[tuple[Hashable, Hashable]] | None = None,
    variants: Sequence[str | Variant] = DEFAULT_VARIANTS,
    permutations: Mapping[tuple[Hashable, Hashable], Permutation | MatchResult] | None = None,
    route: Route | ModelRoute = "auto",
    match_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    options: EvalOptions | None = None,
) -> pd.DataFrame:
    """Evaluate block substitutes and their baselines on a token set.

    Args:
        model: ``HookedTransformer``, ``HookedSAETransformer`` or ``TransformerBridge`` (or the
            model a :class:`ModelRoute` passed as ``route`` runs, e.g. an nnsight model).
        saes: one SAE per layer, as a list (keyed by model layer, from each hook name
            ``blocks.L.…``; ``layer_a``/``layer_b`` are then model layers) or a dict (any keys,
            e.g. model layers; ``layer_a``/``layer_b`` are its keys).
        tokens: token ids ``[n_seq, pos]`` (split into batches of ``options.batch_size``
            sequences), or an
            iterable of ``[batch, pos]`` tensors (used as given). Position 0 is the BOS position.
        pairs: ``(a, b)`` keys of ``saes``; default: adjacent SAEs in the given order.
        variants: built-in names (:data:`VARIANTS`) or :class:`Variant` objects.
        permutations: ``{(a, b): Permutation or MatchResult}`` to use as the ``matched``
            permutation; pairs not in it are matched with :func:`~sae_match_lens.matching.match`.
        route: ``"skip"`` runs the substituted model from B's block boundary
            (``HookedTransformer`` with residual hooks), ``"hooks"`` runs the whole model with a
            hook at B, ``"auto"`` skips where possible. The numbers are the same. Or a
            :class:`ModelRoute` for another library's model
            (:func:`evaluate_substitution_nnsight` passes one).
        match_options: extra keyword arguments for ``match`` (e.g. ``{"max_cost": "auto"}``).
        progress: show progress bars.
        options: the evaluation's knobs (:class:`~sae_match_lens.lens.routes.EvalOptions`:
            ``batch_size``, the random baseline's ``seed``, ``bos``, ``bos_token_id``,
            ``check_model``; module docstring, "Model"). The flat keywords of 0.2 (``batch_size=``,
            ``seed=``, ``bos=``, ``bos_token_id=``, ``check_model=``) still work until 0.4, with a
            ``DeprecationWarning``.

    Returns:
        A DataFrame with one row per (pair, variant) and the columns :data:`RESULT_COLUMNS`.

    Raises:
        TypeError, ValueError: bad tokens (not integer ids, out of the vocabulary), SAEs that
            do not belong to the model, a permutation made for other SAEs or reversed.

    Example:
        >>> table = evaluate_substitution(model, saes, tokens, pairs=[(3, 4)],
        ...                               options=EvalOptions(batch_size=16))
        >>> table.pivot(index="variant", columns="layer_b", values="delta_ce")
    """
    opts = resolve_options(EvalOptions, options)
    batch_size, seed, bos, bos_token_id, check_model = (opts.batch_size, opts.seed, opts.bos,
                                                        opts.bos_token_id, opts.check_model)
    sae_map, pair_list = sae_pairs(saes, pairs)
    if isinstance(route, str):
        if route not in ("auto", "skip", "hooks"):
            raise ValueError(f"route must be 'auto', 'skip' or 'hooks', got {route!r}.")
        model_route: ModelRoute = _TransformerLensRoute(model, route)
    elif isinstance(route, ModelRoute):
        model_route = route
    else:
        raise TypeError(f"route must be 'auto', 'skip', 'hooks' or a ModelRoute, got "
                        f"{type(route).__name__}.")
    if bos not in BOS_POLICIES:
        raise ValueError(f"bos must be one of {list(BOS_POLICIES)}, got {bos!r}.")
    bos_id = resolve_bos_token_id(model, bos_token_id)
    tokens = check_tokens(tokens, model, what="evaluate_substitution")
    used = [sae_map[k] for k in dict.fromkeys(k for pair in pair_list for k in pair)]
    probe = unverified_saes(model, used, what="evaluate_substitution") if check_model else []
    chosen = _resolve_variants(variants)
    match_kwargs = dict(match_options or {})
    if match_kwargs.get("metric") == "cosine" and any(v.permutation == "unfolded" for v in chosen):
        logger.warning(
            "metric='cosine' ignores per-feature scales, so unfolded matching is the folded "
            "matching: the unfolded_matching rows repeat the matched permutation (noted in the "
            "'note' column)."
        )
    given = dict(permutations or {})
    unknown = [pair for pair in given if pair not in pair_list]
    if unknown:
        raise KeyError(f"permutations given for pairs {unknown} that are not evaluated; pairs "
                       f"are {pair_list}.")
    sources = {v.source_key for v in chosen if v.substitution.uses_permutation}
    plans = [
        _plan_pair(model_route, sae_map[a], sae_map[b], chosen, sources, given.get((a, b)),
                   match_kwargs, seed, progress, bos)
        for a, b in pair_list
    ]
    batches, total = token_batches(tokens, batch_size)
    device = model_route.device
    with torch.no_grad():
        for batch in progress_bar(batches, total=total, desc="evaluate substitution", unit="batch",
                                  enabled=progress):
            check_bos_tokens(batch, bos_id, "evaluate_substitution")
            _process_batch(model_route, batch.to(device) if device is not None else batch, plans,
                           probe)
    rows = [row for (a, b), plan in zip(pair_list, plans, strict=True)
            for row in plan.rows(a, b)]
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


@dataclass
class _PairPlan:
    """Everything prepared for one pair: the substitutes, permutations and running sums."""

    hook_a: str
    hook_b: str
    sae_b: Any
    subs: list[tuple[Variant, BlockSubstitute]]
    perms: dict[str, torch.Tensor]
    """Each map's top-1 target per source feature (int64 [F_A], -1: none), keyed by source."""
    bos: str = "keep"
    notes: dict[str, str] = field(default_factory=dict)
    pair_sums: _PairSums = field(default_factory=_PairSums)
    sums: dict[str, _Sums] = field(default_factory=dict)
    ce_clean: float = 0.0
    n_ce: int = 0

    def rows(self, a: Hashable, b: Hashable) -> list[dict[str, Any]]:
        ps = self.pair_sums
        n = ps.states.n
        if n == 0:
            raise ValueError("no tokens were evaluated (every sequence needs at least 3 tokens).")
        ce_clean = self.ce_clean / self.n_ce
        out = []
        for variant, _ in self.subs:
            s = self.sums[variant.name]
            spec = variant.substitution
            perm = self.perms.get(variant.source_key) if spec.uses_permutation else None
            out.append({
                "layer_a": a, "layer_b": b, "hook_a": self.hook_a, "hook_b": self.hook_b,
                "variant": variant.name, "method": spec.method,
                "transfer": spec.transfer if spec.uses_permutation else None,
                "permutation": variant.permutation if spec.uses_permutation else None,
                "explained_variance": explained_variance(s.sse, ps.states),
                "delta_ce": s.ce / self.n_ce - ce_clean,
                "kl": s.kl / self.n_ce,
                "coactivation": (_coactivation(ps, variant.source_key, perm)
                                 if perm is not None else float("nan")),
                "ce_clean": ce_clean, "ce_substituted": s.ce / self.n_ce,
                "mse": s.sse / n,
                "n_matched": int((perm >= 0).sum()) if perm is not None else None,
                "n_tokens": n, "note": self.notes.get(variant.name, ""),
            })
        return out


def _coactivation(ps: _PairSums, source: str, top1: torch.Tensor) -> float:
    fire, both = ps.fire_a[source], ps.both[source]
    ok = (top1 >= 0) & (fire > 0)  # fire: counts of firing tokens
    if not bool(ok.any()):
        return float("nan")
    return float((both[ok].double() / fire[ok].double()).mean())


def _plan_pair(
    route: ModelRoute, sae_a: Any, sae_b: Any, variants: list[Variant], sources: set[str],
    given: Permutation | MatchResult | None, match_options: dict[str, Any], seed: int,
    progress: bool, bos: str,
) -> _PairPlan:
    if given is not None:
        check_direction(given, sae_a, sae_b, what="the permutation given for this pair")
    perms = _permutations(sae_a, sae_b, {s for s in sources if not s.startswith("links:")},
                          given, match_options, seed, progress)
    for variant in variants:
        if variant.permutation == "links" and variant.source_key not in perms:
            lk = links(sae_a, sae_b, k=variant.link_k, score=variant.link_score,  # type: ignore[arg-type]
                       progress=False)
            perms[variant.source_key] = (Transition.from_links(lk), None)  # type: ignore[assignment]
    notes = {}
    if match_options.get("metric") == "cosine":
        notes = {v.name: "metric='cosine' ignores scales: unfolded matching = folded matching"
                 for v in variants if v.permutation == "unfolded"}
    subs = []
    for variant in variants:
        spec = variant.substitution
        perm, cost = perms.get(variant.source_key, (None, None))
        if spec.method == "hybrid" and isinstance(perm, Permutation) and cost is None:
            opts = perm.metadata.get("options") or match_options
            cost = pair_costs(sae_a, sae_b, perm, fold=opts.get("fold"),
                              weights=opts.get("weights"), metric=opts.get("metric"))
        sub = block_substitute(sae_a, sae_b, perm, substitution=spec, cost_F=cost)
        route.check(sub)
        subs.append((variant, sub))
    hook_a, hook_b = subs[0][1].hook_a, subs[0][1].hook_b
    top1 = {key: (p.indices if isinstance(p, Permutation) else _transition_top1(p))
            for key, (p, _) in perms.items()}
    plan = _PairPlan(hook_a, hook_b, sae_b, subs, top1, bos, notes)
    plan.sums = {v.name: _Sums() for v in variants}
    return plan


def _start_layer(model: Any, hook_a: str, hook_b: str, route: Route) -> int | None:
    from transformer_lens import HookedTransformer

    if route == "hooks":
        return None
    bounds = skip_boundaries(hook_a, hook_b)
    ok = (isinstance(model, HookedTransformer) and bounds is not None
          and getattr(model.cfg, "positional_embedding_type", None) != "shortformer")
    if not ok and route == "skip":
        raise ValueError(
            f"route='skip' needs a HookedTransformer and residual hooks "
            f"(blocks.L.hook_resid_pre/post); got {type(model).__name__} with "
            f"'{hook_a}' -> '{hook_b}'. Use route='hooks' or 'auto'."
        )
    return bounds[1] if ok and bounds is not None else None


def _process_batch(route: ModelRoute, batch: torch.Tensor, plans: list[_PairPlan],
                   probe: list[Any]) -> None:
    """One batch through every plan; ``probe``: SAEs whose model is unconfirmed, measured on
    this batch's clean states and then forgotten (emptied)."""
    if batch.ndim != 2 or batch.shape[1] < 3:
        raise ValueError(
            f"each token batch must be [batch, pos] with pos >= 3 (position 0 is excluded as "
            f"BOS, and the last position has no next token), got shape {tuple(batch.shape)}."
        )
    names = list(dict.fromkeys(n for p in plans for n in (p.hook_a, p.hook_b)))
    states, logits = route.clean(batch, names)
    if probe:
        check_reconstruction(probe, states, what="evaluate_substitution")
        probe.clear()
    logp_clean = torch.log_softmax(logits.float(), dim=-1)
    p_clean = logp_clean.exp()
    neg_entropy = _dot(p_clean, logp_clean)
    targets = batch[:, 2:].to(logp_clean.device)
    ce_clean = _ce_sum(logp_clean, targets)
    n_ce = targets.numel()
    for plan in plans:
        missing = [n for n in (plan.hook_a, plan.hook_b) if n not in states]
        if missing:
            raise RuntimeError(f"hooks {missing} did not fire during the forward pass.")
        h_A, h_B = states[plan.hook_a], states[plan.hook_b]
        plan.ce_clean += ce_clean
        plan.n_ce += n_ce
        needs_f_A = bool(plan.perms) or any(
            sub.substitution.method not in ("identity", "sae_b_reconstruction") for _, sub in plan.subs)
        f_A = plan.subs[0][1].encode_a(h_A) if needs_f_A else None
        _update_pair(plan, f_A, h_B)
        for variant, sub in plan.subs:
            h_hat = sub(h_A, h_B, f_A=f_A)
            if plan.bos == "keep":
                h_hat = h_hat.clone()
                h_hat[:, :1] = h_B[:, :1]
            logits_sub = route.substituted(batch, plan.hook_a, plan.hook_b, h_hat)
            logp = torch.log_softmax(logits_sub.float(), dim=-1)
            s = plan.sums[variant.name]
            s.sse += squared_error_sum(h_B, h_hat)
            s.ce += _ce_sum(logp, targets)
            s.kl += kl_sum(p_clean, neg_entropy, logp)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position dot product over the vocabulary, ``[batch, pos, V] x2 -> [batch, pos]``.

    One batched matrix product: no ``[batch, pos, V]`` temporary. ``KL(p ‖ q)`` per position is
    ``dot(p, log p) - dot(p, log q)``; both terms go through this same function, so identical
    distributions give exactly 0.
    """
    return vocab_dot(a, b)


def _ce_sum(logp: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token cross-entropy of positions 1..pos-2 (BOS position excluded)."""
    return cross_entropy_sum(logp, targets)


def _transition_top1(tr: Transition) -> torch.Tensor:
    """The heaviest edge's target of each source feature (-1 where it has none)."""
    out = torch.full((tr.n_source,), -1, dtype=torch.int64)
    if tr.source.numel() == 0:
        return out
    order = torch.argsort(-tr.weight, stable=True)  # heaviest first, ties in edge (rank) order
    order = order[torch.argsort(tr.source[order], stable=True)]  # grouped by source
    src = tr.source[order]
    first = torch.ones_like(src, dtype=torch.bool)
    first[1:] = src[1:] != src[:-1]
    out[src[first]] = tr.target[order][first]
    return out


def _update_pair(plan: _PairPlan, f_A: torch.Tensor | None, h_B: torch.Tensor) -> None:
    ps = plan.pair_sums
    ps.states.add(h_B)
    if not plan.perms or f_A is None:
        return
    sae_b = plan.sae_b
    fire_a = fires(scored_states(f_A))  # non-zero: AbsTopK activations can be negative
    fire_b = fires(scored_activations(sae_b, h_B))
    fire_a = fire_a.reshape(-1, fire_a.shape[-1])
    fire_b = fire_b.to(fire_a.device)
    count_a = fire_a.sum(0).cpu()
    for source, top1 in plan.perms.items():
        index = top1.clamp(min=0).to(fire_b.device).expand(fire_b.shape[0], -1)
        both = (fire_a & torch.gather(fire_b, 1, index)).sum(0).cpu()
        ps.fire_a[source] = ps.fire_a.get(source, 0) + count_a
        ps.both[source] = ps.both.get(source, 0) + both


class _TransformerLensRoute:
    """The :class:`ModelRoute` of a TransformerLens model: hooks record the clean states; the
    substituted run starts at B's block boundary (``start_at_layer``) where ``route`` allows it,
    else a hook writes the substitute at B."""

    def __init__(self, model: Any, route: Route) -> None:
        self.model = model
        self.route = route
        self.device = getattr(model.cfg, "device", None)
        self._starts: dict[tuple[str, str], int | None] = {}

    def check(self, sub: BlockSubstitute) -> None:
        validate_route(self.model, sub)
        self._starts[sub.hook_a, sub.hook_b] = _start_layer(self.model, sub.hook_a, sub.hook_b,
                                                            self.route)

    def clean(self, batch: torch.Tensor, names: Sequence[str]
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        states: dict[str, torch.Tensor] = {}

        def recorder(name: str) -> Any:
            def record(x: torch.Tensor, *, hook: Any) -> None:
                states[name] = x
            return record

        with self.model.hooks(fwd_hooks=[(n, recorder(n)) for n in names]):
            logits = self.model(batch, return_type="logits")
        return states, logits

    def substituted(self, batch: torch.Tensor, hook_a: str, hook_b: str,
                    h_hat: torch.Tensor) -> torch.Tensor:
        start = self._starts[hook_a, hook_b]
        if start is not None:
            return run_from(self.model, batch, h_hat, start)

        def write(x: torch.Tensor, *, hook: Any) -> torch.Tensor:
            if x.shape != h_hat.shape:
                raise ValueError(f"state at '{hook_b}' has shape {tuple(x.shape)}, the "
                                 f"substitute {tuple(h_hat.shape)}.")
            return h_hat

        with self.model.hooks(fwd_hooks=[(hook_b, write)]):
            return self.model(batch, return_type="logits")


@accepts_flat_options(EvalOptions)
def evaluate_substitution_nnsight(
    lm: Any,
    saes: Sequence[Any] | Mapping[Hashable, Any],
    tokens: torch.Tensor | Iterable[torch.Tensor],
    *,
    sae_paths: Mapping[str, str | ModuleSite] | None = None,
    pairs: Sequence[tuple[Hashable, Hashable]] | None = None,
    variants: Sequence[str | Variant] = DEFAULT_VARIANTS,
    permutations: Mapping[tuple[Hashable, Hashable], Permutation | MatchResult] | None = None,
    match_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    options: EvalOptions | None = None,
) -> pd.DataFrame:
    """:func:`~sae_match_lens.evaluation.evaluate_substitution` on an nnsight model.

    The same variants, baselines, metrics and columns
    (:data:`~sae_match_lens.evaluation.RESULT_COLUMNS`); only the route differs
    (:class:`~sae_match_lens.lens.nnsight.NNsightRoute`).

    Args:
        lm: an nnsight model over a Hugging Face causal LM (``TransformersModel``,
            ``LanguageModel``), with its tokenizer (or pass ``bos_token_id``).
        saes: as in :func:`~sae_match_lens.evaluation.evaluate_substitution`.
        tokens: as in :func:`~sae_match_lens.evaluation.evaluate_substitution`.
        pairs: as in :func:`~sae_match_lens.evaluation.evaluate_substitution`.
        variants: as in :func:`~sae_match_lens.evaluation.evaluate_substitution`.
        permutations: as in :func:`~sae_match_lens.evaluation.evaluate_substitution`.
        match_options: as in :func:`~sae_match_lens.evaluation.evaluate_substitution`.
        progress: as in :func:`~sae_match_lens.evaluation.evaluate_substitution`.
        options: as in :func:`~sae_match_lens.evaluation.evaluate_substitution` (the flat
            keywords of 0.2 still work until 0.4, with a ``DeprecationWarning``).
        sae_paths: explicit sites by hook name, for hooks
            :data:`~sae_match_lens.lens.nnsight.MODULE_PATHS` does not map (see
            :func:`~sae_match_lens.lens.nnsight.module_site`).

    Returns:
        The DataFrame of :func:`~sae_match_lens.evaluation.evaluate_substitution`.

    Example:
        >>> table = evaluate_substitution_nnsight(lm, saes, tokens, pairs=[(3, 4)])
        >>> table.pivot(index="variant", columns="layer_b", values="delta_ce")
    """
    from .lens.nnsight import NNsightRoute  # the optional extra's module, loaded on use

    sae_map, pair_list = sae_pairs(saes, pairs)
    used = dict.fromkeys(k for pair in pair_list for k in pair)
    route = NNsightRoute(lm, [sae_map[k] for k in used], sae_paths)
    return evaluate_substitution(
        lm, saes, tokens, pairs=pair_list, variants=variants, permutations=permutations,
        route=route, match_options=match_options, progress=progress, options=options,
    )
