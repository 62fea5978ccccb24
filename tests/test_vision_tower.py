import math

import pytest
import torch
import torch.nn.functional as F

from builders.presets import V2_5
from mimo.config import ConfigError
from mimo.models.encoder_attention import SegmentAttention
from mimo.models.vision_tower import MiMoVisionTransformer, VisionAttention, VisionConfig

# Real patch geometry (3 x 2 x 16 x 16 = 1536), tiny width. Blocks: full, row-window, two column-window
# blocks (a run), row-window, column-window (the last block is column-major: the run ends at the merger).
TINY_VISION = {
    "depth": 6,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "qk_channels": 8,
    "kv_channels": 8,
    "out_hidden_size": 24,
    "fullatt_block_indexes": [0],
    "vit_window_attn_types": [-1, 0, 1, 1, 0, 1],
    "visual_token_window_size": 5,
    "use_sink": True,
}


def tiny_tower(query_chunk: int = 1024, **overrides) -> MiMoVisionTransformer:
    torch.manual_seed(0)
    model = MiMoVisionTransformer(VisionConfig.from_dict({**TINY_VISION, **overrides}), query_chunk=query_chunk)
    with torch.no_grad():  # non-trivial sinks and biases (random init leaves sinks at 0)
        for name, param in model.named_parameters():
            if name.endswith("sinks") or name.endswith("bias"):
                param.normal_()
    return model.eval()


