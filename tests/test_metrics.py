"""The one metrics convention: hand-computed references on tiny tensors, streaming, and the two
routes (``assets.compute_sae_metrics`` and ``evaluate_substitution``) agreeing on real tokens."""

from __future__ import annotations

import math

import pytest
import torch

from sae_match_lens import assets, evaluate_substitution
from sae_match_lens.metrics import (
    FiringSums,
    StateSums,
    cross_entropy_sum,
    explained_variance,
    fires,
    kl_sum,
    next_token_ce,
    next_token_targets,
    squared_error_sum,
    vocab_dot,
)


def test_explained_variance_matches_the_formula_by_hand_with_bos_excluded():
    # one sequence, 3 positions, d = 2; position 0 (BOS) holds huge values that must not count
    x = torch.tensor([[[100.0, -100.0], [1.0, 2.0], [3.0, 6.0]]])
    x_hat = torch.tensor([[[0.0, 0.0], [1.0, 3.0], [2.0, 6.0]]])
    # scored states (1, 2), (3, 6): mean (2, 4); Σ‖x - x̄‖² = 1+4+1+4 = 10; Σ‖x - x̂‖² = 1+1 = 2
    states = StateSums()
    states.add(x)
    sse = squared_error_sum(x, x_hat)
    assert (states.n, sse, states.total_variance) == (2, 2.0, 10.0)
    assert explained_variance(sse, states) == pytest.approx(1 - 2 / 10, abs=1e-15)


def test_state_sums_stream_to_the_pooled_result():
    x = torch.randn(5, 7, 4)
    x_hat = x + 0.3 * torch.randn(5, 7, 4)
    whole, streamed = StateSums(), StateSums()
    whole.add(x)
    sse_whole = squared_error_sum(x, x_hat)
    sse_streamed = 0.0
    for chunk, chunk_hat in zip(x.split(2), x_hat.split(2), strict=True):
        streamed.add(chunk)
        sse_streamed += squared_error_sum(chunk, chunk_hat)
    flat = x[:, 1:].reshape(-1, 4).double()
    reference = 1 - ((x.double() - x_hat.double())[:, 1:] ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum()
    assert explained_variance(sse_streamed, streamed) == pytest.approx(float(reference), rel=1e-12)
    assert explained_variance(sse_whole, whole) == pytest.approx(float(reference), rel=1e-12)


def test_cross_entropy_skips_the_prediction_made_at_bos_and_the_last_position():
    logits = torch.randn(2, 5, 6)
    tokens = torch.randint(0, 6, (2, 5))
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(1, 4):  # predictions made at positions 1 .. pos-2
            row = logits[b, t].double()
            expected -= float(row[tokens[b, t + 1]] - torch.logsumexp(row, 0))
            count += 1
    total, n = next_token_ce(logits, tokens)
    assert n == count == 6
    assert total == pytest.approx(expected, rel=1e-6)
    logp = torch.log_softmax(logits, dim=-1)
    assert cross_entropy_sum(logp, next_token_targets(tokens)) == total


def test_kl_is_averaged_over_the_same_predictions_as_cross_entropy():
    logits_clean, logits_sub = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    logp, logq = torch.log_softmax(logits_clean, -1), torch.log_softmax(logits_sub, -1)
    p = logp.exp()
    expected = sum(
        float((p[b, t].double() * (logp[b, t].double() - logq[b, t].double())).sum())
        for b in range(2) for t in range(1, 4)
    )
    assert kl_sum(p, vocab_dot(p, logp), logq) == pytest.approx(expected, rel=1e-5)
    assert kl_sum(p, vocab_dot(p, logp), logp) == 0.0


def test_a_feature_fires_when_its_activation_is_nonzero_also_negative():
    acts = torch.tensor([[[9.0, 9.0, 9.0], [0.0, -1.5, 0.0], [0.0, 2.0, 0.0]]])
    assert fires(acts[0, 1]).tolist() == [False, True, False]
    firing = FiringSums()
    firing.add(acts)  # BOS (all three fire) is excluded
    assert (firing.n, firing.n_active, firing.l0) == (2, 2, 1.0)
    assert firing.dead_fraction == pytest.approx(2 / 3)


def test_metrics_refuse_sequences_too_short_to_score():
    with pytest.raises(ValueError, match="pos >= 3"):
        next_token_ce(torch.randn(1, 2, 4), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="next_token_targets"):
        cross_entropy_sum(torch.randn(1, 5, 4), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="differ"):
        squared_error_sum(torch.randn(1, 3, 2), torch.randn(1, 3, 3))


@pytest.fixture(scope="module")
def suite():
    model, saes = assets.load_default_suite("jumprelu")
    return model, saes, assets.load_eval_tokens()[:6, :64]


@pytest.mark.parametrize("route", ["skip", "hooks"])
def test_assets_and_evaluation_give_the_same_sae_b_reconstruction_numbers(suite, route):
    model, saes, tokens = suite
    a, b = 2, 3
    table = evaluate_substitution(model, saes, tokens, pairs=[(a, b)],
                                  variants=["sae_b_reconstruction"], batch_size=3,
                                  route=route, progress=False)
    row = table.set_index("variant").loc["sae_b_reconstruction"]
    got = assets.compute_sae_metrics(model, saes[b], tokens, batch_size=3)
    # the same operations on the same tokens: equal up to float64 summation order
    assert row["n_tokens"] == got.n_tokens
    assert row["ce_clean"] == pytest.approx(got.clean_ce_loss, rel=1e-9)
    assert row["explained_variance"] == pytest.approx(got.explained_variance, rel=1e-9)
    assert row["delta_ce"] == pytest.approx(got.delta_ce, rel=1e-9, abs=1e-12)
    assert math.isfinite(row["kl"]) and row["kl"] > 0
