"""Score steered generations without a language-model judge, and sweep steering settings.

Without a judge: :func:`theme_presence` re-reads the generated text with the clean model and SAEs
(mean folded activation of the theme's features, and their mean firing rate on the generated
tokens), :func:`coherence` is the clean model's CE on the generated tokens, and
:func:`proxy_scores` forms the paper's products (Feature Flow, arXiv 2502.03032): behaviour ×
coherence and (1 − behaviour) × coherence, both in [0, 1], with

* behaviour ``= min(1, theme_rate / rate_ref)``: the theme features' firing rate on the text as
  a fraction of ``rate_ref``, their rate on reference text that is on the theme (e.g. corpus
  passages of the theme, measured with :func:`theme_presence`); 0 = no theme feature fires,
  1 = as thematic as the reference or more. Without a reference ``rate_ref = 1`` (behaviour is
  the raw rate);
* coherence ``= exp(−max(0, CE − CE_ref))``: 1 while the clean model finds the text as likely
  as its own unsteered samples (``CE_ref``, their mean CE), falling by a factor ``e`` per nat
  of extra CE. CE rewards repetition, so the distinct-token fraction is reported beside it.

:func:`steering_sweep` runs layers × coefficients × schedules of
:func:`~sae_match_lens.lens.steering.flow_interventions` into a resumable row log, optionally
rated by a :class:`~sae_match_lens.judging.judge.Judge`; :func:`plot_sweep` draws it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pandas as pd
import torch

from ..adapters import folded_activation_factor, hook_name_of
from ..flow.graph import as_stack
from ..lens.steering import (
    Generation,
    Intervention,
    NodeSource,
    SamplingOptions,
    Schedule,
    Units,
    flow_interventions,
    flow_nodes,
    generate_steered,
)
from ..metrics import model_device, record_states
from ..options import (
    accepts_flat_options,
    flat_names,
    renamed_keywords,
    resolve_options,
)
from ..progress import progress_bar
from .judge import Judge
from .rowlog import RowLog, model_fingerprint, sae_fingerprint

__all__ = ["SWEEP_COLUMNS", "SweepOptions", "coherence", "plot_sweep", "proxy_scores", "steering_sweep",
           "theme_presence"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _by_length(sequences: Sequence[torch.Tensor], batch_size: int
               ) -> Iterator[tuple[list[int], torch.Tensor]]:
    groups: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        groups.setdefault(int(seq.numel()), []).append(i)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            yield chunk, torch.stack([sequences[i] for i in chunk])


Texts = Generation | Sequence[str] | torch.Tensor
"""What the proxy scores read: a :class:`Generation` (its continuations are scored), plain texts
(tokenized with BOS; every token after BOS is scored), or token ids ``[n_seq, pos]`` with BOS in
column 0 (e.g. corpus passages; every token after BOS is scored)."""


def _read(model: Any, texts: Texts) -> tuple[list[torch.Tensor], list[int]]:
    """Token sequences and the first scored position of each (continuation start, or 1)."""
    if isinstance(texts, Generation):
        return list(texts.sequences), list(texts.prompt_lengths)
    if isinstance(texts, torch.Tensor):
        if texts.ndim != 2 or texts.shape[1] < 2:
            raise ValueError(f"token ids must be [n_seq, pos >= 2] with BOS in column 0, got "
                             f"shape {tuple(texts.shape)}.")
        return list(texts.long().cpu()), [1] * texts.shape[0]
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a Generation or a list of strings.")
    seqs = [model.to_tokens(t)[0].cpu() for t in texts]
    return seqs, [1] * len(seqs)


@torch.no_grad()
def theme_presence(
    model: Any,
    stack: Mapping[int, Any] | Sequence[Any],
    theme: NodeSource,
    texts: Texts,
    *,
    batch_size: int = 16,
) -> pd.DataFrame:
    """How present a theme is in texts, re-read by the clean model and the theme's SAEs.

    The theme is a set of features (a flow graph, a path or a node list). Over the scored
    tokens (a :class:`Generation`'s continuation; every non-BOS token of plain texts):

    * ``presence``: mean over tokens and theme features of the folded activation (threshold
      units for JumpReLU, so features of different layers are comparable);
    * ``theme_rate``: the fraction of (token, theme feature) pairs that fire, i.e. the theme
      features' mean firing rate (in [0, 1]; unlike "any theme feature fires" it does not
      saturate when the theme has many features).

    Returns:
        One row per text: ``presence``, ``theme_rate``, ``n_tokens``.
    """
    layers = as_stack(stack)
    nodes = flow_nodes(theme, layers)
    per_sae: dict[str, tuple[Any, torch.Tensor]] = {}
    for node in nodes:
        sae = layers[node.layer].get(node.module)
        name = hook_name_of(sae)
        feats = per_sae.get(name, (sae, torch.empty(0, dtype=torch.long)))[1]
        per_sae[name] = (sae, torch.cat([feats, torch.tensor([node.feature])]))
    seqs, starts = _read(model, texts)
    rows: list[dict[str, Any]] = [{} for _ in seqs]
    for members, batch in _by_length(seqs, batch_size):
        states = record_states(model, list(per_sae), batch)
        total = torch.zeros(len(members), batch.shape[1], dtype=torch.float64)
        fired = torch.zeros(len(members), batch.shape[1], dtype=torch.float64)
        for name, (sae, feats) in per_sae.items():
            acts = sae.encode(states[name].to(sae.W_enc.device, sae.W_enc.dtype))[..., feats]
            factor = folded_activation_factor(sae)[feats.to(sae.W_dec.device)]
            total += (acts.double() * factor).sum(-1).cpu()
            fired += (acts != 0).double().sum(-1).cpu()
        for j, i in enumerate(members):
            start = max(1, starts[i])
            n = batch.shape[1] - start
            rows[i] = {"presence": float(total[j, start:].sum()) / (n * len(nodes)) if n else math.nan,
                       "theme_rate": float(fired[j, start:].sum()) / (n * len(nodes)) if n
                       else math.nan,
                       "n_tokens": n}
    return pd.DataFrame(rows, columns=["presence", "theme_rate", "n_tokens"])


@torch.no_grad()
def coherence(model: Any, texts: Texts, *, batch_size: int = 16
              ) -> pd.DataFrame:
    """The clean model's next-token CE (nats) on the scored tokens, and their distinct fraction.

    For a :class:`Generation` the scored tokens are the continuation (each predicted from
    everything before it); for plain texts every token after the first real one (the prediction
    made at BOS is excluded, as in :mod:`~sae_match_lens.metrics`).

    Returns:
        One row per text: ``ce``, ``distinct`` (distinct tokens / scored tokens), ``n_tokens``.
    """
    seqs, starts = _read(model, texts)
    rows: list[dict[str, Any]] = [{} for _ in seqs]
    device = model_device(model)
    for members, batch in _by_length(seqs, batch_size):
        logp = torch.log_softmax(model(batch.to(device) if device else batch,
                                       return_type="logits").float(), dim=-1).cpu()
        for j, i in enumerate(members):
            start = max(2, starts[i])
            target = batch[j, start:]
            n = int(target.numel())
            ce = -float(logp[j, start - 1:-1].gather(-1, target[:, None]).double().mean()) if n \
                else math.nan
            rows[i] = {"ce": ce, "distinct": len(set(target.tolist())) / n if n else math.nan,
                       "n_tokens": n}
    return pd.DataFrame(rows, columns=["ce", "distinct", "n_tokens"])


def proxy_scores(
    model: Any,
    stack: Mapping[int, Any] | Sequence[Any],
    theme: NodeSource,
    generation: Generation,
    *,
    ce_reference: float,
    rate_reference: float | None = None,
) -> pd.DataFrame:
    """Judge-free steering scores of each sample (module docstring).

    Args:
        model: as in :func:`theme_presence`.
        stack: as in :func:`theme_presence`.
        theme: as in :func:`theme_presence`.
        generation: the steered samples.
        ce_reference: the clean model's mean CE on unsteered generations from the same prompts
            and settings (``coherence(model, baseline).ce.mean()``).
        rate_reference: the theme features' firing rate on on-theme reference text
            (``theme_presence(model, stack, theme, texts).theme_rate.mean()``); behaviour is the
            text's rate as a fraction of it, capped at 1. ``None``: 1 (the raw rate).

    Returns:
        One row per sample: ``presence``, ``theme_rate``, ``behaviour``
        (``min(1, theme_rate / rate_reference)``), ``ce``, ``distinct``, ``coherence``
        (``exp(−max(0, ce − ce_reference))``), ``score_activate`` (behaviour × coherence),
        ``score_suppress`` ((1 − behaviour) × coherence).
    """
    if not math.isfinite(float(ce_reference)):
        raise ValueError(f"ce_reference must be finite, got {ce_reference}.")
    ref = _rate_reference(rate_reference)
    frame = theme_presence(model, stack, theme, generation).drop(columns="n_tokens")
    frame["behaviour"] = (frame.theme_rate / ref).clip(upper=1.0)
    frame = frame.join(coherence(model, generation).drop(columns="n_tokens"))
    frame["coherence"] = [math.exp(-max(0.0, ce - ce_reference)) for ce in frame.ce]
    frame["score_activate"] = frame.behaviour * frame.coherence
    frame["score_suppress"] = (1.0 - frame.behaviour) * frame.coherence
    return frame


def _rate_reference(value: float | None) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(float(value)) and 0.0 < float(value) <= 1.0):
        raise ValueError(f"rate_reference must be a firing rate in (0, 1], got {value!r}; "
                         "measure it with theme_presence(...).theme_rate.mean() on on-theme "
                         "text (a rate of 0 means the theme's features never fire there).")
    return float(value)


SWEEP_COLUMNS: tuple[str, ...] = (
    "mode", "layer", "schedule", "coefficient", "n_samples", "hooks", "theme_rate", "behaviour",
    "presence", "ce", "coherence", "distinct", "score_activate", "score_suppress", "score",
    "judge_behavioral", "judge_coherence", "judge_score", "example", "examples")
"""Columns of :func:`steering_sweep`'s table (judge columns are NaN without a judge)."""


