"""The whole method on one model and one SAE stack, with a report (``sae-match demo``).

Steps: fold and match every adjacent pair (folded and unfolded), match every pair up to distance
3 directly and compare with the composition, pick a data-free unmatched threshold per pair,
evaluate every substitution variant and baseline on held-out tokens, trace a few features with
their top-activating tokens, then the flow and steering sections, and write ``report.md``,
``results.json`` and PNG plots.

**Sizes** (:class:`DemoSize`): :data:`DEFAULT` covers every section in about a minute and a half
on 2 CPU cores (16 held-out sequences, the causal check at two layers, two coefficients per
steering sweep, 4 generations per setting); :data:`FULL` (``--full``) is the earlier, larger run
(64 sequences, every layer, four coefficients, 16 generations per setting; about ten minutes);
:data:`QUICK` (``--quick``) is the tests' smallest run. The report says what was sampled and how
wide the error bars are.

**Progress**: one display for the whole run (the stage, its progress and the time left); the
library calls inside run with their own bars off.

**Output folder**: the run is written into a fresh temporary folder beside ``out`` and swapped
in at the end (:func:`~sae_match_lens.savedir.write_directory`), so a run that fails leaves an
earlier report exactly as it was. ``out`` must be new, empty, or hold an earlier demo report
(its ``results.json`` records the format); anything else is refused before any work starts.

The SAEs come from the embedded default suite (offline), or from a SAELens release through
``SAE.from_pretrained`` / ``HookedTransformer.from_pretrained`` (:func:`load_release`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..adapters import fold_scales, hook_name_of, validate_sae
from ..chain import ChainMatch, chain_saes, compare_composed_direct, match_chain
from ..matching import null_max_cost
from ..metrics import fires
from ..releases import (
    HubUnavailableError,
    ModelLoader,
    SAELoader,
    default_model_loader,
    hub_reachable,
    load_release_saes,
    loading_from_hub,
    parse_layers,
)
from ..savedir import write_directory
from .flow_section import FLOW_DEFAULT, FLOW_FULL, FLOW_QUICK, FlowSettings
from .steering_section import STEERING_DEFAULT, STEERING_FULL, STEERING_QUICK, SteeringSettings
from .verdicts import reading

__all__ = ["DEFAULT", "FULL", "QUICK", "REPORT_FORMAT", "DemoSize", "HubUnavailableError",
           "RunProgress", "load_release", "parse_layers", "run_demo", "run_pipeline",
           "scale_profile"]

logger = logging.getLogger(__name__)

REPORT_FORMAT = "sae-match demo report"
"""What a demo folder's ``results.json`` records under ``"format"``; only such a folder (or an
empty one) is replaced by a new run."""


@dataclass(frozen=True)
class DemoSize:
    """How much a demo run computes (module docstring)."""

    name: str
    """``"quick"``, ``"default"`` or ``"full"``."""
    n_seqs: int
    """Held-out sequences (128 tokens each) for substitution, links, flows and paths."""
    n_saes: int | None
    """Residual SAEs used (the first ones; None: all)."""
    max_distance: int
    """Longest distance of the composed-vs-direct comparison."""
    flow: FlowSettings
    """The flow section's sampling."""
    steering: SteeringSettings
    """The steering section's sampling."""

    def __post_init__(self) -> None:
        if self.n_seqs < 1 or self.max_distance < 1 or (self.n_saes is not None
                                                        and self.n_saes < 2):
            raise ValueError(f"DemoSize needs n_seqs >= 1, max_distance >= 1 and n_saes >= 2 or "
                             f"None; got {self.n_seqs}, {self.max_distance}, {self.n_saes}.")


QUICK = DemoSize("quick", 16, 4, 2, FLOW_QUICK, STEERING_QUICK)
"""``--quick``: the tests' smallest run (four residual SAEs)."""
DEFAULT = DemoSize("default", 16, None, 2, FLOW_DEFAULT, STEERING_DEFAULT)
"""The default run: every section, on a sample (module docstring)."""
FULL = DemoSize("full", 64, None, 3, FLOW_FULL, STEERING_FULL)
"""``--full``: the earlier, larger run (module docstring)."""

