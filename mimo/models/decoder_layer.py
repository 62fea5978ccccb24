"""MiMo-V2 attention layer and pre-norm decoder block (shared by the main layers and the MTP layers)."""

from __future__ import annotations

import torch
from torch import nn

from mimo.config import MiMoV2Config
from mimo.models.attention import AttentionBackend
from mimo.models.layers import RMSNorm, apply_rotary
from mimo.models.linear import QKVParallelLinear, RowParallelLinear
from mimo.models.moe import DenseMLP, MiMoV2MoE
from mimo.parallel.mapping import SINGLE_RANK, ParallelRank
from mimo.weights.fused_qkv import QKVGeometry

RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, sin: float32 [T, rotary_dim // 2]


class MiMoV2Attention(nn.Module):
    """GQA attention with separate q/k and v head dims, partial RoPE, value scaling and optional sinks.

    `qkv_proj` is one GEMM producing this rank's `[Q_r; K_r; V_r]`; `num_heads` / `num_kv_heads` are the local
    counts and `attention_sink_bias` holds the local query heads' sinks.
    """

    def __init__(
        self,
        hidden_size: int,
        geometry: QKVGeometry,
        sliding_window: int | None,
        has_sinks: bool,
        value_scale: float | None,
        layer_idx: int,
        parallel: ParallelRank = SINGLE_RANK,
    ):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(hidden_size, geometry, tp_size=parallel.tp_size, tp_rank=parallel.rank)
        local = self.qkv_proj.local_geometry
        self.num_heads = local.num_heads
        self.num_kv_heads = local.num_kv_heads
        self.head_dim = local.head_dim
        self.v_head_dim = local.v_head_dim
        self.sliding_window = sliding_window
        self.value_scale = value_scale
        self.layer_idx = layer_idx
        self.scale = self.head_dim**-0.5
        self.o_proj = RowParallelLinear(
            geometry.num_heads * geometry.v_head_dim, hidden_size, ("o_proj",),
            tp_size=parallel.tp_size, tp_rank=parallel.rank, group=parallel.group,
        )  # fmt: skip
        if has_sinks:
            self.attention_sink_bias = nn.Parameter(torch.zeros(self.num_heads))
        else:
            self.register_parameter("attention_sink_bias", None)

    def shard_of(self, name: str) -> tuple[int, int, torch.Tensor | None]:
        """(dim, full size, positions this rank holds or None for all) of a tensor of this module's own."""
        if name != "attention_sink_bias":
            raise KeyError(name)
        return 0, self.qkv_proj.geometry.num_heads, self.qkv_proj.query_head_index()

    def forward(self, x: torch.Tensor, rope: RopeTables, attn: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj.forward_split(x)  # [T, Hq, D], [T, Hk, D], [T, Hk, Dv]
        if self.value_scale is not None:
            v = v * self.value_scale
        cos, sin = rope
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = attn.attend(
            self.layer_idx, q, k, v,
            sliding_window=self.sliding_window, sinks=self.attention_sink_bias, scale=self.scale,
        )  # [T, Hq, Dv]
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.v_head_dim))


class MiMoV2DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)); the MLP is routed experts or a dense SwiGLU."""

    def __init__(
        self,
        config: MiMoV2Config,
        layer_idx: int,
        layer_type: str,
        is_moe: bool,
        parallel: ParallelRank = SINGLE_RANK,
    ):
        super().__init__()
        spec = config.attention_spec(layer_type)
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attn = MiMoV2Attention(
            hidden_size=config.hidden_size,
            geometry=QKVGeometry(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim),
            sliding_window=spec.sliding_window,
            has_sinks=spec.has_sinks,
            value_scale=config.attention_value_scale,
            layer_idx=layer_idx,
            parallel=parallel,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp: nn.Module
        if is_moe:
            self.mlp = MiMoV2MoE(
                hidden_size=config.hidden_size,
                moe_intermediate_size=config.moe_intermediate_size,
                num_experts=config.n_routed_experts,
                top_k=config.num_experts_per_tok,
                n_group=config.n_group,
                topk_group=config.topk_group,
                norm_topk_prob=config.norm_topk_prob,
                routed_scaling_factor=config.routed_scaling_factor,
                parallel=parallel,
            )
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, parallel)

    def forward(self, x: torch.Tensor, rope: RopeTables, attn: AttentionBackend) -> torch.Tensor:
        """The residual stream [T, H] before the block -> after it."""
        mlp_out, residual = self.forward_residual(x, None, rope, attn)
        return residual + mlp_out

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeTables,
                         attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The stream before the block as `x + residual` (residual None: x alone) -> (the MLP's output, the stream
        before it), whose sum is the stream after the block: each residual add is left to the next norm, which
        fuses it on CUDA. [T, H] each."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, attn), residual)
        return self.mlp(h), residual
