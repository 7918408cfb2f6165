"""``sae-match``: the command line (a thin wrapper; the work is done by the library).

Subcommands:

* ``sae-match demo`` — run the whole method end to end on the built-in model and SAEs (or a
  SAELens release with ``--release``) and write a report.
* ``sae-match match A B --out DIR`` — match two SAEs (saved directories, or
  ``release:sae_id`` for ``SAE.from_pretrained``) and save the whole result
  (:meth:`MatchResult.save <sae_match_lens.matching.MatchResult.save>`: permutation, costs,
  margins, confidences, certificate), which ``sae-match view`` draws; an ``--out`` ending in
  ``.safetensors`` saves the permutation alone, as earlier releases did (``--solver``,
  ``--metric``, ``--weights``, ``--max-cost``, ``--device``, ``--no-fold`` are ``match``'s
  options).
* ``sae-match chain SOURCE --layers 10-14 --out DIR`` — match every adjacent pair of SAEs at
  those model layers (same matching options); save the chain
  (:meth:`ChainMatch.save <sae_match_lens.chain.ChainMatch.save>`), an edge table and where the
  SAEs came from.
* ``sae-match links SOURCE --layers 10-12 --out FILE.csv`` — top-k links between adjacent
  layers, with Neuronpedia URLs (CSV or JSON).
* ``sae-match flow SOURCE [--mlp-release R] --layer L --feature F --out FILE.json`` — the
  Feature Flow graph of one residual feature (node-link JSON, optionally GraphML).

SOURCE is a SAELens release, a local directory whose sub-directories are saved SAEs (each with
its ``cfg.json``; the model layer and module come from each SAE's hook name: ``hook_resid_*``
residual, ``hook_mlp_out`` MLP, ``hook_attn_out`` attention), or ``--suite NAME`` for a suite of
this package (``default``, the embedded one, runs offline; ``--family`` picks its SAEs). Without
``--layers`` a local directory or a suite gives all its layers.
* ``sae-match batch PLAN.yaml --store DIR [--ray ADDRESS]`` — run a plan of pair jobs (match /
  links / compare) into a results store, locally or on a Ray cluster (:mod:`sae_match_lens.batch.runs`).

Release commands resolve SAE ids with :mod:`sae_match_lens.releases` (``--width``, ``--l0``,
``--hook``, ``--variant`` make the choices a release offers; an open choice is reported with its
values; ``--hook`` also picks among a local directory's SAEs). They are data-free: no model is
loaded. Outputs are written only after the work is done,
each file atomically, so a failed run leaves earlier results as they were.

Only the standard library is imported until a command runs, so ``--help`` answers at once;
torch, SAELens and TransformerLens are imported inside the command functions. A user error (a
missing file, an unknown release, an unwritable ``--out``, a bad option value) is reported as
one ``sae-match: error: ...`` line on stderr with exit status 1; ``-v`` shows the traceback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A user error with a message that says what is wrong; printed without a traceback."""


_USER_ERRORS: tuple[type[BaseException], ...] = (CommandError, OSError, ValueError, KeyError)
"""Exception types reported as one line: the library raises these for bad input (STYLE.md)."""


SOLVERS = ("auto", "lapjv", "scipy", "sparse")
METRICS = ("mse", "cosine")
WEIGHT_BLOCKS = ("decoder", "encoder", "b_enc")


def _max_cost(value: str) -> float | str | None:
    if value == "none":
        return None
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise CommandError(f"--max-cost must be 'none', 'auto' or a finite number, got {value!r}.")
    return number


def _weights(value: str | None) -> dict[str, float] | None:
    """``"decoder=1,encoder=0.5"`` → ``{"decoder": 1.0, "encoder": 0.5}`` (blocks left out weigh 0)."""
    if value is None:
        return None
    out: dict[str, float] = {}
    for part in value.split(","):
        name, sep, number = (x.strip() for x in part.partition("="))
        try:
            weight = float(number) if sep and name in WEIGHT_BLOCKS and name not in out else None
        except ValueError:
            weight = None
        if weight is None:
            raise CommandError(f"--weights takes NAME=NUMBER pairs, each NAME once, NAME one of "
                               f"{', '.join(WEIGHT_BLOCKS)} (e.g. decoder=1,encoder=1,b_enc=0); "
                               f"got {value!r}.")
        out[name] = weight
    return out


