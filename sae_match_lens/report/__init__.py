"""Reports: the demo pipeline, its report sections and verdicts, and the HTML viewer.

``demo`` (the whole method on one model and one SAE stack), ``document`` (plots, ``results.json``
and the Markdown report), ``flow_section`` and ``steering_section`` (the report's sections),
``verdicts`` (the report's reading of each comparison) and ``viewer`` (the offline HTML view of a
chain or a flow graph). Public names are importable from :mod:`sae_match_lens`.
"""

from ..compat import forward_names

__getattr__ = forward_names(__name__, "document",
                            ("demo", "document", "flow_section", "steering_section", "verdicts",
                             "viewer"))
