"""``sae-match``: the command line (a thin wrapper; the work is done by the library).

Subcommands:

* ``sae-match demo`` — run the whole method end to end on the built-in model and SAEs (or a
  SAELens release with ``--release``) and write a report.
* ``sae-match match A B --out FILE`` — match two SAEs (saved directories, or
  ``release:sae_id`` for ``SAE.from_pretrained``) and save the permutation.

Only the standard library is imported until a command runs, so ``--help`` answers at once;
torch, SAELens and TransformerLens are imported inside the command functions. A user error (a
missing file, an unknown release, an unwritable ``--out``, a bad option value) is reported as
one ``sae-match: error: ...`` line on stderr with exit status 1; ``-v`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
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


def _max_cost(value: str) -> float | str | None:
    if value == "none":
        return None
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--max-cost must be 'none', 'auto' or a number, got {value!r}"
        ) from None


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
    _check_writable(args.out, directory=False)
    sae_a, sae_b = _load_sae(args.sae_a), _load_sae(args.sae_b)
    from .matching import match

    result = match(sae_a, sae_b, fold=not args.no_fold, metric=args.metric, max_cost=args.max_cost,
                   solver=args.solver, progress=not args.quiet)
    path = result.permutation.save(args.out)
    print(f"matched {result.permutation.n_matched}/{result.permutation.n_source} features, "
          f"total cost {result.total_cost:.6g}, certified={result.certified}; saved {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    release_only = [f"--{name.replace('_', '-')}" for name in ("sae_id_template", "model", "layers")
                    if getattr(args, name) is not None]
    if args.release is None and release_only:
        verb = "applies" if len(release_only) == 1 else "apply"
        raise CommandError(f"{', '.join(release_only)} only {verb} with --release.")
    _check_writable(args.out, directory=True)
    from .demo import HubUnavailableError, parse_layers, run_demo

    try:
        layers = parse_layers(args.layers) if args.layers else None
        summary = run_demo(args.out, family=args.family, quick=args.quick, progress=not args.quiet,
                           release=args.release, sae_id_template=args.sae_id_template,
                           model_name=args.model, layers=layers)
    except HubUnavailableError as exc:
        raise CommandError(str(exc)) from None
    print(summary)
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    _check_writable(args.out, directory=False)
    from .viewer import write_html

    path = write_html(args.results, args.out, max_paths=args.max_paths, max_nodes=args.max_nodes,
                      neuronpedia=args.neuronpedia, title=args.title)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; self-contained, opens offline)")
    return 0


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
    demo.add_argument("--quick", action="store_true", help="a reduced setting (fewer pairs and tokens)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--release", help="a SAELens release to use instead of the built-in suite, "
                      "e.g. gemma-scope-2b-pt-res-canonical (needs the hub or a local cache)")
    demo.add_argument("--sae-id-template",
                      help="SAE id with {layer}, e.g. 'layer_{layer}/width_16k/canonical'")
    demo.add_argument("--model", help="TransformerLens model name for --release, e.g. gemma-2-2b")
    demo.add_argument("--layers", help="layers for --release, e.g. 10-14 or 3,5,7")
    demo.set_defaults(func=_cmd_demo)

    m = sub.add_parser("match", help="match two SAEs and save the permutation")
    m.add_argument("sae_a", help="source SAE: a saved SAE directory or release:sae_id")
    m.add_argument("sae_b", help="target SAE: a saved SAE directory or release:sae_id")
    m.add_argument("--out", required=True,
                   help="output .safetensors file (a .json sidecar is written beside it)")
    m.add_argument("--no-fold", action="store_true", help="match raw instead of folded parameters")
    m.add_argument("--metric", default="mse", choices=["mse", "cosine"])
    m.add_argument("--max-cost", type=_max_cost, default=None,
                   help="'none' (full bijection, default), 'auto' (null model) or a number")
    m.add_argument("--solver", default="auto", choices=["auto", "lapjv", "scipy"])
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=_cmd_match)

    v = sub.add_parser("view", help="write an interactive offline HTML view of a chain or flow graph")
    v.add_argument("results", help="a directory written by ChainMatch.save, or a FlowGraph JSON "
                   "file written by FlowGraph.save_json")
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
