"""Video preprocessing: frame sampling, timestamps, per-frame budget, sound track units, token layout, errors.

Videos are generated with PyAV: H.264 frames whose grey level encodes the frame index (8 * i), optionally
with an AAC 440 Hz stereo tone.
"""

import numpy as np
import pytest
import torch

from mimo.processing.audio import audio_tokens_for_mel
from mimo.processing.config import ProcessorConfig, SpecialTokenIds
from mimo.processing.errors import MediaDecodeError, MediaLimitError, ProcessingError
from mimo.processing.items import MediaItem, Modality
from mimo.processing.placeholders import group_units, media_token_ids, timestamp_text
from mimo.processing.video import build_audio_units, preprocess_video, sample_frame_indices
from mimo.processing.video_meta import video_meta, video_meta_attrs_for
from processing_media import encode_audio, encode_video, tone

TOKENS = SpecialTokenIds(
    vision_start=1001, vision_end=1002, image=1003, video=1004, audio=1005, video_start=1006, video_end=1007,
    audio_start=1008, audio_end=1009,
)
CONFIG = ProcessorConfig(tokens=TOKENS)


def fake_encode(text: str) -> list[int]:
    """Stands in for the tokenizer: one id per character (timestamps become visible in the layout)."""
    return [ord(ch) for ch in text]


@pytest.fixture(scope="module")
def sound_video() -> bytes:
    return encode_video(3.0, 10)  # 30 frames, AAC 48 kHz stereo


def frame_levels(pixel_values: torch.Tensor, grid_thw: torch.Tensor, config: ProcessorConfig) -> list[float]:
    """Mean grey level (0..255) of every frame, undoing the normalisation of channel 0."""
    grid_t = int(grid_thw[0, 0])
    rows = pixel_values.reshape(grid_t, -1, 3, 2, config.patch_size**2)  # [t, patches, C, T, p*p]
    red = rows[:, :, 0].mean(dim=(1, 3))  # [t, 2]
    return (red * config.image_std[0] + config.image_mean[0]).flatten().tolist()


def test_sound_video_frames_timestamps_and_units(sound_video):
    video = preprocess_video(sound_video, CONFIG)
    # 3 s at fps 2 wants 6 frames, min_frames lifts it to 8: indices round(linspace(0, 29, 8))
    indices = [0, 4, 8, 12, 17, 21, 25, 29]
    assert video.video_grid_thw.tolist() == [[4, 4, 6]]
    assert video.pixel_values_videos.shape == (4 * 4 * 6, 1536)
    for level, index in zip(frame_levels(video.pixel_values_videos, video.video_grid_thw, CONFIG), indices):
        assert abs(level - 8 * index) < 4, (level, index)
    assert video.video_timestamps.tolist() == pytest.approx([0.0, 0.8, 1.7, 2.5])
    assert video.second_per_grid_ts == pytest.approx(2 / (8 / 30 * 10))

    sound = video.soundtrack
    assert sound is not None and sound.mel.shape[1] == 128
    assert sound.audio_token_len == audio_tokens_for_mel(sound.mel.shape[0], CONFIG)
    assert abs(sound.mel.shape[0] - 300) < 10  # 100 mel frames per second (+ codec priming)
    # units start at int(ts * 6.25); the last ends at int((2.5 + 1/fps) * 6.25) = 18
    assert sound.segment_starts.tolist() == [0, 5, 10, 15]
    assert sound.segment_lens.tolist() == [5, 5, 5, 3]


def video_item(video) -> MediaItem:
    item = MediaItem(Modality.VIDEO, int(video.video_grid_thw.prod()) // 4,
                     video_grid_thw=video.video_grid_thw,
                     video_timestamps=video.video_timestamps,
                     second_per_grid_ts=torch.tensor([video.second_per_grid_ts], dtype=torch.float64))
    if video.soundtrack is not None:
        item.mel = video.soundtrack.mel
        item.audio_token_len = torch.tensor([video.soundtrack.audio_token_len])
        item.segment_starts, item.segment_lens = video.soundtrack.segment_starts, video.soundtrack.segment_lens
    return item


def chunk(n: int = 6) -> list[int]:
    return [TOKENS.vision_start] + [TOKENS.video] * n + [TOKENS.vision_end]


def audio_run(n: int) -> list[int]:
    return [TOKENS.audio_start] + [TOKENS.audio] * n + [TOKENS.audio_end]


