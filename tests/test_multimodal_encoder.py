import math

import pytest
import torch

from mimo.loading import build_module
from mimo.models.audio_tokenizer import AudioTokenizerConfig, MiMoAudioTokenizer
from mimo.models.audio_tower import AudioConfig, MiMoAudioEncoder, audio_token_count
from mimo.models.multimodal_encoder import MiMoMultimodalEncoder
from mimo.models.vision_tower import MiMoVisionTransformer, VisionConfig

HIDDEN = 24
VISION = {
    "depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "num_key_value_heads": 1,
    "qk_channels": 8, "kv_channels": 8, "out_hidden_size": HIDDEN, "fullatt_block_indexes": [1],
    "vit_window_attn_types": [1, -1], "visual_token_window_size": 4, "use_sink": True,
}
TOKENIZER = {
    "n_mels": 8, "d_model": 16, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 32,
    "encoder_causal": True, "encoder_attn_window_size": [3, 0], "hybrid_attention": True, "avg_pooler": 2,
    "num_quantizers": 3, "codebook_size": [8, 8, 4],
}
AUDIO = {
    "audio_channels": 3, "speech_vocab_size": "9-9-5", "speech_zeroemb_idx": "8-8-4", "input_local_layers": 1,
    "input_local_dim": 8, "input_local_attn_heads": 2, "input_local_head_dim": 4, "input_local_intermediate_size": 16,
    "partial_rotary_factor": 1.0, "projection_layers": 1, "out_hidden_size": HIDDEN, "audio_segment_size": 32,
}


def build(vision=VISION, audio=AUDIO, tokenizer=TOKENIZER) -> MiMoMultimodalEncoder:
    torch.manual_seed(0)
    return MiMoMultimodalEncoder(
        MiMoVisionTransformer(VisionConfig.from_dict(vision)),
        MiMoAudioEncoder(AudioConfig.from_dict(audio)),
        MiMoAudioTokenizer(AudioTokenizerConfig.from_dict(tokenizer)),
    ).eval()


@pytest.fixture(scope="module")
def encoder() -> MiMoMultimodalEncoder:
    return build()


def test_state_dict_prefixes_are_the_checkpoint_roles(encoder):
    prefixes = {name.split(".")[0] for name in encoder.state_dict()}
    assert prefixes == {"visual", "audio_encoder", "audio_tokenizer"}


def test_encode_images_splits_one_forward_per_image(encoder):
    grids = [(1, 4, 6), (1, 2, 2), (1, 6, 4)]
    pixels = [torch.randn(math.prod(g), 1536) for g in grids]
    images = encoder.encode_images(torch.cat(pixels), torch.tensor(grids))
    assert [tuple(x.shape) for x in images] == [(6, HIDDEN), (1, HIDDEN), (6, HIDDEN)]
    for p, g, rows in zip(pixels, grids, images):
        torch.testing.assert_close(rows, encoder.visual(p, torch.tensor([g])), rtol=1e-5, atol=1e-5)


def test_warm_up_leaves_the_encodings_unchanged(encoder):
    pixels, grid, mel = torch.randn(24, 1536), torch.tensor([[1, 4, 6]]), torch.randn(40, 8)
    before = encoder.encode_images(pixels, grid)[0], encoder.encode_audios([mel])[0]
    encoder.warm_up()
    after = encoder.encode_images(pixels, grid)[0], encoder.encode_audios([mel])[0]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_encode_videos_covers_every_frame_group(encoder):
    grids = torch.tensor([[3, 2, 4], [1, 4, 4]])
    videos = encoder.encode_videos(torch.randn(40, 1536), grids)
    assert [x.shape[0] for x in videos] == [6, 4]


def test_encode_audios_rows_follow_audio_token_count(encoder):
    mels = [torch.randn(n, 8) for n in (5, 33, 70)]
    audios = encoder.encode_audios(mels)
    assert [x.shape for x in audios] == [(audio_token_count(m.shape[0], segment_size=32), HIDDEN) for m in mels]
    for mel, rows in zip(mels, audios):
        torch.testing.assert_close(rows, encoder.audio_encoder(encoder.audio_tokenizer.encode(mel, segment_size=32)))


def test_encode_video_audio_trims_to_units(encoder):
    mel = torch.randn(150, 8)  # 10 audio tokens
    full = encoder.encode_audios([mel])[0]
    starts, lens = torch.tensor([0, 3, 7]), torch.tensor([2, 4, 3])
    trimmed = encoder.encode_video_audio(mel, starts, lens)
    torch.testing.assert_close(trimmed, torch.cat([full[0:2], full[3:7], full[7:10]]))


@pytest.mark.parametrize(
    "starts, lens, message",
    [
        ([0, 8], [2, 3], "within"),
        ([0, 3], [2, 0], "non-empty"),
        ([-1], [2], "within"),
        ([0, 1], [2], "one length"),
        ([], [], "non-empty 1-D"),
    ],
)
def test_encode_video_audio_rejects_bad_units(encoder, starts, lens, message):
    with pytest.raises(ValueError, match=message):
        encoder.encode_video_audio(torch.randn(150, 8), torch.tensor(starts, dtype=torch.long),
                                   torch.tensor(lens, dtype=torch.long))


def test_empty_requests_return_no_items(encoder):
    assert encoder.encode_audios([]) == []
    assert encoder.encode_images(torch.empty(0, 1536), torch.empty(0, 3, dtype=torch.long)) == []


def test_bad_media_inputs_raise(encoder):
    with pytest.raises(ValueError, match="grid_thw describes 24 patches"):
        encoder.encode_images(torch.randn(20, 1536), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match=r"mel 1 must be \[T_mel >= 1, 8\]"):
        encoder.encode_audios([torch.randn(10, 8), torch.randn(10, 4)])


@pytest.mark.parametrize(
    "audio, tokenizer, message",
    [
        ({**AUDIO, "out_hidden_size": 32}, TOKENIZER, "out_hidden_size"),
        (AUDIO, {**TOKENIZER, "num_quantizers": 2}, "code channels"),
        (AUDIO, {**TOKENIZER, "codebook_size": [8, 8, 8]}, "codebook_size 8 exceeds"),
    ],
)
def test_mismatched_towers_raise(audio, tokenizer, message):
    with pytest.raises(ValueError, match=message):
        build(audio=audio, tokenizer=tokenizer)


def test_bfloat16_build_keeps_float32_codebooks_and_encodes():
    torch.manual_seed(0)
    encoder = build_module(
        lambda: MiMoMultimodalEncoder(
            MiMoVisionTransformer(VisionConfig.from_dict(VISION)),
            MiMoAudioEncoder(AudioConfig.from_dict(AUDIO)),
            MiMoAudioTokenizer(AudioTokenizerConfig.from_dict(TOKENIZER)),
        ),
        torch.bfloat16,
        "cpu",
    )
    tokenizer = encoder.audio_tokenizer.encoder
    assert tokenizer.conv1.weight.dtype == torch.bfloat16
    assert tokenizer.quantizer.vq.layers[0]._codebook.embed.dtype == torch.float32

    images = encoder.encode_images(torch.randn(24, 1536), torch.tensor([[1, 4, 6]]))
    audios = encoder.encode_audios([torch.randn(40, 8)])
    for rows in images + audios:
        assert rows.dtype == torch.bfloat16 and torch.isfinite(rows).all()
