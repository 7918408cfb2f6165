"""Many-to-one links: exact top-k against brute force, direction, planted partners, the null's
confidence; co-activation statistics and evaluate_links against direct counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_match_lens.adapters import feature_view
from sae_match_lens.assets import load_suite_saes
from sae_match_lens.flow.coactivation import (
    best_partner,
    coactivation_stats,
    evaluate_links,
    one_to_one,
)
from sae_match_lens.flow.linking import SCORES, firing_offset_z, links
from sae_match_lens.matching import match
from sae_match_lens.nulls import moment_matched_sae
from tests.helpers import build_sae, planted_pair
from tests.helpers_tl import random_jumprelu_sae, tiny_model, tiny_tokens
from tests.test_null_model import aligned_sae


def _brute_scores(sae_a, sae_b, score, csls_k=10, density_weight=0.2):
    """Every score of every pair in float64 numpy, from the SAEs' parameters directly."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    va, vb = (feature_view(s, fold=False, dtype=torch.float64) for s in (sae_a, sae_b))
    dec = unit(va.decoder_FO.numpy()) @ unit(vb.decoder_FO.numpy()).T
    enc = unit(va.encoder_FD.numpy()) @ unit(vb.encoder_FD.numpy()).T
    if score == "decoder_cosine":
        return dec
    if score == "cosine_sum":
        return dec + enc
    if score == "csls":
        s = dec + enc
        ra = np.sort(s, axis=1)[:, -csls_k:].mean(1)
        rb = np.sort(s, axis=0)[-csls_k:, :].mean(0)
        return 2 * s - ra[:, None] - rb[None, :]
    if score == "cosine_density":
        za, zb = (firing_offset_z(s).double().numpy() for s in (sae_a, sae_b))
        return dec + enc - density_weight * np.abs(za[:, None] - zb[None, :])
    fa, fb = (feature_view(s, fold=True, dtype=torch.float64) for s in (sae_a, sae_b))
    xa = np.concatenate([fa.decoder_FO.numpy(), fa.encoder_FD.numpy(), fa.bias_FB.numpy()], 1)
    xb = np.concatenate([fb.decoder_FO.numpy(), fb.encoder_FD.numpy(), fb.bias_FB.numpy()], 1)
    return -((xa[:, None, :] - xb[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "topk"])
def test_the_firing_offset_does_not_depend_on_where_the_encoder_subtracts_b_dec(architecture):
    """An SAE whose encoder subtracts ``b_dec`` from its input and the same function written
    with ``b_enc − W_encᵀb_dec`` and no subtraction get the same offsets and the same links;
    measured from the origin instead, their offsets would differ."""
    import copy

    sae = build_sae(architecture, d_in=16, d_sae=40, seed=3)
    assert sae.cfg.apply_b_dec_to_input
    other = copy.deepcopy(sae)
    other.cfg.apply_b_dec_to_input = False
    with torch.no_grad():
        other.b_enc.sub_(sae.b_dec @ sae.W_enc)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(other.encode(x), sae.encode(x))  # the same function
    torch.testing.assert_close(firing_offset_z(other), firing_offset_z(sae))
    target = build_sae(architecture, d_in=16, d_sae=56, seed=4)
    assert torch.equal(links(other, target, k=3, progress=False).indices,
                       links(sae, target, k=3, progress=False).indices)
    norms = sae.W_enc.norm(dim=0)
    theta = getattr(sae, "threshold", torch.zeros(40))
    from_origin = [((theta - s.b_enc) / norms).detach() for s in (sae, other)]
    z = [(o - o.mean()) / o.std() for o in from_origin]
    assert not torch.allclose(z[0], z[1], atol=1e-2)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "topk", "gated"])
def test_top_k_links_are_the_true_top_k_of_every_score(score, architecture):
    sae_a = build_sae(architecture, d_in=16, d_sae=40, seed=1)
    sae_b = build_sae(architecture, d_in=16, d_sae=56, seed=2)
    got = links(sae_a, sae_b, k=4, score=score, block_rows=7, progress=False)
    full = _brute_scores(sae_a, sae_b, score)
    order = np.argsort(-full, axis=1, kind="stable")[:, :4]
    expected_scores = np.take_along_axis(full, order, 1)
    np.testing.assert_allclose(got.scores.numpy(), expected_scores, rtol=1e-4, atol=1e-4)
    chosen = np.take_along_axis(full, got.indices.numpy(), 1)  # ties may swap equal entries
    np.testing.assert_allclose(chosen, expected_scores, rtol=1e-4, atol=1e-4)
    assert got.indices.shape == (40, 4) and got.indices.dtype == torch.int64


