"""Options dataclasses: the knobs of 0.2 still work as flat keywords (with a warning) and give
the very result the options object gives."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch
from helpers import planted_pair

from sae_match_lens import generate_steered, links, match
from sae_match_lens.flow.linking import LinkOptions
from sae_match_lens.matching import MatchOptions
from sae_match_lens.options import gather_options


def test_match_with_flat_knobs_warns_and_equals_match_with_options():
    pair = planted_pair()
    options = MatchOptions(solver="sparse", candidates=8, block_rows=64, max_rounds=4)
    new = match(pair.sae_a, pair.sae_b, progress=False, options=options)
    with pytest.warns(DeprecationWarning, match=r"k= → options\.candidates"):
        old = match(pair.sae_a, pair.sae_b, progress=False, solver="sparse", k=8, block_rows=64,
                    max_rounds=4)
    assert torch.equal(new.permutation.indices, old.permutation.indices)
    assert torch.equal(new.cost_F, old.cost_F)
    assert new.options == old.options and new.options["k"] == 8  # recorded as 0.2 recorded it


def test_links_with_flat_knobs_warns_and_equals_links_with_options():
    pair = planted_pair()
    options = LinkOptions(route="exact", n_null=256, seed=3, density_weight=0.5)
    new = links(pair.sae_a, pair.sae_b, k=2, progress=False, options=options)
    with pytest.warns(DeprecationWarning, match=r"method= → options\.route"):
        old = links(pair.sae_a, pair.sae_b, k=2, progress=False, method="exact", n_null=256, seed=3,
                    density_weight=0.5)
    assert torch.equal(new.indices, old.indices) and torch.equal(new.confidence, old.confidence)
    assert new.options == old.options and new.options["method"] == "exact"


def test_backward_links_keep_their_options():
    pair = planted_pair()
    options = LinkOptions(n_null=128, seed=5)
    back = links(pair.sae_b, pair.sae_a, direction="backward", progress=False, options=options)
    fwd = links(pair.sae_a, pair.sae_b, progress=False, options=options)
    assert torch.equal(back.indices, fwd.indices) and back.options["n_null"] == 128


def test_calls_with_options_do_not_warn():
    pair = planted_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        match(pair.sae_a, pair.sae_b, progress=False, options=MatchOptions(solver="scipy"))


def test_options_are_frozen_and_wrong_types_are_refused():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MatchOptions().solver = "sparse"  # type: ignore[misc]
    pair = planted_pair()
    with pytest.raises(TypeError, match="MatchOptions"):
        match(pair.sae_a, pair.sae_b, progress=False, options=LinkOptions())  # type: ignore[arg-type]


def test_gather_options_keeps_problem_arguments_and_maps_renamed_knobs():
    kwargs = gather_options(MatchOptions, {"fold": False, "max_cost": "auto", "k": 4,
                                           "solver": "sparse"})
    assert kwargs == {"fold": False, "max_cost": "auto",
                      "options": MatchOptions(solver="sparse", candidates=4)}
    assert gather_options(MatchOptions, {"fold": True}) == {"fold": True}


@pytest.mark.parametrize("fn", [match, links, generate_steered])
def test_the_functions_with_options_take_ten_or_so_parameters(fn):
    params = inspect.signature(fn).parameters
    assert len(params) <= 11 and "options" in params, list(params)


MAX_PARAMETERS = 10
PARAMETER_EXCEPTIONS: dict[str, str] = {}
"""Public callables allowed more than MAX_PARAMETERS parameters, each with its reason (none)."""


def _public_callables():
    import sae_match_lens

    for name in sae_match_lens.__all__:
        obj = getattr(sae_match_lens, name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, staticmethod | classmethod):
                    member = member.__func__
                if inspect.isfunction(member):
                    yield f"{name}.{attr}", member
        elif callable(obj):
            yield name, obj


def test_every_public_function_and_method_takes_at_most_ten_parameters():
    """Problem arguments in the signature, tuning knobs in an options dataclass: every function
    and method of ``sae_match_lens.__all__`` (keyword-only counted, ``self``/``cls`` not)."""
    counts = {}
    for qualname, fn in _public_callables():
        params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
        counts[qualname] = len(params)
    assert {"evaluate_substitution", "steering_sweep", "ChatJudge.__init__",
            "Links.save"} <= set(counts)  # the scan reaches functions, constructors and methods
    over = {q: n for q, n in counts.items() if n > MAX_PARAMETERS and q not in PARAMETER_EXCEPTIONS}
    assert not over, over


def test_device_is_a_knob_of_match_links_and_match_features():
    """``device=`` (where the cost blocks run) moved into MatchOptions/LinkOptions; the flat
    keyword still works with a warning, and match_features takes MatchOptions too."""
    from sae_match_lens.adapters import feature_view
    from sae_match_lens.matching import match_features
    from sae_match_lens.solvers.costs import CostWeights, stack_features

    pair = planted_pair()
    with pytest.warns(DeprecationWarning, match=r"device= → options\.device"):
        old = match(pair.sae_a, pair.sae_b, progress=False, device="cpu")
    new = match(pair.sae_a, pair.sae_b, progress=False, options=MatchOptions(device="cpu"))
    assert torch.equal(old.permutation.indices, new.permutation.indices)
    with pytest.warns(DeprecationWarning, match=r"device= → options\.device"):
        old_links = links(pair.sae_a, pair.sae_b, progress=False, device="cpu")
    new_links = links(pair.sae_a, pair.sae_b, progress=False, options=LinkOptions(device="cpu"))
    assert torch.equal(old_links.indices, new_links.indices)
    w = CostWeights.resolve(None, "mse")
    a, b = (stack_features(feature_view(s), w, "mse") for s in (pair.sae_a, pair.sae_b))
    with pytest.warns(DeprecationWarning, match=r"solver= → options\.solver"):
        flat = match_features(a, b, solver="scipy", progress=False)
    direct = match_features(a, b, progress=False, options=MatchOptions(solver="scipy"))
    assert torch.equal(flat.permutation.indices, direct.permutation.indices)
    assert torch.equal(flat.permutation.indices, new.permutation.indices)
