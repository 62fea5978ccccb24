"""MediaItem (one image, audio clip or video with its encoder inputs) and its plain-tensor wire format.

Between the preprocessing and encoder Triton models items travel as flat numpy arrays, never pickles:
every tensor field is concatenated over the items along dim 0, with a per-item row count (-1 = absent).
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


@dataclass(slots=True)
class MediaItem:
    """Encoder inputs of one media item, in prompt order.

    `num_tokens` is the number of placeholder pad tokens the item has in the prompt, i.e. the rows it takes
    in the prompt table: image/video tokens (grid_t*gh*gw/4), audio tokens, and for a video with sound its
    video tokens plus the audio tokens of all its units.
    """

    modality: Modality
    num_tokens: int
    pixel_values: torch.Tensor | None = None  # image [N, C*T*p*p] float32
    grid_thw: torch.Tensor | None = None  # image [1, 3] int64
    pixel_values_videos: torch.Tensor | None = None  # video [N, C*T*p*p] float32
    video_grid_thw: torch.Tensor | None = None  # video [1, 3] int64
    video_timestamps: torch.Tensor | None = None  # video [grid_t] float64 seconds
    second_per_grid_ts: torch.Tensor | None = None  # video [1] float64
    mel: torch.Tensor | None = None  # audio, or a video's sound track: [T_mel, n_mels] float32
    audio_token_len: torch.Tensor | None = None  # [1] int64: rows the audio encoder yields for `mel`
    segment_starts: torch.Tensor | None = None  # video with sound [grid_t] int64: first audio row of each unit
    segment_lens: torch.Tensor | None = None  # video with sound [grid_t] int64: audio rows of each unit

    @property
    def has_sound(self) -> bool:
        return self.modality == Modality.VIDEO and self.mel is not None


TENSOR_FIELDS = tuple(
    field.name for field in dataclasses.fields(MediaItem) if field.name not in ("modality", "num_tokens")
)
_WIRE_DTYPES = {
    "pixel_values": np.float32, "pixel_values_videos": np.float32, "mel": np.float32,
    "video_timestamps": np.float64, "second_per_grid_ts": np.float64,
}


def pack_items(items: list[MediaItem]) -> dict[str, np.ndarray]:
    """Items -> flat arrays: `modality` [n] int8, `num_tokens` [n] int64, and per present field `f`:
    `f` (rows of all items concatenated) and `f_rows` [n] int64 (-1 where an item has no such field)."""
    packed = {
        "modality": np.array([int(item.modality) for item in items], dtype=np.int8),
        "num_tokens": np.array([item.num_tokens for item in items], dtype=np.int64),
    }
    for name in TENSOR_FIELDS:
        values = [getattr(item, name) for item in items]
        present = [value for value in values if value is not None]
        if not present:
            continue
        dtype = _WIRE_DTYPES.get(name, np.int64)
        packed[name] = np.concatenate([value.detach().cpu().numpy().astype(dtype, copy=False) for value in present])
        packed[f"{name}_rows"] = np.array([-1 if v is None else v.shape[0] for v in values], dtype=np.int64)
    return packed


def unpack_items(packed: dict[str, np.ndarray]) -> list[MediaItem]:
    """Inverse of `pack_items`; inconsistent row counts raise ProcessingError."""
    try:
        modalities = [Modality(int(code)) for code in packed["modality"]]
    except (KeyError, ValueError) as exc:
        raise ProcessingError(f"packed media items: bad or missing 'modality' ({exc})") from exc
    num_tokens = packed.get("num_tokens")
    if num_tokens is None or len(num_tokens) != len(modalities):
        raise ProcessingError("packed media items: 'num_tokens' must have one entry per item")
    items = [MediaItem(modality=m, num_tokens=int(n)) for m, n in zip(modalities, num_tokens)]
    for name in TENSOR_FIELDS:
        if name not in packed:
            continue
        rows = packed.get(f"{name}_rows")
        if rows is None or len(rows) != len(items):
            raise ProcessingError(f"packed media items: '{name}_rows' must have one entry per item")
        data, total = packed[name], int(rows[rows > 0].sum())
        if total != data.shape[0]:
            raise ProcessingError(f"packed media items: '{name}' has {data.shape[0]} rows, '{name}_rows' sums to {total}")
        offset = 0
        for item, count in zip(items, rows.tolist()):
            if count < 0:
                continue
            setattr(item, name, torch.from_numpy(np.ascontiguousarray(data[offset:offset + count])))
            offset += count
    return items
