"""Batch runs: plans of pair jobs over a stack of SAEs, their runs and the results store.

``plan`` (plans of pair jobs, job keys, plans from a release and for a flow graph), ``runs``
(run a plan locally or on a Ray cluster), ``store`` (the results store) and ``cli`` (the
``sae-match batch`` command; standard library only). Public names are importable from
:mod:`sae_match_lens`.
"""

from ..compat import forward_names

__getattr__ = forward_names(__name__, "runs", ("cli", "plan", "runs", "store"))
