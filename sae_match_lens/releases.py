"""SAELens releases by name: which SAE id reads which model layer, and loading them as a stack.

SAELens ships a registry of its pretrained releases (``pretrained_saes.yaml``, read with
``sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory``). For each release
it lists the SAE ids, the Hugging Face repository, the model, the loader ("conversion function"),
and per SAE id the Neuronpedia id and sometimes the average L0 — but not the hook each SAE
reads. :func:`release_saes` derives the layer, hook, width, L0 and variant of every SAE id from
the naming scheme of its family (the same rules SAELens' loaders use to build the config):

* Gemma Scope (``gemma_2``): ``layer_{L}/width_{W}/average_l0_{N}`` or ``.../canonical``; the
  release name says the site: ``res`` → ``blocks.L.hook_resid_post``, ``mlp`` →
  ``blocks.L.hook_mlp_out``, ``att`` → ``blocks.L.attn.hook_z`` (the concatenated head outputs
  before ``W_O``, not the attention output); ``embedding/...`` SAEs read ``hook_embed``, no layer,
  and are left out. Gemma Scope transcoders (``gemma_2_transcoder``) read
  ``blocks.L.ln2.hook_normalized``.
* Gemma Scope 2 (``gemma_3``): ``[transcoder/]layer_{L}_width_{W}_l0_{big|medium|small}[_{variant}]``;
  the folder (``resid_post``, ``mlp_out``, ``attn_out`` → ``attn.hook_z``, ``transcoder`` →
  ``hook_mlp_in``) says the site; the L0 is the label, the variant ``affine``/``seed_1``/``plain``.
* Llama Scope (``llama_scope``): ``l{L}{r|m|a}_{8x|32x}`` → ``hook_resid_post`` /
  ``hook_mlp_out`` / ``hook_attn_out``; the R1-distill release ``l{L}r_{dataset}`` (variant).
* Qwen Scope ``layer{L}``, Goodfire ``layer_{L}`` → ``hook_resid_post``; the Qwen 3 transcoders
  (``mwhanna_transcoder``) ``layer_{L}`` → ``blocks.L.mlp.hook_in``; dictionary-learning
  ``resid_post_layer_{L}_trainer_{T}`` → ``hook_resid_post`` (variant ``trainer_T``).
* Every other release names its SAEs by their hook (``blocks.{L}.hook_resid_pre``, with an
  optional width suffix ``_768`` or a ``__trainer_3`` variant suffix), as SAELens' own format does.
* Not placed: the cross-layer transcoder loaded per layer (``mntss_clt_layer_transcoder``), whose
  hooks are only in its repository's ``config.yaml``.

:func:`resolve_release` picks one SAE per requested layer: a choice (hook, width, variant, L0)
with a single value that every requested layer has is made for the user; any other choice must
be passed, and the error lists the values. :func:`load_release_stack` loads the SAEs keyed by
model layer, checks that each reads the hook the resolution promised, and records ``release``,
``sae_id`` and ``neuronpedia_id`` in its metadata when the loader did not;
:func:`load_module_stack` builds the ``{layer: LayerSAEs}`` stack of Feature Flow from residual,
MLP and attention releases. With the Hugging Face hub unreachable and the files not cached, a
:class:`HubUnavailableError` says so in one sentence.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from .adapters import hook_name_of
from .flow.graph import LayerSAEs

__all__ = [
    "HubUnavailableError",
    "ReleaseSAE",
    "load_module_stack",
    "load_release_model",
    "load_release_saes",
    "load_release_stack",
    "parse_layers",
    "release_saes",
    "resolve_release",
]

logger = logging.getLogger(__name__)

SAELoader = Callable[[str, str], Any]
ModelLoader = Callable[[str], Any]

SITES: tuple[str, ...] = (
    "hook_resid_pre", "hook_resid_post", "hook_resid_mid", "hook_mlp_out", "hook_attn_out",
    "attn.hook_z", "hook_mlp_in", "mlp.hook_in", "ln2.hook_normalized",
)
"""The hook points (without the ``blocks.L.`` prefix) the registry's SAEs read."""

