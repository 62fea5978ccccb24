import pytest
import torch

from mimo.weights.fp8 import StoredWeight, dequantize_blockwise, quantize_blockwise, scale_grid_shape
from mimo.weights.fused_qkv import (
    QKVGeometry,
    fuse_interleaved,
    fused_rows,
    fused_scale_grid_shape,
    interleaved_scale_rows,
    quantize_interleaved,
    shard_qkv_for_rank,
    split_interleaved,
)

V25_FULL = QKVGeometry(num_heads=64, num_kv_heads=4, head_dim=192, v_head_dim=128)
V25_SLIDING = QKVGeometry(num_heads=64, num_kv_heads=8, head_dim=192, v_head_dim=128)
PRO = QKVGeometry(num_heads=128, num_kv_heads=8, head_dim=192, v_head_dim=128)

# Small geometries with the same structure: full layers have n_kv == ckpt_tp, sliding (and MTP) layers
# 2 kv heads per shard, and one case with fewer kv heads than shards (replicated KV).
TINY_FULL = QKVGeometry(num_heads=8, num_kv_heads=4, head_dim=24, v_head_dim=16)
TINY_SLIDING = QKVGeometry(num_heads=8, num_kv_heads=8, head_dim=24, v_head_dim=16)
TINY_REPLICATED = QKVGeometry(num_heads=8, num_kv_heads=2, head_dim=24, v_head_dim=16)


def labelled_qkv(g: QKVGeometry, hidden: int = 4):
    """q/k/v whose every row holds (head index, kind) so misplaced rows are visible."""

    def rows(n_heads, dim, kind):
        head = torch.arange(n_heads).repeat_interleave(dim).float()
        return torch.stack([head, torch.full_like(head, kind)] + [torch.randn_like(head)] * (hidden - 2), 1)

    return rows(g.num_heads, g.head_dim, 0), rows(g.num_kv_heads, g.head_dim, 1), rows(g.num_kv_heads, g.v_head_dim, 2)


def test_v25_shard_rows_and_fused_rows():
    assert V25_FULL.rows_per_rank(4) == (3072, 192, 128) and fused_rows(V25_FULL, 4) == 13568
    assert V25_SLIDING.rows_per_rank(4) == (3072, 384, 256) and fused_rows(V25_SLIDING, 4) == 14848
    assert fused_rows(PRO, 8) == 27136


def test_v25_per_shard_scale_grid_shapes():
    # one 27-row grid per shard (3392 rows), not the 106 rows a contiguous 13568-row grid would have
    assert scale_grid_shape(13568, 4096) == (106, 32)
    assert fused_scale_grid_shape(V25_FULL, 4, 4096) == (108, 32)
    assert fused_scale_grid_shape(V25_SLIDING, 4, 4096) == (116, 32)
    assert fused_scale_grid_shape(PRO, 8, 6144) == (216, 48)


@pytest.mark.parametrize(
    "geometry", [TINY_FULL, TINY_SLIDING, TINY_REPLICATED], ids=["full", "sliding_mtp", "kv_replicated"]
)
def test_fuse_split_round_trip(geometry):
    q, k, v = labelled_qkv(geometry)
    fused = fuse_interleaved(q, k, v, geometry, ckpt_tp=4)
    assert fused.shape == (fused_rows(geometry, 4), 4)
    q2, k2, v2 = split_interleaved(fused, geometry, ckpt_tp=4)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_shard_r_is_q_r_k_r_v_r():
    q, k, v = labelled_qkv(TINY_SLIDING)
    fused = fuse_interleaved(q, k, v, TINY_SLIDING, ckpt_tp=4)
    shard = fused.view(4, -1, 4)[1]  # rank 1: q heads 2,3; kv heads 2,3
    q_rows, k_rows, v_rows = TINY_SLIDING.rows_per_rank(4)
    assert torch.equal(shard[:q_rows, :2].unique(dim=0), torch.tensor([[2.0, 0], [3.0, 0]]))
    assert torch.equal(shard[q_rows : q_rows + k_rows, :2].unique(dim=0), torch.tensor([[2.0, 1], [3.0, 1]]))
    assert torch.equal(shard[q_rows + k_rows :, :2].unique(dim=0), torch.tensor([[2.0, 2], [3.0, 2]]))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_shard_for_rank_any_tp(tp):
    q, k, v = labelled_qkv(TINY_FULL)
    q_rows, k_rows, _ = TINY_FULL.rows_per_rank(tp)
    for rank in range(tp):
        shard = shard_qkv_for_rank(q, k, v, TINY_FULL, tp, rank)
        assert shard.shape[0] == sum(TINY_FULL.rows_per_rank(tp))
        assert shard[:q_rows, 0].unique().tolist() == list(range(rank * 8 // tp, (rank + 1) * 8 // tp))
        kv_heads = shard[q_rows : q_rows + k_rows, 0].unique().tolist()
        # tp 8 > 4 kv heads: ranks 2i and 2i+1 both hold kv head i
        assert kv_heads == ([rank // 2] if tp == 8 else list(range(rank * 4 // tp, (rank + 1) * 4 // tp)))


def test_invalid_tp_raises():
    with pytest.raises(ValueError, match="8 attention heads cannot be split over tp=3"):
        TINY_FULL.rows_per_rank(3)
    with pytest.raises(ValueError, match="6 kv heads can be neither split nor replicated over tp=4"):
        QKVGeometry(24, 6, 8, 8).rows_per_rank(4)


def test_wrong_fused_rows_names_tensor_and_shapes():
    q, k, v = labelled_qkv(TINY_FULL)
    fused = fuse_interleaved(q, k, v, TINY_FULL, ckpt_tp=4)
    # a sliding-shaped layer read with full geometry
    with pytest.raises(
        ValueError,
        match=r"model.layers.3.self_attn.qkv_proj.weight: .* shape \(352, 4\), "
        r"expected \(512, hidden\) = 4 shards of \(48, 48, 32\)",
    ):
        split_interleaved(fused, TINY_SLIDING, 4, name="model.layers.3.self_attn.qkv_proj.weight")
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \(96, 4\), expected \(192, 4\)"):
        fuse_interleaved(q[:96], k, v, TINY_FULL, 4)


def test_fp8_per_shard_quantize_dequantize():
    torch.manual_seed(0)
    geometry = QKVGeometry(num_heads=16, num_kv_heads=4, head_dim=24, v_head_dim=16)  # 136 rows/shard
    q, k, v = (torch.randn(rows, 160) * 0.02 for rows in geometry.canonical_rows())
    fused = fuse_interleaved(q, k, v, geometry, ckpt_tp=4)  # [544, 160]
    w_fp8, scale_inv = quantize_interleaved(fused, geometry, 4)
    assert scale_inv.shape == (8, 2) and scale_grid_shape(544, 160) == (5, 2)
    shard2_fp8, shard2_scale = quantize_blockwise(fused[272:408])  # each shard has its own grid
    assert torch.equal(scale_inv[4:6], shard2_scale) and torch.equal(w_fp8[272:408].float(), shard2_fp8.float())

    back = StoredWeight(w_fp8, scale_inv, interleaved_scale_rows(geometry, 4)).dequantized(torch.float32)
    assert torch.equal(back[272:408], dequantize_blockwise(shard2_fp8, shard2_scale, torch.float32))
    assert (back - fused).abs().max() <= fused.abs().max() * 2.0**-4
    q2, k2, v2 = split_interleaved(back, geometry, 4)
    assert (k2 - k).abs().max() <= fused.abs().max() * 2.0**-4
