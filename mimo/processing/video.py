"""Videos -> vision-tower inputs plus, when there is a sound track, its log-mel and audio units (ref §7.2).

Frames are sampled by Qwen's `smart_nframes` rule, resized to one size for the whole clip and grouped in
pairs (temporal_patch_size); each group becomes one "unit" that owns the audio tokens of its time span.
Preprocessing decodes the sampled frames (`decode_video`); mimo_encoder resizes and patchifies them on its device
(`mimo.processing.image.vision_patches`); `preprocess_video` is both in one process.
"""

import math
from dataclasses import dataclass

import av
import numpy as np
import torch

from mimo.processing.audio import (
    DurationLimit, audio_tokens_for_mel, audio_tokens_for_samples, audio_tokens_for_seconds, count_audio_samples,
    decode_audio_stream, declared_seconds, waveform_to_mel,
)
from mimo.processing.config import ProcessorConfig
from mimo.processing.container import ALLOWED_VIDEO_CODECS, check_codec, open_media, stream_seconds
from mimo.processing.errors import MediaDecodeError, MediaLimitError, ProcessingError
from mimo.processing.image import smart_resize, vision_patches


@dataclass(frozen=True, slots=True)
class VideoSoundtrack:
    mel: torch.Tensor  # [T_mel, n_mels]
    audio_token_len: int  # rows the audio encoder produces for the whole track
    segment_starts: torch.Tensor  # [grid_t] int64, first audio token of each unit
    segment_lens: torch.Tensor  # [grid_t] int64, audio tokens each unit takes


@dataclass(frozen=True, slots=True)
class SoundtrackLayout:
    audio_token_len: int  # rows the audio encoder produces for the whole track
    segment_starts: list[int]  # per unit (temporal group): its first audio token
    segment_lens: list[int]  # per unit: the audio tokens it takes


@dataclass(frozen=True, slots=True)
class VideoLayout:
    """Everything about a video's encoder rows and placeholder run, known before a frame is processed."""

    video_grid_thw: tuple[int, int, int]
    video_timestamps: list[float]  # seconds, first frame of each temporal group
    second_per_grid_ts: float
    soundtrack: SoundtrackLayout | None


@dataclass(frozen=True, slots=True)
class DecodedVideo:
    frames: torch.Tensor  # [n, 3, H, W] uint8: the sampled frames as displayed, before the resize
    video_grid_thw: torch.Tensor  # [1, 3] int64
    video_timestamps: torch.Tensor  # [grid_t] float64 seconds, first frame of each temporal group
    second_per_grid_ts: float
    soundtrack: VideoSoundtrack | None


@dataclass(frozen=True, slots=True)
class VideoInputs:
    pixel_values_videos: torch.Tensor  # [grid_t * gh * gw, C * tp * p * p] float32
    video_grid_thw: torch.Tensor  # [1, 3] int64
    video_timestamps: torch.Tensor  # [grid_t] float64 seconds, first frame of each temporal group
    second_per_grid_ts: float
    soundtrack: VideoSoundtrack | None


def sample_frame_indices(total_frames: int, video_fps: float, config: ProcessorConfig) -> list[int]:
    """Indices of the frames to keep (Qwen `smart_nframes`): duration * fps clamped to [min_frames, max_frames]
    and to the frame count, floored to a multiple of temporal_patch_size, spread evenly."""
    factor = config.temporal_patch_size
    if config.num_frames is not None:
        if config.num_frames > config.max_frames:
            raise MediaLimitError(
                f"processor_config.num_frames {config.num_frames} exceeds max_frames {config.max_frames}"
            )
        wanted = config.num_frames
    else:
        min_frames = math.ceil(config.min_frames / factor) * factor
        max_frames = config.max_frames // factor * factor
        wanted = min(max(total_frames / video_fps * config.fps, min_frames), max_frames)
    num_frames = int(min(wanted, total_frames)) // factor * factor
    # Clips shorter than one temporal group keep all their frames; the last one is repeated later.
    num_frames = max(num_frames, min(total_frames, factor))
    return sorted(set(np.linspace(0, total_frames - 1, num_frames).round().astype(int).tolist()))


def _count_frames(container: av.container.InputContainer, stream: av.video.VideoStream) -> int:
    return sum(1 for packet in container.demux(stream) if packet.size)


def frame_size(height: int, width: int, num_frames: int, config: ProcessorConfig) -> tuple[int, int]:
    """The (h, w) every frame of a clip is resized to when `num_frames` are kept: the clip's pixel budget shared."""
    budget = config.video_total_max_pixels * config.temporal_patch_size // num_frames
    max_pixels = max(config.video_min_pixels, min(budget, config.video_max_pixels))
    return smart_resize(height, width, factor=config.image_factor, min_pixels=config.video_min_pixels,
                        max_pixels=max_pixels)  # fmt: skip