MODULE_OF_SITE: dict[str, str] = {
    "hook_resid_pre": "res", "hook_resid_post": "res", "hook_resid_mid": "res",
    "hook_mlp_out": "mlp", "hook_attn_out": "attn", "attn.hook_z": "attn_z",
    "hook_mlp_in": "transcoder", "mlp.hook_in": "transcoder", "ln2.hook_normalized": "transcoder",
}
"""``module`` of a :class:`ReleaseSAE` by site: ``res``/``mlp``/``attn`` read the residual stream,
the MLP output and the attention output (all in the residual basis); ``attn_z`` reads the
concatenated attention-head outputs before ``W_O``; ``transcoder`` reads an MLP's input."""

FLOW_SITES: dict[str, str] = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
"""The site each module of a Feature Flow stack (:class:`~sae_match_lens.flow.graph.LayerSAEs`) reads."""

CHOICES: tuple[str, ...] = ("hook", "width", "variant", "l0")
"""The choices that can tell SAEs of one release and layer apart, in the order they are made."""


class HubUnavailableError(RuntimeError):
    """A release could not be loaded because the Hugging Face hub is unreachable."""


class ReleaseSAE(NamedTuple):
    """One SAE of a SAELens release, placed at a model layer."""

    release: str
    """The SAELens release name."""
    sae_id: str
    """The SAE id within the release (``SAE.from_pretrained(release, sae_id)``)."""
    layer: int
    """The model layer (the ``L`` of ``blocks.L.…`` in the hook name)."""
    hook_name: str
    """The TransformerLens hook the SAE reads, e.g. ``blocks.12.hook_resid_post``."""
    module: str
    """``res``, ``mlp``, ``attn``, ``attn_z`` or ``transcoder`` (:data:`MODULE_OF_SITE`)."""
    width: str | None
    """The width label of the id (``"16k"``, ``"1m"``, ``"8x"``, ``"768"``); None when the id
    has none (the release has one width)."""
    l0: float | str | None
    """The average L0: from the id (``average_l0_82`` → 82.0) or the registry, or Gemma Scope 2's
    label (``"big"``, ``"medium"``, ``"small"``); None when unknown (canonical SAEs)."""
    variant: str | None
    """What else tells SAEs at one layer apart (``"trainer_3"``, ``"affine"``, ``"seed_1"``, a
    dataset name); None when nothing does."""
    neuronpedia_id: str | None
    """The registry's Neuronpedia id (``"gemma-2-2b/12-gemmascope-res-16k"``), or None."""

    @property
    def site(self) -> str:
        """The hook name without its ``blocks.L.`` prefix (what ``hook=`` chooses)."""
        return self.hook_name.split(".", 2)[2]


class _Parsed(NamedTuple):
    layer: int
    site: str
    width: str | None
    l0: float | str | None
    variant: str | None


_HOOK_ID = re.compile(
    r"^blocks\.(?P<layer>\d+)\.(?P<site>" + "|".join(re.escape(s) for s in (*SITES, "hook_z"))
    + r")(?:_(?P<width>\d+))?(?:__(?P<variant>.+))?$"
)
_GEMMA_2 = re.compile(r"^layer_(?P<layer>\d+)/width_(?P<width>\d+[km])/"
                      r"(?:average_l0_(?P<l0>\d+)|canonical)$")
_GEMMA_3 = re.compile(r"^(?:transcoder/)?layer_(?P<layer>\d+)_width_(?P<width>\d+[km])_"
                      r"l0_(?P<l0>big|medium|small)(?:_(?P<variant>.+))?$")
_GEMMA_3_SITES = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out",
                  "attn_out": "attn.hook_z", "transcoder": "hook_mlp_in"}
