"""Audio -> log-mel features (ref §6): decode, resample to 24 kHz, average channels, log-mel [T, 128].

Matches torchaudio's `Resample` (Hann-windowed sinc) and `MelSpectrogram(power=1, HTK, no norm)` without
depending on torchaudio.

Before anything is decoded, `probe_audio_tokens` reads the container's declared duration (PyAV, no decode) for a
token count that refuses what cannot fit; decoding itself stops once the samples so far exceed its `DurationLimit`,
which bounds the work for files whose metadata understates the duration or declares none.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
import torch

from mimo.models.audio_tower import audio_token_count
from mimo.processing.config import ProcessorConfig
from mimo.processing.container import ALLOWED_AUDIO_CODECS, check_codec, open_media, stream_seconds
from mimo.processing.errors import MediaDecodeError, MediaLimitError

_LOG_MEL_FLOOR = 1e-7
STFT_CHUNK_FRAMES = 6000  # 60 s of frames per STFT call
# torchaudio.functional.resample defaults
_LOWPASS_WIDTH = 6
_ROLLOFF = 0.99
# Exact rational resampling builds a [new, 1, ~old] kernel of the reduced ratio; past this many elements
# the rate pair is too odd (e.g. 23999 -> 24000 Hz) and the file should be re-encoded.
_MAX_RESAMPLE_KERNEL = 1 << 24
# Declared durations of compressed audio differ from the decoded length by encoder delay and padding (tens of ms):
# estimates from them are this much shorter, so that an honest file is never refused for tokens it does not have.
DECLARED_DURATION_SLACK_S = 1.0


@dataclass(frozen=True, slots=True)
class DurationLimit:
    """Decoding stops, refusing the audio, once it is longer than `seconds`; `reason` ends "audio is longer than"."""

    seconds: float
    reason: str

    @classmethod
    def of(cls, config: ProcessorConfig) -> "DurationLimit":
        return cls(config.max_media_seconds, f"the {config.max_media_seconds:g} s limit")


def decode_audio(data: bytes, limit: DurationLimit) -> tuple[torch.Tensor, int]:
    """Encoded audio file -> (waveform float32 [channels, samples], sample_rate) of its first audio stream."""
    with open_media(data, "audio") as container:
        return decode_audio_stream(container, _audio_stream(container), limit)


def _audio_stream(container: av.container.InputContainer) -> av.audio.AudioStream:
    if not container.streams.audio:
        raise MediaDecodeError("audio file has no audio stream")
    return container.streams.audio[0]


def declared_seconds(container: av.container.InputContainer, stream: av.audio.AudioStream,
                     limit: DurationLimit) -> float:  # fmt: skip
    """The stream's declared duration less DECLARED_DURATION_SLACK_S (0 where none is declared); a declared
    duration over `limit` is refused here, before decoding."""
    seconds = max(0.0, (stream_seconds(stream, container) or 0.0) - DECLARED_DURATION_SLACK_S)
    if seconds > limit.seconds:
        raise MediaLimitError(f"audio is longer than {limit.reason} (its container declares "
                              f"{seconds + DECLARED_DURATION_SLACK_S:g} s)")  # fmt: skip
    return seconds


def probe_audio_tokens(data: bytes, config: ProcessorConfig, limit: DurationLimit) -> int:
    """At least how many tokens the audio has, from its container's declared duration (nothing is decoded)."""
    with open_media(data, "audio") as container:
        stream = _audio_stream(container)
        check_codec(stream, ALLOWED_AUDIO_CODECS)
        return audio_tokens_for_seconds(declared_seconds(container, stream, limit), config)


def decode_audio_stream(
    container: av.container.InputContainer, stream: av.audio.AudioStream, limit: DurationLimit
) -> tuple[torch.Tensor, int]:
    """The stream's samples: (waveform float32 [channels, samples], sample_rate)."""
    chunks, sample_rate = [], None
    for converted in _converted_frames(container, stream, limit):
        chunks.append(converted.to_ndarray())
        sample_rate = converted.sample_rate
    return torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.float32)), sample_rate


def count_audio_samples(
    container: av.container.InputContainer, stream: av.audio.AudioStream, limit: DurationLimit
) -> tuple[int, int]:
    """(samples per channel, sample_rate) exactly as `decode_audio_stream` yields them, keeping no sample: the
    stream is decoded (compressed containers do not declare their decoded length: encoder delay, padding), but
    neither resampled nor turned into a mel."""
    num_samples, sample_rate = 0, None
    for converted in _converted_frames(container, stream, limit):
        num_samples += converted.samples
        sample_rate = converted.sample_rate
    return num_samples, sample_rate


