"""`python -m builders tiny`: file set, hub config schema, FP8 / fused layout, role-separated loading, presets."""

import json
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from builders.__main__ import main as builders_main
from tools.__main__ import main as tools_main
from builders.presets import FP8_QUANTIZATION_CONFIG, PRESETS, hub_config
from builders.tiny import FP8_SUFFIXES, random_language_tensors
from mimo.config import ConfigError, MiMoV2Config
from mimo.loading import (
    hub_state_dict,
    load_audio_encoder,
    load_audio_tokenizer,
    load_language_model,
    load_vision_tower,
)
from mimo.models.audio_tokenizer import AudioTokenizerConfig
from mimo.models.audio_tower import AudioConfig
from mimo.models.vision_tower import VisionConfig
from mimo.processing.config import TOKEN_ID_KEYS
from mimo.weights.checkpoint import INDEX_FILE, CheckpointError, HubCheckpoint, Role
from mimo.weights.fused_qkv import fused_rows, layer_qkv_geometry
from tools.__main__ import main as tools_main

# ref §1.1 keys read by sglang (plus hub-only keys the release configs carry)
HUB_KEYS = {
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "v_head_dim",
    "swa_num_attention_heads",
    "swa_num_key_value_heads",
    "swa_head_dim",
    "swa_v_head_dim",
    "hybrid_layer_pattern",
    "sliding_window_size",
    "sliding_window",
    "add_swa_attention_sink_bias",
    "add_full_attention_sink_bias",
    "attention_value_scale",
    "attention_bias",
    "rope_theta",
    "swa_rope_theta",
    "partial_rotary_factor",
    "rope_scaling",
    "max_position_embeddings",
    "moe_layer_freq",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "scoring_func",
    "topk_method",
    "norm_topk_prob",
    "hidden_act",
    "layernorm_epsilon",
    "tie_word_embeddings",
    "pad_token_id",
    "eos_token_id",
    "rms_norm_eps",
    "vision_config",
    "audio_config",
    "processor_config",
    "num_nextn_predict_layers",
    "n_shared_experts",
    "routed_scaling_factor",
    "attention_chunk_size",
    "hybrid_block_size",
    "torch_dtype",
    "attention_projection_layout",
    "quantization_config",
    "initializer_range",
    "bos_token_id",
}
TINY_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    INDEX_FILE,
    "audio_tokenizer/config.json",
    "audio_tokenizer/model.safetensors",
}


