"""Data-based co-activation of two SAEs' features, the reference matchers built on it, and
:func:`evaluate_links`.

Link quality is measured on held-out tokens by how well a source feature's firing set agrees
with its linked targets' firing set. Per source feature ``i`` with linked targets ``L(i)``
("B fires" = any feature of ``L(i)`` fires at the token):

* ``jaccard = |A_i ∧ B_L| / |A_i ∨ B_L|`` — the headline metric: it punishes linking everything
  to a few dense "hub" features, which the conditional ``P(B | A)`` rewards;
* ``p_b_given_a = |A_i ∧ B_L| / |A_i|`` (the matching score of the SAE Match paper) and
  ``p_a_given_b = |A_i ∧ B_L| / |B_L|``;
* ``distinct_targets``: how many different target features the top-1 links reach.

Averages are over source features that fire at least ``min_fires`` times. Every number comes
beside two **data-based ceilings** computed from the same tokens: the best single partner of each
source feature by Jaccard (:func:`best_partner`) and the best one-to-one assignment on Jaccard
(:func:`one_to_one`), and beside two **data-based references** that match on the Pearson
correlation of the activations instead (``by="correlation"``: what a researcher who correlates
activations would get; the correlation best partner's Jaccard is at most the best-partner
ceiling). Firing follows
:func:`sae_match_lens.metrics.fires` (activation ≠ 0) over the scored positions (BOS excluded);
correlations are over the same positions, zeros included (scale-free, so folding does not change
them).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from tqdm.auto import tqdm

from ..adapters import describe_sae, hook_name_of, layers_from_hooks, validate_sae
from ..matching import MatchResult
from ..metrics import (
    check_tokens,
    fires,
    record_states,  # re-exported (its home is metrics)
    scored_activations,
    token_batches,  # re-exported (its home is metrics)
)
from ..permutation import Permutation, check_direction
from .linking import Links

__all__ = [
    "LINK_COLUMNS",
    "CoactivationStats",
    "best_partner",
    "coactivation_stats",
    "evaluate_links",
    "link_indices",
    "one_to_one",
    "record_states",
    "sae_pairs",
    "token_batches",
]

logger = logging.getLogger(__name__)

LINK_COLUMNS: tuple[str, ...] = (
    "layer_a", "layer_b", "hook_a", "hook_b", "method", "k", "jaccard", "p_b_given_a",
    "p_a_given_b", "distinct_targets", "n_sources", "ceiling_best_partner", "ceiling_one_to_one",
    "fraction_of_ceiling", "reference_correlation_best_partner", "reference_correlation_one_to_one",
    "n_tokens",
)
"""Columns of :func:`evaluate_links`' table, in order."""