def test_sound_video_layout_interleaves_one_audio_run_per_unit(sound_video):
    ids = media_token_ids(video_item(preprocess_video(sound_video, CONFIG)), CONFIG, fake_encode)
    expected = [TOKENS.video_start]
    for ts, n_audio in zip(("00:00", "00:00", "00:01", "00:02"), (5, 5, 5, 3)):
        expected += fake_encode(ts) + chunk() + audio_run(n_audio)
    assert ids == expected + [TOKENS.video_end]


@pytest.mark.parametrize("interleave,per_unit_ts,expected_groups", [
    (-1, False, [[0, 1, 2, 3]]),
    (2.0, False, [[0, 1, 2], [3]]),
    (2.0, True, [[0, 1, 2], [3]]),
])
def test_interleave_length_groups_units(sound_video, interleave, per_unit_ts, expected_groups):
    config = ProcessorConfig(tokens=TOKENS, video_audio_interleave_length=interleave,
                             use_per_grid_t_timestamps=per_unit_ts)
    video = preprocess_video(sound_video, config)
    assert group_units(video.video_timestamps.tolist(), interleave) == expected_groups
    stamps, lens = ["00:00", "00:00", "00:01", "00:02"], [5, 5, 5, 3]
    expected = [TOKENS.video_start]
    for group in expected_groups:
        for k, g in enumerate(group):
            if k == 0 or per_unit_ts:
                expected += fake_encode(stamps[g])
            expected += chunk()
        expected += audio_run(sum(lens[g] for g in group))
    assert media_token_ids(video_item(video), config, fake_encode) == expected + [TOKENS.video_end]


def test_silent_video_has_no_audio_units():
    video = preprocess_video(encode_video(3.0, 10, sound_rate=None), CONFIG)
    assert video.soundtrack is None
    ids = media_token_ids(video_item(video), CONFIG, fake_encode)
    expected = [TOKENS.video_start]
    for ts in ("00:00", "00:00", "00:01", "00:02"):
        expected += fake_encode(ts) + chunk()
    assert ids == expected + [TOKENS.video_end]
    assert TOKENS.audio not in ids


def test_frame_sampling_rule():
    assert sample_frame_indices(30, 10.0, CONFIG) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert len(sample_frame_indices(600, 30.0, CONFIG)) == 40  # 20 s at 2 fps
    assert len(sample_frame_indices(30 * 3600, 30.0, CONFIG)) == 256  # max_frames
    odd = ProcessorConfig(tokens=TOKENS, fps=1.0, min_frames=3, max_frames=7)
    assert len(sample_frame_indices(30 * 60, 30.0, odd)) == 6  # floored to an even count
    assert sample_frame_indices(3, 30.0, CONFIG) == [0, 2]  # fewer frames than min_frames: all, floored to even
    assert sample_frame_indices(1, 30.0, CONFIG) == [0]  # repeated to a full temporal group later
    fixed = ProcessorConfig(tokens=TOKENS, num_frames=4)
    assert sample_frame_indices(300, 30.0, fixed) == [0, 100, 199, 299]
    with pytest.raises(MediaLimitError, match="num_frames 300 exceeds max_frames 256"):
        sample_frame_indices(1000, 30.0, ProcessorConfig(tokens=TOKENS, num_frames=300))


def test_single_frame_video_repeats_its_frame():
    video = preprocess_video(encode_video(0.1, 10, sound_rate=None), CONFIG)
    assert video.video_grid_thw.tolist() == [[1, 4, 6]] and video.video_timestamps.tolist() == [0.0]


def test_display_rotation_is_applied():
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    pixels[:, :64] = (255, 0, 0)  # left half red
    data = encode_video(1.0, 4, width=128, height=64, sound_rate=None, rotation=90, frame_pixels=pixels)
    video = preprocess_video(data, CONFIG)
    assert video.video_grid_thw.tolist() == [[2, 8, 4]]  # displayed 64 wide, 128 tall
    rows = video.pixel_values_videos.reshape(2, 4, 2, 2, 2, 3, 2, 16, 16)  # [t, bh, bw, mh, mw, C, T, kh, kw]
    red = rows[0, :, :, :, :, 0, 0].mean(dim=(1, 3, 4, 5)) * CONFIG.image_std[0] + CONFIG.image_mean[0]  # [bh, mh]
    assert red[0, 0] < 40 and red[-1, -1] > 215  # turned counter-clockwise: the red left half is now at the bottom