def _match_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``match`` given on the command line, checked."""
    for flag, value, valid in (("--solver", args.solver, SOLVERS), ("--metric", args.metric, METRICS)):
        if value not in valid:
            raise CommandError(f"{flag} must be one of {', '.join(valid)}; got {value!r}.")
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CommandError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, "
                           "cuda:1).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {args.device!r}: CUDA is not available on this machine.")
    return {"fold": not args.no_fold, "metric": args.metric, "weights": _weights(args.weights),
            "max_cost": _max_cost(args.max_cost), "solver": args.solver, "device": args.device}


def _check_writable(path: str, *, directory: bool) -> None:
    """Fail before any work if ``path`` (a file, or a directory when ``directory``) cannot be written."""
    target = Path(path)
    if directory and target.exists() and not target.is_dir():
        raise CommandError(f"--out {path!r} exists and is not a directory.")
    if not directory and target.is_dir():
        raise CommandError(f"--out {path!r} is a directory; give a file name such as perm.safetensors.")
    parent = target if directory else target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"cannot write --out {path!r}: {str(parent)!r} is a file, not a directory.")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise CommandError(f"cannot write --out {path!r}: directory {str(parent)!r} is not writable "
                           f"({exc.strerror or exc.__class__.__name__}).") from None


def _load_sae(spec: str) -> Any:
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "cfg.json")):
            raise CommandError(f"{spec!r} is not a saved SAE directory: it has no cfg.json "
                               "(SAELens writes one with sae.save_model(path)).")
        from sae_lens import SAE

        return SAE.load_from_disk(spec)
    if ":" not in spec:
        what = "not a directory" if os.path.exists(spec) else "no such directory"
        raise CommandError(f"{spec!r}: {what}; give a saved SAE directory or 'release:sae_id'.")
    release, sae_id = spec.split(":", 1)
    from sae_lens import SAE

    try:
        return SAE.from_pretrained(release, sae_id)
    except ValueError as exc:
        raise CommandError(f"cannot load {release}:{sae_id}: {exc}") from None
    except OSError as exc:
        raise CommandError(f"could not download {release}:{sae_id} ({exc.__class__.__name__}); "
                           "the Hugging Face hub is unreachable and the files are not cached.") from None


def _cmd_match(args: argparse.Namespace) -> int:
    options = _match_options(args)
    permutation_only = args.out.lower().endswith(".safetensors")
    _check_writable(args.out, directory=not permutation_only)
    sae_a, sae_b = _load_sae(args.sae_a), _load_sae(args.sae_b)
    from .matching import MatchOptions, match
    from .options import gather_options

    result = match(sae_a, sae_b, progress=not args.quiet, **gather_options(MatchOptions, options))
    if permutation_only:
        path = result.permutation.save(args.out)
        what = "the permutation (give a directory to save costs, margins and the certificate too)"
    else:
        path = result.save(args.out)
        what = "the result (MatchResult.load reads it; sae-match view draws it)"
    print(f"matched {result.permutation.n_matched}/{result.permutation.n_source} features, "
          f"total cost {result.total_cost:.6g}, certified={result.certified}, "
          f"{_gap_text(result.gap, result.total_cost)}; saved {what} in {path}")
    return 0


def _gap_text(gap: float, total: float) -> str:
    """``gap`` as what it is: a floating-point upper bound on ``total − optimum``."""
    if not math.isfinite(gap):
        return "gap unbounded (not certified)"
    share = f", {gap / abs(total):.1g} of the total" if total else ""
    return f"gap ≤ {gap:.2g} (rounding bound on total − optimum{share})"


def _cmd_demo(args: argparse.Namespace) -> int:
    release_only = [f"--{name.replace('_', '-')}" for name in
                    ("sae_id_template", "model", "layers", "width", "l0", "hook", "variant")
                    if getattr(args, name) is not None]
    if args.release is None and release_only:
        verb = "applies" if len(release_only) == 1 else "apply"
        raise CommandError(f"{', '.join(release_only)} only {verb} with --release.")
    _check_writable(args.out, directory=True)
    from .report.demo import HubUnavailableError, parse_layers, run_demo

    try:
        layers = parse_layers(args.layers) if args.layers else None
        summary = run_demo(args.out, family=args.family, quick=args.quick, full=args.full,
                           progress=not args.quiet, release=args.release,
                           sae_id_template=args.sae_id_template, model_name=args.model,
                           layers=layers, choices=_choices(args))
    except (HubUnavailableError, FileExistsError) as exc:
        raise CommandError(str(exc)) from None
    print(summary)
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    _check_writable(args.out, directory=False)
    from .report.viewer import write_html

    path = write_html(args.results, args.out, max_paths=args.max_paths, max_nodes=args.max_nodes,
                      neuronpedia=args.neuronpedia, title=args.title)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; self-contained, opens offline)")
    return 0


def _write_atomic(path: str | Path, write: Any) -> Path:
    """``write(tmp)`` a temporary beside ``path``, then move it into place."""
    from .atomicio import atomic_write

    return atomic_write(path, write)


def _write_text(path: str | Path, text: str) -> Path:
    return _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _choices(args: argparse.Namespace) -> dict[str, Any]:
    return {"width": args.width, "l0": args.l0, "hook": args.hook, "variant": args.variant}


def _release_stack(args: argparse.Namespace, layers: list[int]) -> tuple[list[Any], dict[int, Any]]:
    """Resolve and load ``args.release`` at ``layers``; a hub outage becomes a one-line error."""
    from .releases import HubUnavailableError, load_release_stack, resolve_release

    entries = resolve_release(args.release, layers=layers, **_choices(args))
    try:
        stack = load_release_stack(args.release, layers=layers, progress=not args.quiet,
                                   **_choices(args))
    except HubUnavailableError as exc:
        raise CommandError(str(exc)) from None
    return entries, stack


def _source_kind(args: argparse.Namespace) -> str:
    """``"release"``, ``"directory"`` or ``"suite"``: where the SAEs of a command come from."""
    if (args.release is None) == (args.suite is None):
        raise CommandError("give a SAELens release or a local SAE directory, or --suite NAME "
                           "(e.g. --suite default, the embedded suite), but not both.")
    if args.suite is not None:
        return "suite"
    if os.path.isdir(args.release):
        return "directory"
    if os.sep in args.release or args.release.startswith("."):
        raise CommandError(f"{args.release!r}: no such directory; give a directory of saved SAEs, "
                           "a SAELens release or --suite NAME.")
    return "release"


def _local_module_paths(directory: str, hook: str | None) -> dict[str, dict[int, str]]:
    """``{module: {layer: SAE directory}}`` of the saved SAEs directly under ``directory``,
    from each one's ``cfg.json`` hook name (``hook``: keep only hook names ending in it)."""
    from .adapters import model_layer_of

    found: dict[str, dict[int, str]] = {}
    for cfg in sorted(Path(directory).glob("*/cfg.json")):
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CommandError(f"cannot read {cfg}: {exc}") from None
        hook_name = (data.get("metadata") or {}).get("hook_name") or data.get("hook_name") or ""
        layer = model_layer_of(hook_name)
        module = next((m for m, part in (("res", "hook_resid"), ("mlp", "hook_mlp_out"),
                                         ("attn", "hook_attn_out")) if part in hook_name), None)
        if layer is None or module is None or (hook and not hook_name.endswith(hook)):
            continue
        here = found.setdefault(module, {})
        if layer in here:
            raise CommandError(f"{directory} has two {module} SAEs at layer {layer} "
                               f"({here[layer]}, {cfg.parent}); choose one with --hook.")
        here[layer] = str(cfg.parent)
    if not found:
        raise CommandError(f"{directory} holds no saved SAE (a sub-directory with a cfg.json "
                           "whose hook name reads blocks.L.hook_resid_*, hook_mlp_out or "
                           "hook_attn_out)" + (f" with a hook ending in {hook!r}" if hook else "")
                           + ".")
    return found


