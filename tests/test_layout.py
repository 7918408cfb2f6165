"""The package's import graph: no cycles, and the core keeps the ladder of the data path
(adapters → solvers → matching/links → chain/flow → lens), so that a lower level never imports
a higher one (evaluation, reports, the judge, the CLI). Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import sae_match_lens

PACKAGE = Path(sae_match_lens.__file__).parent

LADDER = {
    "adapters": 0, "permutation": 0, "savedir": 0, "neuronpedia": 0, "metrics": 0,
    "atomicio": 0, "httpclient": 0, "progress": 0, "nulls": 1,
    "solvers.costs": 1, "solvers.screen": 1, "solvers.certificate": 1, "solvers.sparse": 1,
    "solvers.dense": 1, "solvers.topk": 1,
    "matching": 2, "linking": 2,
    "chain": 3, "flow": 3,
    "lens.routes": 4, "lens.hooks": 4, "lens.steering": 4, "lens.nnsight": 4,
}
"""Level of each core module; a module may import modules of its own level or below only."""


def _imports() -> dict[str, set[str]]:
    """Each module (dotted, without the package name) and the package modules it imports."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = [p for p in package.split(".") if p]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{a.name}".lstrip(".") for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "sae_match_lens"):
                target = node.module.removeprefix("sae_match_lens").lstrip(".")
                candidates = [target] + [f"{target}.{a.name}".lstrip(".") for a in node.names]
            else:
                continue
            found |= {c for c in candidates if c in modules and c and c != name}
        graph[name] = found
    return graph


def test_the_import_graph_has_no_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, node, dep])}"
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_core_modules_import_nothing_above_their_level():
    graph = _imports()
    assert set(LADDER) <= set(graph), f"unknown modules in LADDER: {set(LADDER) - set(graph)}"
    wrong = [(module, dep) for module, level in LADDER.items() for dep in sorted(graph[module])
             if LADDER.get(dep, 99) > level]
    assert not wrong, f"imports above the module's level: {wrong}"
