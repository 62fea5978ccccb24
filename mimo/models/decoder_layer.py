"""MiMo-V2 attention layer and pre-norm decoder block (shared by the main layers and the MTP layers)."""

from __future__ import annotations

import torch
from torch import nn

from mimo.config import MiMoV2Config
from mimo.models.attention import AttentionBackend
from mimo.models.layers import RMSNorm, SwiGLUMLP, apply_rotary
from mimo.models.moe import MiMoV2MoE

RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, sin: float32 [T, rotary_dim // 2]


class MiMoV2Attention(nn.Module):
    """GQA attention with separate q/k and v head dims, partial RoPE, value scaling and optional sinks.

    Head counts are the ones this module holds, so a tensor-parallel build passes per-rank counts and the
    matching slice of `attention_sink_bias`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int,
        sliding_window: int | None,
        has_sinks: bool,
        value_scale: float | None,
        layer_idx: int,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim
        self.sliding_window = sliding_window
        self.value_scale = value_scale
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * v_head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=False)
        if has_sinks:
            self.attention_sink_bias = nn.Parameter(torch.zeros(num_heads))
        else:
            self.register_parameter("attention_sink_bias", None)

    def forward(self, x: torch.Tensor, rope: RopeTables, attn: AttentionBackend) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hk, D]
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.v_head_dim)  # [T, Hk, Dv]
        if self.value_scale is not None:
            v = v * self.value_scale
        cos, sin = rope
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = attn.attend(
            self.layer_idx, q, k, v,
            sliding_window=self.sliding_window, sinks=self.attention_sink_bias, scale=self.scale,
        )  # [T, Hq, Dv]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.v_head_dim))


class MiMoV2DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)); the MLP is routed experts or a dense SwiGLU."""

    def __init__(self, config: MiMoV2Config, layer_idx: int, layer_type: str, is_moe: bool):
        super().__init__()
        spec = config.attention_spec(layer_type)
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attn = MiMoV2Attention(
            hidden_size=config.hidden_size,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            v_head_dim=spec.v_head_dim,
            sliding_window=spec.sliding_window,
            has_sinks=spec.has_sinks,
            value_scale=config.attention_value_scale,
            layer_idx=layer_idx,
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
            )
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rope: RopeTables, attn: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, attn)
        return x + self.mlp(self.post_attention_layernorm(x))  # [T, H]