def _schedule_of(value: Schedule | str) -> Schedule:
    return Schedule(value) if isinstance(value, str) else value


def _node_saes(nodes: Sequence[Any], layer_map: Mapping[int, Any]) -> list[Any]:
    """The distinct SAEs the nodes live in, by hook name."""
    saes = {hook_name_of(sae): sae for sae in (layer_map[n.layer].get(n.module) for n in nodes)}
    return [saes[name] for name in sorted(saes)]


@dataclass(frozen=True)
class SweepOptions:
    """The grid, scoring and sampling knobs of :func:`steering_sweep` (the flow, the prompts,
    the coefficients, the intervention and the judge stay in its signature). Every field except
    ``modes``/``layers`` enters the row log's header, so a rerun with other values is refused
    rather than mixed into the same log."""

    layers: Sequence[int] | None = None
    """The layers swept (default: every layer of the flow); for ``"cumulative"`` the steering
    covers the span up to that layer."""
    modes: Sequence[str] = ("single", "cumulative")
    """``"single"`` (steer one layer) and/or ``"cumulative"`` (every flow layer up to it)."""
    schedules: Sequence[Schedule | str] = ("constant",)
    """:class:`~sae_match_lens.lens.steering.Schedule`\\ s or their kinds."""
    units: Units = "folded"
    """As in :func:`~sae_match_lens.lens.steering.flow_interventions`."""
    goal: Literal["suppress", "activate"] | None = None
    """Which product is ``score``: ``"suppress"`` ((1 − behaviour) × coherence, default for
    rescale) or ``"activate"`` (behaviour × coherence, default for add)."""
    rate_reference: float | None = None
    """See :func:`proxy_scores` (the theme's firing rate on on-theme text)."""
    theme: str | None = None
    """The judge's theme."""
    n_samples: int = 4
    """Samples per prompt and setting."""
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    """How :func:`~sae_match_lens.lens.steering.generate_steered` samples."""

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingOptions):
            raise TypeError(f"SweepOptions.sampling must be a SamplingOptions, got "
                            f"{type(self.sampling).__name__}.")


