import json

import pytest

from mimo.config import AttentionSpec, ConfigError, MiMoV2Config

NUM_LAYERS = 48
FLASH_FULL_LAYERS = {0, 5, 11, 17, 23, 29, 35, 41, 47}


def flash_config(**overrides):
    """MiMo-V2-Flash hub config (ref §1.2 values)."""
    config = {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": 152576,
        "hidden_size": 4096,
        "num_hidden_layers": NUM_LAYERS,
        "intermediate_size": 16384,
        "moe_intermediate_size": 2048,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "head_dim": 192,
        "v_head_dim": 128,
        "swa_num_attention_heads": 64,
        "swa_num_key_value_heads": 8,
        "swa_head_dim": 192,
        "swa_v_head_dim": 128,
        "hybrid_layer_pattern": [0 if i in FLASH_FULL_LAYERS else 1 for i in range(NUM_LAYERS)],
        "hybrid_block_size": None,
        "sliding_window_size": 128,
        "sliding_window": 128,
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "attention_value_scale": 0.707,
        "attention_bias": False,
        "partial_rotary_factor": 0.334,
        "rope_theta": 5000000,
        "swa_rope_theta": 10000,
        "rope_scaling": None,
        "max_position_embeddings": 262144,
        "layernorm_epsilon": 1e-5,
        "hidden_act": "silu",
        "moe_layer_freq": [0] + [1] * (NUM_LAYERS - 1),
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": None,
        "n_shared_experts": None,
        "tie_word_embeddings": False,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    }
    config.update(overrides)
    return config


def v25_config(**overrides):
    """MiMo-V2.5: same LM as Flash, fused TP-4 qkv, multimodal sub-configs."""
    config = flash_config(
        architectures=["MiMoV2ForCausalLM"],
        model_type="mimo_v2",
        attention_projection_layout="fused_qkv",
        rope_theta=10000000,
        max_position_embeddings=1048576,
        num_nextn_predict_layers=3,
        eos_token_id=[151645, 151643],
        pad_token_id=151643,
        vision_config={"depth": 28},
        audio_config={"audio_channels": 8},
        processor_config={"image_token_id": 1},
    )
    config.update(overrides)
    return config


def test_flash_config():
    c = MiMoV2Config.from_hf_config(flash_config())
    assert c.architecture == "MiMoV2FlashForCausalLM"
    assert {i for i, t in enumerate(c.layer_types) if t == "full"} == FLASH_FULL_LAYERS
    assert c.moe_layers == (False,) + (True,) * 47
    assert c.full_attention == AttentionSpec(
        num_heads=64, num_kv_heads=4, head_dim=192, v_head_dim=128, rotary_dim=64,
        rope_theta=5e6, sliding_window=None, has_sinks=False,
    )
    assert c.sliding_attention == AttentionSpec(
        num_heads=64, num_kv_heads=8, head_dim=192, v_head_dim=128, rotary_dim=64,
        rope_theta=1e4, sliding_window=128, has_sinks=True,
    )
    assert c.attention_spec("sliding") is c.sliding_attention
    assert c.routed_scaling_factor == 1.0
    assert c.quantization is not None and c.quantization.weight_block_size == (128, 128)
    assert c.attention_projection_layout is None and c.fused_qkv_tp is None
    assert c.num_nextn_predict_layers == 0  # key absent in this hub config
    assert c.max_position_embeddings == 262144
    assert not c.is_multimodal


def test_v25_config():
    c = MiMoV2Config.from_hf_config(v25_config())
    assert c.architecture == "MiMoV2ForCausalLM" and c.model_type == "mimo_v2"
    assert c.attention_projection_layout == "fused_qkv" and c.fused_qkv_tp == 4
    assert c.num_nextn_predict_layers == 3
    assert c.eos_token_ids == (151645, 151643) and c.pad_token_id == 151643
    assert c.is_multimodal
    assert c.vision_config == {"depth": 28} and c.processor_config == {"image_token_id": 1}
    assert c.full_attention.rope_theta == 1e7


def test_multimodal_needs_both_encoders():
    assert not MiMoV2Config.from_hf_config(v25_config(audio_config=None)).is_multimodal
    assert not MiMoV2Config.from_hf_config(v25_config(vision_config=None)).is_multimodal


def test_from_pretrained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(v25_config()))
    assert MiMoV2Config.from_pretrained(tmp_path) == MiMoV2Config.from_hf_config(v25_config())


def test_hybrid_block_size_and_default_all_full():
    c = MiMoV2Config.from_hf_config(flash_config(num_hidden_layers=6, hybrid_layer_pattern=None, hybrid_block_size=3,
                                                 moe_layer_freq=1))
    assert c.layer_types == ("sliding", "sliding", "full", "sliding", "sliding", "full")
    c = MiMoV2Config.from_hf_config(flash_config(num_hidden_layers=3, hybrid_layer_pattern=None, moe_layer_freq=1,
                                                 sliding_window_size=None, sliding_window=None))
    assert c.layer_types == ("full", "full", "full")


