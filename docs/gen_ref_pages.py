"""Generate the API reference pages from the package, at build time (mkdocs-gen-files).

The standard mkdocstrings recipe "automatic code reference pages": walk the package and write
one page per public module under ``reference/``, a ``SUMMARY.md`` that mkdocs-literate-nav turns
into the navigation, and one page "Public API" that renders every name in
``sae_match_lens.__all__``, read when the site is built, so the page follows the list.

Nothing here hard-codes a module path. Skipped: private modules (any part of the dotted name
starts with ``_``, ``__init__`` aside) and deprecated shim modules (their docstring starts with
"Deprecated"). A public name without a docstring raises :class:`DocsError`, which fails the
build. The checks are plain functions on the source tree (``ast``, no mkdocs and no import of
the package's dependencies), so ``tests/test_docs.py`` runs them without the docs extra.
"""

from __future__ import annotations

import ast
import functools
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "sae_match_lens"
ROOT = Path(__file__).resolve().parent.parent
"""The repository root: the package sits at ``ROOT / PACKAGE``."""


class DocsError(ValueError):
    """The package cannot be documented as it stands (e.g. a public name has no docstring)."""


@dataclass(frozen=True)
class ModuleDoc:
    """One public module of the package.

    Attributes:
        name: dotted module name (``sae_match_lens.solvers.topk``).
        path: the source file.
        is_package: whether the file is a package's ``__init__.py``.
        docstring: the module docstring ("" when it has none).
    """

    name: str
    path: Path
    is_package: bool
    docstring: str


@dataclass(frozen=True)
class Definition:
    """Where a top-level name is defined, and whether that definition carries a docstring.

    Attributes:
        module: dotted name of the defining module.
        name: the name.
        has_docstring: a class or function with a docstring, or an assignment followed by a
            string literal (an attribute docstring, as griffe reads it).
    """

    module: str
    name: str
    has_docstring: bool


@functools.lru_cache(maxsize=512)
def _parse_cached(path: Path, mtime_ns: int) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _parse(path: Path) -> ast.Module:
    """The file's syntax tree, parsed once per version of the file."""
    return _parse_cached(path, path.stat().st_mtime_ns)


