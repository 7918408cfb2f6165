"""The report's reading: one function per comparison, numbers in, one sentence out.

Nothing here is fixed text about a particular run. Every function takes the numbers of a
comparison (per layer pair where there are pairs), counts in how many pairs one side wins, loses
or is indistinguishable (:class:`Tolerance`), and writes the verdict those counts support,
including when the method loses and what the other measurements say about why.
:func:`reading` assembles them from a ``results.json``-shaped dict, so the reading can be rebuilt
from the saved results alone.

The tables carry no per-token variances, so "indistinguishable" is a fixed tolerance per
metric (:data:`DELTA_CE_TOL` and friends), stated in the report beside the verdicts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "AGREEMENT_TOL",
    "COACTIVATION_TOL",
    "DELTA_CE_TOL",
    "Tally",
    "Tolerance",
    "composition_verdict",
    "error_preserving_verdict",
    "folding_verdict",
    "headline",
    "hybrid_verdict",
    "identity_verdict",
    "null_fraction_verdict",
    "random_verdict",
    "reading",
    "sae_a_verdict",
    "sae_b_verdict",
    "scale_verdict",
    "tally",
    "unfolded_verdict",
]


class Tolerance(NamedTuple):
    """Two numbers are indistinguishable when they differ by at most
    ``max(absolute, relative · max(|a|, |b|))``."""

    absolute: float
    relative: float = 0.0

    def same(self, a: float, b: float) -> bool:
        return abs(a - b) <= max(self.absolute, self.relative * max(abs(a), abs(b)))

    def describe(self, unit: str = "") -> str:
        parts = [f"{self.absolute:g}{unit}"] + ([f"{100 * self.relative:g}%"] if self.relative else [])
        return parts[0] if len(parts) == 1 else f"max({', '.join(parts)})"


DELTA_CE_TOL = Tolerance(0.005, 0.03)
"""ΔCE (nats): 0.005 nats or 3% of the larger value."""
COACTIVATION_TOL = Tolerance(0.005, 0.01)
"""Co-activation P(B fires | A fires): 0.005 or 1%."""
AGREEMENT_TOL = Tolerance(0.01)
"""Fractions of features (agreement): one percentage point."""


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _mean(values: Sequence[Any]) -> float:
    kept = [float(v) for v in values if _finite(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _pct(x: float) -> str:
    if not _finite(x):
        return "n/a"
    value = 100 * x
    return f"{value:.2g}%" if 0 < abs(value) < 0.1 else f"{value:.1f}%"


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "n/a"


def _range_pct(values: Sequence[Any]) -> str:
    kept = [float(v) for v in values if _finite(v)]
    if len(kept) < 2 or _pct(min(kept)) == _pct(max(kept)):
        return ""
    return f" ({_pct(min(kept))}–{_pct(max(kept))} per pair)"


class Tally(NamedTuple):
    """How a subject compares with another over the pairs where both were measured."""

    wins: int
    """Pairs where the subject is better by more than the tolerance."""
    losses: int
    """Pairs where it is worse by more than the tolerance."""
    ties: int
    """Pairs within the tolerance."""
    mean_subject: float
    """The subject's mean over the counted pairs."""
    mean_other: float
    """The other's mean over the counted pairs."""

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def outcome(self) -> str:
        """``"wins"``, ``"loses"``, ``"ties"``, ``"mixed"`` or ``"none"`` (nothing measured).

        ``wins``: better in more pairs than it ties and worse in none (``loses`` likewise).
        ``ties``: otherwise, when at least half of the pairs are ties. ``mixed``: both wins and
        losses, together outnumbering the ties.
        """
        if self.n == 0:
            return "none"
        if self.losses == 0 and self.wins > self.ties:
            return "wins"
        if self.wins == 0 and self.losses > self.ties:
            return "loses"
        if self.ties >= self.wins + self.losses:
            return "ties"
        return "mixed"


def tally(subject: Sequence[Any], other: Sequence[Any], *, tol: Tolerance,
          lower_is_better: bool = True) -> Tally:
    """Count per pair whether ``subject`` beats, loses to or ties ``other``; pairs where either
    value is missing (None, NaN, inf) are left out."""
    if len(subject) != len(other):
        raise ValueError(f"tally needs one value per pair on both sides, got {len(subject)} and "
                         f"{len(other)}.")
    wins = losses = ties = 0
    kept_s, kept_o = [], []
    for s, o in zip(subject, other, strict=True):
        if not (_finite(s) and _finite(o)):
            continue
        kept_s.append(float(s))
        kept_o.append(float(o))
        if tol.same(s, o):
            ties += 1
        elif (s < o) == lower_is_better:
            wins += 1
        else:
            losses += 1
    return Tally(wins, losses, ties, _mean(kept_s), _mean(kept_o))