def test_backward_links_are_the_forward_links_of_the_swapped_pair():
    sae_a, sae_b = build_sae("jumprelu", seed=1), build_sae("jumprelu", seed=2)
    back = links(sae_a, sae_b, k=2, direction="backward", progress=False)
    swapped = links(sae_b, sae_a, k=2, progress=False)
    assert torch.equal(back.indices, swapped.indices)
    assert back.source["fingerprint"] == swapped.source["fingerprint"]
    assert back.indices.shape[0] == sae_b.cfg.d_sae


@pytest.mark.parametrize("score", ["decoder_cosine", "cosine_sum", "cosine_density", "folded_mse"])
def test_links_recover_planted_partners(score):
    pair = planted_pair(d_sae=96, d_in=24, noise=0.05, seed=3)
    got = links(pair.sae_a, pair.sae_b, score=score, progress=False)
    assert float((got.top1 == pair.truth.indices).double().mean()) > 0.95


def test_confidence_separates_true_partners_from_chance():
    same = aligned_sae("jumprelu", 512, 1)
    other = aligned_sae("jumprelu", 512, 2)
    true_links = links(same, aligned_sae("jumprelu", 512, 1), progress=False)
    assert float(true_links.confidence[:, 0].min()) > 0.99
    chance = links(same, other, null_rate=0.01, progress=False)
    kept = float((chance.top1 >= 0).double().mean())
    assert 0.005 <= kept <= 0.02, kept
    assert torch.isnan(chance.scores[chance.top1 < 0]).all()
    assert chance.null_threshold is not None


def test_csls_null_features_join_the_neighbourhoods_real_features_join():
    """A real source feature is among the A-neighbours its target's r_B averages over; a null
    feature scored without joining them looks better than chance really is, and the csls null
    kept 0.1% instead of 1% of an unrelated SAE's features."""
    stack = load_suite_saes("jumprelu")
    unrelated = moment_matched_sae(stack[3], seed=5)
    lk = links(stack[2], unrelated, score="csls", null_rate=0.05, progress=False)
    assert 0.05 / 3 <= float((lk.top1 >= 0).double().mean()) <= 3 * 0.05


def test_null_rate_cuts_at_the_null_threshold_and_confidence_orders_links():
    stack = load_suite_saes("jumprelu")
    lk = links(stack[2], stack[3], score="cosine_density", k=2, null_rate=0.01, progress=False)
    kept = lk.indices >= 0
    assert bool((lk.scores[kept] > lk.null_threshold).all())
    assert bool((lk.confidence[kept] >= 0.99 - 1 / 2048 - 1e-6).all())  # n_null = 2048
    full = links(stack[2], stack[3], score="cosine_density", k=2, progress=False)
    assert torch.equal(full.confidence, lk.confidence)  # the cut does not change confidences
    assert bool((full.confidence[:, 0] >= full.confidence[:, 1]).all())


def test_sources_of_lists_every_source_linking_to_a_target_best_score_first():
    stack = load_suite_saes("jumprelu")
    lk = links(stack[2], stack[3], k=3, progress=False)
    hub = int(torch.mode(lk.top1).values)  # a target many sources link to
    for rank in (None, 0, 2):
        # a target many sources link to at that rank
        target = hub if rank is None else int(torch.mode(lk.indices[:, rank]).values)
        got = lk.sources_of(target, rank=rank)
        ranks = range(lk.k) if rank is None else [rank]
        expected = sorted((-float(lk.scores[i, r]), i, r) for i in range(lk.indices.shape[0])
                          for r in ranks if int(lk.indices[i, r]) == target)
        assert len(expected) >= 2
        assert got.indices.tolist() == [i for _, i, _ in expected]
        assert got.ranks.tolist() == [r for _, _, r in expected]
        assert got.scores.tolist() == pytest.approx([-s for s, _, _ in expected])
    unreached = sorted(set(range(int(stack[3].cfg.d_sae))) - set(lk.indices.flatten().tolist()))
    assert lk.sources_of(unreached[0]).indices.numel() == 0
    with pytest.raises(ValueError, match="0 <= target < "):
        lk.sources_of(int(stack[3].cfg.d_sae))
    with pytest.raises(ValueError, match="rank must be"):
        lk.sources_of(hub, rank=3)


def test_bad_arguments_are_clear_errors():
    sae_a, sae_b = build_sae("jumprelu", seed=1), build_sae("jumprelu", d_in=8, seed=2)
    with pytest.raises(ValueError, match="unknown link score"):
        links(sae_a, sae_a, score="nope")
    with pytest.raises(ValueError, match="k must be"):
        links(sae_a, sae_a, k=0)
    with pytest.raises(ValueError, match="null_rate"):
        links(sae_a, sae_a, null_rate=1.5)
    with pytest.raises(ValueError, match="d_in 16 vs 8"):
        links(sae_a, sae_b)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def pair_saes():
    return [random_jumprelu_sae("blocks.0.hook_resid_post", seed=1),
            random_jumprelu_sae("blocks.1.hook_resid_post", seed=2)]


