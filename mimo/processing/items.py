"""MediaItem (one image, audio clip or video with its encoder inputs) and its plain-tensor wire format.

Between the preprocessing and encoder Triton models items travel as flat numpy arrays, never pickles:
every wire field (`encoder_input(dtype, rank)` below) is concatenated over the items along dim 0, with a per-item
row count (-1 = absent). `PACKED_MEDIA_TENSORS` is that wire format; the Triton configs, the ensemble and the
encoder read it from here, so a field added, dropped or retyped here is the whole change.
"""

import dataclasses
import enum
from dataclasses import dataclass

import numpy as np
import torch

from mimo.processing.errors import ProcessingError


class Modality(enum.IntEnum):
    IMAGE = 0
    AUDIO = 1
    VIDEO = 2


def encoder_input(dtype: type, rank: int):
    """A MediaItem field that travels to mimo_encoder as `dtype` arrays of `rank` dims (rows first)."""
    return dataclasses.field(default=None, metadata={"wire": (np.dtype(dtype), rank)})


@dataclass(slots=True)
class MediaItem:
    """Encoder inputs of one media item, in prompt order.

    `num_tokens` is the number of placeholder pad tokens the item has in the prompt, i.e. the rows it takes
    in the prompt table: image/video tokens (grid_t*gh*gw/4), audio tokens, and for a video with sound its
    video tokens plus the audio tokens of all its units. Fields without `encoder_input` serve preprocessing only
    (placeholder expansion, video metadata) and are None on the encoder side.
    """

    modality: Modality
    num_tokens: int
    # image, video: the decoded frames before the resize (a video's sampled frames, before the last is repeated to
    # whole temporal groups), uint8 [n, 3, H, W] flattened; mimo_encoder resizes, normalises and patchifies them
    # on its device (`mimo.processing.image.vision_patches`)
    frames: torch.Tensor | None = encoder_input(np.uint8, 1)
    # an image instead of `frames`: its encoded JPEG, decoded by mimo_encoder (nvJPEG on a GPU; `image.jpeg_on_encoder`)
    jpeg: torch.Tensor | None = encoder_input(np.uint8, 1)
    frame_shape: torch.Tensor | None = encoder_input(np.int64, 2)  # image, video [1, 3]: (n, H, W) of the frames
    grid_thw: torch.Tensor | None = encoder_input(np.int64, 2)  # image [1, 3]
    video_grid_thw: torch.Tensor | None = encoder_input(np.int64, 2)  # video [1, 3]
    video_timestamps: torch.Tensor | None = None  # video [grid_t] float64 seconds
    second_per_grid_ts: torch.Tensor | None = None  # video [1] float64
    mel: torch.Tensor | None = encoder_input(np.float32, 2)  # audio, or a video's sound track: [T_mel, n_mels]
    audio_token_len: torch.Tensor | None = None  # [1] int64: rows the audio encoder yields for `mel`
    # video with sound, [grid_t] each: the first audio row of each unit, and its number of audio rows
    segment_starts: torch.Tensor | None = encoder_input(np.int64, 1)
    segment_lens: torch.Tensor | None = encoder_input(np.int64, 1)

    @property
    def has_sound(self) -> bool:
        # segment_lens, not mel: a planned item (`MiMoProcessor.process(decode=False)`) has its units but no mel
        return self.modality == Modality.VIDEO and self.segment_lens is not None


# wire field -> (dtype, rank)
WIRE_FIELDS: dict[str, tuple[np.dtype, int]] = {
    field.name: field.metadata["wire"] for field in dataclasses.fields(MediaItem) if "wire" in field.metadata
}
# every packed tensor -> (dtype, rank); each has one leading row axis (items, or rows of all items)
PACKED_MEDIA_TENSORS: dict[str, tuple[np.dtype, int]] = {
    "modality": (np.dtype(np.int8), 1),
    "num_tokens": (np.dtype(np.int64), 1),
    **{packed: spec for name, field_spec in WIRE_FIELDS.items()
       for packed, spec in ((name, field_spec), (f"{name}_rows", (np.dtype(np.int64), 1)))},
}  # fmt: skip