@dataclass
class CoactivationStats:
    """Firing counts of two SAEs over the same tokens (scored positions only)."""

    n_tokens: int = 0
    """Scored token positions seen."""
    fires_a: torch.Tensor | None = None
    """int64 ``[F_A]``: how often each source feature fires."""
    fires_b: torch.Tensor | None = None
    """int64 ``[F_B]``: how often each target feature fires."""
    both: torch.Tensor | None = None
    """float64 ``[F_A, F_B]``: how often source i and target j fire at the same token."""
    moments: dict[str, torch.Tensor] | None = None
    """float64 sums for the activation correlation (``None`` unless activations were added):
    ``a``, ``aa`` ``[F_A]``; ``b``, ``bb`` ``[F_B]``; ``ab`` ``[F_A, F_B]``."""

    def add(self, fire_a_TF: torch.Tensor, fire_b_TF: torch.Tensor,
            acts_a_TF: torch.Tensor | None = None, acts_b_TF: torch.Tensor | None = None) -> None:
        """Accumulate boolean firing matrices ``[tokens, F_A]`` and ``[tokens, F_B]`` and,
        when given, the activations themselves (for :meth:`correlation`; both or neither, on
        every call)."""
        a, b = fire_a_TF.to(torch.float32), fire_b_TF.to(torch.float32).to(fire_a_TF.device)
        both = (a.T @ b).to(torch.float64).cpu()  # exact: counts < 2^24 per batch
        fa, fb = fire_a_TF.sum(0).cpu(), fire_b_TF.sum(0).cpu()
        with_acts = acts_a_TF is not None and acts_b_TF is not None
        if (acts_a_TF is None) != (acts_b_TF is None) or (
                self.n_tokens and with_acts != (self.moments is not None)):
            raise ValueError("pass the activations of both SAEs on every call, or on none.")
        self.n_tokens += int(fire_a_TF.shape[0])
        self.fires_a = fa if self.fires_a is None else self.fires_a + fa
        self.fires_b = fb if self.fires_b is None else self.fires_b + fb
        self.both = both if self.both is None else self.both + both
        if with_acts:
            assert acts_a_TF is not None and acts_b_TF is not None
            xa = acts_a_TF.to(torch.float64)
            xb = acts_b_TF.to(torch.float64).to(xa.device)
            new = {"a": xa.sum(0), "aa": (xa * xa).sum(0), "b": xb.sum(0),
                   "bb": (xb * xb).sum(0), "ab": xa.T @ xb}
            new = {k: v.cpu() for k, v in new.items()}
            self.moments = new if self.moments is None else {
                k: self.moments[k] + v for k, v in new.items()}

    def _checked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.both is None or self.fires_a is None or self.fires_b is None:
            raise ValueError("no tokens were added to these co-activation statistics.")
        return self.fires_a.double(), self.fires_b.double(), self.both

    def jaccard(self) -> torch.Tensor:
        """float64 ``[F_A, F_B]``: ``|A_i ∧ B_j| / |A_i ∨ B_j|`` (0 where neither fires)."""
        fa, fb, both = self._checked()
        union = fa[:, None] + fb[None, :] - both
        return torch.where(union > 0, both / union.clamp_min(1), torch.zeros_like(both))

    def correlation(self) -> torch.Tensor:
        """float64 ``[F_A, F_B]``: Pearson correlation of the activations over the scored tokens
        (zeros included; 0 where a feature never varies)."""
        if self.moments is None or not self.n_tokens:
            raise ValueError("these statistics hold no activations; collect them with "
                             "coactivation_stats(..., correlation=True).")
        n, m = float(self.n_tokens), self.moments
        cov = m["ab"] - m["a"][:, None] * m["b"][None, :] / n
        var_a = (m["aa"] - m["a"] ** 2 / n).clamp_min(0)
        var_b = (m["bb"] - m["b"] ** 2 / n).clamp_min(0)
        denom = (var_a[:, None] * var_b[None, :]).sqrt()
        return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))

    def similarity(self, by: str) -> torch.Tensor:
        """The ``[F_A, F_B]`` matrix the reference matchers maximise: ``"jaccard"`` or
        ``"correlation"``."""
        if by == "jaccard":
            return self.jaccard()
        if by == "correlation":
            return self.correlation()
        raise ValueError(f"by must be 'jaccard' or 'correlation', got {by!r}.")


def sae_pairs(saes: Sequence[Any] | Mapping[Hashable, Any],
              pairs: Sequence[tuple[Hashable, Hashable]] | None
              ) -> tuple[dict[Hashable, Any], list[tuple[Hashable, Hashable]]]:
    """The SAEs keyed as given (a list is keyed by model layer, from each hook name
    ``blocks.L.…``) and the checked ``(a, b)`` pairs (default: adjacent keys in the given order).

    Raises:
        ValueError: a listed SAE's hook names no block, or two listed SAEs are at one layer
            (pass a mapping then).
    """
    if isinstance(saes, Mapping):
        sae_map = dict(saes)
    elif isinstance(saes, Sequence) and not isinstance(saes, str | bytes):
        sae_map = dict(zip(layers_from_hooks(saes, what="a list of SAEs"), saes, strict=True))
    else:
        raise TypeError(f"saes must be a list or a dict of SAEs, got {type(saes).__name__}.")
    keys = list(sae_map)
    pair_list = list(pairs) if pairs is not None else list(itertools.pairwise(keys))
    for pair in pair_list:
        if len(pair) != 2 or any(k not in sae_map for k in pair):
            raise KeyError(f"pair {pair!r} does not name two SAEs; keys are {keys}.")
    return sae_map, pair_list


