"""Tensor parallelism as a transform of a built model (gpt-fast style): `shard_language_model` swaps every
sharded projection of a `MiMoV2ForCausalLM`, typically built on the meta device, for its rank-local shape and
adds an all-reduce where a rank holds a partial sum. Weights are loaded afterwards (`mimo.parallel.loading`).

Per layer: q/k/v column parallel with local head counts (KV heads replicated when tp exceeds them), sinks sliced
with their query heads, o_proj row parallel + all-reduce; dense MLP gate/up column parallel, down row parallel +
all-reduce; MoE: the router stays whole (every rank routes every token identically), each rank runs its experts
(EP) on its slice of their intermediate dim (TP) and the partial outputs are all-reduced. See mimo.parallel.mapping.
"""

import torch
import torch.distributed as dist
from torch import nn

from mimo.loading import build_module
from mimo.models.decoder_layer import MiMoV2Attention, MiMoV2DecoderLayer
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.layers import SwiGLUMLP
from mimo.models.moe import MiMoV2MoE
from mimo.parallel.mapping import Mapping, rank_config
from mimo.weights.fused_qkv import QKVGeometry


def shard_language_model(
    model: MiMoV2ForCausalLM, mapping: Mapping, rank: int, group: dist.ProcessGroup | None
) -> MiMoV2ForCausalLM:
    """Make `model` (in place) the rank-`rank` part of a `mapping.world_size`-way model; returns it.

    The replaced modules are created on the device and dtype of the ones they replace, uninitialised. `model.config`
    becomes `rank_config(...)`: local head counts.
    """
    if mapping.world_size == 1:
        return model
    mapping.check_model(model.config)
    # From here on the config describes this rank's module, so per-rank state (the KV cache) sizes itself.
    model.config = model.model.config = rank_config(model.config, mapping.tp_size)
    layers: list[MiMoV2DecoderLayer] = list(model.model.layers)
    if model.model.mtp is not None:
        layers += list(model.model.mtp.layers)
    for layer in layers:
        _shard_attention(layer.self_attn, mapping.tp_size, group)
        if isinstance(layer.mlp, MiMoV2MoE):
            _shard_moe(layer.mlp, mapping, rank, group)
        else:
            layer.mlp = _sharded_mlp(layer.mlp, mapping.tp_size, group)
    return model


def _shard_attention(attn: MiMoV2Attention, tp: int, group: dist.ProcessGroup | None) -> None:
    full = QKVGeometry(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.v_head_dim)
    q_rows, k_rows, v_rows = full.rows_per_rank(tp)
    hidden = attn.q_proj.in_features
    attn.num_heads, attn.num_kv_heads = q_rows // attn.head_dim, k_rows // attn.head_dim
    attn.q_proj = _linear_like(attn.q_proj, hidden, q_rows)
    attn.k_proj = _linear_like(attn.k_proj, hidden, k_rows)
    attn.v_proj = _linear_like(attn.v_proj, hidden, v_rows)
    attn.o_proj = _linear_like(attn.o_proj, attn.num_heads * attn.v_head_dim, hidden)
    if attn.attention_sink_bias is not None:
        sinks = attn.attention_sink_bias
        attn.attention_sink_bias = nn.Parameter(torch.empty(attn.num_heads, device=sinks.device, dtype=sinks.dtype))
    attn.register_forward_hook(_all_reduce_output(group))


def _sharded_mlp(mlp: SwiGLUMLP, tp: int, group: dist.ProcessGroup | None) -> SwiGLUMLP:
    hidden, width = _hidden(mlp), _width(mlp) // tp
    local = _like(mlp, lambda: SwiGLUMLP(hidden, width))
    local.register_forward_hook(_all_reduce_output(group))
    return local


def _shard_moe(moe: MiMoV2MoE, mapping: Mapping, rank: int, group: dist.ProcessGroup | None) -> None:
    some_expert = next(iter(moe.experts.values()))
    hidden, width = _hidden(some_expert), _width(some_expert) // mapping.moe_tp_size
    moe.local_experts = mapping.local_experts(rank, moe.gate.num_experts)
    moe.experts = _like(
        some_expert, lambda: nn.ModuleDict({str(e): SwiGLUMLP(hidden, width) for e in moe.local_experts})
    )
    moe.register_forward_hook(_all_reduce_output(group))


def _hidden(mlp: SwiGLUMLP) -> int:
    return mlp.gate_proj.in_features


def _width(mlp: SwiGLUMLP) -> int:
    return mlp.gate_proj.out_features


def _like(module: nn.Module, build):
    weight = next(module.parameters())
    return build_module(build, weight.dtype, weight.device)


def _linear_like(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    weight = linear.weight
    return nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype)


def _all_reduce_output(group: dist.ProcessGroup | None):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)  # partial sums of the row-parallel / expert-parallel ranks
        return output

    return hook