STAGE_WEIGHTS: dict[str, float] = {
    "matching": 5.0, "composed vs direct": 4.0, "substitution": 9.0, "paths and scales": 1.0,
    "flow": 27.0, "steering": 15.0, "plots and report": 1.5,
}
"""Relative cost of each stage (seconds measured at the default size on 2 cores): the overall
progress and its time left."""


class RunProgress:
    """One progress display for a whole run: the stage, its progress, and the time left.

    The bar counts stage weights (:data:`STAGE_WEIGHTS`, about seconds at the default size), so
    its time-left estimate is the remaining weight at the rate measured so far.

    Args:
        weights: ``{stage: relative cost}`` in run order.
        enabled: show the display (``False``: nothing is printed).
    """

    def __init__(self, weights: Mapping[str, float], *, enabled: bool = True) -> None:
        self.weights = dict(weights)
        self.seconds: dict[str, float] = {}
        """``{stage: wall-clock seconds}`` of the stages run so far."""
        self.cpu_seconds: dict[str, float] = {}
        """``{stage: CPU seconds of this process}`` of the stages run so far."""
        self._base = 0.0
        self._cpu = 0.0
        self._stage: str | None = None
        self._started = 0.0
        self._bar = tqdm(total=sum(self.weights.values()), disable=not enabled, desc="demo",
                         bar_format="{desc:<52.52} {percentage:3.0f}%|{bar}| "
                                    "{elapsed} elapsed, about {remaining} left")

    def _finish(self) -> None:
        if self._stage is not None:
            self.seconds[self._stage] = time.perf_counter() - self._started
            self.cpu_seconds[self._stage] = time.process_time() - self._cpu
            self._base += self.weights[self._stage]
            self._bar.n = self._base
            self._bar.refresh()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Callable[[str, float], None]]:
        """Run one stage; yields ``step(label, done)`` to show a sub-step and the share of the
        stage done before it. Its wall and CPU times are kept in :attr:`seconds` and
        :attr:`cpu_seconds`."""
        if name not in self.weights:
            raise KeyError(f"unknown stage {name!r}; stages are {list(self.weights)}.")
        self._stage, self._started, self._cpu = name, time.perf_counter(), time.process_time()
        self._bar.set_description_str(f"demo: {name}", refresh=True)

        def step(label: str, done: float) -> None:
            self._bar.set_description_str(f"demo: {label}", refresh=False)
            self._bar.n = self._base + self.weights[name] * min(max(done, 0.0), 1.0)
            self._bar.refresh()

        yield step
        self._finish()
        self._stage = None

    def close(self) -> None:
        """Close the display."""
        self._bar.set_description_str("demo: done", refresh=False)
        self._bar.close()

def load_release(
    release: str,
    sae_id_template: str,
    model_name: str,
    layers: Sequence[int],
    *,
    sae_loader: SAELoader | None = None,
    model_loader: ModelLoader | None = None,
    progress: bool = True,
) -> tuple[Any, list[Any]]:
    """Load a model and one SAE per layer of a SAELens release.

    Releases in SAELens' registry resolve without a template:
    :func:`~sae_match_lens.releases.load_release_stack` and
    :func:`~sae_match_lens.releases.load_release_model`.

    Args:
        release: SAELens release name, e.g. ``"gemma-scope-2b-pt-res-canonical"``.
        sae_id_template: SAE id with a ``{layer}`` field, e.g.
            ``"layer_{layer}/width_16k/canonical"``.
        model_name: TransformerLens model name, e.g. ``"gemma-2-2b"``.
        layers: the layers to load, in order.
        sae_loader: ``(release, sae_id) -> SAE``; default ``SAE.from_pretrained``.
        model_loader: ``(name) -> model``; default
            ``HookedTransformer.from_pretrained_no_processing`` (SAEs are trained on
            unprocessed weights).
        progress: show a progress bar.

    Raises:
        HubUnavailableError: when the hub cannot be reached and the files are not cached.
    """
    if "{layer}" not in sae_id_template:
        raise ValueError(f"sae_id_template must contain '{{layer}}', got {sae_id_template!r}.")
    offline = sae_loader is None and model_loader is None and not hub_reachable()
    try:
        saes = load_release_saes(release, [sae_id_template.format(layer=layer) for layer in layers],
                                 sae_loader=sae_loader, progress=progress, offline=offline)
        with loading_from_hub(model_name, offline):
            model = (model_loader or default_model_loader)(model_name)
    except HubUnavailableError as exc:
        raise HubUnavailableError(
            f"Cannot load {release} / {model_name}: the Hugging Face hub is unreachable from this "
            "machine and the files are not in the local cache; run once with network access to "
            "cache them, or use the built-in suite (sae-match demo without --release)."
        ) from exc.__cause__
    return model, saes