def test_moe_layer_freq_int_and_list():
    c = MiMoV2Config.from_hf_config(flash_config(num_hidden_layers=5, hybrid_layer_pattern=None, moe_layer_freq=2))
    assert c.moe_layers == (True, False, True, False, True)
    c = MiMoV2Config.from_hf_config(flash_config(num_hidden_layers=3, hybrid_layer_pattern=None,
                                                 moe_layer_freq=[1, 0, 1]))
    assert c.moe_layers == (True, False, True)


def test_context_len_takes_precedence():
    assert MiMoV2Config.from_hf_config(flash_config(context_len=4096)).max_position_embeddings == 4096
    assert MiMoV2Config.from_hf_config(flash_config(max_position_embeddings=None)).max_position_embeddings == 32768


def test_swa_geometry_fallbacks():
    geometry_keys = ("swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim", "swa_v_head_dim",
                     "swa_rope_theta")
    c = MiMoV2Config.from_hf_config(flash_config(**dict.fromkeys(geometry_keys)))
    assert c.sliding_attention == AttentionSpec(
        num_heads=64, num_kv_heads=4, head_dim=192, v_head_dim=192, rotary_dim=64,
        rope_theta=5e6, sliding_window=128, has_sinks=True,
    )
    # swa_v_head_dim falls back to swa_head_dim before head_dim (sglang), never to v_head_dim.
    c = MiMoV2Config.from_hf_config(flash_config(swa_head_dim=96, swa_v_head_dim=None))
    sliding = c.sliding_attention
    assert (sliding.head_dim, sliding.v_head_dim, sliding.rotary_dim) == (96, 96, 32)
    c = MiMoV2Config.from_hf_config(flash_config(v_head_dim=None))
    assert c.full_attention.v_head_dim == 192


@pytest.mark.parametrize("key", ["sliding_window_size", "sliding_window", "window_size"])
def test_sliding_window_keys(key):
    overrides = {"sliding_window_size": None, "sliding_window": None, key: 64}
    assert MiMoV2Config.from_hf_config(flash_config(**overrides)).sliding_attention.sliding_window == 64


def test_accepted_optional_values():
    c = MiMoV2Config.from_hf_config(flash_config(
        rope_scaling={"rope_type": "default"}, routed_scaling_factor=2.5, tie_word_embeddings=True, scale_emb=12,
        eos_token_id=2, n_shared_experts=0, attention_value_scale=None, quantization_config=None,
    ))
    assert c.routed_scaling_factor == 2.5 and c.tie_word_embeddings and c.scale_emb == 12.0
    assert c.eos_token_ids == (2,) and c.attention_value_scale is None and c.quantization is None
    quant = {"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    assert MiMoV2Config.from_hf_config(flash_config(quantization_config=quant)).quantization.excluded_modules == (
        "lm_head",
    )


def _fp8(**overrides):
    return {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], **overrides}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"topk_method": "greedy"}, "topk_method='greedy'"),
        ({"n_shared_experts": 1}, "n_shared_experts=1"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling"),
        ({"attention_projection_layout": "qkv_packed"}, "attention_projection_layout='qkv_packed'"),
        ({"hybrid_layer_pattern": [0, 1]}, "hybrid_layer_pattern"),
        ({"hybrid_layer_pattern": None, "hybrid_block_size": 0}, "hybrid_block_size=0"),
        ({"moe_layer_freq": [1, 0]}, "moe_layer_freq"),
        ({"moe_layer_freq": 0}, "moe_layer_freq=0"),
        ({"moe_layer_freq": None}, "moe_layer_freq=None"),
        ({"sliding_window_size": None, "sliding_window": None}, "sliding_window_size"),
        ({"sliding_window_size": -1}, "sliding_window_size=-1"),
        ({"vocab_size": None}, "'vocab_size'"),
        ({"layernorm_epsilon": None}, "'layernorm_epsilon'"),
        ({"num_key_value_heads": 3}, "num_attention_heads=64 is not a multiple of num_key_value_heads=3"),
        ({"swa_num_key_value_heads": 5}, "swa_num_key_value_heads=5"),
        ({"partial_rotary_factor": 0.01}, "rotary dim must be even"),
        ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
        ({"n_group": 3}, "n_group=3"),
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers=-1"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok=300"),
        (_fp8(quant_method="awq"), "quant_method='awq'"),
        (_fp8(fmt="e5m2"), "fmt='e5m2'"),
        (_fp8(weight_block_size=[64, 64]), "weight_block_size=[64, 64]"),
        (_fp8(activation_scheme="static"), "activation_scheme='static'"),
    ],
)
def test_unsupported_values_raise(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        MiMoV2Config.from_hf_config(flash_config(**overrides))
