"""Opening untrusted media bytes with PyAV: a demuxer allow-list and FFmpeg errors as MediaDecodeError.

The allow-list matters for safety, not just tidiness: demuxers such as hls or concat follow references to
other files or URLs, which must never happen for bytes a client sent.
"""

import io
from collections.abc import Iterator
from contextlib import contextmanager

import av

from mimo.processing.errors import MediaDecodeError, ProcessingError

# FFmpeg demuxer names (a container matches if any of its comma-separated names is listed).
ALLOWED_DEMUXERS = ("wav", "flac", "mp3", "ogg", "mov", "mp4", "m4a", "matroska", "webm", "aac", "avi")
ALLOWED_AUDIO_CODECS = ("aac", "mp3", "mp3float", "opus", "libopus", "vorbis", "flac", "alac") + tuple(
    f"pcm_{fmt}" for fmt in ("s16le", "s16be", "s24le", "s32le", "f32le", "f64le", "u8", "mulaw", "alaw")
)
ALLOWED_VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "mpeg4", "mjpeg")

# Metadata (titles, tags) is never used; undecodable bytes in it must not fail the file. PyAV < 19 decodes it
# strictly unless asked not to; 19 dropped the option and always decodes with surrogateescape.
PYAV_OPEN_OPTIONS = {"metadata_errors": "replace"} if int(av.__version__.split(".")[0]) < 19 else {}


@contextmanager
def open_media(data: bytes, kind: str) -> Iterator[av.container.InputContainer]:
    """Open `data` for demuxing; `kind` ("audio"/"video") only words the error messages."""
    if not data:
        raise MediaDecodeError(f"{kind} is empty (0 bytes)")
    options = {"format_whitelist": ",".join(ALLOWED_DEMUXERS), "protocol_whitelist": "none"}
    try:
        container = av.open(io.BytesIO(data), mode="r", options=options, **PYAV_OPEN_OPTIONS)
    except (av.FFmpegError, ValueError) as exc:
        raise MediaDecodeError(
            f"cannot open {kind}: not a supported container ({', '.join(ALLOWED_DEMUXERS)}) or corrupt ({exc})"
        ) from exc
    try:
        yield container
    except ProcessingError:
        raise
    except (av.FFmpegError, ValueError) as exc:  # FFmpeg's errors (some are OSErrors) and PyAV's own checks
        raise MediaDecodeError(f"corrupt or truncated {kind}: {exc}") from exc
    finally:
        container.close()


def check_codec(stream: av.stream.Stream, allowed: tuple[str, ...]) -> None:
    name = stream.codec_context.name if stream.codec_context is not None else "unknown"
    if name not in allowed:
        raise MediaDecodeError(f"unsupported {stream.type} codec {name!r} (supported: {', '.join(allowed)})")


def stream_seconds(stream: av.stream.Stream, container: av.container.InputContainer) -> float | None:
    """Duration from the container's metadata, None where it declares none."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None
