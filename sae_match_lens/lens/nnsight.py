"""Block substitution on nnsight models (the optional ``nnsight`` extra).

The same substitutes as :mod:`~sae_match_lens.lens.hooks` (encode → permute/transition → decode, and
the baselines) and, through :func:`~sae_match_lens.evaluation.evaluate_substitution_nnsight`
(one level up), the same table as :func:`~sae_match_lens.evaluation.evaluate_substitution`,
for an nnsight model (``nnsight.TransformersModel`` / ``LanguageModel``) over a Hugging Face
causal LM. Only "where a state is read, how the substitute is written, where the logits come
from" is specific to nnsight (:class:`NNsightRoute`); the variants, the substitutes
(:func:`~sae_match_lens.lens.hooks.block_substitute`) and the metrics (:mod:`~sae_match_lens.metrics`)
are the package's own, so both routes give the same numbers on the same weights.

Install with ``pip install "sae-match-lens[nnsight]"``; the rest of the package never imports
nnsight (importing nnsight patches ``torch.Tensor`` globally, so it stays behind this module's
functions).

**Sites.** An SAE says where it reads by a TransformerLens hook name (``cfg.metadata.hook_name``);
on a Hugging Face model the same point is a :class:`ModuleSite`: a module path and whether the
state is the module's ``output`` (its first element when the module returns a tuple, as
attention modules do) or its first ``input``. :data:`MODULE_PATHS` maps the hook names of the
GPT-2 and Llama families (``config.model_type`` in :data:`MODEL_FAMILIES`):

============================  ==============================  ================================
TransformerLens hook          GPT-2 (``gpt2``)                Llama (``llama``, ``mistral``,
                                                              ``qwen2``)
============================  ==============================  ================================
``blocks.L.hook_resid_pre``   ``transformer.h.L.input``       ``model.layers.L.input``
``blocks.L.hook_resid_post``  ``transformer.h.L.output``      ``model.layers.L.output``
``blocks.L.hook_attn_out``    ``transformer.h.L.attn.output`` ``model.layers.L.self_attn.output``
``blocks.L.hook_mlp_out``     ``transformer.h.L.mlp.output``  ``model.layers.L.mlp.output``
============================  ==============================  ================================

These are the states of a TransformerLens model loaded *without weight processing*
(``from_pretrained_no_processing``, or the weight converters with ``fold_ln=False`` and no
centring): LayerNorm folding and centring change the residual stream's values, so an SAE trained
on a processed model reads different numbers than the Hugging Face model computes. Any other
model, or any other point, is addressed explicitly: ``sae_paths={hook_name: "module.path"}``
(``"module.path"`` or ``"module.path.output"`` for the output, ``"module.path.input"`` for the
first input). A path that the model does not have is refused before anything runs, naming the
SAE.

**Forward order.** nnsight serves module values in the order the forward pass computes them, so
each function first runs one tiny probe pass (two tokens, plain PyTorch hooks removed in
``finally``) that records the order in which the sites fire and their widths; widths are checked
against the SAEs' ``d_in`` and A must precede B, before any real pass.

**Hook route.** The substitute is written at B's site while the modules between A and B still run
(their output is overwritten), as TransformerLens' hook route does; the numbers equal its
true-skip route.

**BOS.** As on TransformerLens (:mod:`~sae_match_lens.lens.hooks`): sequences must start with the BOS
token (checked on the token ids), ``bos="keep"`` keeps position 0's true state at B,
``bos="substitute"`` substitutes it too. Inputs are token ids ``[batch, pos]`` without padding.

**No leaks.** A trace's interventions end with the trace. :func:`substitute_nnsight` and
:func:`edit_states` store theirs on an edited *copy* of the model (``Envoy.edit()``), which they
yield; the model passed in is never edited, and the copy's edits are cleared on exit, also after
an exception. Generation (``.generate``) is not covered: an edit applies to the trace's forward
pass.

Example:
    >>> from nnsight import TransformersModel
    >>> lm = TransformersModel(hf_model, tokenizer=tokenizer)
    >>> table = evaluate_substitution_nnsight(lm, saes, tokens, batch_size=8)
    >>> with substitute_nnsight(lm, sae_3, sae_4, match(sae_3, sae_4)) as substituted:
    ...     with substituted.trace(tokens):
    ...         logits = substituted.output.logits.save()
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..adapters import describe_sae, hook_name_of
from ..metrics import check_reconstruction, unverified_saes
from .hooks import BlockSubstitute, Map, Method, Substitution, SubstitutionName, block_substitute
from .routes import BOS_POLICIES, BosPolicy, resolve_bos_token_id, skip_boundaries

__all__ = [
    "MODEL_FAMILIES",
    "MODULE_PATHS",
    "ModuleSite",
    "NNsightRoute",
    "StateEdit",
    "edit_states",
    "module_site",
    "substitute_nnsight",
]

logger = logging.getLogger(__name__)

Port = Literal["output", "input"]

MODULE_PATHS: dict[str, dict[str, str]] = {
    "gpt2": {
        "hook_resid_pre": "transformer.h.{layer}.input",
        "hook_resid_post": "transformer.h.{layer}.output",
        "hook_attn_out": "transformer.h.{layer}.attn.output",
        "hook_mlp_out": "transformer.h.{layer}.mlp.output",
    },
    "llama": {
        "hook_resid_pre": "model.layers.{layer}.input",
        "hook_resid_post": "model.layers.{layer}.output",
        "hook_attn_out": "model.layers.{layer}.self_attn.output",
        "hook_mlp_out": "model.layers.{layer}.mlp.output",
    },
}
"""Per model family, the site of each TransformerLens hook ``blocks.{layer}.<hook>``."""

MODEL_FAMILIES: dict[str, str] = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama",
                                  "qwen2": "llama"}
"""Hugging Face ``config.model_type`` → the :data:`MODULE_PATHS` family (pre-norm blocks
``x + attn(norm(x))``, ``x + mlp(norm(x))`` without post-norms, so the hooks mean the same)."""

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out)$")
_INSTALL = 'this needs nnsight: pip install "sae-match-lens[nnsight]"'


def _require_nnsight() -> Any:
    try:
        import nnsight
    except ImportError as exc:
        raise ImportError(f"{_INSTALL} ({exc}).") from exc
    return nnsight


def _check_model(lm: Any) -> None:
    nnsight = _require_nnsight()
    if not isinstance(lm, nnsight.Envoy):
        raise TypeError(
            f"expected an nnsight model (nnsight.TransformersModel or LanguageModel wrapping a "
            f"Hugging Face causal LM), got {type(lm).__name__}; for a TransformerLens model use "
            "evaluate_substitution / substitute."
        )


@dataclass(frozen=True)
class ModuleSite:
    """Where a state lives in an nnsight model: a module path and which of its values.

    Example:
        >>> ModuleSite.parse("transformer.h.3.attn")
        ModuleSite(path='transformer.h.3.attn', port='output')
    """

    path: str
    """Dotted module path from the model's root, e.g. ``"model.layers.3.mlp"``."""
    port: Port = "output"
    """``"output"``: the module's output (its first element if it returns a tuple);
    ``"input"``: its first input (first positional argument, else first keyword argument)."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path or self.path.startswith("."):
            raise ValueError(f"a module path must be a dotted name like 'transformer.h.3', got "
                             f"{self.path!r}.")
        if self.port not in ("output", "input"):
            raise ValueError(f"port must be 'output' or 'input', got {self.port!r}.")

    @classmethod
    def parse(cls, spec: str | ModuleSite) -> ModuleSite:
        """``"a.b"`` / ``"a.b.output"`` → the output of ``a.b``; ``"a.b.input"`` → its input."""
        if isinstance(spec, ModuleSite):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"a site is a module path string or a ModuleSite, got "
                            f"{type(spec).__name__}.")
        head, _, tail = spec.rpartition(".")
        if head and tail in ("output", "input"):
            return cls(head, tail)  # type: ignore[arg-type]
        return cls(spec)

    def __str__(self) -> str:
        return f"{self.path}.{self.port}"


def module_site(lm: Any, sae: Any, sae_paths: Mapping[str, str | ModuleSite] | None = None
                ) -> ModuleSite:
    """Where ``sae`` reads on the nnsight model ``lm``.

    Args:
        lm: the nnsight model.
        sae: a SAELens SAE; its ``cfg.metadata.hook_name`` is looked up.
        sae_paths: explicit sites by hook name (they win over :data:`MODULE_PATHS`).

    Returns:
        The checked :class:`ModuleSite`.

    Raises:
        ValueError: the hook has no site on this model family (pass ``sae_paths``), or the
            module path does not exist in the model (naming the SAE and close module names).

    Example:
        >>> module_site(lm, sae)                      # GPT-2, blocks.3.hook_resid_post
        ModuleSite(path='transformer.h.3', port='output')
    """
    _check_model(lm)
    hook = hook_name_of(sae)
    if sae_paths is not None and hook in sae_paths:
        site = ModuleSite.parse(sae_paths[hook])
    else:
        site = _family_site(lm, sae, hook)
    _resolve(lm, site, sae)
    return site


def _family_site(lm: Any, sae: Any, hook: str) -> ModuleSite:
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    family = MODEL_FAMILIES.get(str(model_type))
    m = _BLOCK_HOOK.match(hook)
    if family is None or m is None:
        why = (f"model_type {model_type!r} has no built-in map (known: {sorted(MODEL_FAMILIES)})"
               if family is None else
               f"only {sorted(MODULE_PATHS[family])} hooks of 'blocks.L' are mapped")
        raise ValueError(
            f"{describe_sae(sae)}: no module path for hook '{hook}' on this "
            f"{type(lm).__name__}: {why}. Pass sae_paths={{'{hook}': 'module.path'}} (append "
            "'.input' to read a module's first input)."
        )
    return ModuleSite.parse(MODULE_PATHS[family][m.group(2)].format(layer=int(m.group(1))))


def _resolve(lm: Any, site: ModuleSite, sae: Any | None = None) -> Any:
    """The envoy of ``site``'s module, or a ValueError naming the SAE and close module names."""
    nnsight = _require_nnsight()
    try:
        envoy = lm.get(site.path)
    except AttributeError:
        envoy = None
    if not isinstance(envoy, nnsight.Envoy):
        names = [name for name, _ in _torch_module(lm).named_modules() if name]
        close = difflib.get_close_matches(site.path, names, n=3)
        owner = f"{describe_sae(sae)}: " if sae is not None else ""
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"{owner}module path '{site.path}' is not a module of this {type(lm).__name__} "
            f"(it has {len(names)} modules, e.g. {names[:3]}).{hint}"
        )
    return envoy