def _converted_frames(
    container: av.container.InputContainer, stream: av.audio.AudioStream, limit: DurationLimit
) -> Iterator[av.AudioFrame]:
    """The stream decoded to planar float frames at its own rate and layout; refused once longer than `limit`, on
    a change of rate or layout midway, and when it holds no sample at all."""
    check_codec(stream, ALLOWED_AUDIO_CODECS)
    # Planar float at the source rate and layout: every sample format becomes [-1, 1] floats per channel.
    resampler = av.AudioResampler(format="fltp")
    num_samples, source = 0, None
    for frame in container.decode(stream):
        if source is None:
            source = (frame.sample_rate, frame.layout.nb_channels)
        elif (frame.sample_rate, frame.layout.nb_channels) != source:
            raise MediaDecodeError(
                f"audio changes from {source[0]} Hz x {source[1]} channels to {frame.sample_rate} Hz x "
                f"{frame.layout.nb_channels} channels midway; re-encode it with one format"
            )
        for converted in resampler.resample(frame):
            num_samples += converted.samples
            yield converted
        if num_samples > limit.seconds * source[0]:
            raise MediaLimitError(f"audio is longer than {limit.reason}")
    if source is not None:
        for converted in resampler.resample(None):
            num_samples += converted.samples
            yield converted
    if num_samples == 0:
        raise MediaDecodeError("audio stream contains no samples (empty or zero-length audio)")


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """[..., N] at orig_rate -> [..., ceil(N * new / orig)] at new_rate (torchaudio's sinc_interp_hann)."""
    if orig_rate == new_rate:
        return waveform
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    width = math.ceil(_LOWPASS_WIDTH * orig / (min(orig, new) * _ROLLOFF))
    if new * (2 * width + orig) > _MAX_RESAMPLE_KERNEL:
        raise MediaDecodeError(f"cannot resample {orig_rate} Hz to {new_rate} Hz; re-encode at a standard rate")
    kernel = _sinc_resample_kernel(orig, new, width)
    shape = waveform.shape
    flat = waveform.reshape(-1, 1, shape[-1])
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded, kernel, stride=orig)  # [B, new, floor(N / orig) + 1] >= the target
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    return out[:, :resampled_length(shape[-1], orig_rate, new_rate)].reshape(*shape[:-1], -1)


def resampled_length(num_samples: int, orig_rate: int, new_rate: int) -> int:
    """Samples `resample` gives for `num_samples` at orig_rate: ceil(N * new / orig)."""
    return -(-num_samples * new_rate // orig_rate)


def _sinc_resample_kernel(orig: int, new: int, width: int) -> torch.Tensor:
    """[new, 1, 2 * width + orig]: one Hann-windowed sinc low-pass filter per output phase."""
    base_freq = min(orig, new) * _ROLLOFF
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * base_freq).clamp(-_LOWPASS_WIDTH, _LOWPASS_WIDTH)
    window = torch.cos(t * math.pi / _LOWPASS_WIDTH / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * (base_freq / orig)).float()


def hz_to_mel_htk(freq: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + freq / 700.0)


