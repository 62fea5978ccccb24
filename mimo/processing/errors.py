"""Errors raised for bad multimodal input: one family, so serving can turn any of them into a 400."""


class ProcessingError(ValueError):
    """A request's media or messages cannot be turned into a prompt; the message names the problem."""


class MediaDecodeError(ProcessingError):
    """A media file is empty, corrupt, truncated, or in a container/codec we cannot decode."""


class MediaLimitError(ProcessingError):
    """A media item or request exceeds a configured limit (pixels, frames, items, aspect ratio, duration)."""


class PlaceholderMismatchError(ProcessingError):
    """The prompt's placeholders disagree with the media items or with the rows the encoders produced."""
