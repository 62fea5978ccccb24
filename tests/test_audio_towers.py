import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2Model

from builders.presets import V2_5
from mimo.config import ConfigError
from mimo.models.audio_tokenizer import AudioTokenizerConfig, MiMoAudioTokenizer, code_length
from mimo.models.audio_tower import AudioConfig, MiMoAudioEncoder, audio_token_count

# Real strides (2, 2) and group size (4); segments of 40 frames so short inputs cross segment boundaries.
TINY_TOKENIZER = {
    "n_mels": 16, "d_model": 32, "encoder_layers": 4, "encoder_attention_heads": 4, "encoder_ffn_dim": 64,
    "encoder_skip_layer_id": 3, "encoder_causal": True, "encoder_attn_window_size": [3, 0],
    "hybrid_attention": True, "swa_per_block": 2, "stride_size": 2, "avg_pooler": 2, "num_quantizers": 4,
    "codebook_size": [16, 16, 8],
}
TINY_AUDIO = {
    "audio_channels": 4, "speech_vocab_size": "16-16-8-8", "speech_zeroemb_idx": "15-15-7-7",
    "input_local_layers": 2, "input_local_dim": 16, "input_local_attn_heads": 2, "input_local_head_dim": 8,
    "input_local_intermediate_size": 32, "partial_rotary_factor": 1.0, "projection_layers": 2,
    "add_post_norm": True, "out_hidden_size": 24, "audio_segment_size": 40,
}
SEGMENT = TINY_AUDIO["audio_segment_size"]


