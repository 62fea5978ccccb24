"""Audio front end: decode (every accepted format), resampling, log-mel parity, token counts, errors."""

import io
import math
import wave

import numpy as np
import pytest
import torch
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank
from transformers.audio_utils import spectrogram, window_function

from mimo.models.audio_tower import audio_token_count
from mimo.processing.audio import (
    DurationLimit,
    audio_tokens_for_mel,
    decode_audio,
    log_mel_spectrogram,
    mel_filter_bank,
    preprocess_audio,
    resample,
    waveform_to_mel,
)
from mimo.processing.config import ProcessorConfig, SpecialTokenIds
from mimo.processing.errors import MediaDecodeError, MediaLimitError
from processing_media import encode_audio, encode_video, tone

CONFIG = ProcessorConfig(tokens=SpecialTokenIds(*range(9)))


def dominant_hz(signal: torch.Tensor, sample_rate: int) -> float:
    spectrum = torch.fft.rfft(signal.double() * torch.hann_window(signal.numel(), dtype=torch.float64))
    return spectrum.abs().argmax().item() * sample_rate / signal.numel()


def reference_log_mel(waveform: np.ndarray) -> np.ndarray:
    """transformers.audio_utils with torchaudio MelSpectrogram's settings (ref §6), float64."""
    filters = hf_mel_filter_bank(481, 128, 0.0, 12000.0, 24000, norm=None, mel_scale="htk")
    return spectrogram(
        waveform.astype(np.float64), window_function(960, "hann", periodic=True), frame_length=960,
        hop_length=240, fft_length=960, power=1.0, center=True, pad_mode="reflect", mel_filters=filters,
        mel_floor=1e-7, log_mel="log", dtype=np.float64,
    ).T


def test_mel_filter_bank_matches_transformers_htk():
    ours = mel_filter_bank(481, 128, 24000).numpy()
    theirs = hf_mel_filter_bank(481, 128, 0.0, 12000.0, 24000, norm=None, mel_scale="htk")
    np.testing.assert_allclose(ours, theirs, atol=1e-7)


