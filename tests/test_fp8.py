import pytest
import torch

from mimo.weights.fp8 import FP8_DTYPE, dequantize_blockwise, quantize_blockwise, scale_grid_shape

# float8_e4m3fn keeps 3 mantissa bits: round-to-nearest error is at most 2^-4 relative to the value.
E4M3_REL_ERROR = 2.0**-4


@pytest.mark.parametrize("shape", [(128, 128), (300, 200), (1, 5), (129, 257)])
def test_round_trip_within_e4m3_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # columns of very different magnitudes
    w_fp8, scale_inv = quantize_blockwise(w)
    assert w_fp8.dtype == FP8_DTYPE and w_fp8.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == scale_grid_shape(*shape)
    back = dequantize_blockwise(w_fp8, scale_inv, torch.float32)
    # per element: relative rounding error, or the subnormal step of its block (2^-9 * scale)
    block_scale = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    bound = torch.maximum(w.abs() * E4M3_REL_ERROR, block_scale * 2.0**-9)
    assert ((back - w).abs() <= bound).all()


def test_scale_is_block_amax_over_448():
    w = torch.zeros(256, 130)
    w[5, 3] = -896.0  # block (0, 0)
    w[200, 129] = 4.48  # block (1, 1)
    w_fp8, scale_inv = quantize_blockwise(w)
    assert scale_inv[0, 0] == 2.0 and scale_inv[1, 1] == pytest.approx(0.01)
    assert scale_inv[0, 1] == pytest.approx(1e-12 / 448)  # all-zero block: amax clamped, no NaN
    assert w_fp8[5, 3].float() == -448.0
    assert torch.isfinite(dequantize_blockwise(w_fp8, scale_inv, torch.float32)).all()


def test_batched_grids_equal_per_matrix_grids():
    w = torch.randn(3, 200, 130)
    w_fp8, scale_inv = quantize_blockwise(w)
    assert scale_inv.shape == (3, 2, 2)
    for i in range(3):
        one_fp8, one_scale = quantize_blockwise(w[i])
        assert torch.equal(one_scale, scale_inv[i])
        assert torch.equal(one_fp8.float(), w_fp8[i].float())
    assert torch.equal(
        dequantize_blockwise(w_fp8, scale_inv, torch.bfloat16)[1],
        dequantize_blockwise(w_fp8[1], scale_inv[1], torch.bfloat16),
    )


def test_dequantize_rejects_wrong_grid():
    w_fp8, scale_inv = quantize_blockwise(torch.randn(300, 200))
    with pytest.raises(ValueError, match=r"shape \(2, 2\), expected \(3, 2\)"):
        dequantize_blockwise(w_fp8, scale_inv[:2], torch.float32)