def _counts(t: Tally, verb_win: str, verb_lose: str, other: str, over: str = "pairs") -> str:
    if t.outcome == "ties":
        decided = [f"{word} in {k}" for word, k in (("better", t.wins), ("worse", t.losses)) if k]
        extra = f" ({', '.join(decided)})" if decided else ""
        return f"is indistinguishable from {other} in {t.ties} of {t.n} {over}{extra}"
    if t.outcome == "wins":
        extra = f" and is indistinguishable in {t.ties}" if t.ties else ""
        return f"{verb_win} {other} in {t.wins} of {t.n} {over}{extra}"
    if t.outcome == "loses":
        extra = f" and is indistinguishable in {t.ties}" if t.ties else ""
        return f"{verb_lose} {other} in {t.losses} of {t.n} {over}{extra}"
    return (f"is mixed against {other}: better in {t.wins}, worse in {t.losses} and "
            f"indistinguishable in {t.ties} of {t.n} {over}")


def compare(subject: str, other: str, t: Tally, *, metric: str = "ΔCE", unit: str = " nats",
            verbs: tuple[str, str] = ("beats", "loses to"), over: str = "pairs") -> str:
    """``"<subject> loses to <other> in 5 of 5 pairs, mean ΔCE 0.147 vs 0.035 nats"``."""
    if t.outcome == "none":
        return f"{subject} vs {other}: not measured"
    metric = f" {metric}" if metric else ""
    return (f"{subject} {_counts(t, verbs[0], verbs[1], other, over)}, mean{metric} "
            f"{_num(t.mean_subject)} vs {_num(t.mean_other)}{unit}")


def headline(method_ce: float, method_ev: float, vs_identity: Tally) -> str:
    """The first sentence: what one substituted block costs, and whether that beats skipping it."""
    text = (f"Replacing one block by encode→permute→decode (the method, folded) costs "
            f"{_num(method_ce)} nats ΔCE on average (EV {_num(method_ev)})")
    t, drop = vs_identity, f"{_num(vs_identity.mean_other)} nats"
    verdict = {
        "none": "",
        "wins": f", less than simply dropping the block ({drop}; better in {t.wins} of {t.n} pairs)",
        "loses": f", more than simply dropping the block ({drop}; worse in {t.losses} of {t.n} pairs)",
        "ties": f", indistinguishable from simply dropping the block ({drop}; within noise in "
                f"{t.ties} of {t.n} pairs)",
        "mixed": f", against {drop} for simply dropping the block (better in {t.wins}, worse in "
                 f"{t.losses}, indistinguishable in {t.ties} of {t.n} pairs)",
    }
    return text + verdict[t.outcome] + "."


def identity_verdict(vs_identity: Tally, sae_b_vs_identity: Tally, ep_vs_identity: Tally) -> str:
    """Method vs dropping the block, and what explains a loss: SAE B's reconstruction of the true
    state (only reconstruction error) and the error-preserving substitute (only matching error),
    each against dropping the block."""
    text = compare("The method", "dropping the block (identity)", vs_identity)
    if vs_identity.outcome in ("wins", "none"):
        return text + "."
    reasons = []
    b = sae_b_vs_identity
    costs = f"{_num(b.mean_subject)} vs {_num(b.mean_other)} nats"
    if b.n and b.losses > b.wins:
        reasons.append(
            f"SAE B's reconstruction of the true state, which carries nothing but reconstruction "
            f"error, already costs more than dropping the block in {b.losses} of {b.n} pairs "
            f"({costs}): on this model an SAE's reconstruction error costs more than skipping a "
            "whole block, so any substitute that goes through the SAEs starts behind")
    elif b.n and b.wins > b.losses:
        reasons.append(
            f"SAE B's reconstruction of the true state costs less than dropping the block "
            f"({costs}; better in {b.wins} of {b.n} pairs), so reconstruction error alone does "
            "not explain the loss")
    elif b.n:
        reasons.append(
            f"SAE B's reconstruction of the true state costs about as much as dropping the block "
            f"({costs}), so reconstruction error alone uses up the whole margin")
    e = ep_vs_identity
    if e.n and e.losses > e.wins:
        reasons.append(
            f"even with SAE A's reconstruction error carried across (error-preserving, "
            f"{_num(e.mean_subject)} nats) the substitute loses in {e.losses} of {e.n} pairs, so "
            "the matching error alone also exceeds the cost of skipping the block")
    elif e.n:
        reasons.append(
            f"with SAE A's reconstruction error carried across (error-preserving, "
            f"{_num(e.mean_subject)} nats) the substitute "
            f"{_counts(e, 'beats', 'loses to', 'dropping the block')}, so the loss comes from "
            "SAE A's reconstruction error, not from the matching")
    return text + (": " + "; ".join(reasons) + "." if reasons else ".")


