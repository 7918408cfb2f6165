"""The docs site's checks, without mkdocs: what ``mkdocs build --strict`` would refuse, caught by pytest.

``docs/gen_ref_pages.py`` generates the API reference at build time; its checks are plain
functions on the source tree (``ast``), tested here on the package and on small planted
packages. The full build runs in CI after the tests (``.ci/run``).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load_docs_module(name: str) -> ModuleType:
    """Import ``docs/<name>.py`` (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = load_docs_module("gen_ref_pages")


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A planted package under ``root``: ``{"pkg/mod.py": source}``."""
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    return root


def mkdocs_config() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def nav_pages(nav: list | dict | str) -> list[str]:
    """Every page path the nav names, however deeply nested."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return [p for item in nav for p in nav_pages(item)]


# --- the package as it stands -------------------------------------------------------------------


def test_every_public_name_has_a_docstring():
    names = gen.exported_names()
    resolved = gen.check_exports(names)  # raises DocsError naming the undocumented ones
    assert set(resolved) == set(names)


def test_every_public_name_resolves_to_a_module_of_the_package():
    # The Public API page renders ``::: <module>.<name>``: the module must exist in the tree.
    names = gen.exported_names()
    resolved = gen.resolve_exports(names)
    modules = {m.name for m in gen.all_modules()}
    assert {d.module for d in resolved.values()} <= modules


def test_public_api_page_renders_every_exported_name_with_its_anchor():
    names = gen.exported_names()
    page = gen.public_api_markdown(names, gen.resolve_exports(names))
    for name in names:
        assert f"[](){{#sae_match_lens.{name}}}" in page
        assert re.search(rf"^::: sae_match_lens\.[\w.]+\.{re.escape(name)}$", page, re.MULTILINE), name


def test_reference_pages_skip_private_modules_and_cover_the_subpackages():
    documented = {m.name for m in gen.public_modules()}
    assert "sae_match_lens" in documented
    assert not any(part.startswith("_") for name in documented for part in name.split("."))
    packages = {m.name for m in gen.all_modules() if m.is_package and gen.is_documented_module(m)}
    assert packages <= documented


def test_every_page_in_the_nav_exists():
    config = mkdocs_config()
    for page in nav_pages(config["nav"]):
        if page.endswith("/"):  # a generated section (reference/), written by the gen-files script
            continue
        assert (DOCS / page).is_file(), f"mkdocs.yml names docs/{page}, which does not exist"


def test_build_scripts_named_in_mkdocs_yml_exist():
    config = mkdocs_config()
    plugins = {next(iter(p)) if isinstance(p, dict) else p: p for p in config["plugins"]}
    for script in plugins["gen-files"]["gen-files"]["scripts"]:
        assert (ROOT / script).is_file(), script
    handler = plugins["mkdocstrings"]["mkdocstrings"]["handlers"]["python"]["options"]
    for extension in handler.get("extensions", []):
        assert (ROOT / extension.split(":")[0]).is_file(), extension


def bash_blocks(path: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", path.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)


def test_the_home_page_has_the_readme_set_up_commands_verbatim():
    readme = bash_blocks(ROOT / "README.md")
    demo = next(b for b in readme if "sae-match demo --out" in b)
    tests = next(b for b in readme if "python -m pytest" in b)
    index = bash_blocks(DOCS / "index.md")
    assert demo in index and tests in index


def test_the_module_tree_reaches_the_sidebar():
    # Material's navigation.indexes beside the section-index plugin drops every section page
    # (the whole module tree) from the sidebar; the reference needs exactly one of them.
    config = mkdocs_config()
    plugins = {next(iter(p)) if isinstance(p, dict) else p for p in config["plugins"]}
    features = config["theme"].get("features", [])
    assert "literate-nav" in plugins
    assert ("section-index" in plugins) != ("navigation.indexes" in features)


def test_hand_written_links_name_public_names_or_their_modules():
    # ``[text][sae_match_lens.NAME]`` resolves to the Public API page's anchor only while NAME
    # is in __all__, and ``[text][sae_match_lens.module.NAME]`` to the module's page only while
    # the module defines NAME; a renamed, moved or dropped name would fail the strict build.
    import importlib

    names = set(gen.exported_names())
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\[sae_match_lens\.([\w.]+)\]", page.read_text(encoding="utf-8")):
            if "." not in target:
                assert target in names, f"docs/{page.name} links to sae_match_lens.{target}, not in __all__"
                continue
            module, _, name = f"sae_match_lens.{target}".rpartition(".")
            assert hasattr(importlib.import_module(module), name), \
                f"docs/{page.name} links to {module}.{name}, which that module does not define"


def guide_snippets() -> list[str]:
    """The ```python blocks of docs/guide.md, in order."""
    text = (DOCS / "guide.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


@pytest.mark.slow
def test_the_guide_python_blocks_run_in_order(tmp_path, monkeypatch):
    # One namespace for the whole page (it is one story); the release loader answers with
    # default-suite SAEs, as in tests/test_readme.py (no hub here).
    from sae_lens import SAE

    from sae_match_lens import assets

    _, suite_saes = assets.load_default_suite()

    def sae_from_pretrained(release: str, sae_id: str, *args: object, **kwargs: object) -> object:
        return copy.deepcopy(suite_saes[int(re.search(r"layer_(\d+)", sae_id).group(1))])

    monkeypatch.setattr(SAE, "from_pretrained", staticmethod(sae_from_pretrained))
    monkeypatch.chdir(tmp_path)
    snippets = guide_snippets()
    assert len(snippets) >= 5
    namespace: dict[str, object] = {"__name__": "guide"}
    for i, snippet in enumerate(snippets):
        exec(compile(snippet, f"docs/guide.md [python block {i + 1}]", "exec"), namespace)
    assert (tmp_path / "flow.json").is_file() and (tmp_path / "l2_l3").exists()


# --- the checks on planted packages -------------------------------------------------------------


def test_check_exports_names_each_undocumented_public_name(tmp_path):
    root = write_package(tmp_path, {
        "pkgx/__init__.py": '"""Planted."""\n',
        "pkgx/core.py": '''
            """Core."""
            LIMIT = 3
            """Documented constant."""
            BARE = 4
            Kind = int

            def documented():
                """Has one."""

            def bare():
                return 1

            class Bare:
                x: int = 0
            ''',
    })
    names = ["LIMIT", "BARE", "Kind", "documented", "bare", "Bare"]
    resolved = gen.resolve_exports(names, root, "pkgx")
    assert gen.undocumented_exports(resolved) == [
        "BARE (pkgx.core)", "Bare (pkgx.core)", "Kind (pkgx.core)", "bare (pkgx.core)"]
    with pytest.raises(gen.DocsError, match=r"4 public name\(s\).*BARE \(pkgx\.core\)"):
        gen.check_exports(names, root, "pkgx")
    assert set(gen.check_exports(["LIMIT", "documented"], root, "pkgx")) == {"LIMIT", "documented"}


def test_an_exported_submodule_is_documented_by_its_module_docstring(tmp_path):
    root = write_package(tmp_path, {
        "pkgx/__init__.py": '"""Planted."""\n__all__ = ["tools", "bare"]\n',
        "pkgx/tools.py": '"""Tools."""\n',
        "pkgx/bare/__init__.py": "X = 1\n",
    })
    resolved = gen.resolve_exports(["tools", "bare"], root, "pkgx")
    assert resolved["tools"] == gen.Definition("pkgx", "tools", True)
    assert gen.undocumented_exports(resolved) == ["bare (pkgx)"]
    assert "::: pkgx.tools" in gen.public_api_markdown(["tools"], resolved, "pkgx")


def test_a_name_defined_nowhere_is_an_error(tmp_path):
    root = write_package(tmp_path, {"pkgx/__init__.py": '"""Planted."""\nfrom os import sep\n'})
    with pytest.raises(gen.DocsError, match="'sep'.*no module of pkgx defines"):
        gen.resolve_exports(["sep"], root, "pkgx")


@pytest.mark.parametrize("init", [
    '"""Lazy."""\n_EXPORTS = {"Method": "b"}\n__all__ = list(_EXPORTS)\n',
    '"""Eager."""\nfrom .b import Method\n__all__ = ["Method"]\n',
    '"""Two steps."""\nfrom .sub import Method\n__all__ = ["Method"]\n',
])
def test_a_name_defined_twice_resolves_through_the_package_reexports_without_importing(tmp_path, init):
    root = write_package(tmp_path, {
        "pkgx/__init__.py": init,
        "pkgx/a.py": '"""A."""\nMethod = int\n',
        "pkgx/b.py": '"""B."""\nMethod = str\n"""The one exported."""\n',
        "pkgx/sub/__init__.py": '"""Sub."""\nfrom ..b import Method\n',
    })
    resolved = gen.resolve_exports(["Method"], root, "pkgx", import_if_ambiguous=False)
    assert resolved["Method"].module == "pkgx.b"
    assert resolved["Method"].has_docstring


def test_private_and_deprecated_modules_get_no_page(tmp_path):
    root = write_package(tmp_path, {
        "pkgx/__init__.py": '"""Planted."""\n',
        "pkgx/kept.py": '"""Kept."""\n',
        "pkgx/_private.py": '"""Private."""\n',
        "pkgx/old_name.py": '"""Deprecated: import from pkgx.kept instead."""\n',
        "pkgx/sub/__init__.py": '"""Sub."""\n',
        "pkgx/sub/leaf.py": '"""Leaf."""\n',
        "pkgx/_impl/__init__.py": '"""Private package."""\n',
        "pkgx/_impl/inner.py": '"""Inside a private package."""\n',
    })
    modules = gen.public_modules(root, "pkgx")
    assert [m.name for m in modules] == ["pkgx", "pkgx.kept", "pkgx.sub", "pkgx.sub.leaf"]
    pages = {m.name: gen.module_page_path(m).as_posix() for m in modules}
    assert pages == {"pkgx": "pkgx/index.md", "pkgx.kept": "pkgx/kept.md",
                     "pkgx.sub": "pkgx/sub/index.md", "pkgx.sub.leaf": "pkgx/sub/leaf.md"}


def napoleon() -> ModuleType:
    pytest.importorskip("griffe")
    return load_docs_module("griffe_napoleon")


def test_example_sections_are_read_as_examples():
    ext = napoleon()
    text = 'Do it.\n\n    Example:\n        >>> f()[:2]\n\n    Examples are fine: Example: stays.\n'
    assert ext.normalise_example_sections(text) == text.replace("    Example:\n", "    Examples:\n")


def test_sphinx_roles_become_cross_references_resolved_in_the_docstring_scope():
    ext = napoleon()
    import griffe

    scope = {"match": "sae_match_lens.matching.match", "MatchResult": "sae_match_lens.matching.MatchResult",
             "HookedTransformer": "transformer_lens.HookedTransformer", "torch": "torch",
             "_helper": "sae_match_lens.matching._helper"}

    def resolve(name: str) -> str:
        if name not in scope:
            raise griffe.NameResolutionError(name)
        return scope[name]

    cases = {
        ":func:`~sae_match_lens.flow.flow_graph`": "[`flow_graph`][sae_match_lens.flow.flow_graph]",
        ":func:`match`": "[`match`][sae_match_lens.matching.match]",
        ":meth:`MatchResult.save`": "[`MatchResult.save`][sae_match_lens.matching.MatchResult.save]",
        ":attr:`conf <MatchResult.confidence_F>`":
            "[`conf`][sae_match_lens.matching.MatchResult.confidence_F]",
        ":class:`HookedTransformer`": "`HookedTransformer`",  # another library's: code
        ":class:`torch.Tensor`": "`torch.Tensor`",
        ":class:`numpy.ndarray`": "`numpy.ndarray`",          # not in scope, dotted: a library's
        ":func:`_helper`": "`_helper`",                      # private: no page
        ":func:`no_such_name`": "[`no_such_name`][no_such_name]",  # stays a link: the build fails
    }
    for role, markdown in cases.items():
        assert ext.rewrite_docstring(f"See {role}.", resolve) == f"See {markdown}.", role


def test_roles_follow_reexports_to_the_definition_in_a_loaded_package(tmp_path):
    ext = napoleon()
    import griffe

    write_package(tmp_path, {
        "pkgx/__init__.py": '"""Planted."""\n',
        "pkgx/flow/__init__.py": '"""Flow."""\n',
        "pkgx/flow/links.py": '"""Links."""\n\n\ndef links():\n    """Link."""\n',
        "pkgx/linking.py": '"""Deprecated: moved to pkgx.flow.links."""\nfrom .flow.links import links\n',
        "pkgx/user.py": '"""Uses :func:`~pkgx.linking.links`, :func:`links` and :func:`missing`."""\n'
                        "from .linking import links\n",
    })
    loader_extensions = griffe.load_extensions(ext.Napoleon(package="pkgx"))
    pkg = griffe.load("pkgx", search_paths=[str(tmp_path)], extensions=loader_extensions)
    assert pkg["user"].docstring.value == (
        "Uses [`links`][pkgx.flow.links.links], [`links`][pkgx.flow.links.links] and "
        "[`missing`][missing].")