def _torch_module(lm: Any) -> torch.nn.Module:
    module = getattr(lm, "_module", None)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{type(lm).__name__} does not wrap a torch module (no _module).")
    return module


def _first_tensor(value: Any, where: ModuleSite | str) -> torch.Tensor:
    if isinstance(value, tuple | list) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"'{where}' gives a {type(value).__name__}, not a tensor (or a tuple starting with "
            "one); address a module whose output or first input is the state."
        )
    return value


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


@dataclass(frozen=True)
class _Probe:
    """What one tiny forward pass tells about the sites: forward rank and state width."""

    rank: dict[ModuleSite, int]
    width: dict[ModuleSite, int]


def _probe(lm: Any, sites: Iterable[ModuleSite]) -> _Probe:
    """Run two tokens through the model with plain PyTorch hooks (removed in ``finally``) and
    record when each site first fires and the width of its state."""
    sites = list(dict.fromkeys(sites))
    if callable(getattr(lm, "dispatch", None)):
        lm.dispatch()  # a lazily loaded model gets its real weights (idempotent)
    seen: dict[ModuleSite, torch.Tensor] = {}

    def record(site: ModuleSite, value: Any) -> None:
        if site not in seen:
            seen[site] = _first_tensor(value, site)

    handles = []
    try:
        for site in sites:
            module = _resolve(lm, site)._module
            if site.port == "output":
                handles.append(module.register_forward_hook(
                    lambda _m, _args, out, site=site: record(site, out)))
            else:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, kwargs, site=site: record(
                        site, args[0] if args else next(iter(kwargs.values()), None)),
                    with_kwargs=True))
        ids = torch.zeros((1, 2), dtype=torch.long, device=lm.device)
        with torch.no_grad():
            _torch_module(lm)(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    missing = [str(s) for s in sites if s not in seen]
    if missing:
        raise ValueError(f"sites {missing} did not run in a forward pass of this "
                         f"{type(lm).__name__}; address modules of the forward pass.")
    for site, x in seen.items():
        if x.ndim != 3 or x.shape[:2] != (1, 2):
            raise ValueError(f"site '{site}' holds a tensor of shape {tuple(x.shape)} for a "
                             "[1, 2] token batch; expected [batch, pos, d].")
    order = list(seen)
    return _Probe({s: order.index(s) for s in sites}, {s: int(seen[s].shape[-1]) for s in sites})


Write = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class _Step:
    """One site visited in forward order: read its state (under ``key``) and/or overwrite it."""

    site: ModuleSite
    key: str | None = None
    writes: list[Write] = field(default_factory=list)


def _run_steps(root: Any, steps: Sequence[_Step], store: dict[str, Any], *,
               check_ids: Callable[[Any], None] | None = None, logits: bool = False) -> None:
    """The body of a trace or edit: visit ``steps`` (in forward order) on the envoy ``root``.

    Values go into ``store`` (the body runs in this process on real tensors, so a dict from the
    caller's frame carries them out); ``logits=True`` also stores the model's logits.
    """
    if check_ids is not None:
        check_ids(root.input)
    for step in steps:
        envoy = root.get(step.site.path)
        raw = envoy.output if step.site.port == "output" else envoy.input
        h = _first_tensor(raw, step.site)
        if step.key is not None:
            store[step.key] = h
        if not step.writes:
            continue
        new = h
        for write in step.writes:
            new = write(new, store)
            if not isinstance(new, torch.Tensor) or new.shape != h.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"the value written at '{step.site}' has shape {got}; the state "
                                 f"there has {tuple(h.shape)}.")
        if step.site.port == "output":
            envoy.output = _replace_first(raw, new)
        else:
            envoy.input = new
    if logits:
        out = root.output
        store["logits"] = out.logits if hasattr(out, "logits") else _first_tensor(out, "the model")