def mel_to_hz_htk(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filter_bank(num_freqs: int, num_mels: int, sample_rate: int, f_min: float = 0.0,
                    f_max: float | None = None) -> torch.Tensor:
    """Triangular HTK-scale filters without area normalisation (torchaudio `melscale_fbanks`).

    Returns float64 [num_freqs, num_mels].
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    all_freqs = torch.linspace(0, sample_rate // 2, num_freqs, dtype=torch.float64)
    mel_points = torch.linspace(
        hz_to_mel_htk(torch.tensor(f_min, dtype=torch.float64)),
        hz_to_mel_htk(torch.tensor(f_max, dtype=torch.float64)),
        num_mels + 2, dtype=torch.float64,
    )
    freq_points = mel_to_hz_htk(mel_points)
    freq_gaps = freq_points[1:] - freq_points[:-1]
    slopes = freq_points[None, :] - all_freqs[:, None]  # [num_freqs, num_mels + 2]
    rising = -slopes[:, :-2] / freq_gaps[:-1]
    falling = slopes[:, 2:] / freq_gaps[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def log_mel_spectrogram(
    waveform: torch.Tensor, config: ProcessorConfig, *, chunk_frames: int = STFT_CHUNK_FRAMES
) -> torch.Tensor:
    """Mono float waveform [N] at the processor rate -> log-mel [1 + N // hop, n_mels] float32.

    torch.stft(center=True, reflect) computed in chunks of frames, so an hour of audio never holds its whole
    complex spectrogram; float64 so near-silent bins (deep spectral nulls of clean tones) keep their log
    value to 1e-4 (float32 moves them by whole log units). Runs on the waveform's device (a GPU encoder's front
    end: cuFFT in float64).
    """
    n_fft, hop = config.audio_nfft, config.audio_hop_length
    num_frames = mel_frame_count(waveform.numel(), config)
    device = waveform.device
    window = torch.hann_window(config.audio_window_size, periodic=True, dtype=torch.float64, device=device)
    filters = mel_filter_bank(n_fft // 2 + 1, config.audio_n_mels, config.audio_sampling_rate).T.to(device)
    padded = torch.nn.functional.pad(waveform.double()[None, None], (n_fft // 2, n_fft // 2), mode="reflect")[0, 0]
    chunks = []
    for first in range(0, num_frames, chunk_frames):
        count = min(chunk_frames, num_frames - first)
        span = padded[first * hop:(first + count - 1) * hop + n_fft]
        spectrum = torch.stft(
            span, n_fft=n_fft, hop_length=hop, win_length=config.audio_window_size, window=window, center=False,
            return_complex=True,
        ).abs()  # [n_fft // 2 + 1, count]
        chunks.append(torch.log(torch.clamp(filters @ spectrum, min=_LOG_MEL_FLOOR)).T.float())
    return torch.cat(chunks)


def mel_frame_count(num_samples: int, config: ProcessorConfig) -> int:
    """Frames of the log-mel of `num_samples` at the processor rate (centred STFT: 1 + N // hop); audio with no
    more than n_fft / 2 samples is refused."""
    if num_samples <= config.audio_nfft // 2:
        raise MediaDecodeError(
            f"audio is too short: {num_samples} samples at {config.audio_sampling_rate} Hz, "
            f"need more than {config.audio_nfft // 2}"
        )
    return 1 + num_samples // config.audio_hop_length


def waveform_to_mel(waveform: torch.Tensor, sample_rate: int, config: ProcessorConfig) -> torch.Tensor:
    """[channels, N] at sample_rate -> log-mel [T, n_mels]: each channel resampled, then channels averaged."""
    if waveform.shape[-1] == 0:
        raise MediaDecodeError("audio has zero length")
    mono = resample(waveform, sample_rate, config.audio_sampling_rate).mean(dim=0)
    return log_mel_spectrogram(mono, config)


def preprocess_audio(data: bytes, config: ProcessorConfig, limit: DurationLimit | None = None) -> torch.Tensor:
    """Encoded audio file -> log-mel [T, n_mels] float32; refused once longer than `limit` (default: the config's)."""
    waveform, sample_rate = decode_audio(data, limit or DurationLimit.of(config))
    return waveform_to_mel(waveform, sample_rate, config)


def audio_tokens_for_mel(num_frames: int, config: ProcessorConfig) -> int:
    """<|audio_pad|> tokens (= audio-encoder rows) for a log-mel of `num_frames` frames."""
    return audio_token_count(
        num_frames, segment_size=config.audio_segment_size, stride_size=config.audio_stride_size,
        avg_pooler=config.audio_avg_pooler, group_size=config.audio_group_size,
    )


def audio_tokens_for_samples(num_samples: int, sample_rate: int, config: ProcessorConfig) -> int:
    """The exact tokens of `num_samples` decoded at `sample_rate`, as `preprocess_audio` counts them: resampled to
    the processor rate, mel frames, then `audio_tokens_for_mel`."""
    resampled = resampled_length(num_samples, sample_rate, config.audio_sampling_rate)
    return audio_tokens_for_mel(mel_frame_count(resampled, config), config)


def audio_tokens(data: bytes, config: ProcessorConfig, limit: DurationLimit | None = None) -> int:
    """The exact token count of an encoded audio without its mel: the stream is decoded only to count its samples
    (`count_audio_samples`); refused as `preprocess_audio` would refuse it (declared or decoded duration over
    `limit`, too short, corrupt)."""
    limit = limit or DurationLimit.of(config)
    with open_media(data, "audio") as container:
        stream = _audio_stream(container)
        check_codec(stream, ALLOWED_AUDIO_CODECS)
        declared_seconds(container, stream, limit)  # refuses a declared duration over the limit before decoding
        num_samples, sample_rate = count_audio_samples(container, stream, limit)
    return audio_tokens_for_samples(num_samples, sample_rate, config)


def audio_tokens_for_seconds(seconds: float, config: ProcessorConfig) -> int:
    """Tokens of audio lasting `seconds` (0 for audio too short to have any): samples at the processor rate, mel
    frames, then `audio_tokens_for_mel`, as `preprocess_audio` counts a decoded file."""
    samples = math.ceil(seconds * config.audio_sampling_rate)
    if samples <= config.audio_nfft // 2:
        return 0
    return audio_tokens_for_mel(1 + samples // config.audio_hop_length, config)


def max_seconds_for_tokens(tokens: int, config: ProcessorConfig) -> float:
    """Audio longer than this has more than `tokens` tokens (mel frames T fit iff audio_tokens_for_mel(T) <= tokens,
    and audio has at most T frames iff its samples at the processor rate are fewer than T * hop)."""
    if tokens < audio_tokens_for_mel(1, config):
        return 0.0
    low, high = 1, 2
    while audio_tokens_for_mel(high, config) <= tokens:
        low, high = high, high * 2
    while high - low > 1:  # audio_tokens_for_mel(low) <= tokens < audio_tokens_for_mel(high)
        middle = (low + high) // 2
        low, high = (middle, high) if audio_tokens_for_mel(middle, config) <= tokens else (low, middle)
    return low * config.audio_hop_length / config.audio_sampling_rate