def _decode_frames(
    container: av.container.InputContainer, stream: av.video.VideoStream, indices: list[int],
    num_frames_declared: int,
) -> torch.Tensor:
    """Decode the frames at `indices` as displayed: uint8 [n, 3, H, W] (every frame the first one's size)."""
    wanted = iter(indices)
    next_index = next(wanted)
    frames = []
    stream.thread_type = "AUTO"
    for ordinal, frame in enumerate(container.decode(stream)):
        if ordinal != next_index:
            continue
        rgb = _displayed_rgb(frame)
        if frames and rgb.shape != frames[0].shape:
            raise MediaDecodeError(f"video frame {ordinal} is {rgb.shape[2]}x{rgb.shape[1]}, the first is "
                                   f"{frames[0].shape[2]}x{frames[0].shape[1]}: frames must keep one size")
        frames.append(rgb)
        next_index = next(wanted, None)
        if next_index is None:
            break
    if next_index is not None:
        raise MediaDecodeError(
            f"corrupt or truncated video: {num_frames_declared} frames in the stream, frame {next_index} undecodable"
        )
    return torch.stack(frames)


def _displayed_rgb(frame: av.VideoFrame) -> torch.Tensor:
    """[3, H, W] uint8 as displayed: the display matrix (phone videos; counter-clockwise degrees) applied."""
    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
    if frame.rotation:
        rgb = torch.rot90(rgb, k=round(frame.rotation / 90) % 4, dims=(1, 2))
    return rgb


def build_audio_units(
    timestamps: list[float], audio_token_len: int, config: ProcessorConfig
) -> tuple[list[int], list[int]]:
    """(start, length) in audio tokens of each temporal group's share of the sound track (ref §7.2).

    Unit g spans [ts_g, ts_{g+1}); the last one ends at its timestamp + 1/fps. Token offsets are
    int(seconds * tokens_per_second), clipped to the track's token count.
    """
    starts, lens = _audio_unit_spans(timestamps, audio_token_len, config)
    for start_s, length in zip(timestamps, lens):
        if length <= 0:
            raise ProcessingError(
                f"video sound track ({audio_token_len} audio tokens) ends before the frame group at {start_s:.2f} s"
            )
    return starts, lens


def _audio_unit_spans(
    timestamps: list[float], audio_token_len: int, config: ProcessorConfig
) -> tuple[list[int], list[int]]:
    rate = config.audio_tokens_per_second
    ends_s = timestamps[1:] + [timestamps[-1] + 1.0 / config.fps]
    starts = [int(start_s * rate) for start_s in timestamps]
    return starts, [min(int(end_s * rate), audio_token_len) - start for start, end_s in zip(starts, ends_s)]


@dataclass(frozen=True, slots=True)
class _VideoProbe:
    total_frames: int
    fps: float
    height: int
    width: int
    sound_seconds: float | None  # the sound track's declared duration less the slack; None without sound


def _probe_video(data: bytes, config: ProcessorConfig) -> _VideoProbe:
    """Frame count (demuxed, not decoded), rate, declared frame size and sound duration; the limits checked."""
    with open_media(data, "video") as container:
        if not container.streams.video:
            raise MediaDecodeError("video has no video stream")
        stream = container.streams.video[0]
        check_codec(stream, ALLOWED_VIDEO_CODECS)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > config.max_source_pixels:
            raise MediaLimitError(
                f"video frames are {width}x{height} = {width * height} pixels, over the {config.max_source_pixels} limit"
            )
        total_frames = _count_frames(container, stream)
        if total_frames == 0:
            raise MediaDecodeError("video stream contains no frames")
        if stream.average_rate:
            video_fps = float(stream.average_rate)
        elif declared_s := stream_seconds(stream, container):
            video_fps = total_frames / declared_s
        else:
            raise MediaDecodeError("video declares neither a frame rate nor a duration")
        sound_seconds = None
        if container.streams.audio:
            sound_seconds = declared_seconds(container, container.streams.audio[0], DurationLimit.of(config))
    if total_frames / video_fps > config.max_media_seconds:
        raise MediaLimitError(f"video is longer than the {config.max_media_seconds:g} s limit")
    return _VideoProbe(total_frames, video_fps, height, width, sound_seconds)


def _group_timestamps(indices: list[int], video_fps: float, config: ProcessorConfig) -> tuple[list[int], list[float]]:
    """The frame indices padded to whole temporal groups (last frame repeated), and each group's first-frame time."""
    tp = config.temporal_patch_size
    padded = indices + indices[-1:] * (-len(indices) % tp)
    return padded, [index / video_fps for index in padded[::tp]]


