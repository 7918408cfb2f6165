"""Cost matrices by blocks and by entries: every route computes the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_match_lens.adapters import FeatureView
from sae_match_lens.solvers.costs import (
    CostWeights,
    StackedFeatures,
    cost_blocks,
    edge_costs,
    exact_rows,
    exact_scales,
    ieee_products,
    listed_costs,
    matmul_nt,
    squared_norms,
    stack_features,
)


def stacked(x: torch.Tensor) -> StackedFeatures:
    return StackedFeatures(x.float().contiguous(), x.double().pow(2).sum(dim=1))


@pytest.fixture
def pair() -> tuple[StackedFeatures, StackedFeatures, np.ndarray]:
    gen = torch.Generator().manual_seed(0)
    a = stacked(torch.randn(37, 11, generator=gen))
    b = stacked(torch.randn(29, 11, generator=gen) * 2)
    exact = ((a.matrix_FK.double()[:, None] - b.matrix_FK.double()[None]) ** 2).sum(-1).numpy()
    return a, b, exact


def test_matmul_nt_matches_torch_on_contiguous_and_strided_outputs():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 7, generator=gen), torch.randn(9, 7, generator=gen)
    out = torch.empty(13, 9)
    torch.testing.assert_close(matmul_nt(x, y, out), x @ y.T)
    strided = torch.empty(9, 13).T  # not contiguous: the torch route
    torch.testing.assert_close(matmul_nt(x, y, strided), x @ y.T)
    assert out.data_ptr() == matmul_nt(x, y, out).data_ptr()


@pytest.mark.parametrize("block_rows", [1, 5, 64])
def test_cost_blocks_cover_the_matrix_with_squared_distances(pair, block_rows):
    a, b, exact = pair
    blocks = list(cost_blocks(a, b, block_rows=block_rows))
    assert [r0 for r0, _, _ in blocks] == list(range(0, 37, block_rows))
    C = torch.cat([blk for _, _, blk in blocks]).double().numpy()
    np.testing.assert_allclose(C, exact, rtol=1e-5, atol=1e-4)
    assert (C >= 0).all()


def test_entry_routes_agree_with_the_full_matrix(pair):
    a, b, exact = pair
    rows = torch.tensor([3, 0, 36, 3])
    np.testing.assert_allclose(exact_rows(a, b, rows, block_rows=3, device=None).double().numpy(),
                               exact[rows.numpy()], rtol=1e-5, atol=1e-4)
    idx = torch.randint(0, 29, (37, 4), generator=torch.Generator().manual_seed(2))
    listed = listed_costs(a, b, idx, torch.device("cpu")).numpy()
    np.testing.assert_allclose(listed, np.take_along_axis(exact, idx.numpy(), 1), rtol=1e-5,
                               atol=1e-4)
    r, c = np.array([0, 5, 36]), np.array([28, 5, 0])
    np.testing.assert_allclose(edge_costs(a, b, r, c, torch.device("cpu")), exact[r, c],
                               rtol=1e-5, atol=1e-4)
    assert edge_costs(a, b, r[:0], c[:0], torch.device("cpu")).shape == (0,)


def test_ieee_products_switch_off_tf32_on_cuda_and_restore_the_callers_setting():
    flags = torch.backends.cuda.matmul
    before = (torch.get_float32_matmul_precision(), flags.allow_bf16_reduced_precision_reduction,
              flags.allow_fp16_reduced_precision_reduction)
    torch.set_float32_matmul_precision("high")  # a user who allows TF32
    try:
        with ieee_products(torch.device("cuda")):
            assert torch.get_float32_matmul_precision() == "highest"
            assert not flags.allow_bf16_reduced_precision_reduction
            assert not flags.allow_fp16_reduced_precision_reduction
        assert torch.get_float32_matmul_precision() == "high"
        assert (flags.allow_bf16_reduced_precision_reduction,
                flags.allow_fp16_reduced_precision_reduction) == before[1:]
        with ieee_products(torch.device("cpu")):
            assert torch.get_float32_matmul_precision() == "high"  # untouched off CUDA
    finally:
        torch.set_float32_matmul_precision(before[0])
        flags.allow_bf16_reduced_precision_reduction = before[1]


def test_listed_and_edge_costs_are_float64_squared_distances_across_many_chunks():
    gen = torch.Generator().manual_seed(3)
    a = stacked(torch.randn(300, 700, generator=gen))  # a few rows per chunk: many chunks
    b = stacked(torch.randn(200, 700, generator=gen) + 0.5)
    exact = ((a.matrix_FK.double()[:, None] - b.matrix_FK.double()[None]) ** 2).sum(-1).numpy()
    idx = torch.randint(0, 200, (300, 9), generator=gen)
    listed = listed_costs(a, b, idx, torch.device("cpu")).numpy()
    np.testing.assert_allclose(listed, np.take_along_axis(exact, idx.numpy(), 1), rtol=1e-13)
    r, c = np.arange(300), idx.numpy()[:, 0]
    np.testing.assert_allclose(edge_costs(a, b, r, c, torch.device("cpu")), exact[r, c],
                               rtol=1e-13)


def test_stacked_norms_are_the_float64_squared_norms_and_zero_the_offsets():
    gen = torch.Generator().manual_seed(4)
    dec = torch.randn(50, 6, generator=gen)
    view = FeatureView(encoder_FD=torch.randn(50, 5, generator=gen), decoder_FO=dec,
                       bias_FB=torch.randn(50, 1, generator=gen), threshold_F=None,
                       bias_names=("b_enc",), folded=True, hook_name="h")
    for weights in (CostWeights(), CostWeights(1.0, 0.0, 0.0), CostWeights(2.0, 0.0, 0.0)):
        s = stack_features(view, weights, "mse")
        assert s.norm_sq_F is not None
        assert torch.equal(s.norm_sq_F, squared_norms(s.matrix_FK))
        assert torch.equal(s.norm_sq_F, s.matrix_FK.double().square().sum(dim=1))
        scales = exact_scales(s, s)
        assert (scales.offset_a == 0).all() and (scales.offset_b == 0).all()
    torch.testing.assert_close(stack_features(view, CostWeights(1.0, 0.0, 0.0), "mse").matrix_FK, dec)


def test_listed_costs_on_several_threads_match_direct_float64_differences():
    """Enough rows for several threads and a last chunk shorter than the others."""
    gen = torch.Generator().manual_seed(4)
    a = stacked(torch.randn(1601, 2304, generator=gen))
    b = stacked(torch.randn(500, 2304, generator=gen) * 1.5)
    idx = torch.randint(0, 500, (1601, 16), generator=gen)
    listed = listed_costs(a, b, idx, torch.device("cpu")).numpy()
    rows = np.r_[0:5, 800:805, 1590:1601]
    diff = b.matrix_FK.double()[idx[rows]] - a.matrix_FK.double()[rows][:, None, :]
    np.testing.assert_allclose(listed[rows], (diff ** 2).sum(-1).numpy(), rtol=1e-13)
