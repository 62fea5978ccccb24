"""Model geometries for `python -m builders tiny`: the hub `config.json` schema (ref §1.1) with tiny or real widths.

`tiny` runs on 2 CPU cores in milliseconds per forward yet keeps every structural feature of MiMo-V2.5: full and
sliding layers with different kv-head counts (4 and 8, so the fused qkv_proj is TP-4 interleaved and its FP8
grids are per shard), asymmetric q/k vs v head dims, sinks on sliding layers, a dense layer 0 then MoE layers,
MTP layers, a sliding window short prompts already exceed, and complete vision / audio configs.
`v2.5` keeps the real V2.5 widths (ref §1.2, §5.1, §6) with any number of LM layers.
"""

import copy
from dataclasses import dataclass
from typing import Any

TINY_MAX_SHARD_BYTES = 256 * 1024  # small, so the tiny checkpoint really has several shards
REAL_MAX_SHARD_BYTES = 5 * 1024**3
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


@dataclass(frozen=True, slots=True)
class Preset:
    language: dict[str, Any]  # config.json keys except the per-layer lists, token ids and layout
    num_layers: int
    full_attention_period: int  # layer i is full attention iff i == 0 or (i + 1) % period == 0
    vocab_multiple: int  # vocab_size = tokenizer size rounded up to this ...
    min_vocab_size: int  # ... but at least this (the real embedding / lm_head width)
    vision_config: dict[str, Any]
    audio_config: dict[str, Any]
    audio_tokenizer_config: dict[str, Any]
    processor_config: dict[str, Any]  # everything but the special-token ids
    max_shard_bytes: int


def _language(**widths: Any) -> dict[str, Any]:
    """Keys shared by all presets (values as in MiMo-V2.5, ref §1.2), updated with `widths`."""
    return {
        "partial_rotary_factor": 0.334,
        "rope_theta": 10_000_000.0,
        "swa_rope_theta": 10_000.0,
        "rope_scaling": None,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "attention_value_scale": 0.707,
        "attention_bias": False,
        "attention_chunk_size": 128,
        "hybrid_block_size": None,
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "n_shared_experts": None,
        "routed_scaling_factor": None,
        "hidden_act": "silu",
        "layernorm_epsilon": 1e-5,
        "rms_norm_eps": 1e-6,  # read only as the ViT norm eps (ref §1.1)
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "num_nextn_predict_layers": 3,
        "torch_dtype": "bfloat16",
        **widths,
    }


def _audio_processor(audio_channels: int, **video: Any) -> dict[str, Any]:
    return {
        "audio_sampling_rate": 24000,
        "audio_n_mels": 128,
        "audio_hop_length": 240,
        "audio_group_size": 4,
        "audio_channels": audio_channels,
        "use_video_timestamps": True,
        **video,
    }


TINY = Preset(
    language=_language(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=24,
        v_head_dim=16,
        swa_num_attention_heads=8,
        swa_num_key_value_heads=8,
        swa_head_dim=24,
        swa_v_head_dim=16,
        sliding_window_size=16,
        sliding_window=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    ),
    num_layers=4,
    full_attention_period=4,
    vocab_multiple=64,
    min_vocab_size=0,
    vision_config={
        "model_type": "mimovl",
        "depth": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
        "hidden_act": "silu",
        "num_heads": 4,
        "num_key_value_heads": 2,
        "qk_channels": 16,
        "kv_channels": 16,
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [0, 3],
        "vit_window_attn_types": [-1, 0, 1, -1],
        "visual_token_window_size": 8,
        "use_sink": True,
    },
    audio_config={
        "audio_channels": 8,
        "speech_vocab_size": 80,
        "speech_zeroemb_idx": 64,
        "group_size": 4,
        "input_local_layers": 2,
        "input_local_dim": 32,
        "input_local_attn_heads": 2,
        "input_local_head_dim": 16,
        "input_local_intermediate_size": 64,
        "input_full_attention": True,
        "rope_theta": 640000.0,
        "partial_rotary_factor": 1.0,
        "projection_layers": 2,
        "add_post_norm": True,
        "out_hidden_size": 64,
        "audio_segment_size": 6000,
    },
    audio_tokenizer_config={
        "n_mels": 128,
        "d_model": 32,
        "encoder_layers": 2,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "rope_theta": 10000.0,
        "kernel_size": 3,
        "stride_size": 2,
        "avg_pooler": 2,
        "encoder_skip_layer_id": 1,
        "encoder_causal": True,
        "encoder_attn_window_size": [8, 0],
        "hybrid_attention": True,
        "swa_per_block": 2,
        "num_quantizers": 8,
        "codebook_size": [64, 64, 32, 16],
        "sampling_rate": 24000,
        "hop_length": 240,
    },
    processor_config=_audio_processor(
        8, fps=2.0, min_frames=2, max_frames=16, image_max_pixels=256 * 32 * 32, video_max_pixels=64 * 32 * 32,
        video_total_max_pixels=512 * 32 * 32,
    ),
    max_shard_bytes=TINY_MAX_SHARD_BYTES,
)

