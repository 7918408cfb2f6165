"""sae_match_lens: data-free matching of SAE features across transformer layers (SAE Match).

See README.md for the method, conventions and examples.

The public API is about forty names (``__all__``), grouped as a session runs: load a model and
its SAEs → match or link two SAEs → chain and flow through many layers → substitute blocks or
steer features → evaluate → save, view, batch. Everything else lives in its submodule
(``sae_match_lens.flow.linking.SCORES``, ``sae_match_lens.lens.hooks.substitution_hooks``, ...).

Public names are re-exported lazily (PEP 562): ``import sae_match_lens`` is cheap, and a name's
submodule (with torch, SAELens and TransformerLens behind it) is imported on first access, so
``sae-match --help`` answers without loading them. To export a new name, add one line to
``_EXPORTS``: ``"name": "submodule"``. Submodules are also reachable as attributes
(``sae_match_lens.evaluation``). Names and modules of 0.2 that moved stay reachable under their
old paths until 0.4, with one ``DeprecationWarning`` each (:mod:`sae_match_lens.compat`).
"""

import importlib
import os
from typing import Any

# Idle OpenMP threads yield instead of spinning (must be set before torch is imported): with
# few cores, spinning threads slow torch several-fold whenever another process uses a core.
# Only a default; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .compat import install_moved_module_finder, warn_unexported

install_moved_module_finder()

_EXPORTS: dict[str, str] = {
    # load: a model and its SAEs, keyed by model layer
    "load_default_suite": "assets",
    "load_suite_stack": "assets",
    "load_eval_tokens": "assets",
    "load_release_saes": "releases",
    "load_release_stack": "releases",
    "load_release_model": "releases",
    "LayerSAEs": "flow.graph",
    # match or link two SAEs
    "fold": "adapters",
    "match": "matching",
    "MatchResult": "matching",
    "load_match_result": "matching",
    "Permutation": "permutation",
    "links": "flow.linking",
    "Links": "flow.linking",
    # chain and flow through many layers
    "match_chain": "chain",
    "ChainMatch": "chain",
    "flow_graph": "flow.graph",
    "FlowGraph": "flow.graph",
    "predecessors": "flow.graph",
    "persistence": "flow.graph",
    "origin_groups": "flow.graph",
    # substitute blocks, steer features
    "substitute": "lens.hooks",
    "run_skipping": "lens.hooks",
    "steer": "lens.steering",
    "generate_steered": "lens.steering",
    "flow_interventions": "lens.steering",
    "RescaleFeatures": "lens.steering",
    "AddDirection": "lens.steering",
    # evaluate: what a substitute, a link or a steer costs
    "evaluate_substitution": "evaluation",
    "evaluate_links": "flow.coactivation",
    "coactivation_stats": "flow.coactivation",
    "causal_check": "flow.causal",
    "semantic_evaluation": "judging.semantic",
    "steering_sweep": "judging.steering_scores",
    "ChatJudge": "judging.judge",
    # save, view, batch
    "write_html": "report.viewer",
    "plan_pairs": "batch.plan",
    "load_plan": "batch.plan",
    "batch_match": "batch.runs",
    "ResultStore": "batch.store",
}
"""Each public name → the submodule that defines it, grouped as a session with the library runs."""

_UNEXPORTED: dict[str, str] = {
    "ARCHITECTURES": "adapters",
    "FeatureView": "adapters",
    "describe_sae": "adapters",
    "feature_view": "adapters",
    "fold_scales": "adapters",
    "folded_activation_factor": "adapters",
    "hook_name_of": "adapters",
    "model_layer_of": "adapters",
    "rescale": "adapters",
    "sae_identity": "adapters",
    "unfold": "adapters",
    "validate_sae": "adapters",
    "load_manifest": "assets",
    "load_suite_saes": "assets",
    "PairJob": "batch.plan",
    "SAERef": "batch.plan",
    "plan_flow": "batch.plan",
    "plan_from_release": "batch.plan",
    "BatchReport": "batch.runs",
    "StoreError": "batch.store",
    "ChainFileError": "chain",
    "CompositionCheck": "chain",
    "FeaturePath": "chain",
    "FeatureStep": "chain",
    "compare_composed_direct": "chain",
    "DEFAULT_VARIANTS": "evaluation",
    "RESULT_COLUMNS": "evaluation",
    "VARIANTS": "evaluation",
    "Variant": "evaluation",
    "evaluate_substitution_nnsight": "evaluation",
    "pair_costs": "evaluation",
    "CoactivationStats": "flow.coactivation",
    "best_partner": "flow.coactivation",
    "one_to_one": "flow.coactivation",
    "ORIGIN_GROUPS": "flow.graph",
    "SCORES": "flow.linking",
    "Transition": "flow.linking",
    "Judge": "judging.judge",
    "ScriptedJudge": "judging.judge",
    "proxy_scores": "judging.steering_scores",
    "METHODS": "lens.hooks",
    "Map": "lens.hooks",
    "Method": "lens.hooks",
    "SUBSTITUTIONS": "lens.hooks",
    "Substitution": "lens.hooks",
    "Transfer": "lens.hooks",
    "substitution_hooks": "lens.hooks",
    "ModuleSite": "lens.nnsight",
    "NNsightRoute": "lens.nnsight",
    "StateEdit": "lens.nnsight",
    "edit_states": "lens.nnsight",
    "substitute_nnsight": "lens.nnsight",
    "BOS_POLICIES": "lens.routes",
    "Schedule": "lens.steering",
    "steering_hooks": "lens.steering",
    "MatchResultFileError": "matching",
    "null_costs": "matching",
    "null_max_cost": "matching",
    "explanations": "neuronpedia",
    "feature_url": "neuronpedia",
    "PermutationFileError": "permutation",
    "ProvenanceError": "permutation",
    "HubUnavailableError": "releases",
    "ReleaseSAE": "releases",
    "load_module_stack": "releases",
    "release_saes": "releases",
    "resolve_release": "releases",
    "top_activating_tokens": "report.viewer",
    "CostWeights": "solvers.costs",
    "PlantedChain": "synthetic",
    "planted_chain": "synthetic",
}
"""Names exported by 0.2 that 0.3 keeps in their submodule only: still reachable here until 0.4,
with one ``DeprecationWarning`` each naming the submodule to import from."""

__all__ = list(_EXPORTS)

__version__ = "0.3.0"


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _UNEXPORTED:
        home = f"{__name__}.{_UNEXPORTED[name]}"
        value = getattr(importlib.import_module(home), name)
        warn_unexported(f"{__name__}.{name}", home)
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
