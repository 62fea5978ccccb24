"""Re-sharding the TP-interleaved fused qkv_proj to any TP by row gathers, and FP8 re-blocking of gathered rows."""

import pytest
import torch

from mimo.weights.fp8 import StoredWeight, dequantize_blockwise, gather_rows_blockwise, quantize_blockwise
from mimo.weights.fused_qkv import (
    QKVGeometry,
    fuse_interleaved,
    interleaved_rows_for_rank,
    interleaved_scale_rows,
    quantize_interleaved,
    shard_qkv_for_rank,
)

# 136 rows per TP-4 shard: shard boundaries fall inside 128-row blocks, as in V2.5 (3392 rows per shard).
GEOMETRY = QKVGeometry(num_heads=16, num_kv_heads=4, head_dim=24, v_head_dim=16)
# V2.5 full-attention layer: at TP 8 every rank's 128-row block lies inside one per-shard block.
V25_FULL = QKVGeometry(num_heads=64, num_kv_heads=4, head_dim=192, v_head_dim=128)


def e4m3_bound(reference: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Largest |error| one e4m3 rounding may make: half an ulp (3 mantissa bits) or half the subnormal step."""
    return reference.abs() * 2.0**-4 + scale_inv.max() * 2.0**-10


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_rows_for_rank_gather_the_rank_shard(tp):
    q, k, v = (torch.randn(rows, 8) for rows in GEOMETRY.canonical_rows())
    fused = fuse_interleaved(q, k, v, GEOMETRY, ckpt_tp=4)
    for rank in range(tp):
        rows = interleaved_rows_for_rank(GEOMETRY, 4, tp, rank)
        assert torch.equal(fused[rows], shard_qkv_for_rank(q, k, v, GEOMETRY, tp, rank))


def test_scale_rows_follow_the_per_shard_grids():
    scale_rows = interleaved_scale_rows(GEOMETRY, 4)  # 136 rows per shard -> 2 grid rows per shard
    assert scale_rows[[0, 127, 128, 135, 136, 263, 264, 543]].tolist() == [0, 0, 1, 1, 2, 2, 3, 7]


@pytest.mark.parametrize("geometry", [GEOMETRY, V25_FULL], ids=["tiny", "v2.5_full"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_fp8_reblocking_within_one_rounding(geometry, tp):
    torch.manual_seed(tp)
    q, k, v = (torch.randn(rows, 128) * 0.02 for rows in geometry.canonical_rows())
    w_fp8, scale_inv = quantize_interleaved(fuse_interleaved(q, k, v, geometry, ckpt_tp=4), geometry, 4)
    source = StoredWeight(w_fp8, scale_inv, interleaved_scale_rows(geometry, 4)).dequantized(torch.float32)
    for rank in range(tp):
        rows = interleaved_rows_for_rank(geometry, 4, tp, rank)
        rank_fp8, rank_scale = gather_rows_blockwise(w_fp8, scale_inv, interleaved_scale_rows(geometry, 4), rows)
        back = dequantize_blockwise(rank_fp8, rank_scale, torch.float32)
        assert ((back - source[rows]).abs() <= e4m3_bound(source[rows], rank_scale)).all()
        if tp == 4 or (geometry is V25_FULL and tp == 8):
            # every new block lies in one source block: FP8 bytes and scales are copied, bit-exact
            assert torch.equal(back, source[rows])


def test_gather_copies_blocks_from_one_source_block_and_requantizes_mixed_ones():
    torch.manual_seed(0)
    w_fp8, scale_inv = quantize_blockwise(torch.randn(300, 130))
    scale_rows = torch.arange(300) // 128
    rows = torch.cat([torch.arange(128, 256), torch.arange(0, 64)])  # source block 1, then half of block 0
    out, scale = gather_rows_blockwise(w_fp8, scale_inv, scale_rows, rows)
    assert torch.equal(out.view(torch.uint8), w_fp8[rows].view(torch.uint8))
    assert torch.equal(scale, scale_inv[:2].flip(0))

    mixed = torch.arange(100, 228)  # straddles source blocks 0 and 1
    out, scale = gather_rows_blockwise(w_fp8, scale_inv, scale_rows, mixed)
    source = dequantize_blockwise(w_fp8, scale_inv, torch.float32)[mixed]
    assert torch.equal(scale, quantize_blockwise(source)[1])
    assert ((dequantize_blockwise(out, scale, torch.float32) - source).abs() <= e4m3_bound(source, scale)).all()
