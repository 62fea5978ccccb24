"""Hugging Face `MiMoV2FlashForCausalLM` as a reference for our language model (test helper, not product code).

Typical use (tiny random model or a converted checkpoint):

    config = MiMoV2Config.from_hf_config(tiny_hub_config())
    ours = MiMoV2ForCausalLM(config); randomize_weights(ours, seed=0)
    hf = build_hf_model(config, hub_state_dict(ours))
    assert mimo_greedy(ours, prompt, 32) == hf_greedy(hf, prompt, 32)

Semantic differences between the two implementations, handled here:
  * Sliding window: HF keeps `sliding_window` keys *including* the query (mask `kv > q - window`); ours (and
    sglang's FA `window_size=(W, 0)`) keeps the query plus W previous tokens. HF is configured with W + 1.
  * HF ties the SWA geometry to the full one: same query heads and head dims, kv heads doubled, and sinks on
    every SWA layer and never on full layers. `hf_config` rejects configs it cannot express.
  * HF names the sink logits `self_attn.sinks` and packs experts as `experts.gate_up_proj` [E, 2I, H]
    (gate rows first) and `experts.down_proj` [E, H, I]; our hub-named per-expert weights are repacked.
  * HF has no `scale_emb` and no MTP layers (`model.mtp.*` is not copied).
  * HF's eager attention runs in the model dtype, ours in float32: identical in float32 (the parity dtype);
    in bf16 the rounding differs and can flip near-tied MoE routing decisions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # imported where used: the GPU machines' transformers does not import (scipy built for numpy 2)
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

from mimo.config import MiMoV2Config
from mimo.models.attention import NoCacheAttention
from mimo.models.language_model import MiMoV2ForCausalLM


def tiny_hub_config(**overrides: Any) -> dict[str, Any]:
    """A hub-style config.json for a tiny model with full + sliding, dense + MoE layers, that HF can express."""
    config = {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 4,
        "hybrid_layer_pattern": [0, 1, 1, 0],
        "moe_layer_freq": [0, 1, 1, 1],
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2,
        "head_dim": 12,
        "v_head_dim": 8,
        "swa_head_dim": 12,
        "swa_v_head_dim": 8,
        "partial_rotary_factor": 0.334,
        "rope_theta": 5_000_000.0,
        "swa_rope_theta": 10_000.0,
        "sliding_window_size": 8,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "attention_value_scale": 0.707,
        "layernorm_epsilon": 1e-5,
        "max_position_embeddings": 256,
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": None,
        "n_shared_experts": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    config.update(overrides)
    return config


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int) -> None:
    """Random weights scaled so activations and logits stay O(1) (non-trivial greedy choices and routing)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith("e_score_correction_bias"):
            value = 0.1 * noise  # non-zero so selection differs from the pure sigmoid ranking
        elif tensor.dim() >= 2 and "embed_tokens" not in name:  # [out, in] or per expert [E, out, in]
            value = noise / math.sqrt(tensor.shape[-1])
        else:  # embeddings, sink logits
            value = noise
        tensor.copy_(value.to(tensor.dtype))


def random_tiny_model(device: torch.device, seed: int = 0, **config_overrides: Any) -> MiMoV2ForCausalLM:
    """The tiny hub config's model (`tiny_hub_config(**config_overrides)`) with `randomize_weights`, for inference."""
    model = MiMoV2ForCausalLM(MiMoV2Config.from_hf_config(tiny_hub_config(**config_overrides)))
    randomize_weights(model, seed=seed)
    return model.requires_grad_(False).eval().to(device)