def _local_layers(args: argparse.Namespace, modules: Sequence[str],
                  layers: list[int] | None) -> dict[str, dict[int, Any]]:
    """``{module: {layer: SAE}}`` from ``--suite`` or a local directory, at ``layers`` (all the
    residual layers there when ``None``); modules other than ``res`` may be missing."""
    if _source_kind(args) == "suite":
        from .suites import load_suite_layers

        out: dict[str, dict[int, Any]] = {}
        for module in modules:
            try:
                out[module] = load_suite_layers(args.suite, args.family, module=module)
            except FileNotFoundError as exc:
                raise CommandError(str(exc)) from None
            except ValueError as exc:
                if module == "res":
                    raise CommandError(str(exc)) from None
                continue  # e.g. the TopK family has no module SAEs
    else:
        paths = _local_module_paths(args.release, getattr(args, "hook", None))
        out = {m: dict(paths[m]) for m in modules if m in paths}
    res = out.get("res", {})
    if not res:
        raise CommandError(f"{args.suite or args.release} has no residual SAEs.")
    chosen = sorted(res) if layers is None else layers
    missing = [x for x in chosen if x not in res]
    if missing:
        raise CommandError(f"{args.suite or args.release} has no residual SAE at layer(s) "
                           f"{missing}; it has layers {sorted(res)}.")
    loaded = {}
    for module, by_layer in out.items():
        loaded[module] = {x: (_load_sae(sae) if isinstance(sae, str) else sae)
                          for x, sae in by_layer.items() if x in chosen}
    return loaded


