"""Interventions inside models.

``routes`` (where states are read and written on TransformerLens models, BOS handling),
``hooks`` (block substitution: ``substitute``, ``run_skipping``, ``substitution_hooks``),
``steering`` (rescale and add interventions, flows, generation, proxy scores) and ``nnsight``
(the same on nnsight models; the optional ``[nnsight]`` extra, imported only inside its
functions). Public names are importable from :mod:`sae_match_lens`.
"""
