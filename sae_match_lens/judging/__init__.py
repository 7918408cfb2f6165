"""Judging: scores of matched features and of steered generations.

``judge`` (the judge interface and its clients), ``semantic`` (do matched features mean the same
thing?), ``steering_scores`` (score steered generations without a language-model judge, and the
steering sweep) and ``rowlog`` (resumable row logs of judge answers). Public names are
importable from :mod:`sae_match_lens`.
"""