def _load_registry_release(release: str, layers: Sequence[int], choices: dict[str, Any],
                           model_name: str | None, *, sae_loader: SAELoader | None,
                           model_loader: ModelLoader | None, progress: bool
                           ) -> tuple[Any, list[Any], str]:
    """A registry release's SAEs at ``layers`` (ids resolved first, so a bad choice fails before
    anything loads) and its model (the registry's, unless ``model_name`` is given)."""
    from ..releases import load_release_model, load_release_stack, lookup_release, resolve_release

    resolve_release(release, layers=layers, **choices)
    stack = load_release_stack(release, layers=layers, sae_loader=sae_loader, progress=progress,
                               **choices)
    if model_name is None:
        model_name = lookup_release(release).model
        model = load_release_model(release, model_loader=model_loader)
    else:
        with loading_from_hub(model_name, model_loader is None and not hub_reachable()):
            model = (model_loader or default_model_loader)(model_name)
    return model, [stack[layer] for layer in sorted(stack)], str(model_name)


def _eval_tokens(model: Any, family_tokens: torch.Tensor | None, n_seqs: int) -> torch.Tensor:
    if family_tokens is not None:
        return family_tokens[:n_seqs]
    from ..assets import load_eval_tokens, load_suite_model

    shard = load_eval_tokens()[:n_seqs]
    texts = load_suite_model().tokenizer.batch_decode(shard[:, 1:], skip_special_tokens=True)
    return model.to_tokens(texts, prepend_bos=True)[:, :128]


def run_demo(
    out: str | Path,
    *,
    family: str = "jumprelu",
    quick: bool = False,
    full: bool = False,
    size: DemoSize | None = None,
    progress: bool = True,
    release: str | None = None,
    sae_id_template: str | None = None,
    model_name: str | None = None,
    layers: Sequence[int] | None = None,
    sae_loader: SAELoader | None = None,
    model_loader: ModelLoader | None = None,
    choices: Mapping[str, Any] | None = None,
) -> str:
    """Run the pipeline on the default suite (or a release) and write the report to ``out``.

    Returns a short summary. ``size`` (default :data:`DEFAULT`; ``quick``: :data:`QUICK`,
    ``full``: :data:`FULL`) says how much is computed. With ``release`` set, ``layers`` is
    required. A release in SAELens' registry resolves its SAE ids and its model by itself
    (``choices``: the ``width``, ``l0``, ``hook``, ``variant`` of
    :func:`~sae_match_lens.releases.resolve_release` where the release offers several);
    otherwise ``sae_id_template`` and ``model_name`` say what to load (see :func:`load_release`).

    Raises:
        FileExistsError: ``out`` exists and is neither empty nor an earlier demo report (checked
            before anything is loaded or computed).
        ValueError: ``quick`` and ``full`` together, or bad release options.
    """
    if quick and full:
        raise ValueError("choose one of quick and full (or pass size=).")
    size = size or (QUICK if quick else FULL if full else DEFAULT)
    _check_out(out)
    if release is None:
        from ..assets import load_default_suite, load_eval_tokens

        model, saes = load_default_suite(family)  # type: ignore[arg-type]
        tokens: torch.Tensor | None = load_eval_tokens()
        steering_tokens = tokens  # all held-out sequences: the steering section labels sources
        source = f"default suite ({family})"
        if size.n_saes is not None:
            saes = saes[:size.n_saes]
        stack = None
        if family == "jumprelu":  # the suite's MLP/attention SAEs are JumpReLU
            from ..assets import SuiteFilesMissingError, load_suite_stack

            try:
                stack = {layer: s for layer, s in load_suite_stack(family).items()
                         if layer < len(saes)}
            except SuiteFilesMissingError as err:  # a suite built without module SAEs
                logger.warning("The flow section uses the residual SAEs only: %s", err)
    else:
        if not layers:
            raise ValueError("--release needs --layers.")
        if sae_id_template is None:
            model, saes, model_name = _load_registry_release(
                release, layers, dict(choices or {}), model_name, sae_loader=sae_loader,
                model_loader=model_loader, progress=progress)
        else:
            if not model_name:
                raise ValueError("--sae-id-template needs --model (the TransformerLens model name).")
            model, saes = load_release(release, sae_id_template, model_name, layers,
                                       sae_loader=sae_loader, model_loader=model_loader,
                                       progress=progress)
        tokens, source = None, f"{release} on {model_name}"
        family = saes[0].cfg.architecture()
        stack = None
        steering_tokens = None  # the steering section's themes are the default suite's corpus
        logger.info("The steering section needs the default suite's labelled corpus; left out.")
    tokens = _eval_tokens(model, tokens, size.n_seqs)
    return run_pipeline(model, saes, tokens, out, source=source, family=family,
                        max_distance=size.max_distance, progress=progress, stack=stack,
                        steering_tokens=steering_tokens, size=size)


