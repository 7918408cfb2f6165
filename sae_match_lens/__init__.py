"""sae_match_lens: data-free matching of SAE features across transformer layers (SAE Match).

See README.md for the method, conventions and examples.
"""

import os

# Idle OpenMP threads yield instead of spinning (must be set before torch is imported): with
# few cores, spinning threads slow torch several-fold whenever another process uses a core.
# Only a default; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from .adapters import (
    ARCHITECTURES,
    FeatureView,
    describe_sae,
    feature_view,
    fold,
    fold_scales,
    hook_name_of,
    rescale,
    sae_identity,
    unfold,
    validate_sae,
)
from .assets import load_default_suite, load_eval_tokens, load_manifest
from .chain import (
    ChainMatch,
    CompositionCheck,
    FeaturePath,
    FeatureStep,
    compare_composed_direct,
    match_chain,
)
from .costs import CostWeights
from .evaluation import DEFAULT_VARIANTS, RESULT_COLUMNS, VARIANTS, Variant, evaluate_substitution, pair_costs
from .hooks import (
    METHODS,
    BlockSubstitute,
    Method,
    Substitution,
    Transfer,
    block_substitute,
    run_skipping,
    substitute,
    substitution_hooks,
)
from .matching import MatchResult, match, null_max_cost
from .permutation import Permutation, PermutationFileError
from .synthetic import PlantedChain, planted_chain

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_VARIANTS",
    "METHODS",
    "RESULT_COLUMNS",
    "VARIANTS",
    "BlockSubstitute",
    "ChainMatch",
    "CompositionCheck",
    "CostWeights",
    "FeaturePath",
    "FeatureStep",
    "FeatureView",
    "MatchResult",
    "Method",
    "Permutation",
    "PermutationFileError",
    "PlantedChain",
    "Substitution",
    "Transfer",
    "Variant",
    "block_substitute",
    "compare_composed_direct",
    "describe_sae",
    "evaluate_substitution",
    "feature_view",
    "fold",
    "fold_scales",
    "hook_name_of",
    "load_default_suite",
    "load_eval_tokens",
    "load_manifest",
    "match",
    "match_chain",
    "null_max_cost",
    "pair_costs",
    "planted_chain",
    "rescale",
    "run_skipping",
    "sae_identity",
    "substitute",
    "substitution_hooks",
    "unfold",
    "validate_sae",
]

__version__ = "0.1.0"
