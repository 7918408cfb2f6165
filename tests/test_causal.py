"""The deactivation experiment against a direct computation, and its sanity ordering."""

from __future__ import annotations

import pytest
import torch

from sae_match_lens.flow.causal import causal_check
from sae_match_lens.flow.linking import links
from tests.helpers_tl import random_jumprelu_sae, tiny_model, tiny_tokens


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    pred = random_jumprelu_sae("blocks.0.hook_resid_post", seed=1)
    target = random_jumprelu_sae("blocks.1.hook_resid_pre", seed=2)  # the same boundary
    return model, pred, target, tiny_tokens(n_seq=3)


def test_success_and_change_equal_a_direct_computation(setup):
    model, pred, target, tokens = setup
    lk = links(target, pred, k=1, progress=False)
    table = causal_check(model, pred, target, tokens, {"top1": lk}, positions=100,
                         max_targets=1000, progress=False)
    _, cache = model.run_with_cache(tokens)
    h = cache["blocks.0.hook_resid_post"]
    n = deact = 0
    change = 0.0
    with torch.no_grad():
        f_p, f_t = pred.encode(h), target.encode(h)
        for s in range(tokens.shape[0]):
            for t in range(1, tokens.shape[1]):
                for f in torch.nonzero(f_t[s, t]).flatten().tolist():
                    g = int(lk.top1[f])
                    if f_p[s, t, g] == 0:
                        continue
                    acts = torch.zeros(1, pred.cfg.d_sae)
                    acts[0, g] = f_p[s, t, g]
                    edited = h[s, t] - (pred.decode(acts) - pred.decode(torch.zeros_like(acts)))[0]
                    z = float(target.encode(edited[None])[0, f])
                    n += 1
                    deact += z == 0
                    change += 1 - z / float(f_t[s, t, f])
    row = table.iloc[0]
    assert row.n_targets == n > 0
    assert row.success_rate == pytest.approx(deact / n)
    assert row.activation_change == pytest.approx(change / n, abs=1e-5)


def test_the_true_predecessor_beats_a_random_one(setup):
    model, pred, _, tokens = setup
    twin = random_jumprelu_sae("blocks.1.hook_resid_pre", seed=1)  # pred's copy one hook later
    identity = torch.arange(pred.cfg.d_sae)
    random = torch.randperm(pred.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    table = causal_check(model, pred, twin, tokens, {"true": identity, "random": random},
                         progress=False).set_index("method")
    assert table.loc["true", "activation_change"] > table.loc["random", "activation_change"] + 0.3


def test_bad_inputs_are_clear_errors(setup):
    model, pred, target, tokens = setup
    with pytest.raises(ValueError, match="must read before"):
        causal_check(model, target, random_jumprelu_sae("blocks.0.hook_resid_pre"), tokens,
                     {"x": torch.zeros(64, dtype=torch.int64)}, progress=False)
    with pytest.raises(ValueError, match="do not fit"):
        causal_check(model, pred, target, tokens, {"x": torch.zeros(3, dtype=torch.int64)},
                     progress=False)