def sae_b_verdict(t: Tally) -> str:
    """Method vs SAE B's reconstruction of the true state (the same dictionary, B's own codes)."""
    text = compare("The method", "SAE B's reconstruction of the true state", t)
    if t.outcome in ("loses", "mixed"):
        return (text + ": SAE B decoding the codes it would itself assign is the reference for "
                "anything decoded through B's dictionary, and the permuted codes of A fall short "
                f"of it by {_num(t.mean_subject - t.mean_other)} nats on average.")
    if t.outcome == "wins":
        return text + ": the permuted codes of A decode better than B's own codes of the true state."
    return text + "."


def sae_a_verdict(t: Tally) -> str:
    """Method vs SAE A's reconstruction used as the state at B (the same codes, A's dictionary)."""
    text = compare("The method", "SAE A's reconstruction used at B", t)
    if t.outcome in ("loses", "mixed"):
        return (text + ": decoding A's codes with B's dictionary through the matching is worse "
                "than keeping A's own decoder, so the error of moving the codes outweighs what B's "
                "dictionary gains for the skipped block.")
    if t.outcome == "wins":
        return text + ": moving A's codes into B's dictionary recovers part of what the block adds."
    return text + ": moving the codes into B's dictionary neither helps nor hurts."


def random_verdict(t: Tally) -> str:
    """Method vs a random one-to-one permutation (chance)."""
    text = compare("The method", "a random permutation", t)
    if t.outcome == "wins":
        return text + ": the matches carry real information about which feature is which."
    return text + ": the matches are no better than chance at carrying the state across."


def unfolded_verdict(t: Tally) -> str:
    """Method (folded matching) vs the same substitute with a permutation matched unfolded."""
    text = compare("The method", "the same substitute with unfolded matching", t)
    tail = {"ties": f": folding {'does not change' if t.ties == t.n else 'barely changes'} what "
                    "the substitution costs here.",
            "wins": ": folding before matching pays off.",
            "loses": ": folding before matching hurts here.",
            "mixed": ": folding helps in some pairs and hurts in others.", "none": "."}
    return text + tail[t.outcome]


def error_preserving_verdict(ep_vs_method: Tally) -> str:
    """Error-preserving (A's reconstruction error carried across) vs the method: the split of
    the method's ΔCE into SAE A's reconstruction error and the matching error."""
    if ep_vs_method.outcome == "none":
        return "The error-preserving substitute was not measured."
    text = compare("The error-preserving substitute (h_A − A.decode(f_A) + B.decode(P f_A))",
                   "the method", ep_vs_method)
    ep, method = ep_vs_method.mean_subject, ep_vs_method.mean_other
    if ep_vs_method.outcome == "wins":
        return (text + f": what is left, {_num(ep)} nats, is the matching error (moving A's "
                f"features into B's dictionary); the other {_num(method - ep)} nats of the method's "
                "ΔCE come from SAE A's reconstruction error.")
    if ep_vs_method.outcome == "ties":
        return (text + ": carrying SAE A's reconstruction error across changes nothing, so the "
                "method's ΔCE is matching error.")
    if ep_vs_method.outcome == "loses":
        return (text + ": adding SAE A's reconstruction error back makes the substitute worse, so "
                "the reconstruction error and the matching error do not add up here; the split "
                "is not additive.")
    return text + ": the split between reconstruction and matching error differs between pairs."


def hybrid_verdict(hybrid_vs_method: Tally) -> str:
    """Hybrid (cheapest matches through P, the rest by A's own decoder) vs the method."""
    text = compare("The hybrid substitute (cheapest matches through P, the rest by A's own "
                   "decoder)", "the method", hybrid_vs_method)
    tail = {"wins": ": the costlier matches do more harm than good, so a match-cost cut helps.",
            "loses": ": even the costlier matches help more than A's own decoder would.",
            "ties": ": which features go through P makes no difference.",
            "mixed": ": whether the costlier matches help depends on the pair.", "none": "."}
    return text + tail[hybrid_vs_method.outcome]


