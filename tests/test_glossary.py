"""The glossary (README, "Glossary"; :mod:`sae_match_lens.vocabulary`) holds in the code: public
signatures, result fields and table columns use one word per concept.

The uses of "method" and "kind" that 0.3 still carries are listed in ``LEGACY`` with what each
means; a new one fails here. Renaming them changes saved tables and files, so it waits for its
own release (CHANGELOG.md)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import sae_match_lens
from sae_match_lens.vocabulary import DEFAULT_LINK_SCORE, MODULES, SCORES

ATTENTION = re.compile(r"attention|(^|_)att(_|$)", re.IGNORECASE)
"""The attention module is ``attn`` everywhere (``res``, ``mlp``, ``attn``)."""

OVERLOADED = {"method", "methods", "kind", "kinds"}
"""Words that meant four things in 0.2: a route (how a solver runs), a variant (what a
substitution computes), a set of links, a job kind, an intervention kind, an edge's module."""

LEGACY: dict[str, str] = {
    "httpclient.request:method": "an HTTP method (GET/POST)",
    "neuronpedia.Explanation:method": "Neuronpedia's own field: how an explanation was made",
    "solvers.topk.solve_topk:method": "the route of the top-k engine (links' options.route)",
    "lens.hooks.Substitution:method": "what a substitution computes (a variant's substitution)",
    "lens.hooks.Substitution.__init__:method": "the same",
    "judging.semantic.SemanticResult:method": "the name of the link set judged",
    "flow.coactivation.evaluate_links:methods": "named link sets to evaluate",
    "flow.coactivation.link_indices:method": "one named link set",
    "flow.coactivation.LINK_COLUMNS:method": "the column naming the link set",
    "flow.causal.causal_check:methods": "named link sets to check",
    "flow.causal.CAUSAL_COLUMNS:method": "the column naming the link set",
    "evaluation.RESULT_COLUMNS:method": "the column naming a variant's substitution",
    "batch.plan.PairJob:kind": "a batch job's kind (match, links, compare)",
    "batch.plan.PairJob.__init__:kind": "the same",
    "batch.plan.plan_pairs:kind": "the same",
    "batch.plan.plan_from_release:kind": "the same",
    "batch.runs.job_memory_bytes:kind": "the same",
    "batch.store.ResultStore.chain:kind": "the same",
    "batch.store.load_chain:kind": "the same",
    "savedir.write_directory:kind": "the format a saved directory's manifest names",
    "savedir.is_replaceable:kind": "the same",
    "lens.steering.Schedule:kind": "a schedule's shape (constant, exponential, linear)",
    "lens.steering.Schedule.__init__:kind": "the same",
}


def _public_modules() -> list:
    out = []
    for info in pkgutil.walk_packages(sae_match_lens.__path__, "sae_match_lens."):
        if info.name.endswith((".compat", ".cli")) or ".suites." in info.name:
            continue
        out.append(importlib.import_module(info.name))
    return out


def _names() -> list[tuple[str, str]]:
    """(``module.Object[.member]``, name) for every parameter, field and table column of the
    public API of every module (its ``__all__``, defined there)."""
    found = []
    for module in _public_modules():
        short = module.__name__.removeprefix("sae_match_lens.")
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if getattr(obj, "__module__", module.__name__) != module.__name__:
                continue  # re-exported: checked at home
            where = f"{short}.{name}"
            if name.endswith("COLUMNS") and isinstance(obj, tuple):
                found += [(where, column) for column in obj]
            if inspect.isclass(obj):
                fields = getattr(obj, "__dataclass_fields__", None) or getattr(obj, "_fields", ())
                found += [(where, field) for field in fields]
                members = [(f"{where}.{k}", v) for k, v in vars(obj).items()
                           if inspect.isfunction(v) and (not k.startswith("_") or k == "__init__")]
            elif callable(obj):
                members = [(where, obj)]
            else:
                members = []
            for member, fn in members:
                try:
                    params = inspect.signature(fn).parameters
                except (TypeError, ValueError):
                    continue
                found += [(member, p) for p in params if p not in ("self", "cls")]
    return found


def test_the_attention_module_is_attn_everywhere():
    wrong = sorted({f"{where}:{name}" for where, name in _names() if ATTENTION.search(name)})
    assert not wrong, wrong
    assert MODULES == ("res", "mlp", "attn")


def test_overloaded_words_appear_only_where_the_glossary_lists_them():
    used = {f"{where}:{name}" for where, name in _names() if name in OVERLOADED}
    new = sorted(used - set(LEGACY))
    assert not new, f"'method'/'kind' in new public names (say route, variant, ...): {new}"
    gone = sorted(set(LEGACY) - used)
    assert not gone, f"LEGACY lists names that no longer exist (strike them): {gone}"


def test_every_function_that_links_defaults_to_the_one_link_score():
    """A public ``score=`` parameter whose default is a link score defaults to
    ``DEFAULT_LINK_SCORE`` (so ``links(a, b).top1`` is the partner the flow graph follows)."""
    defaults = {}
    for module in _public_modules():
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            fns = ([v for k, v in vars(obj).items() if inspect.isfunction(v)]
                   if inspect.isclass(obj) else [obj] if callable(obj) else [])
            for fn in fns:
                try:
                    params = inspect.signature(fn).parameters
                except (TypeError, ValueError):
                    continue
                for pname in ("score", "link_score"):
                    p = params.get(pname)
                    if p is not None and p.default in SCORES:
                        defaults[f"{module.__name__}.{fn.__qualname__}"] = p.default
            if inspect.isclass(obj) and "link_score" in getattr(obj, "__dataclass_fields__", {}):
                defaults[f"{module.__name__}.{name}.link_score"] = (
                    obj.__dataclass_fields__["link_score"].default)
    for expected in ("links", "predecessors", "flow_graph", "persistence", "origin_groups",
                     "plan_flow", "ResultStore.flow_graph", "Variant.link_score"):
        assert any(key.endswith(expected) for key in defaults), f"{expected} not found"
    wrong = {k: v for k, v in defaults.items() if v != DEFAULT_LINK_SCORE}
    assert not wrong, wrong


def test_the_cli_offers_the_same_default_link_score():
    from sae_match_lens.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("links", "flow"):
        score = next(a for a in subs[command]._actions if a.dest == "score")
        assert score.default == DEFAULT_LINK_SCORE, command

