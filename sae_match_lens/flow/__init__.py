"""Feature flow: links between SAEs, their data-based checks, and the flow graph.

``linking`` (many-to-one links between two SAEs' features: :func:`~.linking.links`, the link
scores and the calibrated null), ``coactivation`` (co-activation statistics, the data-based
ceilings and :func:`~.coactivation.evaluate_links`), ``graph`` (the stack of residual, MLP and
attention SAEs keyed by model layer, predecessors, origin groups and
:class:`~.graph.FlowGraph`) and ``causal`` (the deactivation check of links inside the model).
Public names are importable from :mod:`sae_match_lens`.
"""

from ..compat import forward_names

__getattr__ = forward_names(__name__, "graph", ("causal", "coactivation", "graph", "linking"))
