import json

import pytest
import torch
from helpers import build_sae

from sae_match_lens import Permutation
from sae_match_lens import permutation as permutation_module
from sae_match_lens.permutation import PermutationFileError


def test_apply_is_the_scatter_f_b_at_indices_equals_f_a():
    P = Permutation(torch.tensor([2, 0, 3, 1]))
    f_a = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    expected = torch.zeros(1, 4)
    expected[..., P.indices] = f_a
    assert torch.equal(P.apply(f_a), expected)
    assert P.apply(f_a)[0, 2].item() == 10.0  # source feature 0 lands on target feature 2


def test_apply_drops_unmatched_sources_and_zeroes_unmatched_targets():
    P = Permutation(torch.tensor([4, -1, 0]), n_target=5)
    out = P.apply(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.equal(out, torch.tensor([[3.0, 0.0, 0.0, 0.0, 1.0]]))


def test_apply_keeps_leading_dimensions_and_gradients():
    P = Permutation.random(6, generator=torch.Generator().manual_seed(3))
    acts = torch.randn(2, 3, 6, requires_grad=True)
    out = P.apply(acts)
    assert out.shape == (2, 3, 6)
    out.sum().backward()
    assert torch.equal(acts.grad, torch.ones_like(acts))


def test_composition_follows_the_documented_convention():
    gen = torch.Generator().manual_seed(0)
    P_ab, P_bc = Permutation.random(7, generator=gen), Permutation.random(7, generator=gen)
    P_ac = P_bc @ P_ab
    assert torch.equal(P_ac.indices, P_bc.indices[P_ab.indices])
    f_a = torch.randn(3, 7)
    torch.testing.assert_close(P_ac.apply(f_a), P_bc.apply(P_ab.apply(f_a)))


def test_composition_propagates_missing_partners():
    P_ab = Permutation(torch.tensor([1, -1, 0]), n_target=3)
    P_bc = Permutation(torch.tensor([-1, 2, 0]), n_target=4)
    assert (P_bc @ P_ab).indices.tolist() == [2, -1, -1]
    assert (P_bc @ P_ab).n_target == 4


def test_composition_with_mismatched_sizes_is_an_error():
    with pytest.raises(ValueError, match="n_target=3 but the outer map has n_source=4"):
        Permutation.identity(4) @ Permutation.identity(3)


def test_inverse_undoes_the_map():
    P = Permutation(torch.tensor([3, -1, 0]), n_target=4)
    inv = P.inverse()
    assert inv.indices.tolist() == [2, -1, -1, 0]
    assert (inv @ P).indices.tolist() == [0, -1, 2]
    Q = Permutation.random(9)
    assert Q.inverse() @ Q == Permutation.identity(9)


@pytest.mark.parametrize(
    ("indices", "n_target", "message"),
    [
        ([0, 0, 1], 3, "not one-to-one"),
        ([0, 3], 3, "out of range"),
        ([0, -2], 3, "out of range"),
        ([[0, 1]], 2, "1-D"),
    ],
)
def test_invalid_indices_are_refused(indices, n_target, message):
    with pytest.raises(ValueError, match=message):
        Permutation(torch.tensor(indices), n_target)


def test_float_indices_are_refused():
    with pytest.raises(TypeError, match="integers"):
        Permutation(torch.tensor([0.0, 1.0]))


def test_apply_checks_the_feature_dimension():
    with pytest.raises(ValueError, match="5 features .* maps 4 source features"):
        Permutation.identity(4).apply(torch.zeros(2, 5))


def test_agreement_counts_features_matched_in_either_map():
    P = Permutation(torch.tensor([0, 1, 2, -1]), 4)
    Q = Permutation(torch.tensor([0, 2, 1, -1]), 4)
    assert P.agreement(Q) == pytest.approx(1 / 3)
    assert P.agreement(P) == 1.0


def test_save_and_load_round_trip_with_provenance(tmp_path):
    sae_a = build_sae("jumprelu", seed=0)
    sae_b = build_sae("jumprelu", seed=1, hook_name="blocks.1.hook_resid_post")
    from sae_match_lens.adapters import sae_identity

    meta = {"source": sae_identity(sae_a), "target": sae_identity(sae_b), "options": {"fold": True}}
    P = Permutation(torch.randperm(48), 48, meta)
    path = P.save(tmp_path / "p.safetensors")
    loaded = Permutation.load(path, source=sae_a, target=sae_b)
    assert loaded == P
    assert loaded.metadata["source"]["hook_name"] == "blocks.0.hook_resid_post"
    sidecar = json.loads((tmp_path / "p.safetensors.json").read_text())
    assert sidecar["checksum"] == P.checksum() and sidecar["n_source"] == 48


def test_loading_against_the_wrong_sae_is_a_clear_error(tmp_path):
    from sae_match_lens.adapters import sae_identity

    sae_a, other = build_sae("jumprelu", seed=0), build_sae("jumprelu", seed=5)
    P = Permutation(torch.randperm(48), 48, {"source": sae_identity(sae_a)})
    path = P.save(tmp_path / "p.safetensors")
    with pytest.raises(PermutationFileError, match="fingerprint"):
        Permutation.load(path, source=other)


def test_loading_a_wrong_size_permutation_is_a_clear_error(tmp_path):
    path = Permutation.identity(10).save(tmp_path / "p.safetensors")
    with pytest.raises(PermutationFileError, match="10 features but SAE 'blocks.0.hook_resid_post'"):
        Permutation.load(path, source=build_sae("jumprelu"))


def test_a_tampered_file_fails_its_checksum(tmp_path):
    path = Permutation.identity(10).save(tmp_path / "p.safetensors")
    sidecar = tmp_path / "p.safetensors.json"
    record = json.loads(sidecar.read_text())
    record["n_target"] = 11
    sidecar.write_text(json.dumps(record))
    with pytest.raises(PermutationFileError, match="checksum mismatch"):
        Permutation.load(path)


def test_missing_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(PermutationFileError, match="does not exist"):
        Permutation.load(tmp_path / "nothing.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"not a tensor file")
    (tmp_path / "x.safetensors.json").write_text("{}")
    with pytest.raises(PermutationFileError, match="cannot read|not a sae_match_lens"):
        Permutation.load(tmp_path / "x.safetensors")


def test_a_failed_save_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    original = Permutation.random(12)
    original.save(path)
    before = (path.read_bytes(), (tmp_path / "p.safetensors.json").read_bytes())

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(permutation_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        Permutation.identity(12).save(path)
    assert (path.read_bytes(), (tmp_path / "p.safetensors.json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors", "p.safetensors.json"]
    assert Permutation.load(path) == original
