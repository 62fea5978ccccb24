"""Damaged media (random byte flips, cuts, splices of valid files) fails with ProcessingError and nothing else."""

import numpy as np
import pytest
from PIL import Image

from mimo.processing.audio import preprocess_audio
from mimo.processing.config import ProcessorConfig, SpecialTokenIds
from mimo.processing.errors import ProcessingError
from mimo.processing.image import preprocess_image
from mimo.processing.video import preprocess_video
from processing_media import encode_audio, encode_image, encode_video, gradient_rgb, tone

CONFIG = ProcessorConfig(tokens=SpecialTokenIds(*range(9)))
MUTATIONS_PER_FILE = 24


def valid_files():
    image = Image.fromarray(gradient_rgb(64, 48))
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP"):
        yield pytest.param(encode_image(image, fmt), preprocess_image, id=fmt.lower())
    for kind, rate in (("wav", 16000), ("flac", 16000), ("mp3", 16000), ("opus", 48000), ("m4a", 48000)):
        yield pytest.param(encode_audio(tone(440.0, rate, 0.3, 2), rate, kind), preprocess_audio, id=kind)
    yield pytest.param(encode_video(1.0, 8), preprocess_video, id="mp4")


def mutations(data: bytes, rng: np.random.Generator):
    for i in range(MUTATIONS_PER_FILE):
        damaged = bytearray(data)
        if i % 3 == 0:  # flip a few bytes
            for position in rng.integers(len(damaged), size=int(rng.integers(1, 20))):
                damaged[position] = int(rng.integers(256))
        elif i % 3 == 1:  # cut
            damaged = damaged[: int(rng.integers(1, len(damaged)))]
        else:  # splice in random bytes
            start = int(rng.integers(len(damaged)))
            damaged[start:start + int(rng.integers(1, 64))] = rng.bytes(int(rng.integers(1, 64)))
        yield bytes(damaged)


@pytest.mark.parametrize("data,preprocess", list(valid_files()))
def test_damaged_files_raise_only_processing_errors(data, preprocess):
    """Each damaged file either still decodes or raises ProcessingError; any other exception fails the test."""
    for damaged in mutations(data, np.random.default_rng(0)):
        try:
            preprocess(damaged, CONFIG)
        except ProcessingError:
            continue


def test_undecodable_metadata_text_is_ignored():
    data = encode_audio(tone(440.0, 48000, 0.3), 48000, "m4a")
    tag = data.index(b"Lavf")  # the muxer's "encoder" tag
    damaged = data[:tag] + b"\xff\xfe" + data[tag + 2:]  # invalid UTF-8 in a metadata string
    assert preprocess_audio(damaged, CONFIG).shape[1] == 128