def _check_out(out: str | Path) -> None:
    """Refuse an ``out`` that a demo run may not replace, before any work (module docstring)."""
    from ..savedir import is_replaceable

    path = Path(out)
    if is_replaceable(path, "results.json", REPORT_FORMAT):
        return
    raise FileExistsError(
        f"{path} holds something other than a demo report of this version, so the demo will not "
        "replace it; choose a new or empty folder with --out (or remove that one).")


def run_pipeline(
    model: Any,
    saes: Sequence[Any] | Mapping[int, Any],
    tokens: torch.Tensor,
    out: str | Path,
    *,
    source: str = "",
    family: str = "",
    max_distance: int = 3,
    n_paths: int = 4,
    progress: bool = True,
    stack: Mapping[int, Any] | None = None,
    flow: bool = True,
    steering_tokens: torch.Tensor | None = None,
    quick: bool = False,
    size: DemoSize | None = None,
) -> str:
    """Fold, match, compose, evaluate and report (see the module docstring).

    ``saes`` is a list (each SAE's model layer from its hook name ``blocks.L.…``) or a mapping
    ``{model layer: SAE}``; every table and plot names model layers. ``stack`` (``{model layer:
    LayerSAEs}``) adds MLP/attention SAEs to the flow section; without it the section uses the
    residual SAEs. ``flow=False`` leaves the flow section out. ``steering_tokens`` (held-out
    tokens of the default suite's corpus, whose sources the steering section labels) adds the
    steering section (:func:`~sae_match_lens.report.steering_section.steering_section`); without them it
    is left out. ``size`` sets the sections' sampling (default :data:`DEFAULT`, or
    :data:`QUICK` with ``quick``). The report is written into a temporary folder and swapped in
    at the end (module docstring); ``progress`` shows one display for the whole run.

    Raises:
        FileExistsError: ``out`` holds something other than a demo report (before any work).
    """
    size = size or (QUICK if quick else DEFAULT)
    _check_out(out)
    out = Path(out)
    summary: list[str] = []

    def write(tmp: Path) -> None:
        summary.append(_pipeline(model, saes, tokens, tmp, out, source=source, family=family,
                                 max_distance=max_distance, n_paths=n_paths, progress=progress,
                                 stack=stack, flow=flow, steering_tokens=steering_tokens,
                                 size=size))

    write_directory(out, write, manifest="results.json", kind=REPORT_FORMAT)
    logger.info("%s", summary[0])
    return summary[0]