_LLAMA_SCOPE = re.compile(r"^l(?P<layer>\d+)(?P<kind>[rma])_(?P<width>\d+x)$")
_LLAMA_SCOPE_SITES = {"r": "hook_resid_post", "m": "hook_mlp_out", "a": "hook_attn_out"}
_LLAMA_SCOPE_R1 = re.compile(r"^l(?P<layer>\d+)r_(?P<variant>.+)$")
_QWEN_SCOPE = re.compile(r"^layer(?P<layer>\d+)$")
_LAYER = re.compile(r"^layer_(?P<layer>\d+)$")
_DICTIONARY_LEARNING = re.compile(r"^resid_post_layer_(?P<layer>\d+)_(?P<variant>trainer_\d+)$")

UNPLACED_FAMILIES: dict[str, str] = {
    "mntss_clt_layer_transcoder": "its hooks are only in the repository's config.yaml",
}
"""Loader families whose SAE ids do not say which hook they read, with the reason."""


def _parse(conversion: str | None, release: str, sae_id: str, path: str) -> _Parsed | None:
    """Layer, site, width, L0 and variant of one registry SAE id (None: not placeable)."""
    m: re.Match[str] | None
    if conversion in ("gemma_2", "gemma_2_transcoder"):
        m = _GEMMA_2.match(sae_id)
        if not m:
            return None  # embedding SAEs (hook_embed) have no layer
        if conversion == "gemma_2_transcoder":
            site = "ln2.hook_normalized"
        else:
            tokens = release.split("-")
            site = ("hook_resid_post" if "res" in tokens else "hook_mlp_out" if "mlp" in tokens
                    else "attn.hook_z" if "att" in tokens else "")
            if not site:
                return None
        l0 = float(m["l0"]) if m["l0"] else None
        return _Parsed(int(m["layer"]), site, m["width"], l0, None)
    if conversion == "gemma_3":
        m = _GEMMA_3.match(sae_id)
        folder = path.split("/", 1)[0].removesuffix("_all")
        if not m or folder not in _GEMMA_3_SITES:
            return None
        return _Parsed(int(m["layer"]), _GEMMA_3_SITES[folder], m["width"], m["l0"],
                       m["variant"] or "plain")
    if conversion == "llama_scope":
        m = _LLAMA_SCOPE.match(sae_id)
        if not m:
            return None
        return _Parsed(int(m["layer"]), _LLAMA_SCOPE_SITES[m["kind"]], m["width"], None, None)
    if conversion == "llama_scope_r1_distill":
        m = _LLAMA_SCOPE_R1.match(sae_id)
        return _Parsed(int(m["layer"]), "hook_resid_post", None, None, m["variant"]) if m else None
    if conversion == "qwen_scope":
        m = _QWEN_SCOPE.match(sae_id)
        return _Parsed(int(m["layer"]), "hook_resid_post", None, None, None) if m else None
    if conversion in ("goodfire", "mwhanna_transcoder"):
        m = _LAYER.match(sae_id)
        site = "hook_resid_post" if conversion == "goodfire" else "mlp.hook_in"
        return _Parsed(int(m["layer"]), site, None, None, None) if m else None
    if conversion in UNPLACED_FAMILIES:
        return None
    if conversion == "dictionary_learning_1" and (m := _DICTIONARY_LEARNING.match(sae_id)):
        return _Parsed(int(m["layer"]), "hook_resid_post", None, None, m["variant"])
    m = _HOOK_ID.match(sae_id)
    if not m:
        return None
    site = "attn.hook_z" if m["site"] == "hook_z" else m["site"]  # TransformerLens' name
    return _Parsed(int(m["layer"]), site, m["width"], None, m["variant"])