def _fires(model, saes, tokens):
    _, cache = model.run_with_cache(tokens)
    out = []
    for sae in saes:
        h = cache[sae.cfg.metadata.hook_name][:, 1:]
        out.append((sae.encode(h) != 0).reshape(-1, sae.cfg.d_sae))
    return out


def test_coactivation_counts_and_reference_matchers_equal_direct_computation(model, pair_saes):
    tokens = tiny_tokens(n_seq=8)
    stats = coactivation_stats(model, *pair_saes, tokens, batch_size=3, progress=False)
    with torch.no_grad():
        fa, fb = _fires(model, pair_saes, tokens)
    both = (fa[:, :, None] & fb[:, None, :]).sum(0).double()
    union = (fa[:, :, None] | fb[:, None, :]).sum(0).double()
    jac = torch.where(union > 0, both / union.clamp_min(1), torch.zeros_like(both))
    assert stats.n_tokens == fa.shape[0]
    torch.testing.assert_close(stats.jaccard(), jac)
    best = best_partner(stats)
    fired = fa.sum(0) > 0
    torch.testing.assert_close(jac[fired, best[fired]], jac[fired].max(1).values)
    assert bool((best[~fired] == -1).all())
    perm = one_to_one(stats)
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(jac.numpy(), maximize=True)
    ok = perm.indices >= 0
    assert float(jac[ok, perm.indices[ok]].sum()) == pytest.approx(
        float(jac.numpy()[r, c][fired.numpy()[r]].sum()))


def test_evaluate_links_scores_unions_and_exposes_hubs(model, pair_saes):
    tokens = tiny_tokens(n_seq=8)
    lk = links(*pair_saes, k=3, progress=False)
    with torch.no_grad():
        fa, fb = _fires(model, pair_saes, tokens)
    dense = int(fb.sum(0).argmax())
    hub = torch.full((pair_saes[0].cfg.d_sae,), dense, dtype=torch.int64)
    table = evaluate_links(model, pair_saes, tokens, {"links": {(0, 1): lk},
                                                       "hub": {(0, 1): hub},
                                                       "perm": {(0, 1): match(*pair_saes,
                                                                              progress=False)}},
                           ks=(1, 3), min_fires=1, batch_size=3, progress=False)
    row = table[(table.method == "links") & (table.k == 3)].iloc[0]
    linked = fb[:, lk.indices].any(-1)  # [T, F_A]: any of the 3 targets fires
    both = (fa & linked).sum(0).double()
    union = (fa | linked).sum(0).double()
    active = fa.sum(0) >= 1
    assert row.jaccard == pytest.approx(float((both / union)[active].mean()))
    assert row.p_b_given_a == pytest.approx(float((both / fa.sum(0))[active].mean()))
    hub_row = table[table.method == "hub"].iloc[0]
    assert hub_row.distinct_targets == 1
    links_row = table[(table.method == "links") & (table.k == 1)].iloc[0]
    assert hub_row.p_b_given_a > links_row.p_b_given_a  # the densest target wins on P(B|A)
    hub_fires = fb[:, dense][:, None]
    hub_jaccard = ((fa & hub_fires).sum(0).double() / (fa | hub_fires).sum(0).double())[active]
    assert hub_row.jaccard == pytest.approx(float(hub_jaccard.mean()))
    assert hub_row.jaccard < hub_row.ceiling_best_partner
    assert set(table.method) == {"links", "hub", "perm"}
    assert (table.ceiling_best_partner >= table.jaccard - 1e-12).all()


def test_a_transition_from_one_to_one_links_substitutes_like_the_permutation(model):
    from sae_match_lens.flow.linking import Transition
    from sae_match_lens.lens.hooks import block_substitute

    sae_a = random_jumprelu_sae("blocks.0.hook_resid_post", seed=1)
    sae_b = random_jumprelu_sae("blocks.2.hook_resid_post", seed=2)
    result = match(sae_a, sae_b, progress=False)
    perm = result.permutation
    edges = torch.arange(perm.n_source)
    tr = Transition(edges, perm.indices, torch.ones(perm.n_source), perm.n_source, perm.n_target,
                    {"source": perm.source, "target": perm.target})
    h = torch.randn(2, 5, sae_a.cfg.d_in)
    for method in ("permute", "error_preserving"):
        for transfer in ("folded", "raw"):
            from sae_match_lens.lens.hooks import Substitution

            spec = Substitution(method, transfer)
            torch.testing.assert_close(block_substitute(sae_a, sae_b, tr, substitution=spec)(h),
                                       block_substitute(sae_a, sae_b, perm, substitution=spec)(h))