@torch.no_grad()
def coactivation_stats(model: Any, sae_a: Any, sae_b: Any,
                       tokens: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 8,
                       correlation: bool = False, progress: bool = True) -> CoactivationStats:
    """Stream ``tokens`` through ``model`` and count how SAE A's and B's features co-fire
    (with ``correlation=True`` also the activation moments behind
    :meth:`CoactivationStats.correlation`)."""
    for sae in (sae_a, sae_b):
        validate_sae(sae)
    tokens = check_tokens(tokens, model, what="coactivation_stats")
    names = list(dict.fromkeys([hook_name_of(sae_a), hook_name_of(sae_b)]))
    stats = CoactivationStats()
    batches, total = token_batches(tokens, batch_size)
    for batch in tqdm(batches, total=total, desc="co-activation", unit="batch",
                      disable=not progress):
        states = record_states(model, names, batch)
        acts_a = scored_activations(sae_a, states[hook_name_of(sae_a)])
        acts_b = scored_activations(sae_b, states[hook_name_of(sae_b)])
        if correlation:
            stats.add(fires(acts_a), fires(acts_b), acts_a, acts_b)
        else:
            stats.add(fires(acts_a), fires(acts_b))
    return stats


def best_partner(stats: CoactivationStats, by: str = "jaccard") -> torch.Tensor:
    """Data-based reference: each source feature's target with the highest Jaccard (or, with
    ``by="correlation"``, activation correlation); int64 ``[F_A]``, -1 where the source never
    fires. By Jaccard it is the ceiling of any top-1 link method on the Jaccard metric."""
    best = stats.similarity(by).argmax(dim=1)
    fa, _, _ = stats._checked()
    return torch.where(fa > 0, best, torch.full_like(best, -1))