def _sampling_keywords(fn: F) -> F:
    """Accept 0.2's sampler keywords (``max_new_tokens=``, ...) and ``options=SamplingOptions``
    on :func:`steering_sweep` until 0.4, with one ``DeprecationWarning``: they become
    ``options.sampling``."""
    sampler = set(flat_names(SamplingOptions))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in sampler}
        given = kwargs.get("options")
        if flat or isinstance(given, SamplingOptions):
            warnings.warn("steering_sweep(): the sampler's keywords and options=SamplingOptions "
                          "go in 0.4; pass options=SweepOptions(sampling=SamplingOptions(...)) "
                          f"instead (given: {sorted(flat) or 'options=SamplingOptions'}).",
                          DeprecationWarning, stacklevel=2)
            base = given if isinstance(given, SamplingOptions) else (
                given.sampling if isinstance(given, SweepOptions) else SamplingOptions())
            sweep = given if isinstance(given, SweepOptions) else SweepOptions()
            names = flat_names(SamplingOptions)
            sampling = dataclasses.replace(base, **{names[k]: v for k, v in flat.items()})
            kwargs["options"] = dataclasses.replace(sweep, sampling=sampling)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@renamed_keywords(kind="intervention")
@_sampling_keywords
@accepts_flat_options(SweepOptions)
def steering_sweep(
    model: Any,
    stack: Mapping[int, Any] | Sequence[Any],
    source: NodeSource,
    prompts: str | Sequence[str],
    *,
    path: str | os.PathLike[str],
    coefficients: Sequence[float],
    intervention: Literal["rescale", "add"] = "rescale",
    judge: Judge | None = None,
    progress: bool = True,
    options: SweepOptions | None = None,
) -> pd.DataFrame:
    """Steer a flow over modes × layers × schedules × coefficients and score every setting.

    The first row is the unsteered baseline (``mode="none"``), whose mean CE is the coherence
    reference. Each row is written to ``path`` (a :class:`~sae_match_lens.judging.rowlog.RowLog`) as
    soon as it is finished; a rerun with the same settings, model, SAEs (their fingerprints)
    and judge skips the rows already there, so an interrupted sweep resumes and loses nothing,
    and adding coefficients or layers extends it; a rerun with anything else that determines
    the rows is refused, naming what differs.
    Every setting samples with the same seeds, so rows differ only by the steering.

    Args:
        model: as in :func:`flow_interventions`.
        stack: as in :func:`flow_interventions`.
        source: as in :func:`flow_interventions`.
        prompts: the prompts (each sampled ``options.n_samples`` times).
        path: the row log (JSON lines).
        coefficients: ``r`` (rescale) or ``s`` (add) start values.
        intervention: as in :func:`flow_interventions` (0.2: ``kind=``).
        judge: optional :class:`~sae_match_lens.judging.judge.Judge` rating every sample; its
            behaviour/coherence (0–5, scaled to 0–1) give ``judge_score`` the same way.
        progress: show a progress bar over settings.
        options: the sweep's grid and scoring knobs and how it samples (:class:`SweepOptions`:
            ``layers``, ``modes``, ``schedules``, ``units``, ``goal``, ``rate_reference``,
            ``theme``, ``n_samples``, and ``sampling``, a
            :class:`~sae_match_lens.lens.steering.SamplingOptions`). Until 0.4 the flat keywords
            of 0.2 (``modes=``, ..., and the sampler's ``max_new_tokens=``, ``temperature=``,
            ``top_p=``, ``seed=``, ``batch_size=``) and ``options=SamplingOptions(...)`` still
            work, with a ``DeprecationWarning``.

    Returns:
        One row per setting with :data:`SWEEP_COLUMNS`.

    Example:
        >>> frame = steering_sweep(model, stack, graph, "And the LORD said", path="sweep.jsonl",
        ...                        coefficients=[0, -1, -4], intervention="rescale")
    """
    opts = resolve_options(SweepOptions, options)
    sampling, layers, modes, schedules = opts.sampling, opts.layers, opts.modes, opts.schedules
    units, goal, rate_reference, theme, n_samples = (opts.units, opts.goal, opts.rate_reference,
                                                     opts.theme, opts.n_samples)
    layer_map = as_stack(stack)
    nodes = flow_nodes(source, layer_map)
    goal = goal or ("suppress" if intervention == "rescale" else "activate")
    if goal not in ("suppress", "activate"):
        raise ValueError(f"goal must be 'suppress' or 'activate', got {goal!r}.")
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    scheds = [_schedule_of(s) for s in schedules]
    sweep_layers = sorted({n.layer for n in nodes}) if layers is None else list(layers)
    for value in coefficients:
        if not math.isfinite(float(value)):
            raise ValueError(f"coefficient {value} is not finite.")
    # "kind": the key 0.2 wrote, so that its row logs resume
    header = {"what": "steering_sweep", "kind": intervention, "units": units, "goal": goal,
              "nodes": ["/".join(map(str, n)) for n in nodes],
              "hooks": sorted({hook_name_of(layer_map[n.layer].get(n.module)) for n in nodes}),
              "prompts": prompt_list, "n_samples": n_samples,
              "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
              "top_p": sampling.top_p, "seed": sampling.seed, "batch_size": sampling.batch_size,
              "judge": None if judge is None else judge.identity(), "theme": theme,
              "rate_reference": _rate_reference(rate_reference),
              "model": model_fingerprint(model),
              "saes": {hook_name_of(s): sae_fingerprint(s) for s in _node_saes(nodes, layer_map)}}
    # the sampler settings 0.2 could not set are recorded only when they differ from the default,
    # so that a row log written by 0.2 resumes
    default = SamplingOptions()
    header.update({name: getattr(sampling, name) for name in ("top_k", "do_sample", "stop_at_eos")
                   if getattr(sampling, name) != getattr(default, name)})
    log = RowLog(path, key=("mode", "layer", "schedule", "coefficient"), header=header)
    gen_kwargs = {"n_samples": n_samples, "progress": False, "options": sampling}
    settings: list[tuple[str, int | None, Schedule | None, float | None]] = [
        ("none", None, None, None)]
    settings += [(m, lay, s, float(c)) for m, lay, s, c in
                 itertools.product(modes, sweep_layers, scheds, coefficients)]
    reference: float | None = None
    baseline = log.get({"mode": "none", "layer": None, "schedule": None, "coefficient": None})
    if baseline is not None:
        reference = baseline["ce"]
    for mode, lay, sched, coef in progress_bar(settings, desc="steering sweep", unit="setting",
                                               enabled=progress):
        key = {"mode": mode, "layer": lay, "schedule": None if sched is None else sched.label,
               "coefficient": coef}
        if log.done(key):
            continue
        if mode == "none":
            ivs: list[Intervention] = []
        else:
            assert sched is not None and coef is not None
            if mode == "single" and not any(n.layer == lay for n in nodes):
                continue  # the flow has no node at this layer
            ivs = flow_interventions(layer_map, nodes, mode=mode, layer=lay, intervention=intervention,  # type: ignore[arg-type]
                                     coefficient=coef, schedule=sched, units=units)
        gen = generate_steered(model, prompt_list, ivs, **gen_kwargs)  # type: ignore[arg-type]
        if reference is None:
            reference = float(coherence(model, gen).ce.mean())
        scores = proxy_scores(model, layer_map, nodes, gen, ce_reference=reference,
                              rate_reference=rate_reference)
        row: dict[str, Any] = {**key, "n_samples": len(gen.texts),
                               "hooks": sorted({iv.hook_name for iv in ivs})}
        for column in ("theme_rate", "behaviour", "presence", "ce", "coherence", "distinct", "score_activate",
                       "score_suppress"):
            row[column] = float(scores[column].mean())
        row["score"] = row[f"score_{goal}"]
        row.update(judge_behavioral=math.nan, judge_coherence=math.nan, judge_score=math.nan)
        if judge is not None:
            ratings = [judge.score(p, t, theme=theme) for p, t in zip(gen.prompts, gen.texts,
                                                                      strict=True)]
            beh = sum(r["behavioral"] for r in ratings) / (5 * len(ratings))
            coh = sum(r["coherence"] for r in ratings) / (5 * len(ratings))
            row.update(judge_behavioral=beh, judge_coherence=coh,
                       judge_score=(beh if goal == "activate" else 1 - beh) * coh)
        row["example"] = gen.texts[0]
        row["examples"] = list(gen.texts[::max(1, len(gen.texts) // 3)][:3])  # across prompts
        log.append(row)
    frame = log.frame(SWEEP_COLUMNS)
    logger.info("steering sweep: %d rows in %s", len(frame), log.path)
    return frame


def plot_sweep(frame: pd.DataFrame, path: str | os.PathLike[str], *, value: str = "score",
               title: str | None = None) -> Path:
    """A heat-map per (mode, schedule): layers down, coefficients across, colour = ``value``.

    The baseline row's value is written in the title, so a cell can be read against it.

    Example:
        >>> plot_sweep(frame, "sweep.png", value="theme_rate")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if value not in frame.columns:
        raise KeyError(f"the sweep has no column {value!r}; columns: {list(frame.columns)}.")
    steered = frame[frame["mode"] != "none"]
    if steered.empty:
        raise ValueError("the sweep has no steered rows to plot.")
    base = frame.loc[frame["mode"] == "none", value]
    panels = list(steered.groupby(["mode", "schedule"], sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1.5, 3.4), squeeze=False)
    lo, hi = float(steered[value].min()), float(steered[value].max())
    image = None
    for ax, ((mode, schedule), group) in zip(axes[0], panels, strict=True):
        grid = group.pivot_table(index="layer", columns="coefficient", values=value)
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
        ax.set_xticks(range(grid.shape[1]), [f"{c:g}" for c in grid.columns], fontsize=7)
        ax.set_yticks(range(grid.shape[0]), [str(int(v)) for v in grid.index], fontsize=7)
        for (r, c), v in pd.DataFrame(grid.to_numpy()).stack().items():
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xlabel("coefficient")
        ax.set_ylabel("layer (cumulative: up to)" if mode == "cumulative" else "layer")
        ax.set_title(f"{mode}, {schedule}", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=value)
    base_text = f"; unsteered {float(base.iloc[0]):.3f}" if len(base) else ""
    fig.suptitle((title or f"steering sweep: {value}") + base_text, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