def _pipeline(model: Any, saes: Sequence[Any] | Mapping[int, Any], tokens: torch.Tensor,
              tmp: Path, out: Path, *, source: str, family: str, max_distance: int, n_paths: int,
              progress: bool, stack: Mapping[int, Any] | None, flow: bool,
              steering_tokens: torch.Tensor | None, size: DemoSize) -> str:
    """The run itself, writing into ``tmp`` (which becomes ``out``)."""
    from ..evaluation import evaluate_substitution
    from . import document as report

    t0 = time.perf_counter()
    weights = {k: v for k, v in STAGE_WEIGHTS.items()
               if (k != "flow" or flow) and (k != "steering" or steering_tokens is not None)}
    run = RunProgress(weights, enabled=progress)
    try:
        layers, saes = chain_saes(saes, what="run_pipeline")
        by_layer = dict(zip(layers, saes, strict=True))
        with run.stage("matching") as step:
            chain = match_chain(by_layer, progress=False)
            step("matching: unfolded", 0.5)
            raw_chain = match_chain(by_layer, fold=False, progress=False)
        with run.stage("composed vs direct") as step:
            checks = compare_composed_direct(chain, by_layer, max_distance=max_distance,
                                             progress=False)
            step("composed vs direct: unfolded", 0.5)
            raw_checks = compare_composed_direct(raw_chain, by_layer, max_distance=max_distance,
                                                 progress=False)  # fold=False: in raw_chain
            thresholds = [null_max_cost(saes[i], saes[i + 1]) for i in range(len(saes) - 1)]
        pairs = list(itertools.pairwise(layers))
        with run.stage("substitution"):
            table = evaluate_substitution(model, by_layer, tokens, pairs=pairs,
                                          permutations=dict(zip(pairs, chain.steps, strict=True)),
                                          progress=False)
        with run.stage("paths and scales"):
            paths = _traced_paths(model, saes, chain, tokens, n_paths)
            results = _results(model, saes, tokens, chain, raw_chain, checks, raw_checks,
                               thresholds, table, paths, source, family)
            results["format"] = REPORT_FORMAT
            results["size"] = _size_record(size, tokens)
            results["scales"] = scale_profile(model, by_layer, tokens)
            results["null_rate"] = _null_rate()
            results["reading"] = reading(results)
        if flow:
            with run.stage("flow") as step:
                results["flow"] = _flow(model, saes, tokens, chain, stack, tmp, size.flow, step,
                                        table)
        if steering_tokens is not None:
            from .steering_section import steering_section

            with run.stage("steering") as step:
                results["steering"] = steering_section(
                    model, stack or by_layer, steering_tokens, model.tokenizer, tmp,
                    settings=size.steering, on_step=step, chain=chain)
        with run.stage("plots and report"):
            results["seconds"] = time.perf_counter() - t0
            results["stage_seconds"] = dict(run.seconds)
            results["stage_cpu_seconds"] = dict(run.cpu_seconds)
            report.write_results(results, tmp / "results.json")
            report.plot_substitution(table, tmp / "substitution.png")
            report.plot_agreement(results["composition"], tmp / "agreement_vs_distance.png",
                                  chance=1 / results["setting"]["d_sae"])
            labels = [f"{a}→{b}" for a, b in pairs]
            report.plot_costs({labels[i]: chain.steps[i].cost_F.tolist()
                               for i in range(len(chain.steps))},
                              {labels[i]: t for i, t in enumerate(thresholds)},
                              tmp / "match_costs.png", null_rate=results["null_rate"])
            report.plot_paths(paths, tmp / "feature_paths.png",
                              thresholds={b: t for (_, b), t in zip(pairs, thresholds,
                                                                     strict=True)},
                              hooks=results["setting"]["hooks"])
            report.write_report(results, table, tmp)
    finally:
        run.close()
    return (f"{results['reading'][0]} Report written to {out / 'report.md'} "
            f"({time.perf_counter() - t0:.0f} s).")


def _size_record(size: DemoSize, tokens: torch.Tensor) -> dict[str, Any]:
    """What a run sampled, for the report."""
    return {"name": size.name, "n_seqs": int(tokens.shape[0]),
            "n_tokens": int(tokens[:, 1:].numel()), "max_distance": size.max_distance,
            "flow": dict(size.flow.__dict__), "steering": dict(size.steering.__dict__)}


def _flow(model: Any, saes: Sequence[Any], tokens: torch.Tensor, chain: ChainMatch,
          stack: Mapping[int, Any] | None, out: Path, settings: FlowSettings,
          step: Callable[[str, float], None], substitution: pd.DataFrame) -> dict[str, Any]:
    """The flow section (:func:`~sae_match_lens.report.flow_section.flow_section`), keyed by model layer."""
    from ..flow.graph import LayerSAEs
    from .flow_section import flow_section

    layers = chain.layers
    if stack is None:
        stack = {layer: LayerSAEs(res=sae) for layer, sae in zip(layers, saes, strict=True)}
    permutations = {(layers[i], layers[i + 1]): step_ for i, step_ in enumerate(chain.steps)}
    return flow_section(model, stack, tokens, out, permutations=permutations, settings=settings,
                        on_step=step, substitution=substitution)