def one_to_one(stats: CoactivationStats, by: str = "jaccard") -> Permutation:
    """Data-based reference: the one-to-one assignment maximising summed Jaccard (or, with
    ``by="correlation"``, summed activation correlation; scipy's exact solver; features that
    never fire stay unmatched). By Jaccard it is the ceiling of any permutation."""
    from scipy.optimize import linear_sum_assignment

    jac = stats.similarity(by)
    rows, cols = linear_sum_assignment(jac.numpy(), maximize=True)
    indices = torch.full((jac.shape[0],), -1, dtype=torch.int64)
    indices[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
    fa, _, _ = stats._checked()
    indices[fa == 0] = -1
    return Permutation(indices, jac.shape[1])


LinkMethod = Links | Permutation | MatchResult | torch.Tensor


def link_indices(method: LinkMethod, k: int | None = None) -> torch.Tensor:
    """int64 ``[F_A, k]`` link targets of a method (``Links`` truncated to ``k``; a permutation or
    a ``[F_A]`` index tensor as ``k = 1``)."""
    if isinstance(method, MatchResult):
        method = method.permutation
    if isinstance(method, Permutation):
        return method.indices[:, None]
    if isinstance(method, Links):
        return method.indices if k is None else method.indices[:, :k]
    if isinstance(method, torch.Tensor):
        idx = method.to(torch.int64)
        return idx[:, None] if idx.ndim == 1 else idx
    raise TypeError(f"a link method must be Links, a Permutation, a MatchResult or an index "
                    f"tensor, got {type(method).__name__}.")


@dataclass
class _UnionSums:
    """Per-source counts for one link set: |A ∧ B_L| and |B_L| over tokens."""

    both: torch.Tensor | None = None
    union_fires: torch.Tensor | None = None

    def add(self, fire_a: torch.Tensor, fire_b: torch.Tensor, idx: torch.Tensor) -> None:
        ok = idx >= 0
        gathered = fire_b[:, idx.clamp(min=0).reshape(-1)].reshape(fire_b.shape[0], *idx.shape)
        linked = (gathered & ok[None]).any(dim=-1)
        both = (fire_a & linked).sum(0).cpu()
        lf = linked.sum(0).cpu()
        self.both = both if self.both is None else self.both + both
        self.union_fires = lf if self.union_fires is None else self.union_fires + lf


_COUNT_DTYPE = np.int32
"""Co-firing counts are int32 (8 bytes a stored pair with the int32 column index): exact below
2³¹ scored tokens, which :meth:`_CoFiring.add` checks."""


def _firing_csr(fire_TF: torch.Tensor) -> sp.csr_matrix:
    """A boolean ``[tokens, F]`` firing matrix as a sparse 0/1 matrix."""
    t, f = fire_TF.nonzero(as_tuple=True)
    return sp.csr_matrix((np.ones(len(t), dtype=_COUNT_DTYPE), (t.cpu().numpy(), f.cpu().numpy())),
                         shape=tuple(fire_TF.shape))


class _CoFiring:
    """Firing counts of two SAEs and, when ``pairs``, how often each source and target feature
    fire at the same token, kept sparse: only pairs that co-fire at least once are stored
    (``A^T B`` of the sparse firing matrices per batch, merged into one CSR matrix as batches
    stream), so memory grows with the co-firing pairs seen, not with ``F_A · F_B``. Counts are
    exact integers."""

    def __init__(self, n_a: int, n_b: int, pairs: bool) -> None:
        self.n_a, self.n_b, self.pairs = n_a, n_b, pairs
        self.n_tokens = 0
        self.fires_a = torch.zeros(n_a, dtype=torch.int64)
        self.fires_b = torch.zeros(n_b, dtype=torch.int64)
        self._both = sp.csr_matrix((n_a, n_b), dtype=_COUNT_DTYPE)
        self._pending: sp.csr_matrix | None = None

    def add(self, fire_a_TF: torch.Tensor, fire_b_TF: torch.Tensor) -> None:
        """Accumulate boolean firing matrices ``[tokens, F_A]`` and ``[tokens, F_B]``."""
        self.n_tokens += int(fire_a_TF.shape[0])
        if self.n_tokens >= np.iinfo(_COUNT_DTYPE).max:
            raise ValueError(f"co-firing counts are exact below 2^31 scored tokens, got "
                             f"{self.n_tokens}; evaluate links on fewer tokens.")
        self.fires_a += fire_a_TF.sum(0).cpu()
        self.fires_b += fire_b_TF.sum(0).cpu()
        if not self.pairs:
            return
        counts = (_firing_csr(fire_a_TF).T.tocsr() @ _firing_csr(fire_b_TF)).tocsr()
        self._pending = counts if self._pending is None else self._pending + counts
        if self._pending.nnz > max(self._both.nnz // 2, 1 << 22):  # a merge costs O(stored)
            self._merge()

    def _merge(self) -> None:
        if self._pending is not None:
            self._both = self._both + self._pending  # CSR + CSR: one linear merge
            self._pending = None

    def jaccard(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(indptr, cols, jaccard)`` of the co-firing pairs in CSR layout by source (float64,
        computed as :meth:`CoactivationStats.jaccard` does: every other pair has Jaccard 0)."""
        self._merge()
        both = self._both
        both.sum_duplicates()
        rows = np.repeat(np.arange(self.n_a, dtype=np.int32), np.diff(both.indptr))
        jac = both.data.astype(np.float64)
        union = self.fires_a.double().numpy()[rows]
        del rows
        union += self.fires_b.double().numpy()[both.indices]
        union -= jac
        jac /= union
        return both.indptr, both.indices, jac


def _best_jaccard(n_a: int, indptr: np.ndarray, jac: np.ndarray) -> torch.Tensor:
    """Each source feature's highest Jaccard over all targets (0 where it co-fires with none)."""
    best = np.zeros(n_a)
    has = np.diff(indptr) > 0
    if len(jac):
        best[has] = np.maximum.reduceat(jac, indptr[:-1][has])
    return torch.from_numpy(best)


def _one_to_one_jaccard(n_a: int, n_b: int, indptr: np.ndarray, cols: np.ndarray,
                        jac: np.ndarray) -> torch.Tensor:
    """Each source feature's Jaccard with its partner in a one-to-one assignment maximising the
    summed Jaccard (0 where it has none). Pairs that never co-fire add 0 to any assignment, so the
    optimum is a maximum-weight matching on the co-firing pairs. It is solved exactly by scipy's
    sparse LAPJVsp as a full matching of the sources into the targets plus one private dummy
    target per source: a co-firing pair costs ``2 − jaccard``, a source's dummy 2 (every full
    matching has ``n_a`` edges, so the constant shifts all totals alike and keeps every weight
    nonzero)."""
    out = torch.zeros(n_a, dtype=torch.float64)
    if len(jac) == 0:
        return out
    ends = indptr[1:]  # each source's dummy goes after its own pairs
    weight = np.insert(2.0 - jac, ends, 2.0)
    index = np.insert(cols, ends, (n_b + np.arange(n_a)).astype(cols.dtype))
    graph = sp.csr_matrix((weight, index, indptr + np.arange(n_a + 1, dtype=indptr.dtype)),
                          shape=(n_a, n_b + n_a))
    del weight, index
    r_idx, c_idx = min_weight_full_bipartite_matching(graph)
    del graph
    partner = np.full(n_a, -1, dtype=np.int64)
    partner[r_idx] = c_idx
    rows = np.repeat(np.arange(n_a), np.diff(indptr))
    chosen = np.flatnonzero(partner[rows] == cols)
    out[torch.from_numpy(rows[chosen])] = torch.from_numpy(jac[chosen])
    return out


@dataclass
class _PairLinks:
    key_a: Hashable
    key_b: Hashable
    sae_a: Any
    sae_b: Any
    methods: list[tuple[str, int, torch.Tensor]]
    stats: CoactivationStats | _CoFiring
    sums: dict[tuple[str, int], _UnionSums] = field(default_factory=dict)


@torch.no_grad()
def evaluate_links(
    model: Any,
    saes: Sequence[Any] | Mapping[Hashable, Any],
    tokens: torch.Tensor | Iterable[torch.Tensor],
    methods: Mapping[str, Mapping[tuple[Hashable, Hashable], LinkMethod]],
    *,
    pairs: Sequence[tuple[Hashable, Hashable]] | None = None,
    ks: Sequence[int] = (1,),
    min_fires: int = 5,
    batch_size: int = 8,
    ceilings: Literal["all", "both", "best_partner", "none"] = "both",
    progress: bool = True,
) -> pd.DataFrame:
    """Link quality of each method on held-out tokens, beside the data-based ceilings.

    Args:
        model: the TransformerLens model the SAEs read.
        saes: the SAEs, as a list (keyed by the model layer in each hook name ``blocks.L.…``)
            or a dict (e.g. layer → SAE).
        tokens: ``[n_seq, pos]`` token ids with BOS at position 0 (split into ``batch_size``
            sequences), or an iterable of ``[batch, pos]`` batches
            (:func:`~sae_match_lens.metrics.check_tokens`).
        methods: ``{name: {(a, b): links}}`` where links are :class:`~sae_match_lens.flow.linking.Links`,
            a :class:`~sae_match_lens.permutation.Permutation`/``MatchResult``, or an index tensor.
            Those that record their SAEs must run from ``saes[a]`` to ``saes[b]``
            (:func:`~sae_match_lens.permutation.check_direction`: reversed links are refused
            with a message saying how to reverse them).
        pairs: the ``(a, b)`` keys to evaluate (default: adjacent keys).
        ks: for ``Links`` methods, the numbers of top links to evaluate (a permutation is k = 1);
            each must be at most the links' own ``k`` (a larger one is refused, naming it).
        min_fires: source features firing fewer times are left out of the averages.
        batch_size: sequences per forward pass (memory is bounded by it).
        ceilings: which data-based ceilings to compute: ``"best_partner"``, ``"both"`` (also
            ``one_to_one``) or ``"all"`` (also the two correlation references; they need float64
            activation moments, dense ``F_A × F_B`` products per batch), or ``"none"``. Without
            ``"all"`` co-firing is counted sparsely (only pairs that co-fire, merged as batches
            stream) and ``one_to_one`` is a maximum-weight matching on those pairs, so memory
            grows with the co-firing pairs seen, not with ``F_A × F_B``; ``"none"`` counts no
            pairs.
        progress: show a progress bar.

    Returns:
        A DataFrame with one row per (pair, method, k) and the columns :data:`LINK_COLUMNS`;
        ``fraction_of_ceiling`` is ``jaccard / ceiling_best_partner``.
    """
    sae_map, pair_list = sae_pairs(saes, pairs)
    if ceilings not in ("all", "both", "best_partner", "none"):
        raise ValueError(f"ceilings must be 'all', 'both', 'best_partner' or 'none', got "
                         f"{ceilings!r}.")
    if min_fires < 1:
        raise ValueError(f"min_fires must be >= 1, got {min_fires}.")
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}.")
    tokens = check_tokens(tokens, model, what="evaluate_links")
    for name, by_pair in methods.items():
        for pair in (pair for pair in pair_list if pair in by_pair):
            what = f"evaluate_links method {name!r} for pair {pair!r}"
            check_direction(by_pair[pair], sae_map[pair[0]], sae_map[pair[1]], what=what)
            too_big = [k for k in ks if isinstance(by_pair[pair], Links) and k > by_pair[pair].k]
            if too_big:
                raise ValueError(
                    f"{what}: the links hold k={by_pair[pair].k} partner(s) per source feature, "
                    f"but ks={tuple(ks)} asks for k={too_big}; those rows would repeat "
                    f"k={by_pair[pair].k}. Compute links(..., k={max(ks)}) or leave {too_big} "
                    "out of ks."
                )
    plans = []
    for a, b in pair_list:
        sae_a, sae_b = sae_map[a], sae_map[b]
        chosen = []
        for name, by_pair in methods.items():
            if (a, b) not in by_pair:
                continue
            method = by_pair[(a, b)]
            method_ks = ks if isinstance(method, Links) else (1,)
            for k in method_ks:
                idx = link_indices(method, k)
                if idx.shape[0] != sae_a.cfg.d_sae or bool((idx >= sae_b.cfg.d_sae).any()):
                    raise ValueError(
                        f"method {name!r} for pair {(a, b)}: links of shape {tuple(idx.shape)} do "
                        f"not fit {describe_sae(sae_a)} -> {describe_sae(sae_b)}."
                    )
                chosen.append((name, k, idx))
        # "all" needs the dense activation moments; otherwise co-firing is counted sparsely
        stats = (CoactivationStats() if ceilings == "all" else
                 _CoFiring(sae_a.cfg.d_sae, sae_b.cfg.d_sae, pairs=ceilings != "none"))
        plans.append(_PairLinks(a, b, sae_a, sae_b, chosen, stats))
    names = list(dict.fromkeys(hook_name_of(sae_map[k]) for pair in pair_list for k in pair))
    batches, total = token_batches(tokens, batch_size)
    for batch in tqdm(batches, total=total, desc="evaluate links", unit="batch",
                      disable=not progress):
        states = record_states(model, names, batch)
        fired: dict[Hashable, torch.Tensor] = {}
        acts: dict[Hashable, torch.Tensor] = {}
        for plan in plans:
            for key, sae in ((plan.key_a, plan.sae_a), (plan.key_b, plan.sae_b)):
                if key not in fired:
                    acts[key] = scored_activations(sae, states[hook_name_of(sae)])
                    fired[key] = fires(acts[key])
            fire_a, fire_b = fired[plan.key_a], fired[plan.key_b]
            if isinstance(plan.stats, CoactivationStats):
                plan.stats.add(fire_a, fire_b, acts[plan.key_a], acts[plan.key_b])
            else:
                plan.stats.add(fire_a, fire_b)
            for name, k, idx in plan.methods:
                plan.sums.setdefault((name, k), _UnionSums()).add(fire_a, fire_b,
                                                                   idx.to(fire_b.device))
    return pd.DataFrame([row for plan in plans for row in _rows(plan, min_fires, ceilings)],
                        columns=list(LINK_COLUMNS))


def _mean_over(values: torch.Tensor, keep: torch.Tensor) -> float:
    keep = keep & torch.isfinite(values)
    return float(values[keep].mean()) if bool(keep.any()) else math.nan


def _assigned(jac: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Each source feature's Jaccard with its assigned partner (0 where unassigned)."""
    ok = partner >= 0
    out = torch.zeros(jac.shape[0], dtype=jac.dtype)
    out[ok] = jac[ok, partner[ok]]
    return out


def _ceilings(plan: _PairLinks, active: torch.Tensor, ceilings: str) -> tuple[float, ...]:
    """``(best partner, one-to-one, correlation best partner, correlation one-to-one)`` means
    over the active source features (nan where not asked for)."""
    stats = plan.stats
    nan = math.nan
    if ceilings == "none":
        return nan, nan, nan, nan
    if isinstance(stats, _CoFiring):
        indptr, cols, jac = stats.jaccard()
        ceiling_bp = _mean_over(_best_jaccard(stats.n_a, indptr, jac), active)
        if ceilings == "best_partner":
            return ceiling_bp, nan, nan, nan
        return ceiling_bp, _mean_over(
            _one_to_one_jaccard(stats.n_a, stats.n_b, indptr, cols, jac), active), nan, nan
    dense = stats.jaccard()
    return (_mean_over(dense.max(dim=1).values, active),
            _mean_over(_assigned(dense, one_to_one(stats).indices), active),
            _mean_over(_assigned(dense, best_partner(stats, "correlation")), active),
            _mean_over(_assigned(dense, one_to_one(stats, "correlation").indices), active))


def _rows(plan: _PairLinks, min_fires: int, ceilings: str) -> list[dict[str, Any]]:
    if plan.stats.n_tokens == 0:
        raise ValueError("no tokens were added to these co-activation statistics.")
    fa = plan.stats.fires_a.double()
    active = fa >= min_fires
    ceiling_bp, ceiling_oo, ref_bp, ref_oo = _ceilings(plan, active, ceilings)
    out = []
    for name, k, idx in plan.methods:
        sums = plan.sums[(name, k)]
        assert sums.both is not None and sums.union_fires is not None
        both, uf = sums.both.double(), sums.union_fires.double()
        union = fa + uf - both
        jaccard = torch.where(union > 0, both / union.clamp_min(1), torch.zeros_like(both))
        p_ab = torch.where(uf > 0, both / uf.clamp_min(1), torch.full_like(both, math.nan))
        top1 = idx[:, 0]
        out.append({
            "layer_a": plan.key_a, "layer_b": plan.key_b,
            "hook_a": hook_name_of(plan.sae_a), "hook_b": hook_name_of(plan.sae_b),
            "method": name, "k": k,
            "jaccard": _mean_over(jaccard, active),
            "p_b_given_a": _mean_over(both / fa.clamp_min(1), active),
            "p_a_given_b": _mean_over(p_ab, active),
            "distinct_targets": int(torch.unique(top1[top1 >= 0]).numel()),
            "n_sources": int(active.sum()),
            "ceiling_best_partner": ceiling_bp, "ceiling_one_to_one": ceiling_oo,
            "fraction_of_ceiling": (_mean_over(jaccard, active) / ceiling_bp
                                    if ceiling_bp and not math.isnan(ceiling_bp) else math.nan),
            "reference_correlation_best_partner": ref_bp,
            "reference_correlation_one_to_one": ref_oo,
            "n_tokens": plan.stats.n_tokens,
        })
    return out