@pytest.fixture(scope="module")
def tokenizer() -> MiMoAudioTokenizer:
    torch.manual_seed(0)
    model = MiMoAudioTokenizer(AudioTokenizerConfig.from_dict(TINY_TOKENIZER)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def tower() -> MiMoAudioEncoder:
    torch.manual_seed(0)
    return MiMoAudioEncoder(AudioConfig.from_dict(TINY_AUDIO)).eval()


def reference_features(encoder, mel: torch.Tensor) -> torch.Tensor:
    """Pre-quantizer features of one segment from the definition, in float64, with flash-attn window rules."""
    config = encoder.config
    p = {name: t.double() for name, t in encoder.state_dict().items()}
    x = F.gelu(F.conv1d(mel.double().T[None], p["conv1.weight"], p["conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, p["conv2.weight"], p["conv2.bias"], stride=2, padding=1))[0].T  # [L2, d]
    length, heads = x.shape[0], config.encoder_attention_heads
    head_dim = config.d_model // heads
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq  # [L2, head_dim / 2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def rope(t):
        t1, t2 = t[..., : head_dim // 2], t[..., head_dim // 2 :]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    def layer_norm(t, name):
        return F.layer_norm(t, (config.d_model,), p[name + ".weight"], p[name + ".bias"])

    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    skip = None
    for layer_idx in range(config.encoder_layers):
        lp = f"layers.{layer_idx}."
        left, right = config.layer_window(layer_idx)
        visible = torch.ones(length, length, dtype=torch.bool)
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        if config.encoder_causal:
            visible &= j <= i
        h = layer_norm(x, lp + "self_attn_layer_norm")
        q = rope((h @ p[lp + "self_attn.q_proj.weight"].T + p[lp + "self_attn.q_proj.bias"]).view(length, heads, -1))
        k = rope((h @ p[lp + "self_attn.k_proj.weight"].T).view(length, heads, -1))
        v = (h @ p[lp + "self_attn.v_proj.weight"].T + p[lp + "self_attn.v_proj.bias"]).view(length, heads, -1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * head_dim**-0.5
        attn = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
        x = x + attn.flatten(1) @ p[lp + "self_attn.out_proj.weight"].T + p[lp + "self_attn.out_proj.bias"]
        h = F.gelu(layer_norm(x, lp + "final_layer_norm") @ p[lp + "fc1.weight"].T + p[lp + "fc1.bias"])
        x = x + h @ p[lp + "fc2.weight"].T + p[lp + "fc2.bias"]
        if layer_idx == config.encoder_skip_layer_id - 1:
            skip = x
    x = layer_norm(x + skip, "layer_norm")
    x = F.pad(x, (0, 0, 0, length % 2))  # the pooler zero-pads to a multiple of avg_pooler
    x = F.gelu(F.conv1d(x.T[None], p["down_sample_layer.0.weight"], stride=2))[0].T
    return layer_norm(x, "down_sample_norm")


@pytest.mark.parametrize("frames", [23, 40])
def test_tokenizer_features_match_reference(tokenizer, frames):
    mel = torch.randn(frames, 16)
    with torch.no_grad():
        features = tokenizer.encoder.features(mel[None], torch.tensor([frames]))
    expected = reference_features(tokenizer.encoder, mel)
    assert features.shape == (code_length(frames, stride_size=2, avg_pooler=2), 32)
    torch.testing.assert_close(features.double(), expected, rtol=1e-4, atol=1e-4)


def test_rvq_matches_brute_force(tokenizer):
    x = torch.randn(30, 32)
    codes = tokenizer.encoder.quantizer.vq.encode(x)
    residual = x.double()
    for q, layer in enumerate(tokenizer.encoder.quantizer.vq.layers):
        embed = layer._codebook.embed.double()
        expected = torch.cdist(residual, embed).argmin(-1)
        assert torch.equal(codes[:, q], expected)
        residual = residual - embed[expected]


def test_tokenizer_batches_segments_like_lone_segments(tokenizer):
    mels = [torch.randn(n, 16) for n in (37, 81, 13, 40)]
    batched = tokenizer.encode_batch(mels, segment_size=SEGMENT)
    for mel, codes in zip(mels, batched):
        pieces = [tokenizer.encode(piece, segment_size=SEGMENT) for piece in mel.split(SEGMENT)]
        assert torch.equal(codes, torch.cat(pieces))
        assert codes.dtype == torch.long and codes.shape[1] == 4
    sizes = torch.tensor(tokenizer.config.codebook_size)
    assert all(((c >= 0) & (c < sizes)).all() for c in batched)


def test_tokenizer_flex_path_equals_reference_path(tokenizer):
    # eager FlexAttention on the CPU: causal windowed and causal full layers over several segments
    mels = [torch.randn(n, 16) for n in (37, 81, 13)]
    lengths = [mel.shape[0] for mel in mels]
    batch = torch.nn.utils.rnn.pad_sequence(mels, batch_first=True)
    with torch.no_grad():
        expected = tokenizer.encoder.features(batch, torch.tensor(lengths))
        tokenizer.encoder.attention_impl = "flex"
        try:
            out = tokenizer.encoder.features(batch, torch.tensor(lengths))
        finally:
            tokenizer.encoder.attention_impl = "auto"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_tokenizer_layer_windows_v26():
    config = AudioTokenizerConfig.from_dict(V2_5.audio_tokenizer_config)
    assert [config.layer_attention(i) for i in range(4)] == [(True, 128), (True, None)] * 2
    assert config.codebook_size == (1024, 1024, 256) + (128,) * 17


def test_audio_token_count_rule():
    # release geometry: one token per 16 mel frames, rounded up, also across 6000-frame segments
    assert all(audio_token_count(t) == math.ceil(t / 16) for t in range(1, 20000, 7))
    assert [audio_token_count(t) for t in (1, 16, 17, 6000, 6001, 6017)] == [1, 1, 2, 375, 376, 377]
    # conv2: (n - 1) // 2 + 1 frames; pooler: ceil(/2); groups: ceil(/4); segments of 10 frames -> 3 codes each
    assert audio_token_count(25, segment_size=10) == math.ceil((3 + 3 + 2) / 4)
    with pytest.raises(ValueError, match="t_mel"):
        audio_token_count(0)


@pytest.mark.parametrize("frames", [1, 15, 16, 17, 39, 40, 41, 97, 123])
def test_tower_rows_equal_audio_token_count(tokenizer, tower, frames):
    with torch.no_grad():
        codes = tokenizer.encode(torch.randn(frames, 16), segment_size=SEGMENT)
        rows = tower(codes)
    assert rows.shape == (audio_token_count(frames, segment_size=SEGMENT), 24)
    assert torch.isfinite(rows).all()


def test_local_transformer_matches_hf_qwen2(tower):
    config = tower.config
    hf = Qwen2Model(Qwen2Config(
        hidden_size=config.input_local_dim, num_hidden_layers=config.input_local_layers,
        num_attention_heads=config.input_local_attn_heads, num_key_value_heads=config.input_local_attn_heads,
        head_dim=config.input_local_head_dim, intermediate_size=config.input_local_intermediate_size,
        rope_theta=config.rope_theta, rms_norm_eps=1e-6, vocab_size=8,
    ))
    hf.config._attn_implementation = "sdpa"
    missing, unexpected = hf.load_state_dict(tower.input_local_transformer.state_dict(), strict=False)
    assert missing == ["embed_tokens.weight"] and unexpected == []
    embeds = torch.randn(5, 4, config.input_local_dim)
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds, is_causal=False).last_hidden_state  # as sglang calls it
        torch.testing.assert_close(tower.input_local_transformer(embeds), expected, rtol=1e-5, atol=1e-5)


def test_groups_are_independent_and_last_group_repeats_last_frame(tower):
    codes = torch.randint(0, 7, (10, 5))  # 10 frames, one extra channel beyond audio_channels
    changed = codes.clone()
    changed[5] = (changed[5] + 1) % 7  # group 1
    padded = torch.cat([codes, codes[-1:].expand(2, -1)])
    with torch.no_grad():
        out, out_changed, out_padded = tower(codes), tower(changed), tower(padded)
    assert out.shape == (3, 24)
    torch.testing.assert_close(out[[0, 2]], out_changed[[0, 2]])
    assert not torch.allclose(out[1], out_changed[1])
    torch.testing.assert_close(out, out_padded)


def test_tower_batch_equals_single(tower):
    codes = [torch.randint(0, 7, (n, 4)) for n in (3, 8, 13)]
    with torch.no_grad():
        batched = tower.encode_batch(codes)
        for c, rows in zip(codes, batched):
            torch.testing.assert_close(rows, tower(c))


def test_tower_state_dict_names_are_the_hub_names():
    with torch.device("meta"):
        model = MiMoAudioEncoder(AudioConfig.from_dict(V2_5.audio_config))
    expected = {f"speech_embeddings.{c}.weight": (1280, 1024) for c in range(20)}
    expected |= {"input_local_transformer.norm.weight": (1024,), "projection.mlp.0.weight": (16384, 4096),
                 "projection.mlp.2.weight": (4096, 16384)}
    for layer in range(6):
        p = f"input_local_transformer.layers.{layer}."
        expected |= {p + "input_layernorm.weight": (1024,), p + "post_attention_layernorm.weight": (1024,),
                     p + "mlp.gate_proj.weight": (4096, 1024), p + "mlp.up_proj.weight": (4096, 1024),
                     p + "mlp.down_proj.weight": (1024, 4096), p + "self_attn.o_proj.weight": (1024, 1024)}
        for name in ("q_proj", "k_proj", "v_proj"):
            expected |= {p + f"self_attn.{name}.weight": (1024, 1024), p + f"self_attn.{name}.bias": (1024,)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(261e6, rel=0.01)  # ref §6

    one_layer = AudioConfig.from_dict({**V2_5.audio_config, "projection_layers": 1, "add_post_norm": False})
    with torch.device("meta"):
        names = set(MiMoAudioEncoder(one_layer).state_dict())
    assert "projection.weight" in names and "input_local_transformer.norm.weight" not in names


def test_tokenizer_state_dict_names_are_the_hub_names():
    with torch.device("meta"):
        model = MiMoAudioTokenizer(AudioTokenizerConfig.from_dict(V2_5.audio_tokenizer_config))
    names = set(model.state_dict())
    expected = {"encoder.conv1.weight", "encoder.conv1.bias", "encoder.conv2.weight", "encoder.conv2.bias",
                "encoder.layer_norm.weight", "encoder.layer_norm.bias", "encoder.down_sample_layer.0.weight",
                "encoder.down_sample_norm.weight", "encoder.down_sample_norm.bias"}
    for layer in range(24):
        p = f"encoder.layers.{layer}."
        expected |= {p + "self_attn.k_proj.weight"}
        expected |= {p + f"{name}.{kind}" for kind in ("weight", "bias")
                     for name in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "self_attn_layer_norm",
                                  "fc1", "fc2", "final_layer_norm")}
    for q in range(20):
        expected |= {f"encoder.quantizer.vq.layers.{q}._codebook.{name}"
                     for name in ("embed", "embed_avg", "cluster_size", "inited")}
    assert names == expected
    assert model.state_dict()["encoder.quantizer.vq.layers.2._codebook.embed"].shape == (256, 1024)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"partial_rotary_factor": 0.334}, "partial_rotary_factor"),
        ({"speech_zeroemb_idx": "16-16-8-8"}, "speech_zeroemb_idx"),
        ({"speech_vocab_size": "16-16-8"}, "speech_vocab_sizes"),
        ({"speech_vocab_size": "a-b"}, "speech_vocab_size"),
        ({"projection_layers": 3}, "projection_layers"),
        ({"group_size": 0}, "group_size"),
    ],
)
def test_unsupported_audio_config_raises(override, message):
    with pytest.raises(ConfigError, match=message):
        AudioConfig.from_dict({**TINY_AUDIO, **override})


def test_sglang_audio_defaults_are_rejected_for_their_rotary_factor():
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.334"):
        AudioConfig.from_dict({})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"ln_type": "RMSNorm"}, "ln_type"),
        ({"kernel_size": 5}, "kernel_size"),
        ({"encoder_attn_window_size": [4, 2]}, "encoder_attn_window_size"),
        ({"encoder_attn_window_size": [4]}, "encoder_attn_window_size"),
        ({"encoder_skip_layer_id": 9}, "encoder_skip_layer_id"),
        ({"encoder_attention_heads": 5}, "encoder_attention_heads"),
    ],
)
def test_unsupported_tokenizer_config_raises(override, message):
    with pytest.raises(ConfigError, match=message):
        AudioTokenizerConfig.from_dict({**TINY_TOKENIZER, **override})


def test_bad_audio_inputs_raise(tokenizer, tower):
    with pytest.raises(ValueError, match=r"\[T_mel >= 1, 16\]"):
        tokenizer.encode(torch.randn(10, 8))
    with pytest.raises(ValueError, match="integers"):
        tower(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="channel 2"):
        tower(torch.tensor([[0, 0, 8, 0]]))
    with pytest.raises(ValueError, match="at least one"):
        tower.encode_batch([])
    with pytest.raises(ValueError, match="n_q >= 4"):
        tower(torch.zeros(4, 3, dtype=torch.long))