def _null_rate() -> float | None:
    """The false-match rate ``null_max_cost`` is calibrated to by default (its ``null_rate`` or,
    in older versions, ``quantile`` argument); None when neither is there."""
    parameters = inspect.signature(null_max_cost).parameters
    for name in ("null_rate", "quantile"):
        default = parameters[name].default if name in parameters else None
        if isinstance(default, float):
            return default
    return None


def scale_profile(model: Any, saes: Sequence[Any] | Mapping[int, Any], tokens: torch.Tensor,
                  batch_size: int = 8) -> list[dict[str, Any]]:
    """The paper's Figure 1 premise, per SAE: the scale the fold divides by against the norm of
    the residual stream it reads.

    ``saes``: a list (model layers from the hook names ``blocks.L.…``) or a mapping ``{model
    layer: SAE}``. One row per SAE with ``layer`` (its model layer), ``hook_name``, ``fold_rule``
    (``"threshold"``: JumpReLU, s = θ; ``"decoder_norm"``: s = 1/‖W_dec[i]‖; ``"none"``: s = 1),
    ``mean_threshold`` (None without a threshold), ``mean_decoder_norm``, ``mean_fold_scale``,
    ``fold_scale_cv`` (std / mean of the per-feature scales within the layer),
    ``mean_resid_norm``: the mean L2 norm of the state at the SAE's hook over ``tokens``, and
    ``mean_firing_activation``: the mean magnitude of the raw activation ``encode(x)`` of features
    where they fire (``!= 0``, :func:`~sae_match_lens.metrics.fires`) on those tokens; BOS
    position excluded from both.
    """
    layers, saes = chain_saes(saes, what="scale_profile")
    hooks = [hook_name_of(s) for s in saes]
    wanted = set(hooks)
    totals = torch.zeros(len(saes), dtype=torch.float64)
    act_sums = torch.zeros(len(saes), dtype=torch.float64)
    act_counts = torch.zeros(len(saes), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            _, cache = model.run_with_cache(batch, names_filter=lambda name: name in wanted)
            for k, (sae, hook) in enumerate(zip(saes, hooks, strict=True)):
                x = cache[hook][:, 1:]
                totals[k] += x.to(torch.float64).norm(dim=-1).sum().cpu()
                acts = sae.encode(x.to(sae.dtype)).to(torch.float64)
                act_sums[k] += acts.abs().sum().cpu()
                act_counts[k] += fires(acts).sum().cpu()
            count += batch[:, 1:].numel()
    rows = []
    for k, (sae, hook) in enumerate(zip(saes, hooks, strict=True)):
        scales = fold_scales(sae).to(torch.float64).cpu()
        if validate_sae(sae).scale_rule == "threshold":
            rule = "threshold"
        else:
            rule = "none" if bool((scales == 1).all()) else "decoder_norm"
        decoder = sae.W_dec.detach().to(torch.float64).norm(dim=-1)
        rows.append({
            "layer": layers[k], "hook_name": hook, "fold_rule": rule,
            "mean_threshold": float(scales.mean()) if rule == "threshold" else None,
            "mean_decoder_norm": float(decoder.mean()),
            "mean_fold_scale": float(scales.mean()),
            "fold_scale_cv": float(scales.std() / scales.mean()),
            "mean_resid_norm": float(totals[k] / count) if count else math.nan,
            "mean_firing_activation": float(act_sums[k] / act_counts[k]) if act_counts[k] else math.nan,
        })
    return rows


def _traced_paths(model: Any, saes: Sequence[Any], chain: ChainMatch, tokens: torch.Tensor,
                  n_paths: int) -> list[dict[str, Any]]:
    """The ``n_paths`` complete paths from the chain's first layer with the lowest total cost
    among features that fire on the tokens, each step (at its model layer) with its
    top-activating tokens."""
    hooks = [hook_name_of(s) for s in saes]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
        acts = [sae.encode(cache[hook_name_of(sae)].to(sae.dtype))[:, 1:] for sae in saes]
    table = chain.paths()
    complete = (table >= 0).all(dim=1)
    ever = fires(acts[0]).flatten(0, 1).any(dim=0)
    totals = torch.stack([chain.steps[layer].cost_F[table[:, layer].clamp_min(0)]
                          for layer in range(len(chain.steps))], dim=1).sum(dim=1)
    totals[~(complete & ever)] = float("inf")
    chosen = [int(f) for f in torch.argsort(totals)[:n_paths] if math.isfinite(float(totals[f]))]
    tokenizer = getattr(model, "tokenizer", None)
    paths = []
    for feature in chosen:
        trace = chain.trace(feature)
        steps = []
        for step in trace.steps:
            a = acts[chain.position(step.layer)][..., step.feature].flatten()
            top = torch.topk(a.abs(), k=min(5, a.numel())).indices
            top = top[fires(a[top])]
            ids = tokens[:, 1:].flatten()[top].tolist()
            words = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids]
            steps.append({"layer": step.layer, "hook_name": step.hook_name, "feature": step.feature,
                          "cost": step.cost, "margin": step.margin, "top_tokens": words,
                          "firing_rate": float(fires(a).float().mean()),
                          "neuronpedia_url": step.neuronpedia_url})
        paths.append({"steps": steps, "total_cost": trace.total_cost})
    return paths


