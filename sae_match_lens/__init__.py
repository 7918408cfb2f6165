"""sae_match_lens: data-free matching of SAE features across transformer layers (SAE Match).

See README.md for the method, conventions and examples.
"""

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
from .chain import (
    ChainMatch,
    CompositionCheck,
    FeaturePath,
    FeatureStep,
    compare_composed_direct,
    match_chain,
)
from .costs import CostWeights
from .matching import MatchResult, match, null_max_cost
from .permutation import Permutation, PermutationFileError
from .synthetic import PlantedChain, planted_chain

__all__ = [
    "ARCHITECTURES",
    "ChainMatch",
    "CompositionCheck",
    "CostWeights",
    "FeaturePath",
    "FeatureStep",
    "FeatureView",
    "MatchResult",
    "Permutation",
    "PermutationFileError",
    "PlantedChain",
    "compare_composed_direct",
    "describe_sae",
    "feature_view",
    "fold",
    "fold_scales",
    "hook_name_of",
    "match",
    "match_chain",
    "null_max_cost",
    "planted_chain",
    "rescale",
    "sae_identity",
    "unfold",
    "validate_sae",
]

__version__ = "0.1.0"
