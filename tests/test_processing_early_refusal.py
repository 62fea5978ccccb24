"""Token counts known before decoding (image headers, container durations, demuxed frame counts) and the refusals
they allow: a prompt that cannot fit max_model_len - max_tokens is refused without decoding its media, and an audio
whose container understates its duration stops decoding once its samples alone are too long."""

import io
import re
import struct
import time
import wave

import pytest
from PIL import Image

from mimo.processing.audio import (
    DurationLimit, audio_tokens_for_mel, audio_tokens_for_seconds, max_seconds_for_tokens, preprocess_audio,
    probe_audio_tokens,
)
from mimo.processing.config import ProcessorConfig, SpecialTokenIds
from mimo.processing.errors import MediaLimitError, ProcessingError
from mimo.processing.image import image_tokens, preprocess_image
from mimo.processing.processor import ContextBudget, MiMoProcessor
from mimo.processing.video import preprocess_video, probe_video_tokens
from processing_media import encode_audio, encode_image, encode_video, tone, with_exif_orientation

CONFIG = ProcessorConfig(tokens=SpecialTokenIds(*range(9)))


def silent_wav(seconds: float, sample_rate: int = 8000) -> bytes:
    """8-bit mono PCM silence: an hour is 28 MB, cheap to make, and every sample has to be decoded."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(1)
        out.setframerate(sample_rate)
        out.writeframes(b"\x80" * round(seconds * sample_rate))
    return buffer.getvalue()


def with_declared_seconds(matroska: bytes, seconds: float) -> bytes:
    """The file with its Matroska Segment Duration (float64 ms at the default timecode scale) set to `seconds`."""
    at = matroska.index(b"\x44\x89\x88") + 3
    return matroska[:at] + struct.pack(">d", seconds * 1000) + matroska[at + 8:]


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return MiMoProcessor.from_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("size", [(64, 48), (1000, 17), (3000, 2000), (33, 4000)])
def test_image_tokens_from_the_header_equal_the_decoded_count(size):
    data = encode_image(Image.new("RGB", size, (10, 20, 30)), "PNG")
    _, grid_thw = preprocess_image(data, CONFIG)
    assert image_tokens(data, CONFIG) == int(grid_thw.prod()) // CONFIG.merge_size**2


def test_an_exif_rotation_leaves_the_header_count_exact():
    data = with_exif_orientation(Image.new("RGB", (300, 100)), 6)  # decoded as 100x300
    _, grid_thw = preprocess_image(data, CONFIG)
    assert image_tokens(data, CONFIG) == int(grid_thw.prod()) // CONFIG.merge_size**2


@pytest.mark.parametrize("kind", ["wav", "flac", "mp3", "m4a"])
def test_declared_audio_duration_gives_a_lower_bound_within_the_slack(kind):
    data = encode_audio(tone(440.0, 16000, 7.3), 16000, kind)
    exact = audio_tokens_for_mel(preprocess_audio(data, CONFIG).shape[0], CONFIG)
    estimate = probe_audio_tokens(data, CONFIG, DurationLimit.of(CONFIG))
    assert exact - 8 <= estimate <= exact  # one second of slack is 6.25 tokens


@pytest.mark.parametrize("video", [dict(seconds=2.0, fps=4), dict(seconds=3.0, fps=10, sound_rate=None),
                                   dict(seconds=5.0, fps=8, width=320, height=240)])  # fmt: skip
def test_video_vision_tokens_are_exact_before_decoding_and_sound_a_lower_bound(video):
    data = encode_video(**video)
    decoded = preprocess_video(data, CONFIG)
    vision = int(decoded.video_grid_thw.prod()) // CONFIG.merge_size**2
    sound = int(decoded.soundtrack.segment_lens.sum()) if decoded.soundtrack else 0
    estimate = probe_video_tokens(data, CONFIG)
    assert vision <= estimate <= vision + sound
    if decoded.soundtrack is None:
        assert estimate == vision


@pytest.mark.parametrize("tokens", [1, 5, 100, 1000, 3001])
def test_max_seconds_for_tokens_is_the_exact_boundary(tokens):
    seconds = max_seconds_for_tokens(tokens, CONFIG)
    step = 1 / CONFIG.audio_sampling_rate
    assert audio_tokens_for_seconds(seconds - step, CONFIG) <= tokens < audio_tokens_for_seconds(seconds + step, CONFIG)


def test_a_declared_duration_over_the_limit_is_refused_before_decoding():
    config = ProcessorConfig(tokens=CONFIG.tokens, max_media_seconds=600.0)
    started = time.perf_counter()
    with pytest.raises(MediaLimitError, match=r"longer than the 600 s limit \(its container declares 3540 s\)"):
        probe_audio_tokens(silent_wav(59 * 60), config, DurationLimit.of(config))
    assert time.perf_counter() - started < 1.0


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


def test_sixteen_large_images_beyond_the_context_are_refused_without_decoding(processor):
    image = encode_image(Image.new("RGB", (2048, 2048), (90, 90, 90)), "PNG")  # 4096 tokens each
    messages = user(*[{"type": "image", "image": image}] * 16)
    started = time.perf_counter()
    with pytest.raises(ProcessingError, match=r"prompt length \d+ \+ max_tokens 16 = \d+ exceeds max_model_len 1024 "
                                              r"\(counting the media tokens their headers and containers declare"):
        processor.process(messages, budget=ContextBudget(1024, 16))
    assert time.perf_counter() - started < 1.0  # decoding and resizing them took 13 s


def test_an_hour_of_audio_beyond_the_context_is_refused_without_decoding(processor):
    messages = user({"type": "audio", "audio": silent_wav(59 * 60)})
    started = time.perf_counter()
    with pytest.raises(ProcessingError, match="exceeds max_model_len 1024 .counting the media tokens"):
        processor.process(messages, budget=ContextBudget(1024, 16))
    assert time.perf_counter() - started < 1.0  # decoding it and its log-mel took 46 s


def test_audio_that_understates_its_duration_stops_decoding_at_the_budget(processor):
    long_audio = encode_audio(tone(440.0, 16000, 120.0), 16000, "matroska", codec="pcm_s16le")
    lying = with_declared_seconds(long_audio, 1.0)
    assert probe_audio_tokens(lying, CONFIG, DurationLimit.of(CONFIG)) == 0  # 1 s less the slack
    with pytest.raises(MediaLimitError) as refused:
        processor.process(user({"type": "audio", "audio": lying}), budget=ContextBudget(256, 16))
    stopped_at = re.fullmatch(r"audio is longer than ([\d.]+) s, the most audio whose tokens fit the \d+ this prompt "
                              r"has left within max_model_len - max_tokens \(decoding stopped there\)",
                              str(refused.value))  # fmt: skip
    assert stopped_at and 20 < float(stopped_at.group(1)) < 40  # of its 120 s


def test_a_prompt_that_fits_exactly_is_not_refused(processor):
    audio = encode_audio(tone(440.0, 16000, 3.0), 16000, "m4a")  # declared duration shorter than the decoded one
    image = encode_image(Image.new("RGB", (200, 120), (1, 2, 3)), "PNG")
    messages = user({"type": "image", "image": image}, {"type": "audio", "audio": audio})
    length = len(processor.process(messages).input_ids)
    assert len(processor.process(messages, budget=ContextBudget(length + 16, 16)).input_ids) == length
    with pytest.raises(ProcessingError, match="max_model_len"):  # one token over: the audio's decoding stops
        processor.process(messages, budget=ContextBudget(length + 16, 17))