def test_a_many_to_one_transition_sums_the_folded_activations_linked_to_a_target():
    from sae_match_lens.adapters import fold
    from sae_match_lens.flow.linking import Transition
    from sae_match_lens.lens.hooks import block_substitute
    from sae_match_lens.permutation import ProvenanceError

    sae_a = random_jumprelu_sae("blocks.0.hook_resid_post", seed=1)
    sae_b = random_jumprelu_sae("blocks.2.hook_resid_post", seed=2)
    lk = links(sae_a, sae_b, k=2, progress=False)
    tr = Transition.from_links(lk)
    h = torch.randn(3, 4, sae_a.cfg.d_in)
    with torch.no_grad():
        f_A = fold(sae_a).encode(h)
        f_B = torch.zeros(*f_A.shape[:-1], sae_b.cfg.d_sae)
        for i in range(sae_a.cfg.d_sae):
            for j in lk.indices[i].tolist():
                f_B[..., j] += f_A[..., i]
        expected = fold(sae_b).decode(f_B)
        got = block_substitute(sae_a, sae_b, lk)(h)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tr.apply(f_A), f_B, rtol=1e-5, atol=1e-5)
    other = random_jumprelu_sae("blocks.1.hook_resid_post", seed=5)
    with pytest.raises(ProvenanceError, match="transition"):
        block_substitute(other, sae_b, lk)
    with pytest.raises(ValueError, match="hybrid"):
        block_substitute(sae_a, sae_b, lk, substitution="hybrid", cost_F=torch.zeros(64))


def test_transition_variants_in_evaluate_substitution_match_a_hand_built_transition(model):
    from sae_match_lens.evaluation import Variant, evaluate_substitution
    from sae_match_lens.lens.hooks import Substitution, substitute

    saes = [random_jumprelu_sae("blocks.0.hook_resid_post", seed=1),
            random_jumprelu_sae("blocks.2.hook_resid_post", seed=2)]
    tokens = tiny_tokens(n_seq=4)
    top3 = Variant("top3", Substitution("permute"), "links", "cosine_sum", 3)
    table = evaluate_substitution(model, saes, tokens, variants=["transition_decoder_cosine", top3,
                                                                 "identity"], progress=False)
    lk = links(*saes, k=3, score="cosine_sum", progress=False)
    with torch.no_grad():
        with substitute(model, *saes, lk):
            loss = model(tokens, return_type="loss", loss_per_token=True)[:, 1:].mean()
        clean = model(tokens, return_type="loss", loss_per_token=True)[:, 1:].mean()
    row = table[table.variant == "top3"].iloc[0]
    assert row.delta_ce == pytest.approx(float(loss - clean), abs=1e-5)
    assert row.permutation == "links" and row.n_matched == saes[0].cfg.d_sae
    assert set(table.variant) == {"transition_decoder_cosine", "top3", "identity"}


# --- the screened route: certified top-k against brute force ---------------------------------

def _structured(n_a, n_b, K, *, seed, gap=False, alpha=1.0, consts=False):
    """A top-k problem with real structure: coordinate energy decays (as in trained SAEs), B's
    first rows are noisy copies of A's rows (permuted), the rest unrelated; B also holds an exact
    duplicate of one of its rows and a near-duplicate (near ties). Returns the problem and its
    float64 brute-force score matrix."""
    from sae_match_lens.solvers.topk import TopKProblem

    gen = torch.Generator().manual_seed(seed)
    energy = torch.exp(-torch.arange(K, dtype=torch.float64) / (K / 6))
    a = torch.randn(n_a, K, generator=gen, dtype=torch.float64) * energy
    a /= a.norm(dim=1, keepdim=True)
    b = torch.randn(n_b, K, generator=gen, dtype=torch.float64) * energy
    n_pair = min(n_a, n_b - 2)
    perm = torch.randperm(n_pair, generator=gen)
    b[:n_pair] = a[perm] + 0.05 * torch.randn(n_pair, K, generator=gen, dtype=torch.float64)
    b /= b.norm(dim=1, keepdim=True)
    b[n_b - 1] = b[3]  # exact duplicate: ties broken by the lower index
    b[n_b - 2] = b[5] * (1 + 1e-4)  # near tie
    a, b = a.float(), b.float()
    kw = {}
    if consts:
        kw["p"] = torch.rand(n_a, generator=gen) * 0.3 - 0.1
        kw["q"] = torch.rand(n_b, generator=gen) * 0.3 - 0.1
    if gap:
        kw["g"] = 0.2 * torch.randn(n_a, generator=gen)
        kw["h"] = 0.2 * torch.randn(n_b, generator=gen)
    prob = TopKProblem(a, b, alpha, **kw)
    full = alpha * (a.double() @ b.double().T)
    if consts:
        full -= kw["p"].double()[:, None] + kw["q"].double()[None, :]
    if gap:
        full -= (kw["g"].double()[:, None] - kw["h"].double()[None, :]).abs()
    return prob, full.numpy()


