"""The package's lazy re-exports: every public name resolves, and importing stays cheap."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

import sae_match_lens


@pytest.mark.parametrize("name", sae_match_lens.__all__)
def test_every_public_name_resolves_to_its_submodule_object(name):
    module = importlib.import_module(f"sae_match_lens.{sae_match_lens._EXPORTS[name]}")
    assert getattr(sae_match_lens, name) is getattr(module, name)


def test_public_names_are_listed_in_dir_and_do_not_shadow_submodules():
    assert set(sae_match_lens.__all__) <= set(dir(sae_match_lens))
    for name in sae_match_lens.__all__:
        assert importlib.util.find_spec(f"sae_match_lens.{name}") is None, name


def test_submodules_are_attributes_and_unknown_names_raise_attribute_error():
    assert sae_match_lens.metrics is importlib.import_module("sae_match_lens.metrics")
    with pytest.raises(AttributeError, match="no_such_name"):
        sae_match_lens.no_such_name  # noqa: B018


def test_the_public_api_is_about_forty_names():
    assert 30 <= len(sae_match_lens.__all__) <= 45, len(sae_match_lens.__all__)
    assert len(set(sae_match_lens.__all__)) == len(sae_match_lens.__all__)


def test_names_no_longer_exported_warn_once_and_name_their_module(monkeypatch, recwarn):
    name, home = "SCORES", sae_match_lens._UNEXPORTED["SCORES"]
    assert name not in sae_match_lens.__all__ and name not in dir(sae_match_lens)
    monkeypatch.delitem(vars(sae_match_lens), name, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"from sae_match_lens\.{home} import {name}"):
        value = sae_match_lens.SCORES
    assert value is getattr(importlib.import_module(f"sae_match_lens.{home}"), name)
    recwarn.clear()
    assert sae_match_lens.SCORES is value
    assert not [w for w in recwarn if "no longer exported" in str(w.message)]


@pytest.mark.parametrize("name", sorted(sae_match_lens._UNEXPORTED))
def test_every_name_exported_by_0_2_still_resolves(name):
    module = importlib.import_module(f"sae_match_lens.{sae_match_lens._UNEXPORTED[name]}")
    assert getattr(module, name) is not None
    assert name not in sae_match_lens._EXPORTS


RESULT_TYPES = ("MatchResult", "Links", "ChainMatch", "FlowGraph")
"""The exported result types: each saved by ``save(path)`` and read by ``Type.load(path, ...)``."""


@pytest.mark.parametrize("name", RESULT_TYPES)
def test_every_result_type_is_saved_and_loaded_the_same_way(name):
    import inspect

    cls = getattr(sae_match_lens, name)
    assert name in sae_match_lens.__all__
    save = list(inspect.signature(cls.save).parameters.values())
    assert [p.name for p in save[:1]] == ["self"] and save[1].kind is save[1].POSITIONAL_OR_KEYWORD
    assert all(p.kind is p.KEYWORD_ONLY for p in save[2:]), save
    assert isinstance(inspect.getattr_static(cls, "load"), classmethod)
    load = list(inspect.signature(cls.load).parameters.values())
    assert load[0].kind is load[0].POSITIONAL_OR_KEYWORD
    assert all(p.kind is p.KEYWORD_ONLY for p in load[1:]), load
