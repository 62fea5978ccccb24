"""Small media files made on the fly (no binaries in the repository) for the demo, tests and benchmarks."""

import io
import wave

import numpy as np
from PIL import Image, ImageDraw


def sample_image(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (96, 64)) -> bytes:
    """A PNG: a `color` background with a white disc, so encoders see some structure."""
    image = Image.new("RGB", size, color)
    width, height = size
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_tone(frequency_hz: float = 440.0, seconds: float = 1.0, sample_rate: int = 16000) -> bytes:
    """A mono 16-bit WAV of a sine tone."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    samples = (0.3 * 32767 * np.sin(2 * np.pi * frequency_hz * t)).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(samples.tobytes())
    return buffer.getvalue()