def _assert_true_top_k(idx, val, full, k):
    """Returned links carry the true top-k scores, best first; where the true order is not
    within rounding of a tie, the indices are the brute-force ones (ties: lower index first)."""
    kk = min(k, full.shape[1])
    order = np.argsort(-full, axis=1, kind="stable")[:, :kk]
    best = np.take_along_axis(full, order, 1)
    chosen = np.take_along_axis(full, idx.numpy(), 1)
    np.testing.assert_allclose(chosen, best, rtol=0, atol=1e-6)
    np.testing.assert_allclose(val.numpy(), best, rtol=0, atol=1e-5)
    srt = -np.sort(-full, axis=1)
    nxt = srt[:, kk] if kk < full.shape[1] else np.full(len(full), -np.inf)
    gaps = np.diff(np.concatenate([srt[:, :kk], nxt[:, None]], 1), axis=1)
    clear = (np.abs(gaps) > 1e-6).all(axis=1)
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(idx.numpy()[clear], order[clear])


@pytest.mark.parametrize("gap", [False, True])
def test_the_chunked_row_selection_equals_a_full_selection(gap):
    """``screen_rows`` reads only the ``k`` chunks of columns with the smallest bounds. Without a
    gap its candidates and floor are a full selection's (the ``k`` smallest entries, the floor
    the largest of them); with one the floor stays below every pruned entry and is lower than a
    full selection's by at most the spread of ``h`` within a chunk."""
    from sae_match_lens.solvers.costs import StackedFeatures
    from sae_match_lens.solvers.screen import _chunk_width, make_screen, screen_block, screen_rows

    n_a, n_b, k = 60, 512, 5
    assert _chunk_width(n_b, k) == 32  # 16 chunks: the chunked path is the one under test
    a, b, ca, cb, g, h, cost = _gap_cost_problem(n_a, n_b, seed=8)
    screen = make_screen(StackedFeatures(a, ca), StackedFeatures(b, cb), 12, "float32",
                         torch.device("cpu"))
    cand = screen_rows(screen, n_a, n_b, k, gap=(g, h) if gap else None, block_rows=16,
                       progress=False)
    full = torch.cat([screen_block(screen, r0, min(n_a, r0 + 16))  # the same blocks' products
                      for r0 in range(0, n_a, 16)]).double()
    if not gap:
        kept = full.gather(1, cand.idx).sort(dim=1).values
        assert torch.equal(kept, full.sort(dim=1).values[:, :k])
        assert np.array_equal(cand.floor, kept[:, -1].numpy())
        return
    pruned = torch.ones(n_a, n_b, dtype=torch.bool).scatter_(1, cand.idx, False)
    # the entries' bounds: the floor must stay below them in the chunks it did not read too
    with_gap = full + (g.double()[:, None] - h.double()[None, :]).abs()
    for bound in (with_gap, cost):
        assert (cand.floor <= bound.masked_fill(~pruned, np.inf).amin(dim=1).numpy()).all()
    chunks_h = h.sort().values.view(16, 32)
    spread = float((chunks_h[:, -1] - chunks_h[:, 0]).max())
    kth = with_gap.sort(dim=1).values[:, k - 1].numpy()
    assert (cand.floor >= kth - spread - 1e-4).all()
    assert (cand.floor < kth - 1e-6).any()  # the chunk bounds did cut some floors


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_paired_columns_and_norm_bounds_match_the_full_paired_rows(scale):
    """The screen reads paired operands by columns (only those it keeps): the same values as the
    full paired rows, bit for bit, in any column order, and squared-norm bounds that are upper
    bounds of the rows the screen multiplies, within a few float32 roundings."""
    from sae_match_lens.solvers.topk import _Paired

    gen = torch.Generator().manual_seed(3)
    t = torch.randn(50, 2 * 24 + 5, generator=gen)
    paired = _Paired(t, 24, scale)
    full = paired[5:40]
    cols = torch.randperm(53, generator=gen)[:30]
    assert bool((cols < 24).any() and ((cols >= 24) & (cols < 48)).any() and (cols >= 48).any())
    assert torch.equal(paired.columns(5, 40, cols), full[:, cols])
    exact = full.double().square().sum(dim=1)
    bound = paired.norm_sq_upper(5, 40)
    assert bool((bound >= exact).all()) and bool((bound <= exact * (1 + 1e-5)).all())


@pytest.mark.parametrize(("k", "gap", "alpha", "consts"), [
    (1, False, 1.0, False), (3, False, 2.0, True), (5, True, 1.0, False), (2, True, 2.0, True)])