@pytest.fixture(scope="module")
def fused_fp8(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "fused_fp8"
    builders_main(["tiny", "--out", str(out), "--fp8"])
    return out


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "split"
    builders_main(["tiny", "--out", str(out), "--layout", "split"])
    return out


def read_config(path):
    return json.loads((path / "config.json").read_text())


def test_exact_file_set(fused_fp8):
    files = {str(p.relative_to(fused_fp8)) for p in fused_fp8.rglob("*") if p.is_file()}
    shards = files - TINY_FILES
    assert TINY_FILES <= files and len(shards) >= 3
    index = json.loads((fused_fp8 / INDEX_FILE).read_text())
    assert shards == set(index["weight_map"].values())
    assert all(s.startswith("model-") and s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)


def test_hub_config_schema_and_token_ids(fused_fp8):
    config = read_config(fused_fp8)
    assert set(config) == HUB_KEYS
    assert config["architectures"] == ["MiMoV2ForCausalLM"] and config["model_type"] == "mimo_v2"
    assert config["attention_projection_layout"] == "fused_qkv"
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG
    assert config["hybrid_layer_pattern"] == [0, 1, 1, 0] and config["moe_layer_freq"] == [0, 1, 1, 1]
    assert config["num_key_value_heads"] == 4 and config["swa_num_key_value_heads"] == 8
    assert config["sliding_window_size"] == 16 and config["num_nextn_predict_layers"] == 3

    tokenizer = Tokenizer.from_file(str(fused_fp8 / "tokenizer.json"))
    assert config["vocab_size"] >= tokenizer.get_vocab_size(with_added_tokens=True)
    processor = config["processor_config"]
    assert set(TOKEN_ID_KEYS) <= set(processor)
    assert processor["audio_token_id"] == tokenizer.token_to_id("<|audio_pad|>")
    assert processor["vision_start_token_id"] == tokenizer.token_to_id("<|vision_start|>")
    assert config["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")
    generation = json.loads((fused_fp8 / "generation_config.json").read_text())
    assert generation == {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}


def test_split_layout_is_flash_style(split):
    config = read_config(split)
    assert config["architectures"] == ["MiMoV2FlashForCausalLM"] and config["model_type"] == "mimo_v2_flash"
    assert "attention_projection_layout" not in config and "quantization_config" not in config
    ckpt = HubCheckpoint(split)
    assert "model.layers.1.self_attn.k_proj.weight" in ckpt and not any("qkv_proj" in n for n in ckpt.names())
    assert not any(ckpt.is_fp8(n) for n in ckpt.names())


def test_fp8_and_fused_tensors(fused_fp8):
    ckpt = HubCheckpoint(fused_fp8)
    config = MiMoV2Config.from_pretrained(fused_fp8)
    language = ckpt.names(Role.LANGUAGE, Role.MTP)
    fp8 = {n for n in language if ckpt.is_fp8(n)}
    assert fp8 == {n for n in language if n.endswith(FP8_SUFFIXES)}
    assert {n + "_scale_inv" for n in fp8} == {n for n in language if n.endswith("_scale_inv")}
    assert "model.layers.0.mlp.gate_proj.weight" in fp8 and "model.mtp.layers.0.mlp.down_proj.weight" in fp8
    assert not any(ckpt.is_fp8(n) for n in ckpt.names(Role.VISION, Role.AUDIO))
    assert ckpt.tensor("lm_head.weight").dtype == torch.bfloat16
    # full layer: 4 shards of 88 rows -> 4 scale rows (a contiguous grid over 352 rows would have 3)
    assert ckpt.shape("model.layers.0.self_attn.qkv_proj.weight") == (352, 64)
    assert ckpt.shape("model.layers.0.self_attn.qkv_proj.weight_scale_inv") == (4, 1)
    assert ckpt.shape("model.layers.1.self_attn.qkv_proj.weight") == (512, 64)  # sliding: 4 x 128
    mtp_qkv = "model.mtp.layers.2.self_attn.qkv_proj.weight"
    assert ckpt.shape(mtp_qkv)[0] == fused_rows(layer_qkv_geometry(config, mtp_qkv), 4) == 512


def test_language_load_reads_no_encoder_tensor(fused_fp8):
    ckpt = HubCheckpoint(fused_fp8)
    model = load_language_model(ckpt, torch.float32, "cpu")
    assert model.model.mtp is None
    assert ckpt.accessed == set(ckpt.names(Role.LANGUAGE))
    ckpt = HubCheckpoint(fused_fp8)
    model = load_language_model(ckpt, torch.bfloat16, "cpu", with_mtp=True)
    assert len(model.model.mtp.layers) == 3
    assert ckpt.accessed == set(ckpt.names(Role.LANGUAGE, Role.MTP))
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_encoder_loads_read_no_language_tensor(fused_fp8):
    for loader, role in ((load_vision_tower, Role.VISION), (load_audio_encoder, Role.AUDIO)):
        ckpt = HubCheckpoint(fused_fp8)
        loader(ckpt, torch.float32, "cpu")
        assert ckpt.accessed == set(ckpt.names(role)) and ckpt.accessed
    tokenizer = load_audio_tokenizer(fused_fp8, torch.float32, "cpu")
    assert tokenizer.config.num_quantizers == 8


def test_loaded_weights_are_the_seeded_weights(fused_fp8, split):
    config = MiMoV2Config.from_pretrained(split)
    reference = dict(random_language_tensors(config, seed=0))
    exact = hub_state_dict(load_language_model(split, torch.float32, "cpu", with_mtp=True))
    quantized = hub_state_dict(load_language_model(fused_fp8, torch.float32, "cpu", with_mtp=True))
    assert exact.keys() == reference.keys() == quantized.keys()
    for name, tensor in reference.items():
        assert torch.equal(exact[name], tensor.float()), name
        assert (quantized[name] - tensor.float()).abs().max() <= tensor.float().abs().max() * 2.0**-4, name
    assert reference["model.layers.1.self_attn.attention_sink_bias"].abs().min() > 0
    assert reference["model.layers.1.mlp.gate.e_score_correction_bias"].abs().min() > 0


def test_unknown_layout_and_missing_shard_fail_loading(fused_fp8, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fused_fp8, broken)
    config = read_config(broken)
    config["attention_projection_layout"] = "qkv_packed"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="attention_projection_layout='qkv_packed': expected 'fused_qkv' or unset"):
        load_language_model(broken, torch.float32, "cpu")
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="to shard model-00002-of-.*, which does not exist"):
        load_vision_tower(broken, torch.float32, "cpu")


