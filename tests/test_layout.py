"""The package's import graph: no cycles, and every module keeps the ladder of the data path
(foundations → solvers → matching/links → chain/flow → lens and loaders → evaluation → judging →
batch → report → cli), so that a lower level never imports a higher one. Imports inside
functions count too. The 0.2 compatibility paths (:mod:`sae_match_lens.compat`) and the
packages' faces (``__init__`` files that hold no code) stand outside the ladder."""

from __future__ import annotations

import ast
from pathlib import Path

import sae_match_lens

PACKAGE = Path(sae_match_lens.__file__).parent

LADDER = {
    # foundations: the vocabulary and options helpers, SAEs as feature tensors, permutations,
    # files, HTTP, metrics
    "vocabulary": 0, "options": 0,
    "adapters": 0, "permutation": 0, "savedir": 0, "neuronpedia": 0, "metrics": 0,
    "atomicio": 0, "httpclient": 0, "progress": 0,
    # exact assignment and top-k machinery; the null model; planted test stacks
    "nulls": 1, "synthetic": 1,
    "solvers.costs": 1, "solvers.screen": 1, "solvers.certificate": 1, "solvers.sparse": 1,
    "solvers.dense": 1, "solvers.topk": 1,
    # one pair of SAEs
    "matching": 2, "flow.linking": 2,
    # stacks of SAEs keyed by model layer
    "chain": 3, "flow.graph": 3, "flow.coactivation": 3,
    # inside the model; loaders of models and SAE stacks
    "lens.routes": 4, "lens.hooks": 4, "lens.steering": 4, "lens.nnsight": 4,
    "releases": 4, "assets": 4,
    # what a substitute or a link costs, measured in the model
    "evaluation": 5, "flow.causal": 5,
    # judges of features and of steered generations
    "judging.rowlog": 6, "judging.judge": 6, "judging.semantic": 6, "judging.steering_scores": 6,
    # suites built on demand; batch runs and the results store
    "suites": 7, "suites.build": 7, "suites.cache": 7, "suites.smollm2": 7, "suites.training": 7,
    "batch.plan": 7, "batch.store": 7, "batch.runs": 7, "batch.cli": 7,
    # the demo pipeline, its report and the viewer
    "report.verdicts": 8, "report.viewer": 8, "report.flow_section": 8,
    "report.steering_section": 8, "report.document": 8, "report.demo": 8,
    # the command line
    "cli": 9, "suites.cli": 9,
}
"""Level of each module; a module may import modules of its own level or below only."""

OUTSIDE = {"compat"}
"""Modules that stand outside the ladder: the 0.2 compatibility paths (importlib only)."""

FACES = {"", "flow", "batch", "report", "judging", "lens", "solvers"}
"""Packages whose ``__init__`` holds no code (at most the forwarding of :mod:`~sae_match_lens.compat`)."""


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


def test_no_module_imports_one_above_its_level():
    graph = _imports()
    assert set(LADDER) <= set(graph), f"unknown modules in LADDER: {set(LADDER) - set(graph)}"
    wrong = [(module, dep) for module, level in LADDER.items() for dep in sorted(graph[module])
             if dep not in FACES | OUTSIDE and LADDER.get(dep, 99) > level]
    assert not wrong, f"imports above the module's level: {wrong}"


def test_every_module_stands_on_the_ladder():
    graph = _imports()
    missing = set(graph) - set(LADDER) - OUTSIDE - FACES
    assert not missing, f"modules without a level in LADDER: {sorted(missing)}"


def test_the_package_faces_hold_no_code():
    """A face is a docstring, at most the import of the forwarding helper and its use."""
    for face in FACES:
        path = PACKAGE.joinpath(*face.split("."), "__init__.py") if face else PACKAGE / "__init__.py"
        if not face:
            continue  # the top-level face is the export table (tests/test_api.py)
        body = ast.parse(path.read_text(encoding="utf-8")).body
        kinds = [type(node).__name__ for node in body]
        assert kinds in (["Expr"], ["Expr", "ImportFrom", "Assign"]), f"{path}: {kinds}"


def test_no_private_name_is_imported_across_modules():
    """A helper that several modules share has a public name in one module."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (
                    node.level > 0 or (node.module or "").startswith("sae_match_lens")):
                found += [f"{path.relative_to(PACKAGE)}: {alias.name}" for alias in node.names
                          if alias.name.startswith("_")]
    assert not found, found


def test_no_two_folders_import_each_other():
    """The folders (and the top level) read downhill too: where modules of one folder import
    another folder, none of the other's modules imports the first."""
    graph = _imports()

    def folder(module: str) -> str:
        return module.split(".")[0] if "." in module else ""

    arrows = {(folder(m), folder(d)) for m, deps in graph.items() if m not in FACES | OUTSIDE
              for d in deps if d not in FACES | OUTSIDE and folder(m) != folder(d)}
    both = sorted({tuple(sorted(pair)) for pair in arrows if pair[::-1] in arrows
                   and "" not in pair})
    assert not both, f"folders that import each other: {both}"
