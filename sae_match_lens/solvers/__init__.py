"""Exact assignment and top-k machinery, with no SAE or model knowledge beyond stacked features.

``costs`` (stacked features and exact float64 costs), ``screen`` (the rigorous lower bound and
the one-pass screen), ``certificate`` (dual certificates and rechecks), ``sparse`` (the certified
sparse solver), ``dense`` (float64 certification and repair of dense solutions), ``topk``
(exact top-k of link scores, every pair or through a certified screen). The answers a
user asks for (:func:`~sae_match_lens.matching.match`, :func:`~sae_match_lens.flow.linking.links`)
are built on them one level up.
"""