def _directory() -> dict[str, Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def lookup_release(release: str) -> Any:
    """SAELens' directory entry of ``release``.

    Raises:
        KeyError: For an unknown release, with the closest names.
    """
    directory = _directory()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else (
            "; the names are listed by sae_lens.loading.pretrained_saes_directory."
            "get_pretrained_saes_directory().")
        raise KeyError(f"{release!r} is not a SAELens release{hint}")
    return directory[release]


def release_saes(release: str) -> list[ReleaseSAE]:
    """Every SAE of ``release`` that can be placed at a model layer, sorted by layer and id.

    SAEs that read no layer (Gemma Scope's embedding SAEs) and families whose ids do not name a
    hook (:data:`UNPLACED_FAMILIES`) are left out.

    Raises:
        KeyError: for a name that is not in the registry (with the closest names).

    Example:
        >>> [s.sae_id for s in release_saes("gpt2-small-res-jb")][:2]
        ['blocks.0.hook_resid_pre', 'blocks.1.hook_resid_pre']
    """
    lookup = lookup_release(release)
    out = []
    for sae_id, path in lookup.saes_map.items():
        parsed = _parse(lookup.conversion_func, release, sae_id, str(path))
        if parsed is None:
            continue
        l0 = parsed.l0
        if l0 is None:
            expected = lookup.expected_l0.get(sae_id)
            l0 = float(expected) if isinstance(expected, int | float) and expected > 0 else None
        out.append(ReleaseSAE(
            release=release, sae_id=sae_id, layer=parsed.layer,
            hook_name=f"blocks.{parsed.layer}.{parsed.site}", module=MODULE_OF_SITE[parsed.site],
            width=parsed.width, l0=l0, variant=parsed.variant,
            neuronpedia_id=lookup.neuronpedia_id.get(sae_id) or None,
        ))
    return sorted(out, key=lambda s: (s.layer, s.sae_id))


def _value(entry: ReleaseSAE, choice: str) -> Any:
    return entry.site if choice == "hook" else getattr(entry, choice)


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _span(layers: Iterable[int]) -> str:
    """``[10, 11, 12, 14]`` → ``"10-12, 14"``."""
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _sort_values(values: Iterable[Any]) -> list[Any]:
    return sorted(values, key=lambda v: (v is None, not isinstance(v, int | float), _width_key(v)))


def _width_key(value: Any) -> Any:
    if isinstance(value, int | float):
        return value
    m = re.fullmatch(r"(\d+)([kmx]?)", str(value))
    if m:
        return int(m[1]) * {"": 1, "x": 1, "k": 1_000, "m": 1_000_000}[m[2]]
    return str(value)


def _normalise_l0(l0: float | str | None) -> float | str | None:
    if l0 is None or isinstance(l0, int | float):
        return None if l0 is None else float(l0)
    try:
        return float(l0)
    except ValueError:
        return str(l0)


def _matches(entry: ReleaseSAE, choice: str, wanted: Any) -> bool:
    value = _value(entry, choice)
    if choice == "hook":
        return value == str(wanted) or value == f"hook_{wanted}" or value.endswith(f".{wanted}")
    return value is not None and str(value).lower() == str(wanted).lower()


def resolve_release(
    release: str,
    *,
    layers: Iterable[int] | None = None,
    width: str | int | None = None,
    l0: float | str | None = None,
    hook: str | None = None,
    variant: str | None = None,
) -> list[ReleaseSAE]:
    """One SAE of ``release`` per requested model layer, in layer order.

    Choices are made in the order hook, width, variant, L0. A choice the caller leaves open is
    made for them only when exactly one value is available at every requested layer; otherwise
    a ``ValueError`` lists the values. A numeric ``l0`` picks, at each layer, the SAE whose
    average L0 is nearest (the L0s of a sweep differ from layer to layer; the chosen ones are in
    the result); a label (``"big"``) must match exactly.

    Args:
        release: a SAELens release name, e.g. ``"gemma-scope-2b-pt-res-canonical"``.
        layers: the model layers; default: every layer that has an SAE with the choices made.
        width: the width label, e.g. ``"16k"`` (:attr:`ReleaseSAE.width`).
        l0: a number (nearest average L0 per layer) or a label such as ``"big"``.
        hook: the hook site, e.g. ``"hook_resid_pre"`` or ``"resid_pre"``.
        variant: e.g. ``"trainer_0"`` (:attr:`ReleaseSAE.variant`).

    Returns:
        The chosen :class:`ReleaseSAE` of each layer.

    Raises:
        KeyError: for an unknown release.
        ValueError: when a layer has no SAE, or a choice is open and has several values (the
            message lists them and names the argument to pass).

    Example:
        >>> [s.sae_id for s in resolve_release("gemma-scope-2b-pt-res-canonical",
        ...                                    layers=range(10, 12), width="16k")]
        ['layer_10/width_16k/canonical', 'layer_11/width_16k/canonical']
    """
    entries = release_saes(release)
    if not entries:
        conversion = lookup_release(release).conversion_func
        reason = UNPLACED_FAMILIES.get(conversion or "", "its SAE ids name no model layer")
        raise ValueError(f"{release} lists no SAE that can be placed at a model layer ({reason}); "
                         "load its SAEs with SAE.from_pretrained and pass them keyed by layer.")
    wanted_layers = None if layers is None else sorted(set(int(x) for x in layers))
    if wanted_layers is not None:
        entries = [e for e in entries if e.layer in wanted_layers]
    given = {"hook": hook, "width": width, "variant": variant, "l0": _normalise_l0(l0)}
    for choice in CHOICES:
        wanted = given[choice]
        if wanted is not None and not (choice == "l0" and isinstance(wanted, float)):
            kept = [e for e in entries if _matches(e, choice, wanted)]
            if not kept:
                values = _sort_values({_value(e, choice) for e in entries} - {None})
                where = f" at layers {_span(wanted_layers)}" if wanted_layers else ""
                raise ValueError(
                    f"{release} has no SAE with {choice}={wanted!r}{where}; its {choice} values "
                    f"there are {', '.join(_show(v) for v in values) or 'none'}.")
            entries = kept
            continue
        if choice == "l0" and isinstance(wanted, float):
            entries = _nearest_l0(release, entries, wanted)
            continue
        entries = _settle(release, entries, choice, wanted_layers)
    by_layer: dict[int, list[ReleaseSAE]] = {}
    for e in entries:
        by_layer.setdefault(e.layer, []).append(e)
    if wanted_layers is not None:
        missing = [layer for layer in wanted_layers if layer not in by_layer]
        if missing:
            have = _span(sorted({e.layer for e in release_saes(release)})) or "none"
            chosen = ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)
            raise ValueError(
                f"{release} has no SAE at layer{'s' if len(missing) > 1 else ''} {_span(missing)}"
                f"{' with ' + chosen if chosen else ''}; its SAEs cover layers {have}.")
    out = []
    for layer in sorted(by_layer):
        candidates = by_layer[layer]
        if len(candidates) > 1:  # cannot happen with distinct ids; kept as a guard for the registry
            raise ValueError(f"{release} has {len(candidates)} SAEs at layer {layer} that no choice "
                             f"tells apart: {', '.join(c.sae_id for c in candidates)}.")
        out.append(candidates[0])
    logger.info("%s: %s", release, ", ".join(f"{e.layer}: {e.sae_id}" for e in out))
    return out


