"""Media generated for the processing tests (nothing binary is committed): images, tones, videos."""

import io
import json

import av
import numpy as np
from PIL import Image

from mimo.processing.tokenizer_files import write_tiny_tokenizer


def gradient_rgb(width: int, height: int) -> np.ndarray:
    """Smooth RGB test pattern [H, W, 3] uint8 (smooth so resampling filters agree closely)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127.5 + 100 * np.sin(x / 7.0) * np.cos(y / 9.0)
    return np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)


def encode_image(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def with_exif_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode_image(image, "JPEG", exif=exif, quality=95)


def tone(freq: float, sample_rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    """float32 [channels, samples] sine; channel c has amplitude 0.5 / (c + 1)."""
    t = np.arange(int(round(sample_rate * seconds))) / sample_rate
    wave = np.sin(2 * np.pi * freq * t)
    return np.stack([0.5 / (c + 1) * wave for c in range(channels)]).astype(np.float32)


_LAYOUTS = {1: "mono", 2: "stereo"}


def _mux_audio(container, stream, samples: np.ndarray, sample_rate: int) -> None:
    """Feed planar float [channels, samples] through `stream` in encoder-sized frames."""
    frame_size = stream.codec_context.frame_size or 1024
    for start in range(0, samples.shape[1], frame_size):
        chunk = np.ascontiguousarray(samples[:, start:start + frame_size])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=_LAYOUTS[samples.shape[0]])
        frame.sample_rate = sample_rate
        frame.pts = start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


AUDIO_FORMATS = {  # name -> (container format, codec)
    "wav": ("wav", "pcm_s16le"),
    "flac": ("flac", "flac"),
    "mp3": ("mp3", "libmp3lame"),
    "opus": ("ogg", "libopus"),
    "m4a": ("ipod", "aac"),
}


def encode_audio(samples: np.ndarray, sample_rate: int, kind: str = "wav", codec: str | None = None) -> bytes:
    """Encode float [channels, samples] as `kind` (a key of AUDIO_FORMATS, or a container with `codec`)."""
    fmt, default_codec = AUDIO_FORMATS.get(kind, (kind, None))
    codec = codec or default_codec
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout=_LAYOUTS[samples.shape[0]])
        _mux_audio(container, stream, samples, sample_rate)  # PyAV converts frames to the codec's sample format
    return buffer.getvalue()


def encode_video(seconds: float, fps: int, *, width: int = 96, height: int = 64, sound_rate: int | None = 48000,
                 sound_seconds: float | None = None, tone_hz: float = 440.0, fmt: str = "mp4",
                 codec: str = "h264", rotation: int = 0, frame_pixels: np.ndarray | None = None) -> bytes:
    """Video (H.264 MP4 by default) whose frame i is grey level 8*i (mod 256), or `frame_pixels` [H, W, 3]
    for every frame; with an AAC stereo tone if sound_rate; `rotation`: display matrix, CCW degrees."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if rotation:
            video.set_display_rotation(rotation)
        audio = container.add_stream("aac", rate=sound_rate, layout="stereo") if sound_rate else None
        for i in range(int(round(seconds * fps))):
            pixels = np.full((height, width, 3), (8 * i) % 256, dtype=np.uint8) if frame_pixels is None else frame_pixels
            for packet in video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if audio is not None:
            _mux_audio(container, audio, tone(tone_hz, sound_rate, sound_seconds or seconds, 2), sound_rate)
    return buffer.getvalue()


def write_tiny_checkpoint(directory, *, model_type: str = "mimo_v2", processor_overrides: dict | None = None,
                          extra_vocab: int = 14, encoder_configs: dict | None = None) -> dict:
    """Tokenizer files + a config.json carrying `processor_config` (LM vocab padded past the tokenizer).

    `encoder_configs` may hold `vision_config` / `audio_config` (into config.json) and `audio_tokenizer`
    (written to audio_tokenizer/config.json).
    """
    info = write_tiny_tokenizer(directory)
    processor_config = {key: value for key, value in info.items() if key.endswith("_token_id")
                        and key not in ("eos_token_id", "pad_token_id")}
    processor_config.update(processor_overrides or {})
    encoder_configs = dict(encoder_configs or {})
    tokenizer_config = encoder_configs.pop("audio_tokenizer", None)
    hf_config = {"model_type": model_type, "vocab_size": info["vocab_size"] + extra_vocab,
                 "processor_config": processor_config, **encoder_configs}
    (directory / "config.json").write_text(json.dumps(hf_config))
    if tokenizer_config is not None:
        (directory / "audio_tokenizer").mkdir()
        (directory / "audio_tokenizer" / "config.json").write_text(json.dumps(tokenizer_config))
    return info