def pack_items(items: list[MediaItem]) -> dict[str, np.ndarray]:
    """Items -> every tensor of PACKED_MEDIA_TENSORS: `modality` [n], `num_tokens` [n], and per wire field `f`:
    `f` (rows of all items concatenated; empty when no item has it) and `f_rows` [n] (-1 where an item has none)."""
    packed = {
        "modality": np.array([int(item.modality) for item in items], dtype=np.int8),
        "num_tokens": np.array([item.num_tokens for item in items], dtype=np.int64),
    }
    for name, (dtype, rank) in WIRE_FIELDS.items():
        values = [getattr(item, name) for item in items]
        present = [value.detach().cpu().numpy().astype(dtype, copy=False) for value in values if value is not None]
        packed[name] = np.concatenate(present) if present else np.zeros((0,) * rank, dtype=dtype)
        packed[f"{name}_rows"] = np.array([-1 if v is None else v.shape[0] for v in values], dtype=np.int64)
    return packed


# the wire fields of each modality, one of these sets exactly; a video's sound track comes with all of
# SOUNDTRACK_FIELDS or none
ALLOWED_FIELDS = {
    Modality.IMAGE: (frozenset({"frames", "frame_shape", "grid_thw"}), frozenset({"jpeg", "frame_shape", "grid_thw"})),
    Modality.AUDIO: (frozenset({"mel"}),),
    Modality.VIDEO: (frozenset({"frames", "frame_shape", "video_grid_thw"}),),
}
SOUNDTRACK_FIELDS = frozenset({"mel", "segment_starts", "segment_lens"})
# one row per item: the towers return one table per grid row
GRID_FIELDS = ("grid_thw", "video_grid_thw", "frame_shape")


def unpack_items(packed: dict[str, np.ndarray]) -> list[MediaItem]:
    """Inverse of `pack_items`. Missing tensors, inconsistent row counts, fields an item's modality does not have
    (or lacks), and non-finite floats raise ProcessingError naming the tensor; the towers check the geometry."""
    missing = [name for name in PACKED_MEDIA_TENSORS if name not in packed]
    if missing:
        raise ProcessingError(f"packed media items: missing {missing}")
    try:
        modalities = [Modality(int(code)) for code in packed["modality"]]
    except ValueError as exc:
        raise ProcessingError(f"packed media items: bad 'modality' ({exc})") from exc
    num_tokens = packed["num_tokens"]
    if len(num_tokens) != len(modalities):
        raise ProcessingError("packed media items: 'num_tokens' must have one entry per item")
    items = [MediaItem(modality=m, num_tokens=int(n)) for m, n in zip(modalities, num_tokens)]
    for name in WIRE_FIELDS:
        rows = packed[f"{name}_rows"]
        if len(rows) != len(items):
            raise ProcessingError(f"packed media items: '{name}_rows' must have one entry per item")
        data, total = packed[name], int(rows[rows > 0].sum())
        if total != data.shape[0]:
            raise ProcessingError(
                f"packed media items: '{name}' has {data.shape[0]} rows, '{name}_rows' sums to {total}")
        if name in GRID_FIELDS and (rows > 1).any():
            raise ProcessingError(f"packed media items: '{name}_rows' must be 1 or -1 per item, got {rows.tolist()}")
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise ProcessingError(f"packed media items: '{name}' holds non-finite values (NaN or inf)")
        offset = 0
        for item, count in zip(items, rows.tolist()):
            if count < 0:
                continue
            setattr(item, name, torch.from_numpy(np.ascontiguousarray(data[offset:offset + count])))
            offset += count
    for index, item in enumerate(items):
        _check_fields(index, item)
    return items


def _check_fields(index: int, item: MediaItem) -> None:
    present = {name for name in WIRE_FIELDS if getattr(item, name) is not None}
    allowed = ALLOWED_FIELDS[item.modality]
    if item.modality == Modality.VIDEO:
        allowed = (*allowed, *(fields | SOUNDTRACK_FIELDS for fields in allowed))
    if present not in allowed:
        sound = f", with sound also {sorted(SOUNDTRACK_FIELDS)}" if item.modality == Modality.VIDEO else ""
        needs = " or ".join(str(sorted(fields)) for fields in ALLOWED_FIELDS[item.modality])
        raise ProcessingError(f"packed media items: item {index} ({item.modality.name.lower()}) has {sorted(present)}; "
                              f"it needs exactly {needs}{sound} (the others' '<field>_rows' -1)")