def _listing(values: Iterable[Any], limit: int = 12) -> str:
    shown = [_show(v) for v in _sort_values(values) if v is not None]
    if len(shown) > limit:
        return ", ".join(shown[:limit]) + f", ... ({len(shown)} in all)"
    return ", ".join(shown)


def _example(value: Any) -> str:
    return _show(value) if isinstance(value, float) else repr(value)


def _settle(release: str, entries: list[ReleaseSAE], choice: str,
            wanted_layers: list[int] | None) -> list[ReleaseSAE]:
    """Make an open choice: leave it when no layer has two values, take the single value every
    layer has, or raise listing the values."""
    layers = sorted({e.layer for e in entries}) if wanted_layers is None else wanted_layers
    per_layer = {layer: {_value(e, choice) for e in entries if e.layer == layer} for layer in layers}
    if all(len(v) <= 1 for v in per_layer.values()):
        return entries
    common = set.intersection(*per_layer.values())
    if len(common) == 1:
        (value,) = common
        logger.info("%s: %s=%r is the only one at every requested layer", release, choice, value)
        return [e for e in entries if _value(e, choice) == value]
    noun = {"hook": "hooks", "width": "widths", "variant": "variants", "l0": "L0s"}[choice]
    where = f"layer {layers[0]}" if len(layers) == 1 else f"each of layers {_span(layers)}"
    values = set().union(*per_layer.values())
    if common:
        others = values - common - {None}
        extra = f" (and {_listing(others)} at only some of them)" if others else ""
        message = (f"{release} has {noun} {_listing(common)} at {where}{extra}; pass {choice}= "
                   f"(e.g. {choice}={_example(_sort_values(common)[0])}).")
    elif choice == "l0":
        several = [layer for layer in layers if len(per_layer[layer]) > 1][:3]
        shown = "; ".join(f"layer {layer}: {_listing(per_layer[layer])}" for layer in several)
        message = (f"{release} has L0s that differ by layer ({shown}); pass l0= a number, and at "
                   "each layer the SAE with the nearest average L0 is taken.")
    else:
        message = (f"{release} has no single {choice} at every one of layers {_span(layers)} "
                   f"(its {noun} there: {_listing(values)}); pass {choice}= one of them and the "
                   "layers that have it.")
    if choice == "l0" and "-canonical" not in release and f"{release}-canonical" in _directory():
        message += f" {release}-canonical has one SAE per layer and width."
    raise ValueError(message)