def _trace(lm: Any, batch: torch.Tensor, steps: Sequence[_Step]) -> dict[str, Any]:
    store: dict[str, Any] = {}
    with torch.no_grad(), lm.trace(batch):
        _run_steps(lm, steps, store, logits=True)
    return store


class NNsightRoute:
    """The :class:`~sae_match_lens.evaluation.ModelRoute` of an nnsight model.

    States are read in one traced clean pass; the substituted pass overwrites B's site with the
    substitute (the modules between A and B still run). Built by
    :func:`~sae_match_lens.evaluation.evaluate_substitution_nnsight`; pass one as ``route=`` to
    :func:`~sae_match_lens.evaluation.evaluate_substitution` to share it between calls.

    Args:
        lm: the nnsight model.
        saes: every SAE the evaluation will use (their sites are resolved and probed here).
        sae_paths: explicit sites by hook name (see :func:`module_site`).

    Example:
        >>> route = NNsightRoute(lm, saes)
        >>> evaluate_substitution(lm, saes, tokens, route=route)
    """

    def __init__(self, lm: Any, saes: Iterable[Any],
                 sae_paths: Mapping[str, str | ModuleSite] | None = None) -> None:
        _check_model(lm)
        self.lm = lm
        self.sites: dict[str, ModuleSite] = {}
        """Hook name → site."""
        for sae in saes:
            self.sites.setdefault(hook_name_of(sae), module_site(lm, sae, sae_paths))
        self.probe = _probe(lm, self.sites.values())
        self.device = lm.device

    def check(self, sub: BlockSubstitute) -> None:
        """Both hooks have sites of the SAEs' width, and A's site does not come after B's
        (unless both name the same block boundary, as on TransformerLens)."""
        for sae, hook in ((sub.sae_a, sub.hook_a), (sub.sae_b, sub.hook_b)):
            site = self.sites.get(hook)
            if site is None:
                raise ValueError(f"{describe_sae(sae)}: hook '{hook}' has no site on this route "
                                 f"(known: {sorted(self.sites)}); build the route with this SAE.")
            width = self.probe.width[site]
            if int(sae.cfg.d_in) != width:
                raise ValueError(
                    f"{describe_sae(sae)}: d_in={sae.cfg.d_in} but the state at '{site}' (for "
                    f"hook '{hook}') has width {width}; this SAE was not trained on this point."
                )
        if self._reads_after_write(sub.hook_a, sub.hook_b) and (
                skip_boundaries(sub.hook_a, sub.hook_b) is None):
            raise ValueError(
                f"SAE A's site '{self.sites[sub.hook_a]}' ('{sub.hook_a}') runs after SAE B's "
                f"site '{self.sites[sub.hook_b]}' ('{sub.hook_b}'); the substitute reads at A "
                "and writes at B, so A must precede B (swap them, and invert the permutation)."
            )

    def _reads_after_write(self, hook_a: str, hook_b: str) -> bool:
        rank = self.probe.rank
        return rank[self.sites[hook_a]] > rank[self.sites[hook_b]]

    def _ordered(self, sites: Iterable[ModuleSite]) -> list[ModuleSite]:
        return sorted(set(sites), key=self.probe.rank.__getitem__)

    def clean(self, batch: torch.Tensor, names: Sequence[str]
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One traced clean pass: the states at the hook ``names`` and the logits."""
        sites = self._ordered(self.sites[n] for n in names)
        store = _trace(self.lm, batch, [_Step(s, key=str(s)) for s in sites])
        return {n: store[str(self.sites[n])] for n in names}, store["logits"]

    def substituted(self, batch: torch.Tensor, hook_a: str, hook_b: str,
                    h_hat: torch.Tensor) -> torch.Tensor:
        """The logits with ``h_hat`` written at B's site."""
        site = self.sites[hook_b]
        step = _Step(site, writes=[lambda h, _store: h_hat.to(h.device, h.dtype)])
        return _trace(self.lm, batch, [step])["logits"]


def _bos_checker(bos_id: int, where: str) -> Callable[[Any], None]:
    def check_ids(ids: Any) -> None:
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype not in (
                torch.int64, torch.int32):
            raise ValueError(f"{where}: the model's input must be token ids [batch, pos], got "
                             f"{type(ids).__name__} {tuple(getattr(ids, 'shape', ()))}.")
        bad = ids[:, 0] != bos_id
        if bool(bad.any()):
            raise ValueError(
                f"{where} expects every sequence to start with the BOS token (id {bos_id}), but "
                f"{int(bad.sum())} of {ids.shape[0]} do not; prepend it (and do not pad), or "
                "pass bos_token_id= if the model's BOS is another token."
            )
    return check_ids


@contextmanager
def _edited(lm: Any, steps: list[_Step], check_ids: Callable[[Any], None] | None) -> Iterator[Any]:
    store: dict[str, Any] = {}
    with lm.edit() as (_tracer, edited):
        _run_steps(edited, steps, store, check_ids=check_ids)
    try:
        yield edited
    finally:
        edited.clear_edits()


@contextmanager
def substitute_nnsight(
    lm: Any,
    sae_a: Any,
    sae_b: Any,
    permutation: Map | None = None,
    *,
    substitution: Substitution | SubstitutionName | Method = "folded",
    cost_F: torch.Tensor | None = None,
    bos: BosPolicy = "keep",
    bos_token_id: int | None = None,
    sae_paths: Mapping[str, str | ModuleSite] | None = None,
    check_model: bool = True,
) -> Iterator[Any]:
    """Context manager: a copy of ``lm`` whose every trace uses the substitute A → B.

    The nnsight counterpart of :func:`~sae_match_lens.lens.hooks.substitute`: the state at A's site
    is read, the substitute (:func:`~sae_match_lens.lens.hooks.block_substitute`) is written at B's
    site. ``lm`` itself is never edited; the yielded copy's edit is cleared on exit.

    Args:
        lm: the nnsight model.
        sae_a: see :func:`~sae_match_lens.lens.hooks.block_substitute`.
        sae_b: see :func:`~sae_match_lens.lens.hooks.block_substitute`.
        permutation: see :func:`~sae_match_lens.lens.hooks.block_substitute`.
        substitution: see :func:`~sae_match_lens.lens.hooks.block_substitute`.
        cost_F: see :func:`~sae_match_lens.lens.hooks.block_substitute`.
        bos: see :func:`~sae_match_lens.lens.hooks.substitution_hooks`; every trace's token ids are
            checked to start with BOS.
        bos_token_id: see :func:`~sae_match_lens.lens.hooks.substitution_hooks`.
        sae_paths: explicit sites by hook name (see :func:`module_site`).
        check_model: as in :func:`~sae_match_lens.lens.hooks.substitution_hooks`: SAEs whose
            recorded model is not ``lm``'s (``config.name_or_path``) are refused here; where a
            name is unknown, the first trace measures their explained variance at their sites.

    Yields:
        The edited copy: trace it (``with substituted.trace(tokens): ...``).

    Example:
        >>> with substitute_nnsight(lm, sae_3, sae_5, result, substitution="error_preserving") as sub:
        ...     with sub.trace(tokens):
        ...         logits = sub.output.logits.save()
    """
    if bos not in BOS_POLICIES:
        raise ValueError(f"bos must be one of {list(BOS_POLICIES)}, got {bos!r}.")
    sub = block_substitute(sae_a, sae_b, permutation, substitution=substitution, cost_F=cost_F)
    route = NNsightRoute(lm, [sae_a, sae_b], sae_paths)
    route.check(sub)
    bos_id = resolve_bos_token_id(lm, bos_token_id)
    site_a, site_b = route.sites[sub.hook_a], route.sites[sub.hook_b]
    where = f"the substitute '{sub.hook_a}' -> '{sub.hook_b}'"
    pending = unverified_saes(lm, [sae_a, sae_b], what=where) if check_model else []

    def finish(h_A: torch.Tensor, h_B: torch.Tensor) -> torch.Tensor:
        if pending and h_A.ndim == 3 and h_A.shape[1] >= 2:
            check_reconstruction(pending, {sub.hook_a: h_A, sub.hook_b: h_B}, what=where)
            pending.clear()
        h_hat = sub(h_A, h_B)
        if bos == "keep":
            h_hat = h_hat.clone()
            h_hat[:, :1] = h_B[:, :1]
        return h_hat

    if site_a == site_b or route._reads_after_write(sub.hook_a, sub.hook_b):
        # One site, or the same block boundary read after B: the state at B is the state at A.
        steps = [_Step(site_b, writes=[lambda h, _s: finish(h, h)])]
    else:
        steps = [_Step(site_a, key="h_A"),
                 _Step(site_b, writes=[lambda h, s: finish(s["h_A"], h)])]
    with _edited(lm, steps, _bos_checker(bos_id, where)) as edited:
        yield edited


@dataclass(frozen=True)
class StateEdit:
    """``h[:, positions] <- fn(h[:, positions])`` at one site: the generic edit a steering
    intervention plugs into (see :func:`edit_states`).

    Example:
        >>> StateEdit("transformer.h.3", lambda h: h + 4.0 * direction, positions=slice(1, None))
    """

    site: ModuleSite | str
    """Where: a :class:`ModuleSite` or a path string (``ModuleSite.parse``)."""
    fn: Callable[[torch.Tensor], torch.Tensor]
    """Maps the selected states ``[batch, n_positions, d]`` to new ones of the same shape."""
    positions: int | slice | Sequence[int] | torch.Tensor | None = None
    """Which positions (index along dimension 1); ``None``: all."""

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """The edited copy of the state ``h [batch, pos, d]``."""
        index = slice(None) if self.positions is None else self.positions
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        if isinstance(index, Sequence):
            index = torch.as_tensor(list(index), dtype=torch.long, device=h.device)
        out = h.clone()
        selected = h[:, index]
        new = self.fn(selected)
        if not isinstance(new, torch.Tensor) or new.shape != selected.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"the edit at '{self.site}' returned {got}; expected the shape of the "
                             f"selected states {tuple(selected.shape)}.")
        out[:, index] = new.to(out.dtype)
        return out


@contextmanager
def edit_states(lm: Any, edits: Sequence[StateEdit]) -> Iterator[Any]:
    """Context manager: a copy of ``lm`` whose every trace applies ``edits`` in forward order.

    Several edits at one site apply in the given order. ``lm`` itself is never edited; the
    copy's edits are cleared on exit.

    Args:
        lm: the nnsight model.
        edits: the :class:`StateEdit` s to apply.

    Yields:
        The edited copy.

    Example:
        >>> with edit_states(lm, [StateEdit("transformer.h.3", lambda h: h + v)]) as steered:
        ...     with steered.trace(tokens):
        ...         logits = steered.output.logits.save()
    """
    _check_model(lm)
    if not edits or not all(isinstance(e, StateEdit) for e in edits):
        raise ValueError("edits must be a non-empty sequence of StateEdit.")
    steps: dict[ModuleSite, _Step] = {}
    for edit in edits:
        site = ModuleSite.parse(edit.site)
        _resolve(lm, site)
        steps.setdefault(site, _Step(site)).writes.append(lambda h, _s, e=edit: e.apply(h))
    rank = _probe(lm, steps).rank
    with _edited(lm, sorted(steps.values(), key=lambda s: rank[s.site]), None) as edited:
        yield edited
