"""The per-item metadata contract between the language and encoder roles, versioned and checked on both ends.

One media item travels as its raw encoded bytes plus one UTF-8 JSON object (`item_metadata`, a BYTES tensor of one
element; never a pickle): what the language side planned for it, and, in the encoder's response, what the encoder
found when it decoded the bytes. Version 1:

    {"version": 1, "modality": "image" | "audio" | "video",
     "content_hash": "sha256:<64 hex>",   # the bytes + the processor settings the rows and placeholders depend on
     "num_tokens": N,                      # the item's embedding rows = its pad tokens in the prompt
     # image and video:
     "grid_thw": [t, h, w],                # vision patches; rows t*h*w / merge_size**2
     # video:
     "video_timestamps": [s, ...],          # one per temporal group (t), seconds
     "second_per_grid_ts": s,
     "sound": null | {"audio_token_len": A,          # rows of the whole sound track's encoding
                      "segment_starts": [...], "segment_lens": [...],   # per unit (= temporal group)
                      "interleave_length": L,        # processor video_audio_interleave_length
                      "unit_groups": [[unit, ...], ...]}}   # units sharing one audio run (group_units)

A video's rows are its vision rows, then rows [start, start + len) of its sound track's encoding per unit, so
num_tokens = t*h*w / merge_size**2 + sum(segment_lens); an audio's rows are its audio tokens. Decoding refuses,
naming the field, anything else: another version, a missing or unexpected field, a wrong type, counts that do not
add up. Floats travel as JSON numbers (Python writes the shortest repr, which reads back to the same double).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from mimo.processing.config import ProcessorConfig
from mimo.processing.errors import ProcessingError
from mimo.processing.items import MediaItem, Modality
from mimo.processing.placeholders import group_units

PROTOCOL_VERSION = 1
HASH_PREFIX = "sha256:"
# ProcessorConfig fields that change neither an item's rows nor its placeholder run: the tokenizer's ids and the
# request limits (they only refuse). Every other field is hashed, so a new field counts unless listed here.
NOT_HASHED = frozenset({"tokens", "max_media_items", "max_source_pixels", "max_media_seconds"})
_MODALITY_NAMES = {modality: modality.name.lower() for modality in Modality}
_FIELDS = {  # the fields of each modality, besides version, modality, content_hash, num_tokens
    Modality.IMAGE: ("grid_thw",),
    Modality.AUDIO: (),
    Modality.VIDEO: ("grid_thw", "video_timestamps", "second_per_grid_ts", "sound"),
}
_SOUND_FIELDS = ("audio_token_len", "segment_starts", "segment_lens", "interleave_length", "unit_groups")


class MetadataError(ProcessingError):
    """Item metadata that is not the contract, or that disagrees with the bytes or the other side."""


@dataclass(frozen=True, slots=True)
class VideoSound:
    audio_token_len: int
    segment_starts: tuple[int, ...]
    segment_lens: tuple[int, ...]
    interleave_length: float
    unit_groups: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class ItemMetadata:
    modality: Modality
    content_hash: str
    num_tokens: int
    grid_thw: tuple[int, int, int] | None = None  # image, video
    video_timestamps: tuple[float, ...] | None = None  # video
    second_per_grid_ts: float | None = None  # video
    sound: VideoSound | None = None  # video with a sound track
    version: int = PROTOCOL_VERSION

    @classmethod
    def of(cls, item: MediaItem, content_hash: str, config: ProcessorConfig) -> ItemMetadata:
        """The metadata of a preprocessed or planned item (`MiMoProcessor.process(decode=...)`)."""
        if item.modality == Modality.IMAGE:
            return cls(item.modality, content_hash, item.num_tokens, grid_thw=_grid(item.grid_thw))
        if item.modality == Modality.AUDIO:
            return cls(item.modality, content_hash, item.num_tokens)
        timestamps = tuple(float(t) for t in item.video_timestamps.tolist())
        sound = None
        if item.has_sound:
            interleave = float(config.video_audio_interleave_length)
            sound = VideoSound(int(item.audio_token_len), tuple(item.segment_starts.tolist()),
                               tuple(item.segment_lens.tolist()), interleave,
                               tuple(tuple(g) for g in group_units(list(timestamps), interleave)))  # fmt: skip
        return cls(item.modality, content_hash, item.num_tokens, grid_thw=_grid(item.video_grid_thw),
                   video_timestamps=timestamps, second_per_grid_ts=float(item.second_per_grid_ts.item()),
                   sound=sound)  # fmt: skip

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON (sorted keys, no spaces): equal metadata, equal bytes."""
        return json.dumps(self._as_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    def to_tensor(self) -> np.ndarray:
        """The `item_metadata` tensor value: BYTES [1]."""
        return np.array([self.to_json()], dtype=np.object_)

    @classmethod
    def from_json(cls, raw: bytes, config: ProcessorConfig, where: str = "item_metadata") -> ItemMetadata:
        """Parses and checks `raw`; every error is a MetadataError naming the field (`where`.field)."""
        try:
            document = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError) as error:
            raise MetadataError(f"{where} is not UTF-8 JSON ({error})") from None
        return cls._from_dict(document, config, where)

    @classmethod
    def from_tensor(cls, array: np.ndarray | None, config: ProcessorConfig,
                    where: str = "item_metadata") -> ItemMetadata:  # fmt: skip
        """From a BYTES tensor holding exactly one JSON document (any leading dims of 1, e.g. the batch's)."""
        if array is None or array.size != 1:
            count = 0 if array is None else array.size
            raise MetadataError(f"{where} must hold exactly one JSON document, got {count}")
        raw = array.reshape(-1)[0]
        if not isinstance(raw, bytes):
            raise MetadataError(f"{where} must be BYTES, got {type(raw).__name__}")
        return cls.from_json(raw, config, where)

    def check_matches(self, other: ItemMetadata, theirs: str, where: str = "item_metadata") -> None:
        """Raises MetadataError naming the first field where `other` (what `theirs` found) differs from this one."""
        mine, found = self._as_dict(), other._as_dict()
        for key in mine.keys() | found.keys():
            if key == "sound" and mine.get(key) and found.get(key):
                for sub in _SOUND_FIELDS:
                    if mine[key][sub] != found[key][sub]:
                        raise MetadataError(f"{where}.sound.{sub}: {theirs} found {found[key][sub]}, "
                                            f"the metadata says {mine[key][sub]}")  # fmt: skip
            elif mine.get(key) != found.get(key):
                raise MetadataError(f"{where}.{key}: {theirs} found {found.get(key)}, "
                                    f"the metadata says {mine.get(key)}")  # fmt: skip

    def _as_dict(self) -> dict:
        document = {"version": self.version, "modality": _MODALITY_NAMES[self.modality],
                    "content_hash": self.content_hash, "num_tokens": self.num_tokens}  # fmt: skip
        for name in _FIELDS[self.modality]:
            value = getattr(self, name)
            if name == "sound" and value is not None:
                value = {sub: getattr(value, sub) for sub in _SOUND_FIELDS}
            document[name] = _json_value(value)
        return document

    @classmethod
    def _from_dict(cls, document, config: ProcessorConfig, where: str) -> ItemMetadata:
        if not isinstance(document, dict):
            raise MetadataError(f"{where} must be a JSON object, got {type(document).__name__}")
        version = _integer(document, "version", where, low=0)
        if version != PROTOCOL_VERSION:
            raise MetadataError(f"{where}.version is {version}; this server speaks protocol version {PROTOCOL_VERSION}")
        names = {name: modality for modality, name in _MODALITY_NAMES.items()}
        modality = names.get(_field(document, "modality", where))
        if modality is None:
            raise MetadataError(f"{where}.modality must be one of {sorted(names)}, got {document['modality']!r}")
        _check_keys(document, ("version", "modality", "content_hash", "num_tokens", *_FIELDS[modality]), where)
        content_hash = _field(document, "content_hash", where)
        if not (isinstance(content_hash, str) and content_hash.startswith(HASH_PREFIX)
                and len(content_hash) == len(HASH_PREFIX) + 64
                and all(c in "0123456789abcdef" for c in content_hash[len(HASH_PREFIX):])):  # fmt: skip
            raise MetadataError(f"{where}.content_hash must be '{HASH_PREFIX}' + 64 lowercase hex digits, "
                                f"got {content_hash!r}")  # fmt: skip
        num_tokens = _integer(document, "num_tokens", where, low=1)
        if modality == Modality.AUDIO:
            return cls(modality, content_hash, num_tokens)
        grid = tuple(_integers(document, "grid_thw", where, low=1, length=3))
        merge = config.merge_size**2
        if (grid[1] * grid[2]) % merge:
            raise MetadataError(f"{where}.grid_thw {list(grid)}: h*w must be a multiple of merge_size**2 = {merge}")
        vision_rows = grid[0] * grid[1] * grid[2] // merge
        if modality == Modality.IMAGE:
            if grid[0] != 1:
                raise MetadataError(f"{where}.grid_thw {list(grid)}: an image has one temporal group (t = 1)")
            _check_rows(num_tokens, vision_rows, f"grid_thw t*h*w / {merge}", where)
            return cls(modality, content_hash, num_tokens, grid_thw=grid)
        timestamps = tuple(_numbers(document, "video_timestamps", where, length=grid[0]))
        if any(t < 0 for t in timestamps) or list(timestamps) != sorted(timestamps):
            raise MetadataError(f"{where}.video_timestamps must be non-negative and non-decreasing, "
                                f"got {list(timestamps)}")  # fmt: skip
        second_per_grid_ts = _number(document, "second_per_grid_ts", where)
        if second_per_grid_ts <= 0:
            raise MetadataError(f"{where}.second_per_grid_ts must be > 0, got {second_per_grid_ts}")
        sound = _sound(_field(document, "sound", where), timestamps, f"{where}.sound")
        audio_rows = sum(sound.segment_lens) if sound else 0
        _check_rows(num_tokens, vision_rows + audio_rows,
                    f"{vision_rows} vision rows, grid_thw t*h*w / {merge}, + {audio_rows} rows of sound.segment_lens",
                    where)  # fmt: skip
        return cls(modality, content_hash, num_tokens, grid_thw=grid, video_timestamps=timestamps,
                   second_per_grid_ts=second_per_grid_ts, sound=sound)  # fmt: skip


