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