@pytest.mark.parametrize("signal", ["noise", "tone", "chirp"])
def test_log_mel_matches_transformers_within_1e_4(signal):
    n = 24000 + 137  # not a multiple of the hop
    t = np.arange(n) / 24000
    waveform = {
        "noise": np.random.default_rng(0).normal(0, 0.1, n),
        "tone": 0.5 * np.sin(2 * np.pi * 1000 * t),
        "chirp": 0.3 * np.sin(2 * np.pi * (200 + 3000 * t) * t),
    }[signal].astype(np.float32)
    ours = log_mel_spectrogram(torch.from_numpy(waveform), CONFIG)
    assert ours.shape == (1 + n // 240, 128) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference_log_mel(waveform), atol=1e-4, rtol=0)


def test_long_audio_is_computed_in_chunks_without_seams():
    waveform = torch.from_numpy(np.random.default_rng(1).normal(0, 0.1, 24000 * 3).astype(np.float32))
    whole = log_mel_spectrogram(waveform, CONFIG)
    torch.testing.assert_close(log_mel_spectrogram(waveform, CONFIG, chunk_frames=7), whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(whole.numpy(), reference_log_mel(waveform.numpy()), atol=1e-4, rtol=0)


def test_silence_hits_the_log_floor():
    mel = log_mel_spectrogram(torch.zeros(4800), CONFIG)
    assert torch.allclose(mel, torch.full_like(mel, math.log(1e-7)))


@pytest.mark.parametrize("orig_rate", [8000, 16000, 22050, 44100, 48000])
def test_resample_keeps_tone_frequency_amplitude_and_length(orig_rate):
    samples = torch.from_numpy(tone(1000.0, orig_rate, 1.0))  # amplitude 0.5
    out = resample(samples, orig_rate, 24000)
    assert out.shape == (1, math.ceil(samples.shape[1] * 24000 / orig_rate))
    assert abs(dominant_hz(out[0], 24000) - 1000.0) <= 1.0
    middle = out[0, 2400:-2400]  # away from the zero-padded edges
    assert abs(middle.abs().max().item() - 0.5) < 0.01


def test_resample_is_a_low_pass_filter():
    above_nyquist = torch.from_numpy(tone(15000.0, 48000, 1.0))  # 15 kHz > 12 kHz, must not alias into the band
    out = resample(above_nyquist, 48000, 24000)
    assert out[0, 2400:-2400].abs().max() < 5e-3


def test_resample_rejects_rates_without_a_small_ratio():
    with pytest.raises(MediaDecodeError, match="cannot resample 23999 Hz"):
        resample(torch.zeros(1, 1000), 23999, 24000)


@pytest.mark.parametrize("kind,sample_rate,channels", [
    ("wav", 16000, 1), ("wav", 44100, 2), ("flac", 22050, 1), ("flac", 48000, 2), ("mp3", 44100, 2),
    ("mp3", 16000, 1), ("opus", 48000, 2), ("opus", 16000, 1), ("m4a", 44100, 2), ("m4a", 24000, 1),
])
def test_decode_formats_rates_and_channels(kind, sample_rate, channels):
    data = encode_audio(tone(1000.0, sample_rate, 1.0, channels), sample_rate, kind)
    waveform, rate = decode_audio(data, DurationLimit(60, "60 s"))
    assert rate == (48000 if kind == "opus" else sample_rate)  # Opus always decodes at 48 kHz
    assert waveform.shape[0] == channels
    assert abs(waveform.shape[1] / rate - 1.0) < 0.1  # codecs add priming / padding samples
    mono = resample(waveform, rate, 24000).mean(dim=0)
    assert abs(dominant_hz(mono, 24000) - 1000.0) <= 2.0
    mel = preprocess_audio(data, CONFIG)
    assert mel.shape == (1 + mono.numel() // 240, 128)


def test_channels_are_averaged_after_resampling():
    stereo = torch.from_numpy(tone(500.0, 16000, 0.5, channels=2))  # amplitudes 0.5 and 0.25
    mel = waveform_to_mel(stereo, 16000, CONFIG)
    mono = resample(stereo, 16000, 24000).mean(dim=0)
    assert abs(mono[2400:-2400].abs().max().item() - 0.375) < 0.01
    torch.testing.assert_close(mel, log_mel_spectrogram(mono, CONFIG))


def test_token_count_is_the_audio_towers():
    for frames in (1, 15, 16, 17, 101, 6000, 6001, 12345):
        assert audio_tokens_for_mel(frames, CONFIG) == audio_token_count(frames)
    assert audio_tokens_for_mel(100 * 60, CONFIG) == 375  # 6.25 tokens per second


def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((samples * 32767).astype(np.int16).tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("data,error,message", [
    (b"", MediaDecodeError, "empty"),
    (b"\x00garbage" * 64, MediaDecodeError, "cannot open audio"),
    (_wav_bytes(np.zeros(0), 16000), MediaDecodeError, "no samples"),
    (_wav_bytes(np.zeros(100), 24000), MediaDecodeError, "too short"),
    (encode_audio(tone(440.0, 16000, 0.2), 16000, "wav", codec="adpcm_ima_wav"), MediaDecodeError,
     "unsupported audio codec 'adpcm_ima_wav'"),
    (encode_audio(tone(440.0, 48000, 0.2), 48000, "m4a")[:300], MediaDecodeError, "cannot open audio"),
    (encode_video(0.5, 4, sound_rate=None), MediaDecodeError, "no audio stream"),
])
def test_bad_audio_raises_a_clear_error(data, error, message):
    with pytest.raises(error, match=message):
        preprocess_audio(data, CONFIG)


def test_format_change_midway_is_rejected():
    mono_16k = encode_audio(tone(440.0, 16000, 0.5), 16000, "adts", codec="aac")
    stereo_48k = encode_audio(tone(440.0, 48000, 0.5, 2), 48000, "adts", codec="aac")
    with pytest.raises(MediaDecodeError, match="audio changes from 16000 Hz x 1 channels to 48000 Hz x 2 channels"):
        preprocess_audio(mono_16k + stereo_48k, CONFIG)


def test_audio_over_the_duration_limit_is_rejected():
    config = ProcessorConfig(tokens=CONFIG.tokens, max_media_seconds=0.5)
    with pytest.raises(MediaLimitError, match="longer than the 0.5 s limit"):
        preprocess_audio(_wav_bytes(np.zeros(16000), 16000), config)