def content_hash(modality: Modality, data: bytes, config: ProcessorConfig) -> str:
    """sha256 over the protocol version, the modality, the hashed processor settings (canonical JSON: all fields but
    NOT_HASHED) and the encoded bytes."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_HASHED}
    digest = hashlib.sha256()
    for part in (f"mimo-epd/{PROTOCOL_VERSION}/{_MODALITY_NAMES[modality]}".encode(),
                 json.dumps(settings, sort_keys=True, separators=(",", ":")).encode(), bytes(data)):  # fmt: skip
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two splits hash alike
        digest.update(part)
    return HASH_PREFIX + digest.hexdigest()


def _grid(grid_thw) -> tuple[int, int, int]:
    if grid_thw is None or tuple(grid_thw.shape) != (1, 3):
        shape = None if grid_thw is None else list(grid_thw.shape)
        raise MetadataError(f"an item's grid must be one [t, h, w] row, got {shape}")
    return tuple(int(v) for v in grid_thw[0].tolist())


def _json_value(value):
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _check_keys(document: dict, allowed: tuple[str, ...], where: str) -> None:
    missing = [key for key in allowed if key not in document]
    if missing:
        raise MetadataError(f"{where}: missing field {missing[0]!r}")
    unexpected = sorted(set(document) - set(allowed))
    if unexpected:
        raise MetadataError(f"{where}: unexpected field {unexpected[0]!r} (the fields are {list(allowed)})")


def _field(document: dict, key: str, where: str):
    if key not in document:
        raise MetadataError(f"{where}: missing field {key!r}")
    return document[key]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(document: dict, key: str, where: str, low: int) -> int:
    value = _field(document, key, where)
    if not _is_int(value) or value < low or value > 2**63 - 1:
        raise MetadataError(f"{where}.{key} must be an integer >= {low}, got {value!r}")
    return value


def _integers(document: dict, key: str, where: str, low: int, length: int | None = None) -> list[int]:
    values = _field(document, key, where)
    if not isinstance(values, list) or (length is not None and len(values) != length):
        raise MetadataError(f"{where}.{key} must be a list of {length if length is not None else 'n'} integers, "
                            f"got {values!r}")  # fmt: skip
    if not all(_is_int(v) and low <= v <= 2**63 - 1 for v in values):
        raise MetadataError(f"{where}.{key} must hold integers >= {low}, got {values!r}")
    return values


def _number(document: dict, key: str, where: str) -> float:
    value = _field(document, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MetadataError(f"{where}.{key} must be a finite number, got {value!r}")
    return float(value)


def _numbers(document: dict, key: str, where: str, length: int) -> list[float]:
    values = _field(document, key, where)
    if not isinstance(values, list) or len(values) != length:
        raise MetadataError(f"{where}.{key} must be a list of {length} numbers (one per temporal group of grid_thw), "
                            f"got {values!r}")  # fmt: skip
    return [_number({key: v}, key, where) for v in values]


def _check_rows(num_tokens: int, rows: int, rule: str, where: str) -> None:
    if num_tokens != rows:
        raise MetadataError(f"{where}.num_tokens is {num_tokens}, but the item has {rows} rows ({rule})")


def _sound(value, timestamps: tuple[float, ...], where: str) -> VideoSound | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MetadataError(f"{where} must be null or a JSON object, got {type(value).__name__}")
    _check_keys(value, _SOUND_FIELDS, where)
    units = len(timestamps)
    audio_token_len = _integer(value, "audio_token_len", where, low=1)
    starts = tuple(_integers(value, "segment_starts", where, low=0, length=units))
    lens = tuple(_integers(value, "segment_lens", where, low=1, length=units))
    if any(start + length > audio_token_len for start, length in zip(starts, lens)):
        raise MetadataError(f"{where}: units (segment_starts {list(starts)}, segment_lens {list(lens)}) must lie "
                            f"within audio_token_len {audio_token_len}")  # fmt: skip
    interleave = _number(value, "interleave_length", where)
    if interleave < 0 and interleave != -1:
        raise MetadataError(f"{where}.interleave_length must be -1 or >= 0, got {interleave}")
    groups = value["unit_groups"]
    expected = group_units(list(timestamps), interleave)
    if groups != expected:
        raise MetadataError(f"{where}.unit_groups is {groups!r}, but video_timestamps with interleave_length "
                            f"{interleave} group the units as {expected}")  # fmt: skip
    return VideoSound(audio_token_len, starts, lens, interleave, tuple(tuple(g) for g in groups))
