import pytest
from helpers import planted_pair

from sae_match_lens import Permutation
from sae_match_lens.cli import main


def test_match_command_saves_a_loadable_permutation(tmp_path, capsys):
    pair = planted_pair(d_sae=64, noise=0.1, seed=2)
    pair.sae_a.save_model(tmp_path / "a")
    pair.sae_b.save_model(tmp_path / "b")
    out = tmp_path / "perm.safetensors"
    assert main(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--quiet"]) == 0
    assert "matched 64/64 features" in capsys.readouterr().out
    assert Permutation.load(out, source=pair.sae_a, target=pair.sae_b) == pair.truth


def test_match_command_rejects_a_bad_sae_spec(tmp_path):
    with pytest.raises(SystemExit, match="neither a saved SAE directory nor 'release:sae_id'"):
        main(["match", "nowhere", "nowhere", "--out", str(tmp_path / "p.safetensors")])