def _command_stack(args: argparse.Namespace, minimum: int = 2) -> tuple[dict[int, Any], str, str]:
    """``({layer: SAE}, file name, JSON text)``: the residual SAEs a chain or links command
    reads, and a record of where they came from."""
    from .releases import parse_layers

    kind = _source_kind(args)
    if kind == "release" and args.layers is None:
        raise CommandError("--layers is required with a release (e.g. --layers 10-14).")
    layers = parse_layers(args.layers, minimum=minimum) if args.layers is not None else None
    if kind == "release":
        assert layers is not None
        entries, stack = _release_stack(args, layers)
        record = {"release": args.release, "layers": layers, "choices": _choices(args),
                  "saes": [e._asdict() for e in entries]}
        return stack, "release.json", json.dumps(record, indent=1, default=str)
    stack = _local_layers(args, ["res"], layers)["res"]
    if len(stack) < minimum:
        raise CommandError(f"{args.suite or args.release} gives {len(stack)} layer(s); at least "
                           f"{minimum} are needed.")
    record = ({"suite": args.suite, "family": args.family} if kind == "suite"
              else {"directory": os.path.abspath(args.release), "hook": args.hook})
    record["layers"] = sorted(stack)
    return stack, "source.json", json.dumps(record, indent=1, default=str)


def _cmd_chain(args: argparse.Namespace) -> int:
    options = _match_options(args)
    _check_writable(args.out, directory=True)
    stack, record_name, record = _command_stack(args)
    from .chain import match_chain

    chain = match_chain(stack, progress=not args.quiet, **options)
    path = chain.save(args.out, extra_files={
        "edges.csv": chain.edges().to_csv(index=False),
        record_name: record,
    })
    for (a, b), r in zip(itertools.pairwise(chain.layers), chain.steps, strict=True):
        print(f"layer {a}→{b}: matched {r.permutation.n_matched}/{r.permutation.n_source} "
              f"features, total cost {r.total_cost:.6g}, certified={r.certified}")
    print(f"saved the chain ({len(chain.steps)} steps, chain.json), edges.csv and {record_name} "
          f"in {path}")
    return 0


def _cmd_links(args: argparse.Namespace) -> int:
    suffix = Path(args.out).suffix.lower()
    if suffix not in (".csv", ".json"):
        raise CommandError(f"--out {args.out!r} must end in .csv or .json.")
    _check_writable(args.out, directory=False)
    stack, _, _ = _command_stack(args)
    layers = sorted(stack)
    import pandas as pd

    from .flow.linking import links

    frames = []
    for a, b in itertools.pairwise(layers):
        lk = links(stack[a], stack[b], k=args.k, score=args.score, null_rate=args.null_rate,
                   progress=not args.quiet)
        frame = lk.to_frame()
        frame.insert(0, "layer_b", b)
        frame.insert(0, "layer_a", a)
        frames.append(frame)
        kept = int((lk.indices[:, 0] >= 0).sum())
        print(f"layer {a}→{b}: {kept}/{lk.indices.shape[0]} features linked "
              f"({lk.distinct_targets()} distinct top-1 targets), score {args.score}")
    table = pd.concat(frames, ignore_index=True)
    text = table.to_csv(index=False) if suffix == ".csv" else table.to_json(orient="records", indent=1)
    print(f"saved {len(table)} links to {_write_text(args.out, text)}")
    return 0


