"""The package's words for its recurring concepts, defined once (README, "Glossary").

* *score*: a link similarity, higher is better (:data:`SCORES`; ``folded_mse`` is the negated
  folded matching cost, so that it too is higher-is-better);
* *cost*: a matching cost, lower is better (:func:`~sae_match_lens.matching.match`'s ``metric``);
* *route*: how a computation runs, never what it answers: a solver's (:data:`ROUTES`) or the
  model's (TransformerLens hooks or nnsight, :mod:`sae_match_lens.lens.routes`);
* *variant*: what a substitution computes (:class:`~sae_match_lens.evaluation.Variant`);
* *module*: which output an SAE reads (:data:`MODULES`);
* *feature key*: a feature's name, ``"L/module/F"`` (e.g. ``"3/res/17"``;
  :meth:`~sae_match_lens.flow.graph.FlowGraph.node_id`).

Standard library only, so that the command line's ``--help`` can name the defaults.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["DEFAULT_LINK_SCORE", "MODULES", "ROUTES", "SCORES", "LinkScore", "Module", "Route"]

LinkScore = Literal["decoder_cosine", "folded_mse", "cosine_sum", "csls", "cosine_density"]
SCORES: tuple[str, ...] = ("decoder_cosine", "folded_mse", "cosine_sum", "csls", "cosine_density")
"""The link scores (:func:`~sae_match_lens.flow.linking.links`), all higher-is-better."""

DEFAULT_LINK_SCORE: LinkScore = "decoder_cosine"
"""The link score every function that links uses by default
(:func:`~sae_match_lens.flow.linking.links`, the flow graph's predecessors, persistence and
origin groups, flow plans, the results store's flow graphs, the evaluation's link variants, the
command line). One constant, so that ``links(a, b).top1`` is
the partner the flow graph follows.

Decoder cosine (Feature Flow's score), chosen on evidence (``benchmarks/validate_suite.py``,
docs "Suites"): a reading replaces it only if it beats it by more than 1% of the best-partner
ceiling on every kind of pair of the selection part (every pair of the default suite, the first
half of each kind's layers on the SmolLM2 suite). None did: ``cosine_density`` wins on the
toy default suite but loses on the real residual pairs, and no encoder, density or
virtual-weight reading beat decoder cosine across modules. The flow thresholds (0.5, 0.15)
are in its units, as in the paper."""

Route = Literal["auto", "exact", "screened"]
ROUTES: tuple[str, ...] = ("auto", "exact", "screened")
"""How the top-k of links is found: every pair, the certified screen, or chosen by size."""

Module = Literal["res", "mlp", "attn"]
MODULES: tuple[str, ...] = ("res", "mlp", "attn")
"""The outputs an SAE of a layer reads: the residual stream, the MLP's and the attention's."""