def probe_video_tokens(data: bytes, config: ProcessorConfig) -> int:
    """At least how many tokens the video has, without decoding a frame: its vision tokens exactly (the frame count
    is demuxed; the size is the declared one, which a rotation does not change the count of), and the audio tokens of
    its sound track's declared duration."""
    probe = _probe_video(data, config)
    indices = sample_frame_indices(probe.total_frames, probe.fps, config)
    h, w = frame_size(probe.height, probe.width, len(indices), config)
    _, timestamps = _group_timestamps(indices, probe.fps, config)
    tokens = len(timestamps) * h * w // config.image_factor**2
    if probe.sound_seconds is not None:
        _, lens = _audio_unit_spans(timestamps, audio_tokens_for_seconds(probe.sound_seconds, config), config)
        tokens += sum(max(0, length) for length in lens)
    return tokens


def _decode_soundtrack(data: bytes, timestamps: list[float], config: ProcessorConfig) -> VideoSoundtrack:
    with open_media(data, "video") as container:
        waveform, sample_rate = decode_audio_stream(container, container.streams.audio[0], DurationLimit.of(config))
    mel = waveform_to_mel(waveform, sample_rate, config)
    audio_token_len = audio_tokens_for_mel(mel.shape[0], config)
    starts, lens = build_audio_units(timestamps, audio_token_len, config)
    return VideoSoundtrack(
        mel=mel, audio_token_len=audio_token_len,
        segment_starts=torch.tensor(starts, dtype=torch.long), segment_lens=torch.tensor(lens, dtype=torch.long),
    )


def _second_per_grid_ts(num_sampled: int, probe: _VideoProbe, config: ProcessorConfig) -> float:
    sample_fps = num_sampled / probe.total_frames * probe.fps
    return config.temporal_patch_size / sample_fps


def decode_video(data: bytes, config: ProcessorConfig) -> DecodedVideo:
    """Encoded video -> its sampled frames (uint8, before the resize), grid, timestamps, and the sound track if any."""
    probe = _probe_video(data, config)
    indices = sample_frame_indices(probe.total_frames, probe.fps, config)
    with open_media(data, "video") as container:
        frames = _decode_frames(container, container.streams.video[0], indices, probe.total_frames)
    padded, timestamps = _group_timestamps(indices, probe.fps, config)
    h, w = frame_size(frames.shape[2], frames.shape[3], len(indices), config)
    grid = (len(padded) // config.temporal_patch_size, h // config.patch_size, w // config.patch_size)
    return DecodedVideo(
        frames=frames,
        video_grid_thw=torch.tensor([grid], dtype=torch.long),
        video_timestamps=torch.tensor(timestamps, dtype=torch.float64),
        second_per_grid_ts=_second_per_grid_ts(len(indices), probe, config),
        soundtrack=_decode_soundtrack(data, timestamps, config) if probe.sound_seconds is not None else None,
    )


def preprocess_video(data: bytes, config: ProcessorConfig) -> VideoInputs:
    """Encoded video -> frames patchified for the vision tower, timestamps, and the sound track if any."""
    video = decode_video(data, config)
    return VideoInputs(
        pixel_values_videos=vision_patches(video.frames, video.video_grid_thw, config),
        video_grid_thw=video.video_grid_thw, video_timestamps=video.video_timestamps,
        second_per_grid_ts=video.second_per_grid_ts, soundtrack=video.soundtrack,
    )


def plan_video(data: bytes, config: ProcessorConfig) -> VideoLayout:
    """What `preprocess_video` will give, exactly, without processing the clip: frames are counted by demuxing and
    only the first is decoded (its displayed size, rotation applied, sets every frame's); the sound track is decoded
    only to count its samples (`count_audio_samples`: no resampling, no mel)."""
    probe = _probe_video(data, config)
    indices = sample_frame_indices(probe.total_frames, probe.fps, config)
    with open_media(data, "video") as container:
        first = next(container.decode(container.streams.video[0]), None)
        if first is None:
            raise MediaDecodeError(f"corrupt or truncated video: {probe.total_frames} frames in the stream, "
                                   "frame 0 undecodable")  # fmt: skip
        _, height, width = _displayed_rgb(first).shape
    h, w = frame_size(height, width, len(indices), config)
    padded, timestamps = _group_timestamps(indices, probe.fps, config)
    soundtrack = None
    if probe.sound_seconds is not None:
        with open_media(data, "video") as container:
            samples, rate = count_audio_samples(container, container.streams.audio[0], DurationLimit.of(config))
        audio_token_len = audio_tokens_for_samples(samples, rate, config)
        starts, lens = build_audio_units(timestamps, audio_token_len, config)
        soundtrack = SoundtrackLayout(audio_token_len, starts, lens)
    grid = (len(padded) // config.temporal_patch_size, h // config.patch_size, w // config.patch_size)
    return VideoLayout(grid, timestamps, _second_per_grid_ts(len(indices), probe, config), soundtrack)
