"""Substitute blocks of a TransformerLens model by encode → permute → decode (SAE Match, Eq. 5).

Read the residual stream ``h_A`` at SAE A's hook (``cfg.metadata.hook_name``), and write an
approximation of ``h_B`` at SAE B's hook, skipping the blocks in between:

``h_B ≈ SAE_B.decode(P · SAE_A.encode(h_A))``

where ``P`` is a :class:`~sae_match_lens.permutation.Permutation` A→B
(``f_B[..., P.indices] = f_A``). The blocks between the two hooks still run on the hook route
(their output is overwritten); :func:`run_skipping` does not compute them at all.

**Transfer units.** The paper's Eq. 5 does not say in which units activations cross from A to B.
Two choices are offered (:class:`Substitution`'s ``transfer``):

* ``"folded"`` (default): encode with ``fold(SAE_A)``, permute, decode with ``fold(SAE_B)``.
  Activations cross in each SAE's fold units (threshold units for JumpReLU), the units in which
  :func:`~sae_match_lens.matching.match` compared the features. Equivalently
  ``f_B[P(i)] = f_A[i] · c_A[i] / c_B[P(i)]`` with ``c = folded_activation_factor(sae)`` (the
  factor taking an SAE's ``encode`` output into folded units: ``1/s`` for most architectures,
  ``1`` for TopK/AbsTopK with ``rescale_acts_by_decoder_norm``), which is how it is computed (no
  folded copies of the SAEs are made).
* ``"raw"``: raw activations of SAE A are decoded by raw SAE B (``f_B[P(i)] = f_A[i]``).

For a JumpReLU pair, ``folded`` keeps "how far above its threshold" a feature is, ``raw`` keeps
its raw magnitude; for SAEs whose fold scale is 1 (TopK without decoder-norm rescaling) they
coincide.

**Methods** (:data:`Method`):

* ``"permute"``: ``SAE_B.decode(P f_A)``.
* ``"hybrid"`` (the paper's Appendix B): the ``round(quantile · n_matched)`` matched features with
  the lowest match cost go through ``P`` to B's decoder; the rest (and unmatched features) are
  decoded by A's own decoder:
  ``SAE_B.decode(P(f_A ⊙ m)) + SAE_A.decode(f_A ⊙ ¬m) - SAE_A.decode(0)``. At ``quantile=1`` every
  matched feature goes through ``P`` but unmatched ones are still decoded by A, so it equals
  ``permute`` only when every feature is matched (a bijection); at 0 it is SAE A's
  reconstruction with B's ``b_dec`` in place of A's.
* ``"error_preserving"``: ``h_A - SAE_A.decode(f_A) + SAE_B.decode(P f_A)``; carries SAE A's
  reconstruction error across, separating the SAE's error from the matching error.
* ``"identity"``: ``h_A`` (drop the blocks).
* ``"sae_a_reconstruction"``: ``SAE_A.decode(f_A)`` used as the state at B.
* ``"sae_b_reconstruction"``: ``SAE_B.decode(SAE_B.encode(h_B))`` of the true ``h_B`` (needs the
  skipped blocks, so it has no skipping route).

**BOS.** The SAEs this package meets (Gemma Scope, the default suite) are trained without the
BOS position, whose residual state is an attention sink with a huge norm that every later
position reads. So by default (``bos="keep"``) position 0 keeps its true state at B: on the hook
route it is the state the skipped blocks computed, on the true-skip route a one-token run gives
it (under causal attention position 0 only attends to itself). ``bos="substitute"`` substitutes
it too. Either way the tokens must start with the model's BOS token (checked where tokens are
seen; the hook route checks the embedding of position 0): a sequence without BOS would have its
first real token treated as BOS, so it is refused with a clear error.

**Provenance.** A permutation made by :func:`~sae_match_lens.matching.match` (and links, and
transitions) records which SAEs it maps; using it with other SAEs raises
:class:`~sae_match_lens.permutation.ProvenanceError` naming both, and one that maps B→A is
refused with how to reverse it (:func:`~sae_match_lens.permutation.check_direction`).

**Model.** With ``check_model=True`` (default) an SAE whose recorded model
(``cfg.metadata.model_name``) is not the model's ``cfg.model_name`` is refused when the hooks are
built; where a name is unknown, the first forward pass measures each SAE's explained variance
at its hook and refuses SAEs below
:data:`~sae_match_lens.metrics.MIN_PROBE_EXPLAINED_VARIANCE` (they do not read this model).

Hooks are plain TransformerLens hook functions ``fn(tensor, *, hook)``; they never read
``hook.name`` (a ``TransformerBridge`` calls them under its own names), the names are captured
when they are built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..adapters import (
    check_no_runtime_normalisation,
    describe_sae,
    folded_activation_factor,
    hook_name_of,
    validate_sae,
)
from ..flow.linking import Links, Transition
from ..matching import MatchResult
from ..metrics import check_reconstruction, check_saes_fit_model, check_tokens, unverified_saes
from ..options import accepts_flat_options, resolve_options
from ..permutation import Permutation
from .routes import (
    BOS_POLICIES,
    BosPolicy,
    EvalOptions,
    check_bos_tokens,
    check_skippable,
    embedding_of_bos,
    reads_after_write,
    resolve_bos_token_id,
    run_from,
    run_to,
    starts_with_bos,
    validate_route,
)

__all__ = [
    "BOS_POLICIES",
    "METHODS",
    "SUBSTITUTIONS",
    "BlockSubstitute",
    "BosPolicy",
    "EvalOptions",
    "HookFn",
    "Map",
    "Method",
    "Substitution",
    "SubstitutionName",
    "Transfer",
    "block_substitute",
    "run_skipping",
    "substitute",
    "substitution_hooks",
]

logger = logging.getLogger(__name__)

Method = Literal["permute", "hybrid", "error_preserving", "identity", "sae_a_reconstruction",
                 "sae_b_reconstruction"]
"""How a substitute computes the state at B from the state at A (the module docstring's **Methods**)."""
SubstitutionName = Literal["folded", "raw", "hybrid", "error_preserving", "identity",
                           "sae_a_reconstruction", "sae_b_reconstruction"]
Transfer = Literal["folded", "raw"]
"""The units in which activations cross from A to B (the module docstring's **Transfer units**)."""
HookFn = Callable[..., torch.Tensor | None]
METHODS: tuple[str, ...] = ("permute", "hybrid", "error_preserving", "identity",
                            "sae_a_reconstruction", "sae_b_reconstruction")
"""Every :data:`Method`, in the order the module docstring describes them."""
_USES_PERMUTATION = ("permute", "hybrid", "error_preserving")
SUBSTITUTIONS: tuple[str, ...] = ("folded", "raw", "hybrid", "error_preserving", "identity",
                                  "sae_a_reconstruction", "sae_b_reconstruction")
"""The substitution names, the same as the :func:`~sae_match_lens.evaluation.evaluate_substitution`
variants they make: ``"folded"`` (the method: permute in fold units) and ``"raw"`` (permute raw
activations) are the two transfers of ``permute``; the others name their method (folded transfer
where it applies). Anything else is a :class:`Substitution`."""


@dataclass(frozen=True)
class Substitution:
    """How the state at B's hook is computed from the state at A's hook (see module docstring).

    Example:
        >>> Substitution("hybrid", quantile=0.8)
        Substitution(method='hybrid', transfer='folded', quantile=0.8)
    """

    method: Method = "permute"
    """One of :data:`METHODS`."""
    transfer: Transfer = "folded"
    """Units in which activations cross from A to B: ``"folded"`` or ``"raw"``."""
    quantile: float = 0.5
    """``hybrid`` only: the fraction of matched features (lowest cost first) sent through P."""

    @classmethod
    def of(cls, value: Substitution | str) -> Substitution:
        """A :class:`Substitution` from itself or a name of :data:`SUBSTITUTIONS` (or a
        :data:`METHODS` name, folded transfer).

        Example:
            >>> Substitution.of("raw")
            Substitution(method='permute', transfer='raw', quantile=0.5)
        """
        if isinstance(value, Substitution):
            return value
        if value in ("folded", "raw"):
            return cls("permute", value)  # type: ignore[arg-type]
        if isinstance(value, str) and value in METHODS:
            return cls(value)  # type: ignore[arg-type]
        raise ValueError(f"unknown substitution {value!r}; use one of {list(SUBSTITUTIONS)} "
                         "or a Substitution(method, transfer, quantile).")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"unknown substitution method {self.method!r}; valid: {list(METHODS)}."
            )
        if self.transfer not in ("folded", "raw"):
            raise ValueError(f"transfer must be 'folded' or 'raw', got {self.transfer!r}.")
        if not 0.0 <= float(self.quantile) <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}.")

    @property
    def uses_permutation(self) -> bool:
        """Whether the method moves SAE A's features through a permutation."""
        return self.method in _USES_PERMUTATION

    @property
    def needs_target_state(self) -> bool:
        """Whether the method needs the true state at B (so the blocks must run)."""
        return self.method == "sae_b_reconstruction"