def test_tools_logits_subcommand(fused_fp8, tmp_path):
    ids = np.array([5, 17, 300, 42, 7] * 5, dtype=np.int64)  # 25 tokens: longer than the 16-token window
    np.save(tmp_path / "ids.npy", ids)
    tools_main(
        [
            "logits",
            "--checkpoint",
            str(fused_fp8),
            "--input-ids",
            str(tmp_path / "ids.npy"),
            "--out",
            str(tmp_path / "logits.npy"),
        ]
    )
    logits = np.load(tmp_path / "logits.npy")
    assert logits.dtype == np.float32 and logits.shape == (25, read_config(fused_fp8)["vocab_size"])
    assert logits.std(axis=-1).min() > 0.1  # random weights still give clearly non-uniform predictions
    assert len(set(logits.argmax(-1).tolist())) > 5
    np.save(tmp_path / "bad.npy", ids.reshape(5, 5))
    with pytest.raises(ValueError, match=r"expected a non-empty 1-D integer array, found dtype int64 shape \(5, 5\)"):
        tools_main(
            [
                "logits",
                "--checkpoint",
                str(fused_fp8),
                "--input-ids",
                str(tmp_path / "bad.npy"),
                "--out",
                str(tmp_path / "x.npy"),
            ]
        )


def test_v25_preset_has_real_widths():
    token_ids = {"vocab_size": 151_700, "eos_token_id": 151645, "pad_token_id": 151643}
    token_ids.update({key: 151652 + i for i, key in enumerate(TOKEN_ID_KEYS)})
    raw = hub_config(PRESETS["v2.5"], num_layers=12, token_ids=token_ids, fp8=True, fused_qkv=True)
    config = MiMoV2Config.from_hf_config(raw)
    assert raw["vocab_size"] == 152_576 and raw["hybrid_layer_pattern"] == [0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0]
    assert fused_rows(layer_qkv_geometry(config, "model.layers.0.self_attn.qkv_proj.weight"), 4) == 13568
    assert fused_rows(layer_qkv_geometry(config, "model.layers.1.self_attn.qkv_proj.weight"), 4) == 14848
    assert (config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (256, 8, 2048)
    vision = VisionConfig.from_dict(raw["vision_config"])
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (28, 1280, 4096)
    audio = AudioConfig.from_dict(raw["audio_config"])
    assert (audio.audio_channels, audio.input_local_dim, audio.out_hidden_size) == (20, 1024, 4096)
    tokenizer = AudioTokenizerConfig.from_dict(PRESETS["v2.5"].audio_tokenizer_config)
    assert (tokenizer.d_model, tokenizer.encoder_layers, tokenizer.num_quantizers) == (1024, 24, 20)