V2_5 = Preset(
    language=_language(
        hidden_size=4096,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=192,
        v_head_dim=128,
        swa_num_attention_heads=64,
        swa_num_key_value_heads=8,
        swa_head_dim=192,
        swa_v_head_dim=128,
        sliding_window_size=128,
        sliding_window=128,
        intermediate_size=16384,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        num_experts_per_tok=8,
        max_position_embeddings=1048576,
    ),
    num_layers=48,
    full_attention_period=6,
    vocab_multiple=256,
    min_vocab_size=152576,
    vision_config={
        "model_type": "mimovl",
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
        "out_hidden_size": 4096,
        "fullatt_block_indexes": [0, 9, 18, 27],
        "vit_window_attn_types": ([-1] + [0] * 4 + [1] * 4) * 3 + [-1],
        "visual_token_window_size": 64,
        "use_sink": True,
    },
    audio_config={
        "audio_channels": 20,
        "speech_vocab_size": 1280,
        "speech_zeroemb_idx": 1024,
        "group_size": 4,
        "input_local_layers": 6,
        "input_local_dim": 1024,
        "input_local_attn_heads": 16,
        "input_local_head_dim": 64,
        "input_local_intermediate_size": 4096,
        "input_full_attention": True,
        "rope_theta": 640000.0,
        "partial_rotary_factor": 1.0,
        "projection_layers": 2,
        "add_post_norm": True,
        "out_hidden_size": 4096,
        "audio_segment_size": 6000,
    },
    audio_tokenizer_config={
        "n_mels": 128,
        "d_model": 1024,
        "encoder_layers": 24,
        "encoder_attention_heads": 16,
        "encoder_ffn_dim": 4096,
        "rope_theta": 10000.0,
        "kernel_size": 3,
        "stride_size": 2,
        "avg_pooler": 2,
        "encoder_skip_layer_id": 3,
        "encoder_causal": True,
        "encoder_attn_window_size": [128, 0],
        "hybrid_attention": True,
        "swa_per_block": 2,
        "num_quantizers": 20,
        "codebook_size": [1024, 1024, 256] + [128] * 17,
        "sampling_rate": 24000,
        "hop_length": 240,
    },
    processor_config=_audio_processor(20, fps=1.0, max_frames=3600),
    max_shard_bytes=REAL_MAX_SHARD_BYTES,
)

PRESETS = {"tiny": TINY, "v2.5": V2_5}


def hub_config(
    preset: Preset, *, num_layers: int, token_ids: dict[str, int], fp8: bool, fused_qkv: bool
) -> dict[str, Any]:
    """The complete hub config.json.

    Args:
        token_ids: `write_tiny_tokenizer`'s result: vocab_size, eos/pad ids and every processor_config id key.
        fused_qkv: V2.5 layout (`MiMoV2ForCausalLM`, TP-interleaved qkv_proj) or Flash-style split q/k/v.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    special = {k: v for k, v in token_ids.items() if k not in ("vocab_size", "eos_token_id", "pad_token_id")}
    multiple = preset.vocab_multiple
    config = {
        "architectures": ["MiMoV2ForCausalLM" if fused_qkv else "MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2" if fused_qkv else "mimo_v2_flash",
        "vocab_size": max(preset.min_vocab_size, -(-token_ids["vocab_size"] // multiple) * multiple),
        "num_hidden_layers": num_layers,
        "hybrid_layer_pattern": [
            0 if i == 0 or (i + 1) % preset.full_attention_period == 0 else 1 for i in range(num_layers)
        ],
        "moe_layer_freq": [0] + [1] * (num_layers - 1),
        **copy.deepcopy(preset.language),
        "bos_token_id": None,
        "eos_token_id": token_ids["eos_token_id"],
        "pad_token_id": token_ids["pad_token_id"],
        "vision_config": copy.deepcopy(preset.vision_config),
        "audio_config": copy.deepcopy(preset.audio_config),
        "processor_config": {**copy.deepcopy(preset.processor_config), **special},
    }
    if fused_qkv:
        config["attention_projection_layout"] = "fused_qkv"
    if fp8:
        config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    return config