def test_per_frame_pixel_budget_sets_one_size_for_all_frames(sound_video):
    # 8 frames share 8 * 1024 * 2 pixels -> 2048 per frame, raised to video_min_pixels (4096): 96x64 -> 64x32
    config = ProcessorConfig(tokens=TOKENS, video_total_max_pixels=8 * 1024)
    video = preprocess_video(sound_video, config)
    assert video.video_grid_thw.tolist() == [[4, 2, 4]]


def test_units_follow_timestamps_at_6_25_tokens_per_second():
    starts, lens = build_audio_units([0.0, 2.0, 4.0], 100, CONFIG)
    assert starts == [0, 12, 25] and lens == [12, 13, 3]  # last ends at int(4.5 * 6.25) = 28
    starts, lens = build_audio_units([0.0, 2.0, 4.0], 26, CONFIG)
    assert lens == [12, 13, 1]  # clipped to the track's token count
    with pytest.raises(ProcessingError, match="ends before the frame group at 4.00 s"):
        build_audio_units([0.0, 2.0, 4.0], 25, CONFIG)


def test_sound_track_shorter_than_the_video_is_an_error():
    with pytest.raises(ProcessingError, match="sound track .* ends before the frame group"):
        preprocess_video(encode_video(3.0, 10, sound_seconds=1.0), CONFIG)


def test_timestamp_text():
    assert [timestamp_text(s) for s in (0.0, 1.99, 61.0, 3599.5, 6000.0)] == ["00:00", "00:01", "01:01", "59:59", "100:00"]


def test_video_meta_fields_follow_the_model_type(sound_video):
    with_sound = video_item(preprocess_video(sound_video, CONFIG))
    silent = video_item(preprocess_video(encode_video(1.0, 4, sound_rate=None), CONFIG))  # 4 frames, 2 groups
    image = MediaItem(Modality.IMAGE, 4)
    assert video_meta_attrs_for("qwen2_5_vl") == ("video_timestamps", "second_per_grid_ts")
    assert video_meta_attrs_for("mimo_v2")[2:] == (
        "video_audio_feature_lens", "video_audio_segment_lens_flat", "video_audio_per_video_num_units",
        "video_audio_embedding",
    )
    meta = video_meta([image, with_sound, silent], "mimo_v2")
    assert set(meta) == set(video_meta_attrs_for("mimo_v2")) - {"video_audio_embedding"}
    assert meta["video_timestamps"].tolist() == pytest.approx([0.0, 0.8, 1.7, 2.5, 0.0, 0.5])
    assert meta["second_per_grid_ts"].tolist() == pytest.approx([0.75, 0.5])
    assert meta["video_audio_feature_lens"].tolist() == with_sound.audio_token_len.tolist()
    assert meta["video_audio_segment_lens_flat"].tolist() == [5, 5, 5, 3]
    assert meta["video_audio_per_video_num_units"].tolist() == [4, 0]
    assert set(video_meta([with_sound], "qwen2_vl")) == {"video_timestamps", "second_per_grid_ts"}


@pytest.mark.parametrize("data,error,message", [
    (b"", MediaDecodeError, "video is empty"),
    (b"\x00\x01garbage" * 100, MediaDecodeError, "cannot open video"),
    (encode_audio(tone(440.0, 48000, 0.5), 48000, "m4a"), MediaDecodeError, "no video stream"),
], ids=["empty", "garbage", "audio-only"])
def test_bad_videos_raise_clear_errors(data, error, message):
    with pytest.raises(error, match=message):
        preprocess_video(data, CONFIG)


def test_truncated_video_is_an_error(sound_video):
    with pytest.raises(MediaDecodeError, match="cannot open video|corrupt or truncated"):
        preprocess_video(sound_video[: len(sound_video) // 2], CONFIG)


def test_video_over_the_duration_limit_is_rejected(sound_video):
    with pytest.raises(MediaLimitError, match="longer than the 2 s limit"):
        preprocess_video(sound_video, ProcessorConfig(tokens=TOKENS, max_media_seconds=2.0))


def test_frame_size_over_the_pixel_cap_is_rejected_before_decoding(sound_video):
    config = ProcessorConfig(tokens=TOKENS, max_source_pixels=96 * 64 - 1)
    with pytest.raises(MediaLimitError, match="video frames are 96x64 = 6144 pixels, over the 6143 limit"):
        preprocess_video(sound_video, config)


def test_unsupported_video_codec_is_rejected():
    data = encode_video(1.0, 4, width=32, height=32, sound_rate=None, fmt="avi", codec="ffv1")
    with pytest.raises(MediaDecodeError, match="unsupported video codec 'ffv1'"):
        preprocess_video(data, CONFIG)