def folding_verdict(agreements: Sequence[Any], coact_folded: Sequence[Any],
                    coact_unfolded: Sequence[Any]) -> str:
    """How many adjacent matches folding changed, and whether the changed ones co-fire better."""
    agree = _mean(agreements)
    if not _finite(agree):
        return "Folded and unfolded matches were not compared."
    changed = 1 - agree
    if changed <= AGREEMENT_TOL.absolute:
        text = f"Folding changed {_pct(changed)} of the adjacent matches: folded and unfolded matching agree"
    else:
        spread = _range_pct([1 - a for a in agreements if _finite(a)])
        text = f"Folding changed {_pct(changed)} of the adjacent matches{spread}"
    t = tally(coact_folded, coact_unfolded, tol=COACTIVATION_TOL, lower_is_better=False)
    if t.outcome == "none":
        return text + "."
    co = compare("co-activation of folded matches on held-out text", "unfolded", t, metric="",
                 unit="", verbs=("is higher than", "is lower than"))
    if changed > AGREEMENT_TOL.absolute and t.outcome == "ties":
        co += ", so the partners folding picks instead are no better or worse on data"
    return f"{text}; {co}."


def null_fraction_verdict(fractions: Sequence[Any], null_rate: float | None,
                          coact_method: float, coact_random: float) -> str:
    """How many matches beat the data-free null threshold, and what that means."""
    frac = _mean(fractions)
    if not _finite(frac):
        return "No data-free null threshold was computed."
    rate = "the null model's threshold"
    if _finite(null_rate):
        rate = f"the cost a chance partner beats for {100 * null_rate:.3g}% of A's features"
    text = (f"{_pct(frac)} of adjacent matches{_range_pct(fractions)} are cheaper than the data-free "
            f"null threshold ({rate})")
    if frac < 0.1:
        verdict = "few matches are individually certain from parameters alone"
    elif frac < 0.5:
        verdict = "a minority of matches is individually certain from parameters alone"
    elif frac < 0.9:
        verdict = "most matches are individually distinguishable from chance"
    else:
        verdict = "nearly every match is individually distinguishable from chance"
    data = ""
    if _finite(coact_method) and _finite(coact_random):
        if coact_method > 2 * coact_random:
            joiner = ", even though" if frac < 0.5 else ", and"
            data = (f"{joiner} matched features co-fire far above chance on held-out text "
                    f"({_num(coact_method)} vs {_num(coact_random)} for random pairs)")
        else:
            data = (f"; on held-out text matched features co-fire little more than random pairs "
                    f"({_num(coact_method)} vs {_num(coact_random)})")
    return f"{text}: {verdict}{data}."


def composition_verdict(distances: Sequence[int], agreement: Sequence[Any],
                        agreement_unfolded: Sequence[Any], chance: float | None) -> str:
    """Composed vs direct matches per distance, against chance and folded vs unfolded."""
    rows = [(int(d), float(a)) for d, a in zip(distances, agreement, strict=True) if _finite(a)]
    if not rows:
        return "Composed and direct matches were not compared."
    parts = ", ".join(f"{_pct(a)} at distance {d}" for d, a in rows)
    text = f"Composed and direct matches agree on {parts}"
    if _finite(chance):
        text += f" (chance: {_pct(chance)})"
    worst = min(a for _, a in rows)
    best = max(a for _, a in rows)
    if _finite(chance) and best <= 2 * chance:
        verdict = "composition is no better than chance at predicting the direct match"
    elif worst >= 0.9:
        verdict = "composing adjacent matches reproduces direct matching"
    elif worst >= 0.5:
        verdict = "composition reproduces direct matching for most features"
    elif best >= 0.5:
        verdict = "composition reproduces direct matching for most features at short distance only"
    else:
        verdict = ("composition reproduces direct matching only for a minority of features, far "
                   "above chance" if _finite(chance) and worst > 2 * chance else
                   "composition reproduces direct matching only for a minority of features")
    values = [a for _, a in rows]
    if len(values) > 1 and all(x > y for x, y in itertools.pairwise(values)):
        verdict += ", and less the further apart the layers are"
    t = tally(agreement, agreement_unfolded, tol=AGREEMENT_TOL, lower_is_better=False)
    tail = "" if t.outcome == "none" else (
        "; " + compare("folded", "unfolded matching", t, metric="agreement", unit="",
                       verbs=("agrees more than", "agrees less than"), over="distances"))
    return f"{text}: {verdict}{tail}."


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    if n < 3:
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sx = math.sqrt(sum((v - mx) ** 2 for v in x))
    sy = math.sqrt(sum((v - my) ** 2 for v in y))
    if sx == 0 or sy == 0:
        return math.nan
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / (sx * sy)


