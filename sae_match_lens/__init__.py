"""sae_match_lens: data-free matching of SAE features across transformer layers (SAE Match).

See README.md for the method, conventions and examples.

Public names are re-exported lazily (PEP 562): ``import sae_match_lens`` is cheap, and a name's
submodule (with torch, SAELens and TransformerLens behind it) is imported on first access, so
``sae-match --help`` answers without loading them. To export a new name, add one line to
``_EXPORTS``: ``"name": "submodule"``. Submodules are also reachable as attributes
(``sae_match_lens.evaluation``). Modules moved in 0.3 stay importable under their old paths
with a ``DeprecationWarning`` (:mod:`sae_match_lens.compat`).
"""

import importlib
import os
from typing import Any

# Idle OpenMP threads yield instead of spinning (must be set before torch is imported): with
# few cores, spinning threads slow torch several-fold whenever another process uses a core.
# Only a default; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .compat import install_moved_module_finder

install_moved_module_finder()

_EXPORTS: dict[str, str] = {
    "ARCHITECTURES": "adapters",
    "DEFAULT_VARIANTS": "evaluation",
    "METHODS": "lens.hooks",
    "RESULT_COLUMNS": "evaluation",
    "VARIANTS": "evaluation",
    "ChainFileError": "chain",
    "ChainMatch": "chain",
    "CompositionCheck": "chain",
    "CostWeights": "solvers.costs",
    "FeaturePath": "chain",
    "FeatureStep": "chain",
    "FeatureView": "adapters",
    "MatchResult": "matching",
    "Method": "lens.hooks",
    "Permutation": "permutation",
    "PermutationFileError": "permutation",
    "PlantedChain": "synthetic",
    "Substitution": "lens.hooks",
    "SUBSTITUTIONS": "lens.hooks",
    "Transfer": "lens.hooks",
    "Variant": "evaluation",
    "compare_composed_direct": "chain",
    "describe_sae": "adapters",
    "evaluate_substitution": "evaluation",
    "feature_view": "adapters",
    "fold": "adapters",
    "fold_scales": "adapters",
    "hook_name_of": "adapters",
    "load_default_suite": "assets",
    "load_eval_tokens": "assets",
    "load_manifest": "assets",
    "match": "matching",
    "match_chain": "chain",
    "model_layer_of": "adapters",
    "null_max_cost": "matching",
    "pair_costs": "evaluation",
    "planted_chain": "synthetic",
    "rescale": "adapters",
    "run_skipping": "lens.hooks",
    "sae_identity": "adapters",
    "substitute": "lens.hooks",
    "substitution_hooks": "lens.hooks",
    "unfold": "adapters",
    "validate_sae": "adapters",
    "BOS_POLICIES": "lens.routes",
    "ProvenanceError": "permutation",
    "folded_activation_factor": "adapters",
    "null_costs": "matching",
    "Map": "lens.hooks",
    "SCORES": "flow.linking",
    "Links": "flow.linking",
    "Transition": "flow.linking",
    "links": "flow.linking",
    "CoactivationStats": "flow.coactivation",
    "coactivation_stats": "flow.coactivation",
    "best_partner": "flow.coactivation",
    "one_to_one": "flow.coactivation",
    "evaluate_links": "flow.coactivation",
    "LayerSAEs": "flow.graph",
    "FlowGraph": "flow.graph",
    "ORIGIN_GROUPS": "flow.graph",
    "predecessors": "flow.graph",
    "origin_groups": "flow.graph",
    "flow_graph": "flow.graph",
    "persistence": "flow.graph",
    "causal_check": "flow.causal",
    "write_html": "report.viewer",
    "top_activating_tokens": "report.viewer",
    "MatchResultFileError": "matching",
    "load_match_result": "matching",
    "ReleaseSAE": "releases",
    "HubUnavailableError": "releases",
    "release_saes": "releases",
    "resolve_release": "releases",
    "load_release_saes": "releases",
    "load_release_stack": "releases",
    "load_module_stack": "releases",
    "load_release_model": "releases",
    "feature_url": "neuronpedia",
    "explanations": "neuronpedia",
    "load_suite_stack": "assets",
    "load_suite_saes": "assets",
    "ModuleSite": "lens.nnsight",
    "NNsightRoute": "lens.nnsight",
    "StateEdit": "lens.nnsight",
    "edit_states": "lens.nnsight",
    "evaluate_substitution_nnsight": "evaluation",
    "substitute_nnsight": "lens.nnsight",
    "RescaleFeatures": "lens.steering",
    "AddDirection": "lens.steering",
    "Schedule": "lens.steering",
    "steer": "lens.steering",
    "steering_hooks": "lens.steering",
    "flow_interventions": "lens.steering",
    "generate_steered": "lens.steering",
    "proxy_scores": "judging.steering_scores",
    "steering_sweep": "judging.steering_scores",
    "Judge": "judging.judge",
    "ChatJudge": "judging.judge",
    "ScriptedJudge": "judging.judge",
    "semantic_evaluation": "judging.semantic",
    "SAERef": "batch.plan",
    "PairJob": "batch.plan",
    "BatchReport": "batch.runs",
    "batch_match": "batch.runs",
    "plan_pairs": "batch.plan",
    "plan_from_release": "batch.plan",
    "load_plan": "batch.plan",
    "plan_flow": "batch.plan",
    "ResultStore": "batch.store",
    "StoreError": "batch.store",
}
"""Each public name → the submodule that defines it."""

__all__ = list(_EXPORTS)

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