def test_screened_top_k_is_the_brute_force_top_k_and_the_screen_is_used(k, gap, alpha, consts):
    from sae_match_lens.solvers.topk import solve_topk

    prob, full = _structured(300, 420, 64, seed=k, gap=gap, alpha=alpha, consts=consts)
    idx, val, stats = solve_topk(prob, k, method="screened", screen_dims=24, keep=k + 15,
                             block_rows=64, progress=False, label="test")
    _assert_true_top_k(idx, val, full, k)
    assert stats["route"] == "screened" and stats["screen_dims"] == 24
    assert stats["rows_certified"] + stats["rows_rechecked"] + stats["rows_recomputed"] == 300
    assert stats["rows_recomputed"] < 300 // 2, stats  # most rows proven without a full row
    exact_idx, exact_val, exact_stats = solve_topk(prob, k, method="exact", screen_dims=24,
                                               keep=k + 15, block_rows=64, progress=False,
                                               label="test")
    assert exact_stats["route"] == "exact"
    _assert_true_top_k(exact_idx, exact_val, full, k)


def test_screened_rows_the_screen_cannot_prove_are_recomputed_exactly():
    from sae_match_lens.solvers.topk import solve_topk

    prob, full = _structured(200, 260, 64, seed=7, gap=True)
    idx, val, stats = solve_topk(prob, 3, method="screened", screen_dims=1, keep=3,
                             block_rows=50, progress=False, label="test")
    assert stats["rows_recomputed"] > 100  # a width-1 screen proves little
    _assert_true_top_k(idx, val, full, 3)


@pytest.mark.parametrize(("n_b", "m", "k", "gap"), [(420, 24, 3, True), (2000, 40, 5, False),
                                                   (2000, 24, 1, True)])
def test_rows_the_candidates_cannot_prove_are_rechecked_against_every_column_in_reach(
        n_b, m, k, gap):
    """With only ``k`` candidates no row is certified by its candidates; the recheck lists every
    column whose bound reaches the row's proven k-th score and finds the true top-k there."""
    from sae_match_lens.solvers.topk import solve_topk

    prob, full = _structured(400, n_b, 64, seed=k, gap=gap)
    idx, val, stats = solve_topk(prob, k, method="screened", screen_dims=m, keep=k, block_rows=64,
                             progress=False, label="test")
    assert stats["rows_certified"] + stats["rows_rechecked"] + stats["rows_recomputed"] == 400
    assert stats["rows_rechecked"] > 200, stats
    _assert_true_top_k(idx, val, full, k)


