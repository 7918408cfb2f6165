"""A permutation knows which SAEs it maps: using it with others raises, composition checks its
ends, folding does not change an SAE's identity, hand-made permutations still work; saving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from sae_match_lens.adapters import fold, rescale, sae_identity
from sae_match_lens.chain import match_chain
from sae_match_lens.evaluation import evaluate_substitution
from sae_match_lens.lens.hooks import run_skipping, substitute
from sae_match_lens.matching import match
from sae_match_lens.permutation import Permutation, ProvenanceError
from tests.helpers_tl import layer_saes, tiny_model, tiny_tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def saes():
    return layer_saes()  # blocks.{0..3}.hook_resid_post


@pytest.fixture(scope="module")
def p01(saes):
    return match(saes[0], saes[1], progress=False)


def test_a_permutation_for_other_saes_is_refused_by_every_route(model, saes, p01):
    tokens = tiny_tokens()
    for given in (p01, p01.permutation):
        with pytest.raises(ProvenanceError, match=r"blocks\.0\.hook_resid_post.*blocks\.2"), \
                substitute(model, saes[2], saes[3], given):
            pass
        with pytest.raises(ProvenanceError, match="made for"):
            run_skipping(model, tokens, saes[2], saes[3], given)
        with pytest.raises(ProvenanceError, match="made for"):
            evaluate_substitution(model, {2: saes[2], 3: saes[3]}, tokens, permutations={(2, 3): given},
                                  variants=["folded"], progress=False)
    for hp in model.hook_dict.values():
        assert not hp.fwd_hooks


def test_the_saes_it_was_made_for_are_accepted_folded_or_not(model, saes, p01):
    tokens = tiny_tokens()
    with torch.no_grad():
        with substitute(model, saes[0], saes[1], p01):
            plain = model(tokens, return_type="loss")
        with substitute(model, fold(saes[0]), fold(saes[1]), p01):
            folded = model(tokens, return_type="loss")
    torch.testing.assert_close(plain, folded, rtol=1e-5, atol=1e-5)
    scaled = rescale(saes[1], torch.rand(saes[1].cfg.d_sae, dtype=torch.float64) + 0.5)
    assert sae_identity(scaled)["directions"] == sae_identity(saes[1])["directions"]
    assert sae_identity(scaled)["fingerprint"] != sae_identity(saes[1])["fingerprint"]
    assert sae_identity(saes[2])["directions"] != sae_identity(saes[1])["directions"]


def test_an_sae_with_the_same_hook_but_other_weights_is_refused(model, saes, p01):
    other = layer_saes()[1]
    with torch.no_grad():
        other.W_dec.copy_(torch.randn_like(other.W_dec))
    with pytest.raises(ProvenanceError, match="directions"), substitute(model, saes[0], other, p01):
        pass


def test_hand_made_permutations_carry_no_identity_and_are_not_checked(model, saes):
    tokens = tiny_tokens()
    perm = Permutation.identity(saes[0].cfg.d_sae)
    assert perm.source is None and perm.target is None
    assert run_skipping(model, tokens, saes[2], saes[3], perm).isfinite()


def test_composition_checks_the_middle_and_keeps_the_ends(saes):
    p01 = match(saes[0], saes[1], progress=False).permutation
    p12 = match(saes[1], saes[2], progress=False).permutation
    p23 = match(saes[2], saes[3], progress=False).permutation
    p02 = p12 @ p01
    assert p02.source["hook_name"] == "blocks.0.hook_resid_post"
    assert p02.target["hook_name"] == "blocks.2.hook_resid_post"
    assert (p23 @ p02).target["hook_name"] == "blocks.3.hook_resid_post"
    with pytest.raises(ProvenanceError, match="inner map's target must be the outer map's source"):
        p23 @ p01
    inv = p01.inverse()
    assert (inv.source["hook_name"], inv.target["hook_name"]) == (
        "blocks.1.hook_resid_post", "blocks.0.hook_resid_post")
    # hand-made maps compose with anything
    assert (Permutation.identity(p01.n_target) @ p01).source["hook_name"] == p01.source["hook_name"]


def test_chain_compositions_carry_provenance(model, saes):
    chain = match_chain(saes, progress=False)
    p03 = chain.compose(0, 3)
    assert (p03.source["hook_name"], p03.target["hook_name"]) == (
        "blocks.0.hook_resid_post", "blocks.3.hook_resid_post")
    assert chain.compose(3, 0).source["hook_name"] == "blocks.3.hook_resid_post"
    tokens = tiny_tokens()
    with pytest.raises(ProvenanceError):
        run_skipping(model, tokens, saes[1], saes[3], p03)
    assert run_skipping(model, tokens, saes[0], saes[3], p03).isfinite()


def test_saved_files_follow_the_umask(tmp_path, p01):
    old = os.umask(0o022)
    try:
        path = p01.permutation.save(tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    for p in (path, tmp_path / "p.safetensors.json"):
        assert (p.stat().st_mode & 0o777) == 0o644
    loaded = Permutation.load(path)
    assert loaded == p01.permutation
    assert loaded.source["hook_name"] == "blocks.0.hook_resid_post"


def test_a_killed_save_leaves_a_recognisable_temporary_that_the_next_save_removes(tmp_path, p01):
    """A child process is killed while it writes; its temporary is then cleaned by a later save
    of the same target, and the target is never damaged."""
    target = tmp_path / "p.safetensors"
    p01.permutation.save(target)
    before = target.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, torch, safetensors.torch as st
        from sae_match_lens.permutation import Permutation
        def stall(*a, **k):
            open({str(tmp_path / 'ready')!r}, 'w').close()
            signal.pause()
        st.save_file = stall
        import sae_match_lens.permutation as pm
        pm.save_file = stall
        Permutation(torch.arange(64)).save({str(target)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if (tmp_path / "ready").exists():
                break
            child.poll()
            assert child.returncode is None, "the child ended before stalling"
            import time

            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    leftovers = sorted(p.name for p in tmp_path.glob(".p.safetensors*.sae-match-tmp"))
    assert leftovers, "the killed save left no temporary (nothing to test)"
    assert target.read_bytes() == before
    p01.permutation.save(target)
    assert not list(tmp_path.glob("*.sae-match-tmp"))
    assert Permutation.load(target) == p01.permutation