def _short(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def _tracks(scale: Sequence[Any], norm: Sequence[float]) -> tuple[str, str]:
    """How ``scale`` follows ``norm`` across layers, and ``"a→b (×g, r = …)"``.

    ``"tracks"``: correlation across layers r ≥ 0.8 and ``log(growth of scale) / log(growth of
    norm)`` in [0.5, 2] (growth = last / first); ``"less"`` / ``"more"``: r ≥ 0.8 but growing
    less than half / more than twice as much in log terms; ``"unrelated"``: r < 0.8 (or
    undefined); ``"missing"``: a value is missing or not positive."""
    if not all(_finite(v) and v > 0 for v in scale):
        return "missing", "n/a"
    values = [float(v) for v in scale]
    g_s, g_n = values[-1] / values[0], norm[-1] / norm[0]
    r = _pearson(values, norm)
    desc = f"{_short(values[0])}→{_short(values[-1])} (×{g_s:.2f}, r = {_num(r, 2)})"
    ratio = math.log(g_s) / math.log(g_n) if abs(math.log(g_n)) > 1e-9 else math.nan
    if not (_finite(r) and r >= 0.8 and _finite(ratio)):
        return "unrelated", desc
    if ratio < 0.5:
        return "less", desc
    return ("more" if ratio > 2.0 else "tracks"), desc


_HOW = {"tracks": "tracks the norm", "less": "rises in step with the norm but grows far less",
        "more": "rises in step with the norm but grows far more",
        "unrelated": "does not move with the norm", "missing": "was not measured"}


def scale_verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paper's Figure 1 premise: does the per-feature scale the fold divides by (JumpReLU θ)
    grow with the residual-stream norm across layers, or does the scale sit in the decoder norms
    or in the activations?

    ``rows``: one per SAE, in layer order, with ``mean_resid_norm``, ``mean_decoder_norm``,
    ``mean_threshold`` (None when the SAE has no threshold), ``mean_firing_activation``
    (optional), ``mean_fold_scale``, ``fold_scale_cv`` and ``fold_rule``. r is the correlation
    across layers with the residual norm.
    """
    rows = [r for r in rows if _finite(r.get("mean_resid_norm")) and r["mean_resid_norm"] > 0]
    if len(rows) < 2:
        return "Too few layers to say whether the SAEs' scale tracks the residual-stream norm."
    norm = [float(r["mean_resid_norm"]) for r in rows]
    g_n = norm[-1] / norm[0]
    text = (f"Across layers the residual-stream norm at the SAEs' hooks goes {_short(norm[0])}→"
            f"{_short(norm[-1])} (×{g_n:.2f})")
    if abs(math.log(g_n)) < math.log(1.1):
        return (text + ": it hardly grows, so there is no layer-to-layer growth for θ or the "
                "decoder norms to track.")
    dec_how, dec_desc = _tracks([r.get("mean_decoder_norm") for r in rows], norm)
    act_how, act_desc = _tracks([r.get("mean_firing_activation") for r in rows], norm)
    rule = str(rows[0].get("fold_rule", ""))
    thetas = [r.get("mean_threshold") for r in rows]
    if all(_finite(t) and t > 0 for t in thetas):
        theta_how, theta_desc = _tracks(thetas, norm)
        text += f", the mean JumpReLU threshold θ {theta_desc}: θ {_HOW[theta_how]}"
        if theta_how == "tracks":
            return (text + " (the paper's Figure 1 premise holds), so folding by θ removes a scale "
                    "that differs between layers.")
        text += ", so the Figure 1 premise does not hold here"
        if dec_how == "tracks":
            return (text + f"; the mean decoder-row norm tracks it instead, {dec_desc}: the scale "
                    "sits in the decoder norms, and folding by θ has no layer-to-layer growth to "
                    "undo.")
        if act_how == "tracks":
            return (text + f"; the mean firing activation tracks it instead, {act_desc}: the scale "
                    "sits in the activations, and folding by θ leaves it there.")
        return (text + f"; neither the mean decoder-row norm ({dec_desc}) nor the mean firing "
                f"activation ({act_desc}) tracks it.")
    unit = [r for r in rows if _finite(r.get("mean_fold_scale")) and _finite(r.get("fold_scale_cv"))
            and abs(r["mean_fold_scale"] - 1) < 1e-3 and r["fold_scale_cv"] < 1e-3]
    fold = {"decoder_norm": "the fold uses the decoder-row norm (s = 1/‖W_dec[i]‖)",
            "none": "the fold leaves these SAEs as they are (s = 1)"}.get(rule, f"the fold rule is {rule!r}")
    if rule == "decoder_norm" and len(unit) == len(rows):
        fold += ", and the decoder rows are unit-norm, so s = 1 and the fold changes nothing"
    text = (f"These SAEs have no threshold θ; {fold}. {text}, the mean decoder-row norm "
            f"{dec_desc}: it {_HOW[dec_how]}")
    if dec_how == "tracks":
        removes = {"decoder_norm": ", and the fold removes it",
                   "none": ", and the fold leaves it in place"}.get(rule, "")
        return text + f", so the scale sits in the decoder norms{removes}."
    if act_how == "tracks":
        kept = ", which the fold leaves in place" if rule == "none" or len(unit) == len(rows) else ""
        return (text + f"; the mean firing activation tracks it instead, {act_desc}: the scale "
                f"sits in the activations{kept}.")
    return text + f"; nor does the mean firing activation ({act_desc})."


def _per_pair(substitution: Sequence[Mapping[str, Any]], variant: str, column: str,
              pairs: Sequence[tuple[Any, Any]]) -> list[Any]:
    by_pair = {(r["layer_a"], r["layer_b"]): r.get(column) for r in substitution if r["variant"] == variant}
    return [by_pair.get(p) for p in pairs]


def reading(results: Mapping[str, Any]) -> list[str]:
    """Every verdict of the report, computed from a ``results.json``-shaped dict.

    Uses ``substitution`` (rows with ``layer_a``, ``layer_b``, ``variant``, ``delta_ce``,
    ``explained_variance``, ``coactivation``), ``adjacent``, ``composition_by_distance``,
    ``scales`` (optional), ``setting.d_sae`` and ``null_rate`` (optional).
    """
    sub = results.get("substitution", [])
    pairs = list(dict.fromkeys((r["layer_a"], r["layer_b"]) for r in sub))

    def ce(variant: str) -> list[Any]:
        return _per_pair(sub, variant, "delta_ce", pairs)

    def vs(subject: str, other: str) -> Tally:
        return tally(ce(subject), ce(other), tol=DELTA_CE_TOL)

    method = "folded"
    sentences = [
        headline(_mean(ce(method)), _mean(_per_pair(sub, method, "explained_variance", pairs)),
                 vs(method, "identity")),
        identity_verdict(vs(method, "identity"), vs("sae_b_reconstruction", "identity"),
                         vs("error_preserving", "identity")),
        sae_b_verdict(vs(method, "sae_b_reconstruction")),
        sae_a_verdict(vs(method, "sae_a_reconstruction")),
        random_verdict(vs(method, "random_permutation")),
        unfolded_verdict(vs(method, "unfolded_matching")),
        error_preserving_verdict(vs("error_preserving", method)),
        hybrid_verdict(vs("hybrid", method)),
    ]
    adjacent = results.get("adjacent", [])
    sentences.append(folding_verdict([a.get("agreement_folded_unfolded") for a in adjacent],
                                     [a.get("coactivation_folded") for a in adjacent],
                                     [a.get("coactivation_unfolded") for a in adjacent]))
    if results.get("scales"):
        sentences.append(scale_verdict(results["scales"]))
    sentences.append(null_fraction_verdict(
        [a.get("fraction_below_null_threshold") for a in adjacent], results.get("null_rate"),
        _mean(_per_pair(sub, method, "coactivation", pairs)),
        _mean(_per_pair(sub, "random_permutation", "coactivation", pairs))))
    by_distance = results.get("composition_by_distance", [])
    d_sae = results.get("setting", {}).get("d_sae")
    sentences.append(composition_verdict(
        [r["distance"] for r in by_distance], [r.get("agreement") for r in by_distance],
        [r.get("agreement_unfolded") for r in by_distance],
        1 / d_sae if _finite(d_sae) and d_sae > 0 else None))
    return sentences