def _cmd_flow(args: argparse.Namespace) -> int:
    from .releases import load_module_stack, parse_layers, release_saes

    if not args.out.lower().endswith(".json"):
        raise CommandError(f"--out {args.out!r} must end in .json (node-link JSON).")
    if args.graphml is not None:
        _check_writable(args.graphml, directory=False)
    _check_writable(args.out, directory=False)
    kind = _source_kind(args)
    if kind != "release" and (args.mlp_release or args.attn_release):
        raise CommandError("--mlp-release and --attn-release go with a release; a local "
                           "directory or a suite brings its own MLP and attention SAEs.")
    local = _local_layers(args, ["res", "mlp", "attn"], None) if kind != "release" else None
    if args.layers is not None:
        layers = parse_layers(args.layers, minimum=1)
        if args.layer not in layers:
            raise CommandError(f"--layers {args.layers} does not contain the seed layer {args.layer}.")
    else:
        have = (set(local["res"]) if local is not None
                else {e.layer for e in release_saes(args.release)})
        layers = [x for x in range(args.layer - args.span, args.layer + args.span + 1) if x in have]
    if local is not None:
        from .flow.graph import LayerSAEs

        missing = [x for x in layers if x not in local["res"]]
        if missing:
            raise CommandError(f"{args.suite or args.release} has no residual SAE at layer(s) "
                               f"{missing}; it has layers {sorted(local['res'])}.")
        stack = {x: LayerSAEs(res=local["res"][x], mlp=local.get("mlp", {}).get(x),
                              attn=local.get("attn", {}).get(x)) for x in layers}
    else:
        from .releases import HubUnavailableError

        try:
            stack = load_module_stack(args.release, mlp_release=args.mlp_release,
                                      attn_release=args.attn_release, layers=layers,
                                      width=args.width, l0=args.l0, progress=not args.quiet)
        except HubUnavailableError as exc:
            raise CommandError(str(exc)) from None
    from .flow.graph import flow_graph

    graph = flow_graph(stack, (args.layer, args.feature), score=args.score, cut=args.cut,
                       module_min=args.module_min, progress=not args.quiet)
    text = json.dumps(graph.to_node_link(), indent=1, allow_nan=False, default=str)
    path = _write_text(args.out, text)
    if args.graphml is not None:
        _write_atomic(args.graphml, graph.save_graphml)
    counts = graph.nodes.module.value_counts().to_dict()
    first, last = graph.similarity_span
    ends = [x for x, end in ((first, layers[0]), (last, layers[-1])) if x == end and len(layers) > 1]
    note = (f"; the span reaches the end of the loaded layers ({', '.join(map(str, ends))}): "
            "widen --layers or --span to follow it further" if ends else "")
    print(f"flow graph from {graph.options['seed']} over layers {layers[0]}-{layers[-1]}: "
          f"{len(graph.nodes)} nodes ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}), "
          f"{len(graph.edges)} edges, similarity span {first}-{last}{note}; saved {path}")
    return 0