def _results(model: Any, saes: Sequence[Any], tokens: torch.Tensor, chain: ChainMatch,
             raw_chain: ChainMatch, checks: list, raw_checks: list, thresholds: list[float],
             table: pd.DataFrame, paths: list[dict[str, Any]], source: str, family: str) -> dict[str, Any]:
    cfg = model.cfg
    adjacent = []
    for k, (folded, raw) in enumerate(zip(chain.steps, raw_chain.steps, strict=True)):
        layer_a, layer_b = chain.layers[k], chain.layers[k + 1]
        rows = table[(table.layer_a == layer_a) & (table.layer_b == layer_b)].set_index("variant")
        lam = thresholds[k]
        adjacent.append({
            "layer_a": layer_a, "layer_b": layer_b,
            "agreement_folded_unfolded": folded.permutation.agreement(raw.permutation),
            "mean_cost": float(folded.cost_F.nanmean()),
            "null_max_cost": lam,
            "fraction_below_null_threshold": float((folded.cost_F < lam).float().mean()),
            "coactivation_folded": _get(rows, "folded", "coactivation"),
            "coactivation_unfolded": _get(rows, "unfolded_matching", "coactivation"),
            "certified": folded.certified,
        })
    raw_by_pair = {(c.src, c.dst): c.agreement for c in raw_checks}
    composition = [{"src": c.src, "dst": c.dst, "distance": c.distance, "agreement": c.agreement,
                    "agreement_unfolded": raw_by_pair[(c.src, c.dst)]} for c in checks]
    by_distance = (pd.DataFrame(composition).groupby("distance")[["agreement", "agreement_unfolded"]]
                   .mean().reset_index())
    summary = (table.groupby("variant", sort=False)[["explained_variance", "delta_ce", "kl", "coactivation"]]
               .mean().reset_index())
    results: dict[str, Any] = {
        "setting": {
            "source": source, "family": family, "model": getattr(cfg, "model_name", type(model).__name__),
            "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_saes": len(saes),
            "d_sae": int(saes[0].cfg.d_sae), "hooks": [hook_name_of(s) for s in saes],
            "layers": list(chain.layers),
            "n_tokens": int(tokens[:, 1:].numel()),
        },
        "adjacent": adjacent,
        "folding_summary": [{k: adjacent_row[k] for k in ("layer_a", "layer_b", "agreement_folded_unfolded",
                                                          "coactivation_folded", "coactivation_unfolded",
                                                          "fraction_below_null_threshold")}
                            for adjacent_row in adjacent],
        "substitution": table.to_dict(orient="records"),
        "substitution_summary": summary.to_dict(orient="records"),
        "composition": composition,
        "composition_by_distance": by_distance.to_dict(orient="records"),
        "paths": paths,
    }
    return results


def _get(rows: pd.DataFrame, variant: str, column: str) -> float:
    return float(rows.loc[variant, column]) if variant in rows.index else math.nan