def brute_force_attention(q, k, v, *, scale, window, sinks):
    """Per head: exp-scores over visible keys (|i - j| <= window), sink term in the denominator."""
    length, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    out = torch.empty_like(q, dtype=torch.float64)
    idx = torch.arange(length)
    visible = torch.ones(length, length, dtype=torch.bool)
    if window is not None:
        visible = (idx[:, None] - idx[None, :]).abs() <= window
    for h in range(num_heads):
        scores = (q[:, h].double() @ k[:, h // group].double().T) * scale
        weights = torch.where(visible, scores.exp(), torch.zeros_like(scores))
        denominator = weights.sum(-1, keepdim=True)
        if sinks is not None:
            denominator = denominator + sinks[h].double().exp()
        out[:, h] = (weights / denominator) @ v[:, h // group].double()
    return out


def rotate(x, angles):
    """Rotate-half RoPE with explicit angles [T, head_dim / 2], in float64."""
    x = x.double()
    half = x.shape[-1] // 2
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    return torch.cat([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)


def linear64(layer, x):
    return F.linear(x, layer.weight.double(), layer.bias.double())


def reference_forward(model: MiMoVisionTransformer, pixel_values, grid):
    """One item, written from the definition in float64: every block sorts the patches into its walk order
    by explicit (t, row, col) coordinates, attends within each temporal slice, and scatters them back."""
    config = model.config
    t, h, w = grid
    m = config.spatial_merge_size
    # coordinates of the input rows: merge units row-major, the m x m patches of a unit consecutive
    coords = torch.tensor(
        [(ti, ur * m + i, uc * m + j) for ti in range(t) for ur in range(h // m) for uc in range(w // m)
         for i in range(m) for j in range(m)]
    )
    frame, unit_row, unit_col = coords[:, 0], coords[:, 1] // m, coords[:, 2] // m
    within = (coords[:, 1] % m) * m + coords[:, 2] % m
    row_major = ((frame * (h // m) + unit_row) * (w // m) + unit_col) * m * m + within
    col_major = ((frame * (w // m) + unit_col) * (h // m) + unit_row) * m * m + within
    axis_dim = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    angles = torch.cat([coords[:, 1, None] * inv_freq, coords[:, 2, None] * inv_freq], dim=-1)  # [N, D/2]

    x = model.patch_embed(pixel_values).double()
    for block_idx, block in enumerate(model.blocks):
        order = torch.argsort(col_major if config.vit_window_attn_types[block_idx] == 1 else row_major)
        attn, n = block.attn, len(order)
        xs = x[order]
        q, k, v = linear64(attn.qkv, block.norm1(xs)).split(
            [attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim], -1
        )
        q = rotate(q.view(n, attn.num_heads, -1), angles[order])
        k = rotate(k.view(n, attn.num_kv_heads, -1), angles[order])
        v = v.view(n, attn.num_kv_heads, -1)
        sinks = None if attn.sinks is None else attn.sinks.detach()
        slices = [
            brute_force_attention(q[s : s + h * w], k[s : s + h * w], v[s : s + h * w], scale=attn.scale,
                                  window=config.block_window(block_idx), sinks=sinks)
            for s in range(0, n, h * w)
        ]
        xs = xs + linear64(attn.proj, torch.cat(slices).flatten(1))
        hidden = block.norm2(xs)
        mlp = block.mlp
        xs = xs + linear64(mlp.down_proj, F.silu(linear64(mlp.gate_proj, hidden)) * linear64(mlp.up_proj, hidden))
        x = torch.empty_like(x)
        x[order] = xs
    return model.merger(x.float())


def test_patch_embed_as_linear_equals_conv3d():
    model = tiny_tower()
    patches = torch.randn(10, 3, 2, 16, 16)
    conv = model.patch_embed.proj(patches).flatten(1)  # [10, hidden]
    linear = model.patch_embed(patches.flatten(1))
    torch.testing.assert_close(linear, conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, chunk", [(3, 4), (3, 100), (None, 4)])
def test_segment_attention_matches_brute_force(window, chunk):
    torch.manual_seed(1)
    attn = VisionAttention(16, num_heads=4, num_kv_heads=2, head_dim=4, window=window)
    if attn.sinks is not None:
        attn.sinks.data.normal_()
    q, k, v = torch.randn(13, 4, 4), torch.randn(13, 2, 4), torch.randn(13, 2, 4)
    expected = brute_force_attention(q, k, v, scale=0.5, window=window, sinks=attn.sinks)
    segment = SegmentAttention([13], torch.device("cpu"), [], impl="reference", query_chunk=chunk)
    out = segment(q, k, v, scale=attn.scale, causal=False, window=window, sinks=attn.sinks)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [(1, 4, 6), (2, 6, 4)])
def test_column_major_runs_match_reference(grid):
    model = tiny_tower(query_chunk=7)
    pixel_values = torch.randn(math.prod(grid), 1536)
    with torch.no_grad():
        out = model(pixel_values, torch.tensor([grid]))
        expected = reference_forward(model, pixel_values, grid)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_batched_items_equal_one_by_one():
    model = tiny_tower(query_chunk=8)
    grids = [(1, 4, 6), (2, 2, 4), (1, 8, 2)]
    pixels = [torch.randn(math.prod(g), 1536) for g in grids]
    with torch.no_grad():
        batched = model(torch.cat(pixels), torch.tensor(grids))
        single = torch.cat([model(p, torch.tensor([g])) for p, g in zip(pixels, grids)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_flex_path_equals_reference_path():
    # eager FlexAttention on the CPU: the block masks of several items, full and windowed blocks with sinks
    model = tiny_tower(query_chunk=8)
    grids = [(1, 4, 6), (2, 2, 4), (1, 8, 2)]
    pixel_values = torch.randn(sum(math.prod(g) for g in grids), 1536)
    with torch.no_grad():
        expected = model(pixel_values, torch.tensor(grids))
        model.attention_impl = "flex"
        out = model(pixel_values, torch.tensor(grids))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height, width", [(224, 224), (448, 640)])
def test_image_token_count_is_hw_over_32_squared(height, width):
    model = tiny_tower(depth=2, vit_window_attn_types=[0, 1], fullatt_block_indexes=[])
    grid = (1, height // 16, width // 16)
    with torch.no_grad():
        out = model(torch.randn(math.prod(grid), 1536), torch.tensor([grid]))
    assert out.shape == ((height // 32) * (width // 32), 24)
    assert torch.isfinite(out).all() and out.std() > 0


def test_without_sinks_window_blocks_attend_fully():
    config = VisionConfig.from_dict({**TINY_VISION, "use_sink": False})
    assert [config.block_window(i) for i in range(config.depth)] == [None] * config.depth
    with_sinks = VisionConfig.from_dict(TINY_VISION)
    assert [with_sinks.block_window(i) for i in range(6)] == [None, 5, 5, 5, 5, 5]


def test_state_dict_names_are_the_hub_names():
    config = VisionConfig.from_dict(V2_5.vision_config)  # the release geometry (ref §5.1)
    with torch.device("meta"):
        model = MiMoVisionTransformer(config)
    expected = {"patch_embed.proj.weight": (1280, 3, 2, 16, 16), "merger.ln_q.weight": (1280,),
                "merger.mlp.0.weight": (5120, 5120), "merger.mlp.0.bias": (5120,),
                "merger.mlp.2.weight": (4096, 5120), "merger.mlp.2.bias": (4096,)}
    for i in range(28):
        p = f"blocks.{i}."
        expected |= {p + "norm1.weight": (1280,), p + "norm2.weight": (1280,),
                     p + "attn.qkv.weight": (3072, 1280), p + "attn.qkv.bias": (3072,),
                     p + "attn.proj.weight": (1280, 2048), p + "attn.proj.bias": (1280,),
                     p + "mlp.gate_proj.weight": (4608, 1280), p + "mlp.gate_proj.bias": (4608,),
                     p + "mlp.up_proj.weight": (4608, 1280), p + "mlp.up_proj.bias": (4608,),
                     p + "mlp.down_proj.weight": (1280, 4608), p + "mlp.down_proj.bias": (1280,)}
        if i not in (0, 9, 18, 27):
            expected[p + "attn.sinks"] = (32,)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(729e6, rel=0.01)  # ref §2.4


@pytest.mark.parametrize(
    "override, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"kv_channels": 16}, "kv_channels"),
        ({"vit_window_attn_types": [0, 1]}, "vit_window_attn_types"),
        ({"vit_window_attn_types": [0, 2, 0, 0, 0, 0]}, "vit_window_attn_types"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"patch_size": 0}, "patch_size"),
    ],
)
def test_unsupported_config_values_raise(override, message):
    with pytest.raises(ConfigError, match=message):
        VisionConfig.from_dict({**TINY_VISION, **override})


def test_sglang_defaults():
    config = VisionConfig.from_dict({})
    assert (config.num_key_value_heads, config.head_dim, config.out_hidden_size) == (8, 64, 2048)
    assert config.vit_window_attn_types == (-1,) * 28 and config.use_sink is False


@pytest.mark.parametrize(
    "shape, grid, message",
    [
        ((24, 1000), [[1, 4, 6]], "1536"),
        ((23, 1536), [[1, 4, 6]], "24 patches"),
        ((24, 1536), [[1, 3, 8]], "multiples of spatial_merge_size"),
        ((24, 1536), [[1, 4, 6, 1]], "grid_thw"),
    ],
)
def test_bad_inputs_raise(shape, grid, message):
    with pytest.raises(ValueError, match=message):
        tiny_tower()(torch.randn(shape), torch.tensor(grid))