def _nearest_l0(release: str, entries: list[ReleaseSAE], target: float) -> list[ReleaseSAE]:
    numeric = [e for e in entries if isinstance(e.l0, float)]
    if not numeric:
        labels = _sort_values({e.l0 for e in entries} - {None})
        raise ValueError(f"{release} gives no average L0 numbers for these SAEs"
                         + (f"; its L0 labels are {', '.join(map(str, labels))}" if labels else "")
                         + "; pass l0= one of the labels, or leave it out.")
    out = []
    for layer in sorted({e.layer for e in numeric}):
        here = [e for e in numeric if e.layer == layer]
        out.append(min(here, key=lambda e: (abs(e.l0 - target), e.l0)))  # type: ignore[operator]
    return out


def parse_layers(spec: str, *, minimum: int = 2) -> list[int]:
    """``"10-14"`` → ``[10, 11, 12, 13, 14]``; ``"3,5,7"`` → ``[3, 5, 7]``.

    Raises:
        ValueError: for another form, or fewer than ``minimum`` layers.
    """
    try:
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-", 1))
            layers = list(range(lo, hi + 1))
        else:
            layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"layers must look like '10-14' or '3,5,7', got {spec!r}.") from None
    if len(layers) < minimum:
        raise ValueError(f"layers {spec!r} name fewer than {minimum} layers; this needs at least "
                         f"{minimum}.")
    return layers


# -- loading ---------------------------------------------------------------------------------

def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Within the block, load from the local Hugging Face cache only (no network retries)."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hub_constants

    previous = (os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE)
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if previous[0] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous[0]
        hub_constants.HF_HUB_OFFLINE = previous[1]


@contextlib.contextmanager
def loading_from_hub(what: str, offline: bool) -> Iterator[None]:
    """Run a load; with the hub unreachable, a missing file becomes a one-sentence error."""
    try:
        with _hub_offline(offline):
            yield
    except OSError as exc:
        if not offline:
            raise
        raise HubUnavailableError(
            f"Cannot load {what}: the Hugging Face hub is unreachable from this machine and the "
            "files are not in the local cache; run once with network access to cache them."
        ) from exc


def _default_sae_loader(release: str, sae_id: str) -> Any:
    from sae_lens import SAE

    return SAE.from_pretrained(release, sae_id)


def default_model_loader(name: str, **from_pretrained_kwargs: Any) -> Any:
    """TransformerLens' ``HookedTransformer.from_pretrained_no_processing(name, ...)``."""
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained_no_processing(name, **from_pretrained_kwargs)


