"""Library progress bars are labelled and appear only for work that takes a while."""

from __future__ import annotations

import pytest

from sae_match_lens.matching import match
from sae_match_lens.progress import PROGRESS_DELAY, progress_bar
from tests.helpers_tl import random_jumprelu_sae


def test_a_short_loop_prints_no_bar_and_a_long_one_a_labelled_bar(capsys):
    assert sum(progress_bar(range(3), desc="quick work")) == 3
    assert capsys.readouterr().err == ""
    assert sum(progress_bar(range(3), desc="slow work", delay=0)) == 3  # as if it took long
    assert "slow work" in capsys.readouterr().err
    assert PROGRESS_DELAY >= 1.0
    with pytest.raises(ValueError, match="label"):
        progress_bar(range(3), desc=" ")


def test_a_quick_match_with_progress_on_prints_nothing(capsys):
    a = random_jumprelu_sae("blocks.0.hook_resid_post", seed=1)
    b = random_jumprelu_sae("blocks.1.hook_resid_post", seed=2)
    match(a, b, progress=True)
    assert capsys.readouterr().err == ""