def _gap_cost_problem(n_a: int, n_b: int, *, seed: int):
    """Random rows (width 40) with mse constants and a gap ``g, h``, and their float64 cost
    ``c_a + c_b − 2a·b + |g − h|``."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n_a, 40, generator=gen), torch.randn(n_b, 40, generator=gen)
    ca, cb = a.double().square().sum(1), b.double().square().sum(1)
    g, h = torch.randn(n_a, generator=gen), torch.randn(n_b, generator=gen)
    cost = (ca[:, None] + cb[None, :] - 2 * a.double() @ b.double().T
            + (g.double()[:, None] - h.double()[None, :]).abs())
    return a, b, ca, cb, g, h, cost


def test_screen_rows_below_lists_every_column_whose_cost_reaches_the_limit():
    from sae_match_lens.solvers.costs import StackedFeatures
    from sae_match_lens.solvers.screen import make_screen, screen_rows_below

    a, b, ca, cb, g, h, cost = _gap_cost_problem(80, 300, seed=6)
    limits = torch.quantile(cost, 0.05, dim=1).float()  # about 15 columns per row reach it
    for m, max_cols in ((8, 300), (40, 60), (40, 10)):
        screen = make_screen(StackedFeatures(a, ca), StackedFeatures(b, cb), m, "float32",
                             torch.device("cpu"))
        found = screen_rows_below(screen, 80, 300, limits, max_cols=max_cols, gap=(g, h),
                                  block_rows=16)
        listed = found.counts <= max_cols
        assert (found.counts >= 15).all()
        assert listed.all() if max_cols > 15 else not listed.any()
        for i in np.flatnonzero(listed):
            cols = found.cols[i][found.cols[i] >= 0]
            assert len(cols) == found.counts[i] and torch.equal(cols, cols.sort().values)
            reach = torch.nonzero(cost[i] <= limits[i].double()).flatten()
            assert set(reach.tolist()) <= set(cols.tolist())  # nothing in reach left out
        assert (found.cols[~torch.from_numpy(listed)] == -1).all()
        if m == 40:  # the full-width bound is the cost less rounding: little beyond the limit
            assert (found.counts <= (cost <= limits.double()[:, None] + 1e-3).sum(1).numpy()).all()


def test_screened_top_k_with_k_at_least_the_targets_is_a_full_sort():
    from sae_match_lens.solvers.topk import solve_topk

    prob, full = _structured(40, 30, 32, seed=2, gap=True)
    idx, val, stats = solve_topk(prob, 35, method="screened", screen_dims=8, keep=35,
                             block_rows=16, progress=False, label="test")
    assert idx.shape == (40, 30)
    _assert_true_top_k(idx, val, full, 35)
    assert stats["rows_recomputed"] == 0  # nothing pruned: every row is certified


def test_exact_ties_are_taken_and_ordered_by_lower_index():
    from sae_match_lens.solvers.topk import _block_topk

    gen = torch.Generator().manual_seed(0)
    block = torch.randint(0, 4, (50, 23), generator=gen).float()  # many ties
    for kk in (1, 3, 22, 23):
        v, i = _block_topk(block, kk)
        ref = torch.sort(block, dim=1, descending=True, stable=True)
        assert torch.equal(i, ref.indices[:, :kk]) and torch.equal(v, ref.values[:, :kk])


def test_the_row_screen_floor_bounds_every_pruned_cost_with_the_gap():
    from sae_match_lens.solvers.costs import StackedFeatures
    from sae_match_lens.solvers.screen import make_screen, screen_rows

    a, b, ca, cb, g, h, cost = _gap_cost_problem(90, 70, seed=4)
    for m in (4, 40):
        screen = make_screen(StackedFeatures(a, ca), StackedFeatures(b, cb), m, "float32",
                             torch.device("cpu"))
        cand = screen_rows(screen, 90, 70, 6, gap=(g, h), block_rows=32, progress=False)
        pruned = torch.ones(90, 70, dtype=torch.bool).scatter_(1, cand.idx, False)
        lowest_pruned = cost.masked_fill(~pruned, np.inf).amin(dim=1).numpy()
        assert (cand.floor <= lowest_pruned).all()
        if m == 40:  # the full-width screen is the cost less a rounding allowance: tight
            sixth = cost.sort(dim=1).values[:, 5].numpy()
            assert (cand.floor >= sixth - 1e-4 * np.abs(sixth)).all()


@pytest.mark.parametrize(("k", "gap", "alpha", "consts"), [
    (1, True, 1.0, False), (4, False, 2.0, True), (2, True, 2.0, True)])
def test_paired_screen_is_exact_and_tighter_when_decoder_and_encoder_point_alike(
        k, gap, alpha, consts):
    """Scores over [decoder | encoder] blocks: the screen may work in the basis (u + v, u − v).
    The top-k stay the brute-force ones (any pairing is exact up to a rounding allowance), and
    when each feature's two blocks point alike (as trained SAEs' do) the same width proves
    more rows than the original basis."""
    from sae_match_lens.solvers.topk import TopKProblem, solve_topk

    half, _ = _structured(300, 420, 32, seed=10 + k)
    gen = torch.Generator().manual_seed(k)

    def blocks(x: torch.Tensor) -> torch.Tensor:
        enc = x + 0.15 * torch.randn(x.shape, generator=gen) / x.shape[1] ** 0.5
        return torch.cat([x, enc / enc.norm(dim=1, keepdim=True)], dim=1)

    a, b = blocks(half.a), blocks(half.b)
    kw = {}
    if consts:
        kw["p"], kw["q"] = torch.rand(300, generator=gen) * 0.3, torch.rand(420, generator=gen)
    if gap:
        kw["g"] = 0.2 * torch.randn(300, generator=gen)
        kw["h"] = 0.2 * torch.randn(420, generator=gen)
    full = alpha * (a.double() @ b.double().T)
    if consts:
        full -= kw["p"].double()[:, None] + kw["q"].double()[None, :]
    if gap:
        full -= (kw["g"].double()[:, None] - kw["h"].double()[None, :]).abs()
    full = full.numpy()
    certified = {}
    for pairs in (0, 32):
        prob = TopKProblem(a, b, alpha, pairs=pairs, **kw)
        idx, val, stats = solve_topk(prob, k, method="screened", screen_dims=6, keep=k + 15,
                                 block_rows=64, progress=False, label="test")
        _assert_true_top_k(idx, val, full, k)
        certified[pairs] = stats["rows_certified"]
    assert certified[32] > certified[0] + 30, certified


@pytest.mark.parametrize("score", SCORES)
def test_links_screened_route_equals_brute_force_on_planted_saes(score, caplog):
    pair = planted_pair(d_sae=160, d_in=24, noise=0.05, seed=5)
    with caplog.at_level("INFO", logger="sae_match_lens"):
        got = links(pair.sae_a, pair.sae_b, k=2, score=score, method="screened",
                    screen_dims=24, progress=False)
    full = _brute_scores(pair.sae_a, pair.sae_b, score)
    order = np.argsort(-full, axis=1, kind="stable")[:, :2]
    expected = np.take_along_axis(full, order, 1)
    chosen = np.take_along_axis(full, got.indices.numpy(), 1)
    np.testing.assert_allclose(chosen, expected, rtol=1e-4, atol=1e-4)
    route = got.route["links"]
    assert route["route"] == "screened" and route["rows_recomputed"] < 160
    assert "screened top-2" in caplog.text
    back = links(pair.sae_a, pair.sae_b, k=2, score=score, method="screened", screen_dims=24,
                 direction="backward", progress=False)
    chosen_back = np.take_along_axis(full.T, back.indices.numpy(), 1)
    np.testing.assert_allclose(chosen_back, -np.sort(-full.T, axis=1)[:, :2], rtol=1e-4,
                               atol=1e-4)


def test_small_problems_take_the_exact_route_and_say_so(caplog):
    sae_a, sae_b = build_sae("jumprelu", seed=1), build_sae("jumprelu", seed=2)
    with caplog.at_level("INFO", logger="sae_match_lens"):
        got = links(sae_a, sae_b, k=2, progress=False)
    assert got.route["links"]["route"] == "exact" and "exact top-2" in caplog.text


def test_progress_bar_can_be_turned_off(capsys, monkeypatch):
    sae_a, sae_b = build_sae("jumprelu", seed=1), build_sae("jumprelu", seed=2)
    monkeypatch.setattr("sae_match_lens.progress.PROGRESS_DELAY", 0.0)  # bars show at once
    links(sae_a, sae_b, method="screened", screen_dims=4, progress=False)
    assert capsys.readouterr().err == ""
    links(sae_a, sae_b, method="screened", screen_dims=4, progress=True)
    assert "screening candidates" in capsys.readouterr().err


def _same_links(a, b):
    for name in ("indices", "scores", "confidence"):
        assert torch.equal(getattr(a, name), getattr(b, name)) or (
            name == "scores" and torch.equal(getattr(a, name).isnan(), getattr(b, name).isnan())
            and torch.equal(getattr(a, name).nan_to_num(), getattr(b, name).nan_to_num())), name
    assert (a.score, a.source, a.target, a.null_threshold, a.options) == (
        b.score, b.source, b.target, b.null_threshold, b.options)


def test_links_save_then_load_gives_every_field_back(tmp_path):
    from sae_match_lens.flow.linking import Links

    sae_a = build_sae("jumprelu", seed=1)
    sae_b = build_sae("jumprelu", seed=2, hook_name="blocks.1.hook_resid_post")
    lk = links(sae_a, sae_b, k=3, null_rate=0.05, progress=False)
    assert (lk.indices == -1).any()  # the NaN scores of cut links survive too
    assert lk.save(tmp_path / "lk") == tmp_path / "lk"
    back = Links.load(tmp_path / "lk", source=sae_a, target=sae_b)
    _same_links(lk, back)
    assert back.route == lk.route
    lk.save(tmp_path / "lk")  # an earlier save is replaced whole
    _same_links(lk, Links.load(tmp_path / "lk"))


def test_links_load_refuses_other_saes_and_corrupt_or_foreign_directories(tmp_path):
    import json

    from sae_match_lens.flow.linking import Links, LinksFileError
    from sae_match_lens.permutation import ProvenanceError

    sae_a = build_sae("jumprelu", seed=1)
    sae_b = build_sae("jumprelu", seed=2, hook_name="blocks.1.hook_resid_post")
    path = links(sae_a, sae_b, k=2, progress=False).save(tmp_path / "lk")
    with pytest.raises(ProvenanceError, match="made for"):
        Links.load(path, source=sae_b, target=sae_a)
    match(sae_a, sae_b, progress=False).save(tmp_path / "match")
    with pytest.raises(LinksFileError, match=r"match.*links\.json"):
        Links.load(tmp_path / "match")
    with pytest.raises(LinksFileError, match=r"missing.*does not exist"):
        Links.load(tmp_path / "missing")
    record = json.loads((path / "links.json").read_text())
    record["fields"]["null_threshold"] = 0.5
    (path / "links.json").write_text(json.dumps(record))
    with pytest.raises(LinksFileError, match=r"lk: checksum mismatch"):
        Links.load(path)
    record["format_version"] = 99
    (path / "links.json").write_text(json.dumps(record))
    with pytest.raises(LinksFileError, match="upgrade sae_match_lens"):
        Links.load(path)
    with pytest.raises(FileExistsError):
        links(sae_a, sae_b, progress=False).save(tmp_path / "match")