def _add_release_options(p: argparse.ArgumentParser, *, stack: bool = True) -> None:
    """The release and its choices; ``stack``: also ``--layers`` (required), ``--hook``,
    ``--variant`` (a flow stack fixes each module's hook)."""
    p.add_argument("release", nargs="?", metavar="SOURCE",
                   help="a SAELens release (e.g. gemma-scope-2b-pt-res-canonical) or a local "
                   "directory of saved SAEs (sub-directories with cfg.json)")
    p.add_argument("--suite", help="instead of SOURCE: a suite of this package (default: the "
                   "embedded one, offline; smollm2 once built)")
    p.add_argument("--family", default="jumprelu",
                   help="--suite: which SAEs (jumprelu, topk; default: %(default)s)")
    if stack:
        p.add_argument("--layers", help="model layers, e.g. 10-14 or 3,5,7 (required with a "
                       "release; default for a directory or suite: all its layers)")
    p.add_argument("--width", help="width of the SAEs, e.g. 16k (when the release has several)")
    p.add_argument("--l0", help="average L0: a number (the nearest at each layer) or a label "
                   "such as big (when the release has several)")
    if stack:
        p.add_argument("--hook", help="hook site, e.g. hook_resid_pre (when a layer has several, "
                       "in a release or a directory)")
        p.add_argument("--variant", help="e.g. trainer_0 (when the release has several)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_match_options(p: argparse.ArgumentParser) -> None:
    """The options of ``match`` (checked by :func:`_match_options`, so a bad value is one line)."""
    p.add_argument("--solver", default="auto", metavar="{" + ",".join(SOLVERS) + "}",
                   help="assignment solver (default: %(default)s; all exact)")
    p.add_argument("--metric", default="mse", metavar="{" + ",".join(METRICS) + "}",
                   help="matching cost (default: %(default)s)")
    p.add_argument("--weights", metavar="decoder=1,encoder=1,b_enc=1",
                   help="cost weight of each block; blocks left out weigh 0 (default: all three "
                   "for mse, decoder and encoder for cosine)")
    p.add_argument("--max-cost", default="none", metavar="none|auto|NUMBER",
                   help="'none' (full bijection, default), 'auto' (null model) or a number")
    p.add_argument("--device", default="cpu",
                   help="where cost blocks are computed, e.g. cuda (default: %(default)s)")
    p.add_argument("--no-fold", action="store_true", help="match raw instead of folded parameters")


def build_parser() -> argparse.ArgumentParser:
    """The ``sae-match`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="sae-match", description="Data-free matching of SAE features across layers."
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details, and show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the method end to end on built-in SAEs and write a report")
    demo.add_argument("--out", default="sae_match_report", help="report directory (default: %(default)s)")
    demo.add_argument("--family", default="jumprelu", choices=["jumprelu", "topk"],
                      help="which built-in SAE family to use (default: %(default)s)")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the smallest setting (4 SAEs, fewer pairs and tokens)")
    size.add_argument("--full", action="store_true",
                      help="the large setting: 64 sequences, the causal check at every layer, "
                           "four coefficients and 16 generations per steering setting (about ten "
                           "minutes on 2 cores; the default takes about a minute and a half)")
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    demo.add_argument("--release", help="a SAELens release to use instead of the built-in suite, "
                      "e.g. gemma-scope-2b-pt-res-canonical (needs the hub or a local cache)")
    demo.add_argument("--layers", help="model layers for --release, e.g. 10-14 or 3,5,7")
    demo.add_argument("--width", help="--release: width of the SAEs, e.g. 16k (when it has several)")
    demo.add_argument("--l0", help="--release: average L0, a number or a label such as big")
    demo.add_argument("--hook", help="--release: hook site, e.g. hook_resid_pre (when several)")
    demo.add_argument("--variant", help="--release: e.g. trainer_0 (when it has several)")
    demo.add_argument("--sae-id-template",
                      help="for a release outside SAELens' registry: SAE id with {layer}, e.g. "
                      "'layer_{layer}/width_16k/canonical' (then --model is needed)")
    demo.add_argument("--model", help="TransformerLens model name (default: the registry's)")
    demo.set_defaults(func=_cmd_demo)

    m = sub.add_parser("match", help="match two SAEs and save the result")
    m.add_argument("sae_a", help="source SAE: a saved SAE directory or release:sae_id")
    m.add_argument("sae_b", help="target SAE: a saved SAE directory or release:sae_id")
    m.add_argument("--out", required=True,
                   help="output directory: the whole result (permutation, costs, margins, "
                   "confidences, certificate; sae-match view draws it); a name ending in "
                   ".safetensors saves the permutation alone (with a .json sidecar)")
    _add_match_options(m)
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=_cmd_match)

    v = sub.add_parser("view", help="write an interactive offline HTML view of a chain or flow graph")
    v.add_argument("results", help="a directory written by ChainMatch.save or MatchResult.save "
                   "(sae-match chain / match), a permutation .safetensors file, or a FlowGraph "
                   "JSON file written by FlowGraph.save_json")
    v.add_argument("--out", required=True, help="output .html file")
    v.add_argument("--max-paths", type=int, default=200,
                   help="chains: draw at most this many paths, longest first (default: %(default)s)")
    v.add_argument("--max-nodes", type=int, default=3000,
                   help="draw at most this many nodes (default: %(default)s)")
    v.add_argument("--neuronpedia", help="Neuronpedia link template with {layer}, {model_layer}, "
                   "{module}, {hook}, {feature}, e.g. "
                   "'https://www.neuronpedia.org/gpt2-small/{model_layer}-res-jb/{feature}'")
    v.add_argument("--title", help="page title")
    v.set_defaults(func=_cmd_view)

    c = sub.add_parser("chain", help="match adjacent layers of a release, a directory or a "
                       "suite and save the chain",
                       description="Match every adjacent pair of SAEs at the given model layers "
                       "(data-free; SAEs come from a release via SAE.from_pretrained or the local "
                       "cache, from a local directory of saved SAEs, or from --suite). DIR gets "
                       "the saved chain (chain.json and one step_AAA_BBB directory per pair of "
                       "model layers; ChainMatch.load reads it), edges.csv (model layers, "
                       "features, costs, Neuronpedia URLs) and release.json (or source.json for "
                       "a directory or suite).")
    _add_release_options(c)
    c.add_argument("--out", required=True, help="output directory")
    _add_match_options(c)
    c.set_defaults(func=_cmd_chain)

    from .vocabulary import DEFAULT_LINK_SCORE, SCORES  # standard library only

    scores = list(SCORES)
    lk = sub.add_parser("links", help="top-k links between adjacent layers (CSV/JSON)",
                        description="For each feature at each layer, its k best partners at the next "
                        "layer, with score, null-model confidence and Neuronpedia URLs.")
    _add_release_options(lk)
    lk.add_argument("--out", required=True, help="output file, .csv or .json")
    lk.add_argument("--k", type=int, default=1, help="partners per feature (default: %(default)s)")
    lk.add_argument("--score", default=DEFAULT_LINK_SCORE, choices=scores,
                    help="link score (default: %(default)s)")
    lk.add_argument("--null-rate", type=float, default=None,
                    help="drop links the null model would give a random feature at this rate")
    lk.set_defaults(func=_cmd_links)

    f = sub.add_parser("flow", help="the Feature Flow graph of one residual feature",
                       description="Follow a residual feature forward and backward through top-1 "
                       "links, with its MLP and attention predecessors, and save the graph.")
    _add_release_options(f, stack=False)
    f.add_argument("--mlp-release", help="MLP-output release, e.g. gemma-scope-2b-pt-mlp-canonical")
    f.add_argument("--attn-release", help="attention-output release (hook_attn_out), "
                   "e.g. llama_scope_lxa_8x")
    f.add_argument("--layer", type=int, required=True, help="model layer of the seed feature")
    f.add_argument("--feature", type=int, required=True, help="the seed feature")
    f.add_argument("--layers", help="layers to load, e.g. 8-16 (default: --span around --layer)")
    f.add_argument("--span", type=int, default=3,
                   help="without --layers, load this many layers on each side (default: %(default)s)")
    f.add_argument("--score", default=DEFAULT_LINK_SCORE, choices=scores,
                   help="link score (default: %(default)s)")
    f.add_argument("--cut", type=float, default=0.5, help="residual links below this end the flow")
    f.add_argument("--module-min", type=float, default=0.15,
                   help="MLP/attention predecessors below this are dropped")
    f.add_argument("--out", required=True, help="output node-link JSON file")
    f.add_argument("--graphml", help="also write the graph as GraphML to this file")
    f.set_defaults(func=_cmd_flow)

    from .batch import cli as batch_cli  # standard library only: --help stays torch-free

    batch_cli.add_parser(sub)
    from .suites import cli as suite_cli  # standard library only at import

    suite_cli.add_parser(sub)
    return parser


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])  # str(KeyError) quotes its message
    return str(exc) or exc.__class__.__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-match`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as exc:
        if args.verbose:
            raise
        print(f"sae-match: error: {_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("sae-match: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
