"""The deactivation experiment against a direct computation, and its sanity ordering."""

from __future__ import annotations

import pytest
import torch

from sae_match_lens.flow.causal import CausalOptions, best_single_predecessors, causal_check
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


ALL = CausalOptions(positions=100, max_targets=1000)
"""Every position and every active target of the tiny token set."""


def test_best_single_predecessor_equals_brute_force_and_bounds_top1(setup):
    model, pred, target, tokens = setup
    lk = links(target, pred, k=1, progress=False)
    table = best_single_predecessors(model, pred, target, tokens, links={"top1": lk},
                                     progress=False, options=ALL)
    _, cache = model.run_with_cache(tokens)
    h = cache["blocks.0.hook_resid_post"]
    with torch.no_grad():
        f_p, f_t = pred.encode(h), target.encode(h)
        expected = {}
        for s in range(tokens.shape[0]):
            for t in range(1, tokens.shape[1]):
                active_p = torch.nonzero(f_p[s, t]).flatten().tolist()
                for f in torch.nonzero(f_t[s, t]).flatten().tolist():
                    best, best_g, by_top1 = -float("inf"), -1, float("nan")
                    for g in active_p:  # every active predecessor, one at a time
                        acts = torch.zeros(1, pred.cfg.d_sae)
                        acts[0, g] = f_p[s, t, g]
                        edited = h[s, t] - (pred.decode(acts)
                                            - pred.decode(torch.zeros_like(acts)))[0]
                        change = 1 - float(target.encode(edited[None])[0, f]) / float(f_t[s, t, f])
                        if change > best:
                            best, best_g = change, g
                        if g == int(lk.top1[f]):
                            by_top1 = change
                    expected[(s, t, f)] = (best_g, best, by_top1)
    got = {(r.seq, r.position, r.target): (r.best_predecessor, r.activation_change,
                                           r.top1_change) for r in table.itertuples()}
    assert set(got) == set(expected) and len(got) > 0
    for key, (g, change, by_top1) in expected.items():
        assert got[key][1] == pytest.approx(change, abs=1e-5)
        assert got[key][2] == pytest.approx(by_top1, abs=1e-5, nan_ok=True)
        if g >= 0:  # the argmax itself may differ only on an exact tie
            assert got[key][0] == g or got[key][1] == pytest.approx(change, abs=1e-6)
    # The same sample as causal_check (so the two tables compare target by target).
    top1 = causal_check(model, pred, target, tokens, {"top1": lk}, options=ALL,
                        progress=False).iloc[0]
    assert top1.n_sampled == len(table)


def test_rerun_from_the_recorded_block_input_equals_a_full_run(setup, monkeypatch):
    """Re-runs start at the predecessor's block from its recorded input; the numbers are those
    of re-running the whole model from the tokens."""
    import sae_match_lens.flow.causal as causal

    model, _, _, tokens = setup
    pred = random_jumprelu_sae("blocks.1.hook_mlp_out", seed=3)
    target = random_jumprelu_sae(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", seed=4)
    lk = links(target, pred, k=3, progress=False)

    def both() -> tuple:
        unchecked = CausalOptions(check_model=False)
        return (causal_check(model, pred, target, tokens, {"top3": lk}, progress=False,
                             options=unchecked),
                best_single_predecessors(model, pred, target, tokens, links={"top3": lk},
                                         progress=False, options=unchecked))

    assert causal._start_block(model, "blocks.1.hook_mlp_out") == 1
    fast = both()
    monkeypatch.setattr(causal, "_start_block", lambda model, hook: None)
    full = both()
    assert fast[0].n_targets.iloc[0] > 0 and len(fast[1]) > 0
    for a, b in zip(fast, full, strict=True):
        for col in a.columns:
            if a[col].dtype.kind == "f":
                assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), abs=1e-5,
                                                          nan_ok=True), col
            else:
                assert (a[col] == b[col]).all(), col


def test_flat_sampling_knobs_warn_and_equal_causal_options(setup):
    import pandas as pd

    from sae_match_lens.flow.causal import CausalOptions

    model, pred, target, tokens = setup
    methods = {"top1": links(target, pred, k=1, progress=False)}
    with pytest.warns(DeprecationWarning, match=r"max_targets= → options\.max_targets"):
        old = causal_check(model, pred, target, tokens, methods, positions=3, max_targets=4,
                           seed=2, progress=False)
    new = causal_check(model, pred, target, tokens, methods, progress=False,
                       options=CausalOptions(positions=3, max_targets=4, seed=2))
    pd.testing.assert_frame_equal(old, new)
    other = causal_check(model, pred, target, tokens, methods, progress=False,
                         options=CausalOptions(positions=3, max_targets=4, seed=3))
    assert not other.equals(new)  # the seed reaches the sampling