def hf_config(config: MiMoV2Config) -> MiMoV2FlashConfig:
    """The transformers config with the same semantics as `config` (raises if HF cannot express it)."""
    from transformers import MiMoV2FlashConfig

    full, sliding = config.full_attention, config.sliding_attention
    has_sliding = "sliding" in config.layer_types
    problems = []
    if full.has_sinks:
        problems.append("HF has no sinks on full-attention layers")
    if has_sliding:
        if not sliding.has_sinks:
            problems.append("HF always has sinks on sliding layers")
        geometry = ("num_heads", "head_dim", "v_head_dim")
        if any(getattr(sliding, key) != getattr(full, key) for key in geometry):
            problems.append("HF sliding layers share num_heads / head_dim / v_head_dim with full layers")
        if sliding.num_kv_heads != 2 * full.num_kv_heads:
            problems.append("HF sliding layers have exactly twice the full layers' kv heads")
    if config.scale_emb is not None:
        problems.append("HF has no scale_emb")
    if problems:
        raise ValueError(f"config cannot be expressed as MiMoV2FlashConfig: {'; '.join(problems)}")

    def rope(theta: float) -> dict[str, Any]:
        return {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": config.partial_rotary_factor}

    hf = MiMoV2FlashConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=full.num_heads,
        num_key_value_heads=full.num_kv_heads,
        head_dim=full.head_dim,
        v_head_dim=full.v_head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"full_attention": rope(full.rope_theta), "sliding_attention": rope(sliding.rope_theta)},
        attention_bias=False,
        moe_intermediate_size=config.moe_intermediate_size,
        num_experts_per_tok=config.num_experts_per_tok,
        n_routed_experts=config.n_routed_experts,
        routed_scaling_factor=config.routed_scaling_factor,
        n_group=config.n_group,
        topk_group=config.topk_group,
        norm_topk_prob=config.norm_topk_prob,
        # HF's window counts the query itself; ours is the query plus `sliding_window` previous tokens.
        sliding_window=sliding.sliding_window + 1 if has_sliding else None,
        layer_types=[f"{t}_attention" for t in config.layer_types],
        mlp_layer_types=["sparse" if moe else "dense" for moe in config.moe_layers],
        attention_value_scale=config.attention_value_scale,
        pad_token_id=config.pad_token_id,
    )
    hf._attn_implementation = "eager"  # the only HF attention path with sinks and v_head_dim != head_dim
    return hf


def hf_state_dict(config: MiMoV2Config, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our hub-named state dict -> HF parameter names (sinks renamed, experts packed, MTP dropped)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.startswith("model.mtp.") or ".mlp.experts." in name:
            continue
        out[name.replace(".self_attn.attention_sink_bias", ".self_attn.sinks")] = tensor
    for i, is_moe in enumerate(config.moe_layers):
        if not is_moe:
            continue
        prefix = f"model.layers.{i}.mlp.experts"
        experts = range(config.n_routed_experts)
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([state_dict[f"{prefix}.{e}.gate_proj.weight"], state_dict[f"{prefix}.{e}.up_proj.weight"]])
             for e in experts]
        )  # [E, 2I, H]
        out[f"{prefix}.down_proj"] = torch.stack([state_dict[f"{prefix}.{e}.down_proj.weight"] for e in experts])
    if config.tie_word_embeddings:  # HF lists the tied head under both names
        out["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    return out


def build_hf_model(config: MiMoV2Config, state_dict: dict[str, torch.Tensor]) -> MiMoV2FlashForCausalLM:
    """An eval-mode HF model holding exactly the weights of our (hub-named, split q/k/v) state dict."""
    from transformers import MiMoV2FlashForCausalLM

    dtype = state_dict["model.embed_tokens.weight"].dtype
    model = MiMoV2FlashForCausalLM(hf_config(config)).to(dtype).eval()
    model.load_state_dict(hf_state_dict(config, state_dict), strict=True)
    return model


@torch.no_grad()
def hf_logits(model: MiMoV2FlashForCausalLM, input_ids: list[int]) -> torch.Tensor:
    """float32 logits [T, vocab] of one sequence, no KV cache."""
    ids = torch.tensor([input_ids], device=model.device)
    return model(input_ids=ids, use_cache=False).logits[0].float()


@torch.no_grad()
def mimo_logits(model: MiMoV2ForCausalLM, input_ids: list[int]) -> torch.Tensor:
    """float32 logits [T, vocab] of one sequence through our model with NoCacheAttention."""
    device = model.model.embed_tokens.weight.device
    ids = torch.tensor(input_ids, device=device)
    hidden = model(torch.arange(len(input_ids), device=device), NoCacheAttention([len(input_ids)]), model.embed(ids))
    return model.compute_logits(hidden)


def hf_greedy(model: MiMoV2FlashForCausalLM, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation, recomputing the whole sequence every step (no cache)."""
    return _greedy(lambda ids: hf_logits(model, ids), prompt_ids, max_new_tokens)


def mimo_greedy(model: MiMoV2ForCausalLM, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation with our model, recomputing the whole sequence every step (no cache)."""
    return _greedy(lambda ids: mimo_logits(model, ids), prompt_ids, max_new_tokens)


def _greedy(logits_fn, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        ids.append(int(logits_fn(ids)[-1].argmax()))
    return ids[len(prompt_ids):]