def _offline(custom_loader: Any, offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return custom_loader is None and not hub_reachable()


def load_release_saes(
    release: str,
    sae_ids: Sequence[str],
    *,
    sae_loader: SAELoader | None = None,
    progress: bool = True,
    offline: bool | None = None,
) -> list[Any]:
    """Load SAEs of a release by id, in order, recording where they came from.

    Each SAE's metadata gets ``release``, ``sae_id`` and (from the registry) ``neuronpedia_id``
    where the loader left them unset.

    Args:
        release: the SAELens release name.
        sae_ids: the SAE ids to load.
        sae_loader: ``(release, sae_id) -> SAE``; default ``SAE.from_pretrained``.
        progress: show a progress bar.
        offline: load from the local cache only; default: when the default loader is used and
            the hub cannot be reached.

    Raises:
        HubUnavailableError: offline and the files are not cached.
    """
    offline = _offline(sae_loader, offline)
    loader = sae_loader or _default_sae_loader
    lookup = _directory().get(release)
    saes = []
    with loading_from_hub(release, offline):
        for sae_id in tqdm(sae_ids, desc="loading SAEs", disable=not progress):
            saes.append(loader(release, sae_id))
    for sae_id, sae in zip(sae_ids, saes, strict=True):
        md = sae.cfg.metadata
        if not md.get("release"):
            md.release = release
            md.sae_id = sae_id
        if not md.get("neuronpedia_id") and lookup is not None and lookup.neuronpedia_id.get(sae_id):
            md.neuronpedia_id = lookup.neuronpedia_id[sae_id]
    return saes


def load_release_stack(
    release: str,
    *,
    layers: Iterable[int] | None = None,
    width: str | int | None = None,
    l0: float | str | None = None,
    hook: str | None = None,
    variant: str | None = None,
    sae_loader: SAELoader | None = None,
    progress: bool = True,
) -> dict[int, Any]:
    """The SAEs of ``release`` at ``layers``, keyed by model layer (:func:`resolve_release`).

    Accepted wherever the package takes a stack: ``match_chain(stack)``, ``flow_graph(stack, ...)``,
    ``evaluate_substitution(model, stack, ...)``.

    Args:
        release: as in :func:`resolve_release`.
        layers: as in :func:`resolve_release`.
        width: as in :func:`resolve_release`.
        l0: as in :func:`resolve_release`.
        hook: as in :func:`resolve_release`.
        variant: as in :func:`resolve_release`.
        sae_loader: ``(release, sae_id) -> SAE``; default ``SAE.from_pretrained``.
        progress: show a progress bar.

    Returns:
        ``{layer: SAE}`` in layer order.

    Raises:
        HubUnavailableError: the hub is unreachable and the files are not cached.
        ValueError: a resolution error (:func:`resolve_release`), or a loaded SAE that reads
            another hook than the one its id promises.

    Example:
        >>> stack = load_release_stack("gemma-scope-2b-pt-res-canonical", layers=range(10, 15),
        ...                            width="16k")
        >>> chain = match_chain(stack)
    """
    entries = resolve_release(release, layers=layers, width=width, l0=l0, hook=hook,
                              variant=variant)
    return _load_entries(entries, sae_loader=sae_loader, progress=progress)


def _load_entries(entries: Sequence[ReleaseSAE], *, sae_loader: SAELoader | None,
                  progress: bool, offline: bool | None = None) -> dict[int, Any]:
    """Load resolved SAEs (one release per layer) and check each reads the promised hook."""
    by_release: dict[str, list[ReleaseSAE]] = {}
    for e in entries:
        by_release.setdefault(e.release, []).append(e)
    offline = _offline(sae_loader, offline)
    loaded: dict[tuple[str, str], Any] = {}
    for release, group in by_release.items():
        saes = load_release_saes(release, [e.sae_id for e in group], sae_loader=sae_loader,
                                 progress=progress, offline=offline)
        for e, sae in zip(group, saes, strict=True):
            if hook_name_of(sae) != e.hook_name:
                raise ValueError(
                    f"{release} SAE {e.sae_id!r} reads {hook_name_of(sae)!r}, but its id places it "
                    f"at {e.hook_name!r}; load the SAEs with SAE.from_pretrained and pass them "
                    "keyed by model layer.")
            loaded[(release, e.sae_id)] = sae
    return {e.layer: loaded[(e.release, e.sae_id)] for e in entries}


def load_module_stack(
    release: str,
    *,
    mlp_release: str | None = None,
    attn_release: str | None = None,
    layers: Iterable[int] | None = None,
    width: str | int | None = None,
    l0: float | str | None = None,
    sae_loader: SAELoader | None = None,
    progress: bool = True,
) -> dict[int, LayerSAEs]:
    """A Feature Flow stack ``{layer: LayerSAEs(res, mlp, attn)}`` from up to three releases.

    The residual release must read ``hook_resid_post``, the MLP release ``hook_mlp_out`` and the
    attention release ``hook_attn_out`` (in the residual basis) at every requested layer. Gemma
    Scope's attention SAEs read ``attn.hook_z`` (the head outputs before ``W_O``) and are refused:
    their decoder rows live in another space than the residual features'. Every SAE id is
    resolved before anything is loaded.

    Args:
        release: the residual-stream release, e.g. ``"gemma-scope-2b-pt-res-canonical"``.
        mlp_release: the MLP-output release, e.g. ``"gemma-scope-2b-pt-mlp-canonical"``.
        attn_release: the attention-output release, e.g. ``"llama_scope_lxa_8x"``.
        layers: the model layers; default: every layer of the residual release.
        width: as in :func:`resolve_release`, for all three releases.
        l0: as in :func:`resolve_release`, for all three releases.
        sae_loader: ``(release, sae_id) -> SAE``; default ``SAE.from_pretrained``.
        progress: show progress bars.

    Raises:
        HubUnavailableError: the hub is unreachable and the files are not cached.
        ValueError: a release whose SAEs read another site, or that misses a layer.

    Example:
        >>> stack = load_module_stack("gemma-scope-2b-pt-res-canonical",
        ...                           mlp_release="gemma-scope-2b-pt-mlp-canonical",
        ...                           layers=range(10, 15), width="16k")
        >>> graph = flow_graph(stack, (12, 345))
    """
    plan: dict[str, list[ReleaseSAE]] = {}
    for module, name in (("res", release), ("mlp", mlp_release), ("attn", attn_release)):
        if name is None:
            continue
        site = FLOW_SITES[module]
        sites = {e.site for e in release_saes(name)}
        if site not in sites:
            found = ", ".join(sorted(sites)) or "no placeable hooks"
            why = (" (the concatenated head outputs before W_O, not the attention output in the "
                   "residual basis that Feature Flow compares)" if "attn.hook_z" in sites else "")
            raise ValueError(f"{name} cannot be the {module} release of a flow stack: its SAEs read "
                             f"{found}{why}; a {module} release must read blocks.L.{site}.")
        plan[module] = resolve_release(name, layers=layers, width=width, l0=l0, hook=site)
        if layers is None:
            layers = [e.layer for e in plan["res"]]
    offline = _offline(sae_loader, None)
    stack: dict[int, dict[str, Any]] = {}
    for module, group in plan.items():
        per_layer = _load_entries(group, sae_loader=sae_loader, progress=progress, offline=offline)
        for layer, sae in per_layer.items():
            stack.setdefault(layer, {})[module] = sae
    return {layer: LayerSAEs(**mods) for layer, mods in sorted(stack.items())}


def load_release_model(release: str, *, model_loader: ModelLoader | None = None) -> Any:
    """The model a release was trained on, as a TransformerLens model.

    The default loader is ``HookedTransformer.from_pretrained_no_processing`` (SAEs are trained on
    unprocessed weights) with the release's ``model_from_pretrained_kwargs`` from the registry
    (e.g. ``center_writing_weights=True`` for ``gpt2-small-res-jb``).

    Args:
        release: the SAELens release name.
        model_loader: ``(name) -> model``; default as above.

    Raises:
        HubUnavailableError: the hub is unreachable and the weights are not cached.
    """
    lookup = lookup_release(release)
    name = lookup.model
    if model_loader is not None:
        return model_loader(name)
    kwargs = dict((lookup.config_overrides or {}).get("model_from_pretrained_kwargs") or {})
    with loading_from_hub(name, _offline(None, None)):
        return default_model_loader(name, **kwargs)
