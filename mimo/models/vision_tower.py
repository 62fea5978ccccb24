"""MiMo-V2.5 vision tower (checkpoint prefix `visual.`; ref §2.4, §5).

A Qwen2.5-VL-style ViT: Conv3d patch embedding applied as a linear, 2-D RoPE, pre-norm blocks whose attention
is either full or a 1-D local window with per-head sinks (tokens walked row-major or column-major by merge
unit), and a 2x2 patch merger into the language model's hidden size.

Inputs come from the processor as one row per 16x16x2 patch, ordered (C, T, kh, kw) inside the row and
2x2-merge-unit-major across rows (the four patches of a merge unit are consecutive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimo.config import ConfigError
from mimo.models.encoder_attention import SegmentAttention
from mimo.models.layers import RMSNorm, SwiGLUMLP, apply_rotary, rotary_cos_sin

# Reference path: queries are attended in chunks of this many rows so the float32 score matrix stays bounded
# (a 4096-token image has 16384 patches per segment).
DEFAULT_QUERY_CHUNK = 1024


# sglang `MiMoVLVisionConfig` defaults, keyed by hub `vision_config` name (ref §5.1 table).
SGLANG_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 28,
    "hidden_size": 1280,
    "intermediate_size": 4608,
    "hidden_act": "silu",
    "num_heads": 32,
    "num_key_value_heads": 8,
    "qk_channels": 64,
    "kv_channels": 64,
    "in_channels": 3,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "out_hidden_size": 2048,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "vit_window_attn_types": None,
    "visual_token_window_size": 64,
    "use_sink": False,
}


@dataclass(frozen=True, slots=True)
class VisionConfig:
    """Hub `vision_config` (V2.5 values in comments, ref §5.1)."""

    depth: int  # 28
    hidden_size: int  # 1280
    intermediate_size: int  # 4608
    num_heads: int  # 32
    num_key_value_heads: int  # 8
    head_dim: int  # 64, hub `qk_channels` (= `kv_channels`)
    in_channels: int  # 3 (hub `in_channels` or `in_chans`)
    patch_size: int  # 16
    temporal_patch_size: int  # 2
    spatial_merge_size: int  # 2
    out_hidden_size: int  # 4096 (= LM hidden)
    fullatt_block_indexes: tuple[int, ...]  # (0, 9, 18, 27)
    vit_window_attn_types: tuple[int, ...]  # per block: 1 = merge units walked column-major, 0 / -1 = row-major
    visual_token_window_size: int  # 64: windowed blocks attend |i - j| <= this many tokens
    use_sink: bool  # True
    rope_theta: float = 10000.0  # not a hub key (Qwen2.5-VL vision rotary)
    rms_norm_eps: float = 1e-6  # not a hub key: sglang hard-codes 1e-6 for every ViT norm

    @classmethod
    def from_dict(cls, hub: dict[str, Any]) -> VisionConfig:
        d = {**SGLANG_VISION_DEFAULTS, **hub}
        if d["hidden_act"] != "silu":
            raise ConfigError(f"vision_config.hidden_act={d['hidden_act']!r} is not supported; accepted: ('silu',)")
        head_dim = d["hidden_size"] // d["num_heads"] if d["qk_channels"] is None else d["qk_channels"]
        if d["kv_channels"] not in (None, head_dim):
            raise ConfigError(
                f"vision_config.kv_channels={d['kv_channels']!r} differs from qk_channels={head_dim}; "
                "the MiMo ViT uses one head dim for q, k and v"
            )
        window_types = d["vit_window_attn_types"]
        return cls(
            depth=d["depth"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_heads=d["num_heads"],
            num_key_value_heads=d["num_heads"] if d["num_key_value_heads"] is None else d["num_key_value_heads"],
            head_dim=head_dim,
            in_channels=hub.get("in_channels", hub.get("in_chans", d["in_channels"])),
            patch_size=d["patch_size"],
            temporal_patch_size=d["temporal_patch_size"],
            spatial_merge_size=d["spatial_merge_size"],
            out_hidden_size=d["out_hidden_size"],
            fullatt_block_indexes=tuple(d["fullatt_block_indexes"]),
            vit_window_attn_types=(-1,) * d["depth"] if window_types is None else tuple(window_types),
            visual_token_window_size=d["visual_token_window_size"],
            use_sink=bool(d["use_sink"]),
        )

    def __post_init__(self) -> None:
        for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "num_key_value_heads", "head_dim",
                    "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size", "out_hidden_size",
                    "visual_token_window_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"vision_config.{key}={value!r}: expected a positive int")
        if self.num_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"vision_config.num_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 4 != 0:
            raise ConfigError(f"vision_config head dim {self.head_dim}: 2-D RoPE needs a multiple of 4")
        if len(self.vit_window_attn_types) != self.depth or any(t not in (-1, 0, 1) for t in self.vit_window_attn_types):
            raise ConfigError(
                f"vision_config.vit_window_attn_types={list(self.vit_window_attn_types)}: "
                f"expected {self.depth} values in (-1, 0, 1)"
            )

    @property
    def patch_dim(self) -> int:
        """Width of one pixel row: C * T * p * p (1536 for V2.5)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LM token (4)."""
        return self.spatial_merge_size**2

    def block_window(self, block_idx: int) -> int | None:
        """Local attention window of a block, or None for full attention.

        sglang gives non-full blocks a (w, w) window only together with sinks; without `use_sink` they attend
        fully (ref §5.2 note).
        """
        if block_idx in self.fullatt_block_indexes or not self.use_sink:
            return None
        return self.visual_token_window_size


class VisionPatchEmbed(nn.Module):
    """Conv3d(kernel = stride = (T, p, p), no bias) applied to pre-cut patches as one matmul."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # [dim, C*T*p*p], (C, T, kh, kw) order = the pixel rows' order
        return F.linear(pixel_values.to(weight.dtype), weight)  # [N, dim]


class VisionAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window = window
        self.scale = head_dim**-0.5
        # rows ordered [Q; K; V] as in the checkpoint
        self.qkv = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=True)
        self.proj = nn.Linear(num_heads * head_dim, hidden_size, bias=True)
        # sinks exist only on windowed blocks (sglang creates them for non-full blocks when use_sink)
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if window is not None else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: SegmentAttention) -> torch.Tensor:
        """Non-causal attention inside each temporal slice (the segments of `attention`)."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv(x).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1,
        )
        # RoPE in float32 like Qwen2.5-VL's vision rotary
        q = apply_rotary(q.view(num_tokens, self.num_heads, self.head_dim).float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.view(num_tokens, self.num_kv_heads, self.head_dim).float(), cos, sin).to(x.dtype)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = attention(q, k, v, scale=self.scale, causal=False, window=self.window, sinks=self.sinks)  # [N, Hq, D]
        return self.proj(out.reshape(num_tokens, -1))  # [N, hidden]


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig, block_idx: int):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = VisionAttention(
            config.hidden_size, config.num_heads, config.num_key_value_heads, config.head_dim,
            window=config.block_window(block_idx),
        )
        self.norm2 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: SegmentAttention) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, attention)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nn.Module):
    """RMSNorm per patch, concatenate the 4 patches of a merge unit, MLP to the LM width."""

    def __init__(self, hidden_size: int, merge_unit: int, out_hidden_size: int, eps: float):
        super().__init__()
        merged = hidden_size * merge_unit
        self.ln_q = RMSNorm(hidden_size, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = self.ln_q(x).view(-1, self.mlp[0].in_features)  # [N / 4, 4 * hidden]
        return self.mlp(merged)  # [N / 4, out_hidden]


class MiMoVisionTransformer(nn.Module):
    """attention_impl: "auto" (FlexAttention on CUDA, the float32 reference elsewhere), "reference" or "flex"
    (mimo.models.encoder_attention); query_chunk bounds the reference path's score blocks; compile_blocks: on the
    CUDA flex path, run each block through torch.compile (the first forward compiles, about 15 s on an H200)."""

    def __init__(
        self,
        config: VisionConfig,
        query_chunk: int = DEFAULT_QUERY_CHUNK,
        attention_impl: str = "auto",
        compile_blocks: bool = True,
    ):
        super().__init__()
        self.config = config
        self.query_chunk = query_chunk
        self.attention_impl = attention_impl
        self.compile_blocks = compile_blocks
        self._compiled_blocks: list[nn.Module] | None = None
        self.patch_embed = VisionPatchEmbed(
            config.in_channels, config.temporal_patch_size, config.patch_size, config.hidden_size
        )
        self.blocks = nn.ModuleList(VisionBlock(config, i) for i in range(config.depth))
        self.merger = VisionPatchMerger(
            config.hidden_size, config.merge_unit, config.out_hidden_size, config.rms_norm_eps
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Encode a batch of images or videos.

        Args:
            pixel_values: [N, C*T*p*p] patch rows of all items, merge-unit-major (see module docstring).
            grid_thw: [n, 3] (t, h, w) patch grid per item; sum(t*h*w) == N.
        Returns:
            [N / 4, out_hidden_size], items in order, each item's tokens row-major over its merged grid.
        """
        grids = self.check_inputs(pixel_values, grid_thw)
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.device))  # [N, hidden]
        device = x.device

        row_cos, row_sin = self._rotary_tables(grids, device)  # [N, head_dim / 2] each
        to_columns = self._column_order(grids, device)  # [N] token permutation
        to_rows = torch.argsort(to_columns)
        col_cos, col_sin = row_cos[to_columns], row_sin[to_columns]
        # one attention segment per temporal slice; both walks keep the slices contiguous and in place
        attention = SegmentAttention(
            [h * w for t, h, w in grids for _ in range(t)], device,
            specs=[(False, self.config.block_window(i)) for i in range(self.config.depth)],
            impl=self.attention_impl, query_chunk=self.query_chunk,
        )

        # inductor's CPU flex template has no log-sum-exp output: compiled blocks are for the CUDA fast path
        compiled = attention.impl == "flex" and self.compile_blocks and device.type == "cuda"
        blocks = self.compiled_blocks() if compiled else self.blocks
        in_columns = False
        for block, window_type in zip(blocks, self.config.vit_window_attn_types):
            # permute when entering / leaving a run of column-major blocks (sglang `run_blocks`)
            if (window_type == 1) != in_columns:
                x = x[to_rows] if in_columns else x[to_columns]
                in_columns = not in_columns
            cos, sin = (col_cos, col_sin) if in_columns else (row_cos, row_sin)
            x = block(x, cos, sin, attention)
        if in_columns:
            # sglang would hand a trailing column-major run straight to the merger; the LM expects each item's
            # tokens row-major, so restore that order (V2.5's pattern ends with a full row-major block anyway).
            x = x[to_rows]
        return self.merger(x)

    def compiled_blocks(self) -> list[nn.Module]:
        """The blocks through torch.compile, which fuses the norms, float32 RoPE and SwiGLU around the attention
        kernel; dynamic shapes, so one compile serves every image size. A plain list, not submodules: the state
        dict keeps the hub names."""
        if self._compiled_blocks is None:
            self._compiled_blocks = [torch.compile(block, dynamic=True) for block in self.blocks]
        return self._compiled_blocks

    def check_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
        """Validate shapes; returns grid_thw as host ints."""
        config = self.config
        if pixel_values.dim() != 2 or pixel_values.shape[1] != config.patch_dim:
            raise ValueError(
                f"pixel_values must be [num_patches, {config.patch_dim}], found {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, found {pixel_values.dtype}")
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.is_floating_point():
            raise ValueError(f"grid_thw must be an integer [n, 3] tensor, found {grid_thw.dtype} {tuple(grid_thw.shape)}")
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        if not grids:
            raise ValueError("grid_thw must describe at least one image or video")
        merge = config.spatial_merge_size
        for i, (t, h, w) in enumerate(grids):
            if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
                raise ValueError(
                    f"grid_thw[{i}] = {(t, h, w)}: t, h, w must be positive and h, w multiples of "
                    f"spatial_merge_size={merge}"
                )
        num_patches = sum(t * h * w for t, h, w in grids)
        if num_patches != pixel_values.shape[0]:
            raise ValueError(
                f"grid_thw describes {num_patches} patches but pixel_values has {pixel_values.shape[0]} rows"
            )
        return grids

    def _rotary_tables(self, grids: list[tuple[int, int, int]], device: torch.device):
        """cos/sin [N, head_dim / 2]: first half rotates by the patch row, second half by the patch column."""
        merge = self.config.spatial_merge_size
        positions = []
        for t, h, w in grids:
            rows = torch.arange(h, device=device)[:, None].expand(h, w)
            cols = torch.arange(w, device=device)[None, :].expand(h, w)
            # (h, w) -> merge-unit-major order: [h/m, m, w/m, m] -> [h/m, w/m, m, m]
            hw = torch.stack([rows, cols], dim=-1).view(h // merge, merge, w // merge, merge, 2)
            positions.append(hw.permute(0, 2, 1, 3, 4).reshape(-1, 2).repeat(t, 1))  # [t*h*w, 2]
        positions = torch.cat(positions)  # [N, 2]
        axis_dim = self.config.head_dim // 2  # each axis rotates head_dim / 4 frequency pairs
        row_cos, row_sin = rotary_cos_sin(positions[:, 0], axis_dim, self.config.rope_theta)
        col_cos, col_sin = rotary_cos_sin(positions[:, 1], axis_dim, self.config.rope_theta)
        return torch.cat([row_cos, col_cos], dim=-1), torch.cat([row_sin, col_sin], dim=-1)

    def _column_order(self, grids: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
        """Token permutation walking each temporal slice's merge units column-major (whole units move)."""
        merge = self.config.spatial_merge_size
        unit_orders = []
        offset = 0
        for t, h, w in grids:
            units = torch.arange(t * (h // merge) * (w // merge), device=device).view(t, h // merge, w // merge)
            unit_orders.append(units.transpose(1, 2).reshape(-1) + offset)
            offset += units.numel()
        unit_order = torch.cat(unit_orders)  # [N / 4]
        unit = self.config.merge_unit
        return (unit_order[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)  # [N]
