"""Hook positions and block-boundary runs, checked against the model's own forward pass."""

from __future__ import annotations

import pytest
import torch

from sae_match_lens.lens.routes import hook_order, run_from, run_to, skip_boundaries
from tests.helpers_tl import N_LAYERS, tiny_model, tiny_tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_hook_order_follows_the_order_in_which_hooks_fire(model):
    fired: list[str] = []

    def record(x, *, hook):
        fired.append(hook.name)

    model.run_with_hooks(tiny_tokens(1), fwd_hooks=[(lambda name: True, record)])
    assert len(set(fired)) > 10 * N_LAYERS  # the firing order covers the blocks' hooks
    ranks = [hook_order(name, N_LAYERS) for name in fired]
    assert ranks == sorted(ranks), [n for n, r, s in zip(fired, ranks, sorted(ranks), strict=True)
                                    if r != s][:5]


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post", (2, 4)),
    ("blocks.2.hook_resid_pre", "blocks.2.hook_resid_post", (2, 3)),
    ("blocks.1.hook_resid_post", "blocks.2.hook_resid_pre", (2, 2)),
    ("blocks.3.hook_resid_post", "blocks.1.hook_resid_post", None),
    ("blocks.1.hook_resid_mid", "blocks.3.hook_resid_post", None),
    ("blocks.1.attn.hook_z", "blocks.3.hook_resid_post", None),
])
def test_skip_boundaries_are_the_blocks_between_residual_hooks(a, b, expected):
    assert skip_boundaries(a, b) == expected


@pytest.mark.parametrize("boundary", [0, 2, N_LAYERS])
def test_running_to_a_boundary_and_on_from_it_is_the_plain_forward_pass(model, boundary):
    tokens = tiny_tokens(2)
    resid = run_to(model, tokens, boundary)
    _, cache = model.run_with_cache(tokens)
    name = f"blocks.{boundary}.hook_resid_pre" if boundary < N_LAYERS else \
        f"blocks.{N_LAYERS - 1}.hook_resid_post"
    torch.testing.assert_close(resid, cache[name])
    torch.testing.assert_close(run_from(model, tokens, resid, boundary), model(tokens))