@dataclass(frozen=True, eq=False)
class BlockSubstitute:
    """A prepared substitute ``h_A (, h_B) -> ĥ_B``; build it with :func:`block_substitute`.

    Shape suffixes: S = source features (SAE A), T = target features (SAE B), D = d_model.
    """

    sae_a: Any
    """Source SAE (reads ``hook_a``)."""
    sae_b: Any
    """Target SAE (reads ``hook_b``)."""
    substitution: Substitution
    """The method and transfer units."""
    hook_a: str
    """Where ``h_A`` is read."""
    hook_b: str
    """Where the approximation is written."""
    permutation: Permutation | None = None
    """The map A→B (``None`` for methods that use none)."""
    source_index: torch.Tensor | None = field(default=None, repr=False)
    """For each target feature, the source feature moved into it (0 where none), on B's device."""
    factor: torch.Tensor | None = field(default=None, repr=False)
    """Per-target multiplier: transfer scale ``c_A/c_B`` (folded transfer, ``c`` =
    :func:`~sae_match_lens.adapters.folded_activation_factor`) or 1, 0 where nothing is moved in."""
    keep_mask: torch.Tensor | None = field(default=None, repr=False)
    """``hybrid`` only: 1 for source features decoded by A's own decoder, else 0."""
    transition: Transition | None = None
    """A many-to-one map A→B used instead of a permutation (``None`` for permutations)."""
    edge_source: torch.Tensor | None = field(default=None, repr=False)
    """Transitions: the source feature of each edge, on B's device."""
    edge_target: torch.Tensor | None = field(default=None, repr=False)
    """Transitions: the target feature of each edge, on B's device."""
    edge_factor: torch.Tensor | None = field(default=None, repr=False)
    """Transitions: edge weight × transfer scale ``c_A/c_B`` (or the weight alone, raw)."""

    def encode_a(self, h_A: torch.Tensor) -> torch.Tensor:
        """SAE A's activations of ``h_A`` (on A's device and dtype)."""
        return self.sae_a.encode(_to_sae(h_A, self.sae_a))

    def move(self, f_A: torch.Tensor) -> torch.Tensor:
        """Move activations ``f_A [..., S]`` into B's features and units ``[..., T]``."""
        if self.edge_source is not None:
            assert self.edge_target is not None and self.edge_factor is not None
            f = f_A.to(self.edge_source.device, self.sae_b.W_dec.dtype)
            out = f.new_zeros((*f.shape[:-1], self.sae_b.cfg.d_sae))
            return out.index_add_(-1, self.edge_target, f[..., self.edge_source] * self.edge_factor)
        assert self.source_index is not None and self.factor is not None
        f = f_A.to(self.source_index.device, self.sae_b.W_dec.dtype)
        index = self.source_index.expand(*f.shape[:-1], -1)
        return torch.gather(f, -1, index) * self.factor

    def __call__(
        self,
        h_A: torch.Tensor,
        h_B: torch.Tensor | None = None,
        *,
        f_A: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the approximation of the state at B.

        Args:
            h_A: the state at A's hook ``[..., d_in]``.
            h_B: the true state at B's hook (only ``sae_b_reconstruction`` reads it).
            f_A: SAE A's activations of ``h_A`` if already computed (saves one encode).

        Returns:
            ``ĥ_B`` with the shape, device and dtype of ``h_A``.
        """
        method = self.substitution.method
        if method == "identity":
            return h_A
        if method == "sae_b_reconstruction":
            if h_B is None:
                raise ValueError(
                    f"substitution 'sae_b_reconstruction' at '{self.hook_b}' needs the true state at B; "
                    "it cannot skip the blocks."
                )
            sae = self.sae_b
            return sae.decode(sae.encode(_to_sae(h_B, sae))).to(h_B.device, h_B.dtype)
        if f_A is None:
            f_A = self.encode_a(h_A)
        if method == "sae_a_reconstruction":
            out = self.sae_a.decode(f_A)
        elif method == "permute":
            out = self.sae_b.decode(self.move(f_A))
        elif method == "hybrid":
            assert self.keep_mask is not None
            kept = f_A * self.keep_mask
            zero = f_A.new_zeros((1, f_A.shape[-1]))
            from_a = self.sae_a.decode(kept) - self.sae_a.decode(zero)
            out = self.sae_b.decode(self.move(f_A)) + from_a.to(self.sae_b.W_dec.device)
        else:
            error_A = _to_sae(h_A, self.sae_a) - self.sae_a.decode(f_A)
            out = self.sae_b.decode(self.move(f_A)) + error_A.to(self.sae_b.W_dec.device)
        return out.to(h_A.device, h_A.dtype)


def _to_sae(h: torch.Tensor, sae: Any) -> torch.Tensor:
    return h.to(sae.W_enc.device, sae.W_enc.dtype)


def check_substitute_sae(sae: Any, role: str) -> str:
    """Check that ``sae`` can be installed in a forward pass as ``role`` (a supported SAE, no
    run-time normalisation, output width equal to input width); returns its hook name."""
    validate_sae(sae)
    check_no_runtime_normalisation(sae, role)
    d_out = getattr(sae.cfg, "d_out", sae.cfg.d_in)
    if d_out != sae.cfg.d_in:
        raise ValueError(
            f"{describe_sae(sae)} ({role}) is a transcoder (d_in={sae.cfg.d_in}, d_out={d_out}); "
            "block substitution needs SAEs that reconstruct the state they read."
        )
    name = hook_name_of(sae)
    if name == "<no hook_name>":
        raise ValueError(
            f"{describe_sae(sae)} ({role}) has no cfg.metadata.hook_name, so it is unknown where "
            "it reads; set sae.cfg.metadata.hook_name = 'blocks.L.hook_resid_post' (for example)."
        )
    return name


Map = Permutation | MatchResult | Links | Transition
"""What carries activations from A to B: a permutation (or the ``MatchResult`` holding one), or a
many-to-one :class:`~sae_match_lens.flow.linking.Transition` (``Links`` are used as their binarised
transition over all kept links)."""


def _split(permutation: Map | None, cost_F: torch.Tensor | None
           ) -> tuple[Permutation | Transition | None, torch.Tensor | None]:
    if isinstance(permutation, MatchResult):
        return permutation.permutation, permutation.cost_F if cost_F is None else cost_F
    if isinstance(permutation, Links):
        return Transition.from_links(permutation), cost_F
    if permutation is not None and not isinstance(permutation, Permutation | Transition):
        raise TypeError(
            "permutation must be a Permutation, a MatchResult, Links or a Transition, got "
            f"{type(permutation).__name__}."
        )
    return permutation, cost_F


def block_substitute(
    sae_a: Any,
    sae_b: Any,
    permutation: Map | None = None,
    *,
    substitution: Substitution | SubstitutionName | Method = "folded",
    cost_F: torch.Tensor | None = None,
) -> BlockSubstitute:
    """Prepare the substitute ``h_A -> ĥ_B`` for a pair of SAEs (no model needed).

    Args:
        sae_a: source SAE; reads ``sae_a.cfg.metadata.hook_name``.
        sae_b: target SAE; its hook is where the approximation goes.
        permutation: the map A→B, or a :class:`~sae_match_lens.matching.MatchResult` (whose
            ``cost_F`` then serves the ``hybrid`` method). Needed by ``permute``, ``hybrid``
            and ``error_preserving``; ignored by the others.
        substitution: a :class:`Substitution` or a name of :data:`SUBSTITUTIONS` (the
            evaluation variants' names: ``"folded"``, ``"raw"``, ``"hybrid"``, …).
        cost_F: per-source-feature match cost ``[n_source]`` for ``hybrid`` (NaN: unmatched);
            default: the MatchResult's.

    Raises:
        ValueError: unsupported SAE, missing hook name, permutation sizes that do not match the
            SAEs (naming the SAE and expected vs actual), missing permutation or costs.

    Example:
        >>> sub = block_substitute(sae_3, sae_4, match(sae_3, sae_4))
        >>> h_4_hat = sub(h_3)
    """
    if not isinstance(substitution, Substitution | str):
        raise TypeError(f"substitution must be a Substitution or one of {list(SUBSTITUTIONS)}, "
                        f"got {substitution!r}.")
    spec = Substitution.of(substitution)
    hook_a, hook_b = check_substitute_sae(sae_a, "SAE A"), check_substitute_sae(sae_b, "SAE B")
    perm, cost = _split(permutation, cost_F)
    if not spec.uses_permutation:
        return BlockSubstitute(sae_a, sae_b, spec, hook_a, hook_b, perm)
    if perm is None:
        raise ValueError(
            f"substitution '{spec.method}' from '{hook_a}' to '{hook_b}' needs a permutation "
            "A→B (a Permutation or the MatchResult of match(sae_a, sae_b))."
        )
    if isinstance(perm, Transition):
        return _transition_substitute(sae_a, sae_b, spec, hook_a, hook_b, perm)
    perm.check_saes(sae_a, sae_b, what=f"the permutation for '{hook_a}' -> '{hook_b}'")
    for role, sae, n in (("source", sae_a, perm.n_source), ("target", sae_b, perm.n_target)):
        if n != sae.cfg.d_sae:
            raise ValueError(
                f"the permutation's {role} side has {n} features but {describe_sae(sae)} has "
                f"d_sae={sae.cfg.d_sae}; expected a permutation of shape "
                f"{sae_a.cfg.d_sae}->{sae_b.cfg.d_sae} (n_source = SAE A's d_sae, "
                "n_target = SAE B's d_sae)."
            )
    send_S = perm.matched.clone()
    keep_mask = None
    if spec.method == "hybrid":
        send_S = _hybrid_mask(perm, cost, spec.quantile, hook_a)
        keep_mask = (~send_S).to(device=sae_a.W_enc.device, dtype=sae_a.W_enc.dtype)
    ratio_S = torch.ones(perm.n_source, dtype=torch.float64)
    target_scale = torch.ones(perm.n_target, dtype=torch.float64)
    if spec.transfer == "folded":
        ratio_S = folded_activation_factor(sae_a).cpu()
        target_scale = 1.0 / folded_activation_factor(sae_b).cpu()
    sent = torch.nonzero(send_S).flatten()
    targets = perm.indices[sent]
    source_index = torch.zeros(perm.n_target, dtype=torch.int64)
    factor = torch.zeros(perm.n_target, dtype=torch.float64)
    source_index[targets] = sent
    factor[targets] = ratio_S[sent] * target_scale[targets]
    device, dtype = sae_b.W_dec.device, sae_b.W_dec.dtype
    return BlockSubstitute(
        sae_a, sae_b, spec, hook_a, hook_b, perm,
        source_index=source_index.to(device), factor=factor.to(device=device, dtype=dtype),
        keep_mask=keep_mask,
    )


def _transition_substitute(sae_a: Any, sae_b: Any, spec: Substitution, hook_a: str, hook_b: str,
                           tr: Transition) -> BlockSubstitute:
    tr.check_saes(sae_a, sae_b, what=f"the transition for '{hook_a}' -> '{hook_b}'")
    if spec.method == "hybrid":
        raise ValueError(
            f"substitution 'hybrid' from '{hook_a}' ranks one-to-one matches by cost; a many-to-one "
            "transition has none. Use 'permute' or 'error_preserving' with a transition."
        )
    for role, sae, n in (("source", sae_a, tr.n_source), ("target", sae_b, tr.n_target)):
        if n != sae.cfg.d_sae:
            raise ValueError(
                f"the transition's {role} side has {n} features but {describe_sae(sae)} has "
                f"d_sae={sae.cfg.d_sae}."
            )
    factor = tr.weight.clone()
    if spec.transfer == "folded":
        factor *= (folded_activation_factor(sae_a).cpu()[tr.source]
                   / folded_activation_factor(sae_b).cpu()[tr.target])
    device, dtype = sae_b.W_dec.device, sae_b.W_dec.dtype
    return BlockSubstitute(
        sae_a, sae_b, spec, hook_a, hook_b, None, transition=tr,
        edge_source=tr.source.to(device), edge_target=tr.target.to(device),
        edge_factor=factor.to(device=device, dtype=dtype),
    )


def _hybrid_mask(perm: Permutation, cost_F: torch.Tensor | None, quantile: float,
                 hook_a: str) -> torch.Tensor:
    if cost_F is None:
        raise ValueError(
            f"the hybrid substitution from '{hook_a}' needs per-feature match costs: pass the "
            "MatchResult of match() as the permutation, or cost_F=."
        )
    cost = torch.as_tensor(cost_F).detach().to("cpu", torch.float64).flatten()
    if cost.numel() != perm.n_source:
        raise ValueError(
            f"cost_F has {cost.numel()} entries but the permutation from '{hook_a}' maps "
            f"{perm.n_source} source features."
        )
    matched = perm.matched & torch.isfinite(cost)
    n_send = round(quantile * int(matched.sum()))
    order = torch.argsort(torch.where(matched, cost, torch.inf), stable=True)
    send = torch.zeros(perm.n_source, dtype=torch.bool)
    send[order[:n_send]] = True
    return send


def _with_true_bos(h_hat: torch.Tensor, true_state_0: torch.Tensor) -> torch.Tensor:
    """``h_hat`` with position 0 replaced by the true state there (``[batch, 1 or pos, d]``)."""
    out = h_hat.clone()
    out[:, :1] = true_state_0[:, :1].to(out.device, out.dtype)
    return out


def _check_policy(bos: str) -> None:
    if bos not in BOS_POLICIES:
        raise ValueError(f"bos must be one of {list(BOS_POLICIES)}, got {bos!r}.")


def _make_hooks(model: Any, sub: BlockSubstitute, bos: BosPolicy,
                bos_token_id: int | None, probe: list[Any]) -> list[tuple[str, HookFn]]:
    """The hooks of a substitute; ``probe``: SAEs whose model is unconfirmed, checked on the
    first forward pass (:func:`~sae_match_lens.metrics.check_reconstruction`)."""
    _check_policy(bos)
    state: dict[str, torch.Tensor] = {}
    pending = list(probe)
    hook_a, hook_b = sub.hook_a, sub.hook_b
    bos_id = resolve_bos_token_id(model, bos_token_id)
    expected = embedding_of_bos(model, bos_id)

    def check_embed(x: torch.Tensor, *, hook: Any) -> None:
        bad = ~starts_with_bos(x, expected)
        if bool(bad.any()):
            raise ValueError(
                f"the substitute '{hook_a}' -> '{hook_b}' expects every sequence to start with "
                f"the model's BOS token (id {bos_id}), but {int(bad.sum())} of {x.shape[0]} do "
                "not; prepend it (model.to_tokens(text, prepend_bos=True)), or pass "
                "bos_token_id= if the model's BOS is another token."
            )

    def substitute_at_b(h_A: torch.Tensor, h_B: torch.Tensor) -> torch.Tensor:
        if h_A.shape != h_B.shape:
            raise ValueError(
                f"state at '{hook_a}' has shape {tuple(h_A.shape)} but the state at '{hook_b}' "
                f"has {tuple(h_B.shape)}; block substitution needs the same shape at both hooks."
            )
        if pending and h_A.ndim == 3 and h_A.shape[1] >= 2:  # a pass with a non-BOS position
            check_reconstruction(pending, {hook_a: h_A, hook_b: h_B},
                                 what=f"the substitute '{hook_a}' -> '{hook_b}'")
            pending.clear()
        h_hat = sub(h_A, h_B)
        return _with_true_bos(h_hat, h_B) if bos == "keep" else h_hat

    def read_a(h_A: torch.Tensor, *, hook: Any) -> None:
        state["h_A"] = h_A

    def write_b(h_B: torch.Tensor, *, hook: Any) -> torch.Tensor:
        h_A = state.pop("h_A", None)
        if h_A is None:
            raise RuntimeError(
                f"the substitute for '{hook_b}' ran before the hook at '{hook_a}' saw this "
                "forward pass; A's hook must run first (was the pass started after A?)."
            )
        return substitute_at_b(h_A, h_B)

    def write_b_same_boundary(h_B: torch.Tensor, *, hook: Any) -> torch.Tensor:
        return substitute_at_b(h_B, h_B)

    hooks: list[tuple[str, HookFn]] = [("hook_embed", check_embed)]
    if reads_after_write(model, hook_a, hook_b):
        # Both hooks are the same block boundary (e.g. blocks.2.hook_resid_pre after
        # blocks.1.hook_resid_post): the state at B *is* the state at A.
        return [*hooks, (hook_b, write_b_same_boundary)]
    return [*hooks, (hook_a, read_a), (hook_b, write_b)]


def _prepare(model: Any, sae_a: Any, sae_b: Any, permutation: Map | None,
             substitution: Substitution | SubstitutionName | Method,
             cost_F: torch.Tensor | None, check_model: bool) -> tuple[BlockSubstitute, list[Any]]:
    """The substitute, and the SAEs whose model its name does not confirm (to be probed)."""
    sub = block_substitute(sae_a, sae_b, permutation, substitution=substitution, cost_F=cost_F)
    validate_route(model, sub)
    what = f"the substitute '{sub.hook_a}' -> '{sub.hook_b}'"
    return sub, unverified_saes(model, [sae_a, sae_b], what=what) if check_model else []


def substitution_hooks(
    model: Any,
    sae_a: Any,
    sae_b: Any,
    permutation: Map | None = None,
    *,
    substitution: Substitution | SubstitutionName | Method = "folded",
    cost_F: torch.Tensor | None = None,
    bos: BosPolicy = "keep",
    bos_token_id: int | None = None,
    check_model: bool = True,
) -> list[tuple[str, HookFn]]:
    """Forward hooks that substitute the blocks between SAE A's and SAE B's hooks.

    Works on ``HookedTransformer``, ``HookedSAETransformer`` and ``TransformerBridge``; every
    hook name, the hook order, the SAEs' ``d_in``, the permutation's sizes and provenance are
    checked first. One hook checks that position 0 is the BOS token, one records ``h_A``, the
    last returns the substitute at B.

    Args:
        model: the TransformerLens model.
        sae_a: see :func:`block_substitute`.
        sae_b: see :func:`block_substitute`.
        permutation: see :func:`block_substitute`.
        substitution: see :func:`block_substitute`.
        cost_F: see :func:`block_substitute`.
        bos: ``"keep"`` (default): position 0 (BOS) keeps its true state at B; ``"substitute"``:
            it is substituted like every other position.
        bos_token_id: the BOS token id (default: the model tokenizer's ``bos_token_id``; needed
            when the model has no tokenizer).
        check_model: refuse SAEs that do not belong to ``model``: an SAE whose recorded
            ``cfg.metadata.model_name`` differs from ``model.cfg.model_name`` is refused here;
            where either name is unknown, the first forward pass measures each SAE's explained
            variance at its hook and raises when it is below
            :data:`~sae_match_lens.metrics.MIN_PROBE_EXPLAINED_VARIANCE`. ``False`` skips both.

    Returns:
        ``[(name, fn), ...]`` for ``model.run_with_hooks(fwd_hooks=...)``.

    Example:
        >>> hooks = substitution_hooks(model, sae_3, sae_5, match(sae_3, sae_5))
        >>> loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks)
    """
    sub, probe = _prepare(model, sae_a, sae_b, permutation, substitution, cost_F, check_model)
    return _make_hooks(model, sub, bos, bos_token_id, probe)


@contextmanager
def substitute(
    model: Any,
    sae_a: Any,
    sae_b: Any,
    permutation: Map | None = None,
    *,
    substitution: Substitution | SubstitutionName | Method = "folded",
    cost_F: torch.Tensor | None = None,
    bos: BosPolicy = "keep",
    bos_token_id: int | None = None,
    check_model: bool = True,
) -> Iterator[Any]:
    """Context manager: inside it, every forward pass of ``model`` uses the substitute.

    Only the hooks added here are removed on exit (also when the forward pass raises); hooks
    the caller installed before are kept. Arguments as in :func:`substitution_hooks`.

    Example:
        >>> with substitute(model, sae_3, sae_5, result, substitution="error_preserving"):
        ...     loss = model(tokens, return_type="loss")
    """
    hooks = substitution_hooks(model, sae_a, sae_b, permutation, substitution=substitution,
                               cost_F=cost_F, bos=bos, bos_token_id=bos_token_id,
                               check_model=check_model)
    with model.hooks(fwd_hooks=hooks) as hooked:
        yield hooked


@accepts_flat_options(EvalOptions)
def run_skipping(
    model: Any,
    tokens: torch.Tensor,
    sae_a: Any,
    sae_b: Any,
    permutation: Map | None = None,
    *,
    substitution: Substitution | SubstitutionName | Method = "folded",
    cost_F: torch.Tensor | None = None,
    return_type: Literal["logits", "loss", "both"] = "loss",
    loss_per_token: bool = False,
    options: EvalOptions | None = None,
) -> Any:
    """Run ``model`` without computing the blocks between A's and B's hooks (true skip).

    The model runs up to A's boundary (``stop_at_layer``), the substitute is computed, and the
    model resumes at B's boundary (``start_at_layer``). Gives the same result as the hook route
    (:func:`substitute`) at a fraction of the cost. Hooks inside the skipped blocks, and hooks
    at B's own hook point, do not fire; the next ``hook_resid_pre`` sees the substitute.

    Args:
        model: a ``HookedTransformer`` (or ``HookedSAETransformer``).
        tokens: integer token ids ``[batch, pos]``
            (:func:`~sae_match_lens.metrics.check_tokens`).
        sae_a: see :func:`block_substitute`; its hook must be ``blocks.L.hook_resid_pre`` or
            ``blocks.L.hook_resid_post``.
        sae_b: see :func:`block_substitute`; its hook, likewise.
        permutation: see :func:`block_substitute`.
        substitution: see :func:`block_substitute`.
        cost_F: see :func:`block_substitute`.
        return_type: as in ``HookedTransformer.forward``.
        loss_per_token: as in ``HookedTransformer.forward``.
        options: the run's knobs (:class:`~sae_match_lens.lens.routes.EvalOptions`; its
            ``bos``, ``bos_token_id`` and ``check_model`` apply here). With ``bos="keep"``
            (default) the true state of position 0 at B comes from a one-token run of the model
            (causal attention: position 0 attends only to itself), so no skipped block runs on
            the other positions. An SAE whose model its name does not confirm is probed on the
            first few sequences before the run
            (:func:`~sae_match_lens.metrics.check_saes_fit_model`). The flat keywords of 0.2
            (``bos=``, ``bos_token_id=``, ``check_model=``) still work until 0.4, with a
            ``DeprecationWarning``.

    Example:
        >>> loss = run_skipping(model, tokens, sae_3, sae_5, match(sae_3, sae_5))
        >>> run_skipping(model, tokens, sae_3, sae_5, perm, options=EvalOptions(bos="substitute"))
    """
    opts = resolve_options(EvalOptions, options)
    bos, bos_token_id, check_model = opts.bos, opts.bos_token_id, opts.check_model
    _check_policy(bos)
    tokens = check_tokens(tokens, model, what="run_skipping")
    sub, probe = _prepare(model, sae_a, sae_b, permutation, substitution, cost_F, check_model)
    stop, start = check_skippable(model, sub)
    check_bos_tokens(tokens, resolve_bos_token_id(model, bos_token_id),
                     f"run_skipping '{sub.hook_a}' -> '{sub.hook_b}'")
    if probe:
        check_saes_fit_model(model, probe, tokens, what=f"run_skipping '{sub.hook_a}' -> "
                             f"'{sub.hook_b}'")
    h_hat = sub(run_to(model, tokens, stop))
    if bos == "keep":
        h_hat = _with_true_bos(h_hat, run_to(model, tokens[:, :1], start))
    return run_from(model, tokens, h_hat, start,
                    return_type=return_type, loss_per_token=loss_per_token)