def _dotted(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _is_private(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


def all_modules(root: Path = ROOT, package: str = PACKAGE) -> list[ModuleDoc]:
    """Every module of the package, private and deprecated ones included, sorted by name.

    Args:
        root: the directory that holds the package folder.
        package: the package's name (its folder under ``root``).

    Returns:
        One :class:`ModuleDoc` per ``.py`` file.
    """
    modules = []
    for path in sorted((root / package).rglob("*.py")):
        name, is_package = _dotted(path, root)
        docstring = ast.get_docstring(_parse(path)) or ""
        modules.append(ModuleDoc(name, path, is_package, docstring))
    return modules


def is_documented_module(module: ModuleDoc) -> bool:
    """Whether a module gets a reference page: public, and not a deprecated shim.

    Args:
        module: the module.

    Returns:
        False for private modules (any dotted part starting with ``_``) and for modules whose
        docstring starts with "Deprecated".
    """
    return not _is_private(module.name) and not module.docstring.lstrip().startswith("Deprecated")


def public_modules(root: Path = ROOT, package: str = PACKAGE) -> list[ModuleDoc]:
    """The modules that get a reference page (see :func:`is_documented_module`).

    Args:
        root: the directory that holds the package folder.
        package: the package's name.

    Returns:
        The documented modules, sorted by name.
    """
    return [m for m in all_modules(root, package) if is_documented_module(m)]


def _is_docstring(node: ast.stmt | None) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def top_level_definitions(module: ModuleDoc) -> list[Definition]:
    """The names a module defines at top level (classes, functions, assignments).

    Imports are not definitions, so a re-export never counts.

    Args:
        module: the module.

    Returns:
        One :class:`Definition` per defined name, in source order.
    """
    body = _parse(module.path).body
    found = []
    for i, node in enumerate(body):
        following = body[i + 1] if i + 1 < len(body) else None
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            found.append(Definition(module.name, node.name, ast.get_docstring(node) is not None))
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.extend(Definition(module.name, t.id, _is_docstring(following))
                         for t in targets if isinstance(t, ast.Name))
        elif sys.version_info >= (3, 12) and isinstance(node, ast.TypeAlias):
            found.append(Definition(module.name, node.name.id, _is_docstring(following)))
    return found


def exported_names(package: str = PACKAGE) -> list[str]:
    """The package's ``__all__``, read from the installed package.

    ``import sae_match_lens`` is cheap (its names are loaded lazily), so this imports nothing
    heavy.

    Args:
        package: the package's name.

    Returns:
        The names, in the package's order.

    Raises:
        DocsError: the package has no ``__all__``.
    """
    names = getattr(importlib.import_module(package), "__all__", None)
    if names is None:
        raise DocsError(f"{package} has no __all__; the Public API page renders that list.")
    return list(names)


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _reexport_sources(module: str, name: str, root: Path) -> set[str]:
    """Modules that ``module`` says ``name`` comes from, read from its source.

    Two spellings count: ``from .x import name`` (relative or absolute) and a lazy-export
    table, a dict literal with the entry ``"name": "x"`` (a submodule relative to ``module``).
    """
    path = _module_file(module, root)
    if path is None:
        return set()
    is_package = path.name == "__init__.py"
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    sources = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            base = anchor[: len(anchor) - (node.level - 1)] if node.level else []
            sources.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if (isinstance(key, ast.Constant) and key.value == name
                        and isinstance(value, ast.Constant) and isinstance(value.value, str)):
                    sources.add(".".join([*anchor, value.value.lstrip(".")]))
    return sources


def _static_owner(name: str, candidates: list[Definition], root: Path, package: str) -> Definition | None:
    """The candidate that the package's own re-exports lead to, following them a few steps."""
    by_module = {d.module: d for d in candidates}
    frontier, seen = {package}, set()
    for _ in range(6):
        frontier = {s for m in frontier for s in _reexport_sources(m, name, root)} - seen
        found = [by_module[m] for m in frontier if m in by_module]
        if len(found) == 1:
            return found[0]
        if found or not frontier:
            return None
        seen |= frontier
    return None


def _runtime_owner(name: str, candidates: list[Definition], package: str) -> Definition | None:
    """The candidate whose module's attribute is the very object the package exports."""
    exported = getattr(importlib.import_module(package), name)
    owner = getattr(exported, "__module__", None)
    by_module = [d for d in candidates if d.module == owner]
    if len(by_module) == 1:
        return by_module[0]
    same = [d for d in candidates
            if getattr(importlib.import_module(d.module), name, None) is exported]
    return same[0] if len(same) == 1 else None


def resolve_exports(names: list[str], root: Path = ROOT, package: str = PACKAGE,
                    *, import_if_ambiguous: bool = True) -> dict[str, Definition]:
    """Where each exported name is defined, found in the source tree.

    A name defined in one module only is resolved statically. A name defined in several
    modules is resolved by following the package's own re-exports (``from .x import name``, or
    a lazy-export table ``{"name": "x"}``), and failing that by importing the candidates and
    comparing objects (or, with ``import_if_ambiguous=False``, left out of the result).

    Args:
        names: the exported names.
        root: the directory that holds the package folder.
        package: the package's name.
        import_if_ambiguous: import the candidate modules to settle a name defined twice.

    Returns:
        ``{name: Definition}`` for every resolved name (an exported submodule: defined by the
        package, documented by its module docstring).

    Raises:
        DocsError: a name is defined nowhere in the package, or several candidate definitions
            remain.
    """
    definitions: dict[str, list[Definition]] = {}
    modules = all_modules(root, package)
    submodules = {m.name: m for m in modules}
    for module in modules:
        for definition in top_level_definitions(module):
            definitions.setdefault(definition.name, []).append(definition)
    resolved = {}
    for name in names:
        candidates = list({d.module: d for d in definitions.get(name, [])}.values())
        if not candidates and f"{package}.{name}" in submodules:  # an exported submodule
            resolved[name] = Definition(package, name, bool(submodules[f"{package}.{name}"].docstring))
            continue
        if not candidates:
            raise DocsError(f"{package}.__all__ names {name!r}, but no module of {package} defines "
                            f"it at top level; define it, or drop it from __all__.")
        if len(candidates) == 1:
            resolved[name] = candidates[0]
            continue
        owner = _static_owner(name, candidates, root, package)
        if owner is None and not import_if_ambiguous:
            continue
        if owner is None:
            owner = _runtime_owner(name, candidates, package)
        if owner is None:
            raise DocsError(f"{package}.{name} is defined in several modules "
                            f"({', '.join(d.module for d in candidates)}) and the exported object "
                            f"matches none of them alone; give the definitions distinct names.")
        resolved[name] = owner
    return resolved


def undocumented_exports(resolved: dict[str, Definition]) -> list[str]:
    """The exported names whose definition has no docstring.

    Args:
        resolved: the output of :func:`resolve_exports`.

    Returns:
        ``"name (module)"`` for each undocumented name, sorted.
    """
    return sorted(f"{name} ({d.module})" for name, d in resolved.items() if not d.has_docstring)


def check_exports(names: list[str], root: Path = ROOT, package: str = PACKAGE) -> dict[str, Definition]:
    """Resolve the exported names and require a docstring on each.

    Args:
        names: the exported names.
        root: the directory that holds the package folder.
        package: the package's name.

    Returns:
        ``{name: Definition}`` for every name.

    Raises:
        DocsError: a name cannot be resolved, or has no docstring.
    """
    resolved = resolve_exports(names, root, package)
    missing = undocumented_exports(resolved)
    if missing:
        raise DocsError(f"{len(missing)} public name(s) in {package}.__all__ have no docstring: "
                        f"{', '.join(missing)}. Add one (for a constant or type alias, a string "
                        f"literal on the line after its assignment).")
    return resolved


def module_page_path(module: ModuleDoc) -> Path:
    """The reference page of a module, relative to ``reference/``.

    A package gets ``index.md`` in its folder (mkdocs-section-index makes it the section's
    page); a module gets ``name.md``.

    Args:
        module: the module.

    Returns:
        e.g. ``sae_match_lens/solvers/index.md`` or ``sae_match_lens/solvers/topk.md``.
    """
    parts = module.name.split(".")
    return Path(*parts, "index.md") if module.is_package else Path(*parts).with_suffix(".md")


def module_page_markdown(module: ModuleDoc, package: str = PACKAGE) -> str:
    """A module's reference page: its docstring and members, rendered by mkdocstrings.

    The top-level package's page shows its docstring only: its public names are the Public API
    page's, rendered there once.

    Args:
        module: the module.
        package: the package's name.

    Returns:
        The page's Markdown.
    """
    if module.name == package:
        return (f"::: {module.name}\n    options:\n      members: false\n\n"
                "Every public name: [Public API](../public_api.md).\n")
    return f"::: {module.name}\n"


def public_api_markdown(names: list[str], resolved: dict[str, Definition],
                        package: str = PACKAGE) -> str:
    """The "Public API" page: every exported name, in ``__all__`` order, rendered in full.

    Each name gets an anchor ``sae_match_lens.<name>``, so hand-written pages link to
    ``[match][sae_match_lens.match]`` wherever the name is defined.

    Args:
        names: the exported names, in order.
        resolved: where each is defined.
        package: the package's name.

    Returns:
        The page's Markdown.
    """
    lines = [
        "# Public API",
        "",
        f"Every name in `{package}.__all__`, in that order: `from {package} import <name>`. "
        "Each heading shows the module that defines the name; the module pages of the "
        "reference hold everything else.",
        "",
    ]
    for name in names:
        lines += [f"[](){{#{package}.{name}}}", f"::: {resolved[name].module}.{name}",
                  "    options:", "      show_root_full_path: true", f"      toc_label: {name}", ""]
    return "\n".join(lines)


def main() -> None:
    """Write the reference pages and their navigation (run by mkdocs-gen-files)."""
    import mkdocs_gen_files

    nav = mkdocs_gen_files.Nav()
    names = exported_names()
    resolved = check_exports(names)
    with mkdocs_gen_files.open("reference/public_api.md", "w") as page:
        page.write(public_api_markdown(names, resolved))
    nav["Public API"] = "public_api.md"
    for module in public_modules():
        page_path = module_page_path(module)
        parts = tuple(module.name.split("."))
        nav[parts] = page_path.as_posix()
        with mkdocs_gen_files.open(Path("reference", page_path), "w") as page:
            page.write(module_page_markdown(module))
        mkdocs_gen_files.set_edit_path(Path("reference", page_path), module.path.relative_to(ROOT))
    with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as summary:
        summary.writelines(nav.build_literate_nav())


if __name__ in {"__main__", "<run_path>"}:
    main()
