"""The 0.2 module paths: importable for one minor version, warning once with the new path."""

from __future__ import annotations

import importlib
import sys

import pytest

import sae_match_lens
from sae_match_lens.compat import MOVED_MODULES


def _forget(monkeypatch: pytest.MonkeyPatch, old: str) -> None:
    """Make the next import of ``sae_match_lens.<old>`` a first import."""
    if old in vars(sae_match_lens):  # (hasattr would import it through the package's __getattr__)
        monkeypatch.delattr(sae_match_lens, old)
    monkeypatch.delitem(sys.modules, f"sae_match_lens.{old}", raising=False)


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_warns_with_the_new_one_and_is_the_same_module(monkeypatch, old):
    _forget(monkeypatch, old)
    new = f"sae_match_lens.{MOVED_MODULES[old]}"
    with pytest.warns(DeprecationWarning, match=rf"sae_match_lens\.{old} moved to {new}\b"):
        module = importlib.import_module(f"sae_match_lens.{old}")
    assert module is importlib.import_module(new)
    assert module.__name__ == new and module.__spec__.name == new


def test_an_old_module_path_warns_only_at_its_first_import(monkeypatch, recwarn):
    _forget(monkeypatch, "linking")
    with pytest.warns(DeprecationWarning):
        importlib.import_module("sae_match_lens.linking")
    recwarn.clear()
    from sae_match_lens.linking import links  # noqa: F401
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)
                and "moved" in str(w.message)]


@pytest.mark.parametrize(("package", "name", "home"), [
    ("flow", "FlowGraph", "flow.graph"),
    ("flow", "predecessors", "flow.graph"),
    ("batch", "batch_match", "batch.runs"),
    ("report", "write_report", "report.document"),
])
def test_names_of_an_old_module_that_became_a_package_are_forwarded(monkeypatch, package, name,
                                                                     home):
    pkg = importlib.import_module(f"sae_match_lens.{package}")
    if name in vars(pkg):
        monkeypatch.delattr(pkg, name)
    with pytest.warns(DeprecationWarning, match=rf"moved to sae_match_lens\.{home}\.{name}"):
        value = getattr(pkg, name)
    assert value is getattr(importlib.import_module(f"sae_match_lens.{home}"), name)


def test_a_package_that_was_a_module_still_refuses_unknown_names():
    with pytest.raises(AttributeError):
        sae_match_lens.flow.no_such_name  # noqa: B018
