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
from .permutation import Permutation, PermutationFileError

__all__ = [
    "ARCHITECTURES",
    "FeatureView",
    "Permutation",
    "PermutationFileError",
    "describe_sae",
    "feature_view",
    "fold",
    "fold_scales",
    "hook_name_of",
    "rescale",
    "sae_identity",
    "unfold",
    "validate_sae",
]

__version__ = "0.1.0"
