"""Placeholder token runs (ref §7.2) and their mapping onto prompt-table rows.

The chat template renders one short placeholder per media item; `expand_placeholders` replaces each with
the item's full run of pad tokens. `assign_prompt_table_ids` later rewrites every pad token to
`vocab_size + row`, where the prompt table is the concatenation, in prompt order, of each item's rows:

* image: its vision-tower rows;
* audio: its audio-encoder rows;
* video: the vision-tower rows of all its frame groups, then (with sound) the audio-encoder rows of its
  units in unit order, i.e. rows [start, start + len) of the sound track's encoding for each unit.
"""

from collections.abc import Callable
from dataclasses import dataclass

from mimo.processing.config import ProcessorConfig, SpecialTokenIds
from mimo.processing.errors import PlaceholderMismatchError
from mimo.processing.items import MediaItem, Modality

EncodeText = Callable[[str], list[int]]


def timestamp_text(seconds: float) -> str:
    """'MM:SS' of a frame group's first frame (minutes keep growing past 99)."""
    whole = int(seconds)
    return f"{whole // 60:02d}:{whole % 60:02d}"


def group_units(timestamps: list[float], interleave_length: float) -> list[list[int]]:
    """Indices of the units (temporal groups) that share one audio run: 0 -> one group per unit, -1 -> a
    single group, L > 0 -> units whose timestamps fall in the same L-second window."""
    if interleave_length == 0:
        return [[g] for g in range(len(timestamps))]
    if interleave_length == -1:
        return [list(range(len(timestamps)))]
    groups: dict[int, list[int]] = {}
    for g, ts in enumerate(timestamps):
        groups.setdefault(int(ts // interleave_length), []).append(g)
    return list(groups.values())


def video_tokens_per_group(item: MediaItem, config: ProcessorConfig) -> int:
    _, grid_h, grid_w = item.video_grid_thw[0].tolist()
    return grid_h * grid_w // config.merge_size**2


def media_token_ids(item: MediaItem, config: ProcessorConfig, encode_text: EncodeText) -> list[int]:
    """The full placeholder run of one item, pad tokens expanded."""
    tokens = config.tokens
    if item.modality == Modality.IMAGE:
        return [tokens.vision_start] + [tokens.image] * item.num_tokens + [tokens.vision_end]
    if item.modality == Modality.AUDIO:
        return [tokens.audio_start] + [tokens.audio] * item.num_tokens + [tokens.audio_end]
    return _video_token_ids(item, config, encode_text)


def _video_token_ids(item: MediaItem, config: ProcessorConfig, encode_text: EncodeText) -> list[int]:
    tokens = config.tokens
    chunk = [tokens.vision_start] + [tokens.video] * video_tokens_per_group(item, config) + [tokens.vision_end]
    timestamps = item.video_timestamps.tolist()
    ids = [tokens.video_start]
    if not item.has_sound:
        for ts in timestamps:
            ids += encode_text(timestamp_text(ts)) + chunk
    else:
        lens = item.segment_lens.tolist()
        for group in group_units(timestamps, config.video_audio_interleave_length):
            for k, g in enumerate(group):
                if k == 0 or config.use_per_grid_t_timestamps:
                    ids += encode_text(timestamp_text(timestamps[g]))
                ids += chunk
            ids += [tokens.audio_start] + [tokens.audio] * sum(lens[g] for g in group) + [tokens.audio_end]
    ids.append(tokens.video_end)
    return ids


@dataclass(frozen=True, slots=True)
class _Span:
    modality: Modality
    begin: int  # index of the opening token
    end: int  # one past the closing token


def _scan_media_runs(ids: list[int], tokens: SpecialTokenIds, *, expanded: bool) -> list[_Span]:
    """Media runs in `ids`, in order. Short form (as the chat template renders them): start, pads, end.
    Expanded form: images and audio the same, a video is everything from its video start to its video end."""
    simple = {
        (tokens.vision_start, tokens.image): (Modality.IMAGE, tokens.vision_end),
        (tokens.audio_start, tokens.audio): (Modality.AUDIO, tokens.audio_end),
    }
    if not expanded:
        simple[(tokens.vision_start, tokens.video)] = (Modality.VIDEO, tokens.vision_end)
    pads = {tokens.image, tokens.video, tokens.audio}
    spans, i = [], 0
    while i < len(ids):
        if expanded and ids[i] == tokens.video_start:
            try:
                end = ids.index(tokens.video_end, i + 1)
            except ValueError:
                raise PlaceholderMismatchError(f"video run opened at position {i} is never closed") from None
            spans.append(_Span(Modality.VIDEO, i, end + 1))
            i = end + 1
            continue
        match = simple.get((ids[i], ids[i + 1] if i + 1 < len(ids) else None))
        if match is None:
            if ids[i] in pads:
                raise PlaceholderMismatchError(f"pad token {ids[i]} at position {i} is outside a media placeholder")
            i += 1
            continue
        modality, end_token = match
        j = i + 1
        while j < len(ids) and ids[j] == ids[i + 1]:
            j += 1
        if j == len(ids) or ids[j] != end_token:
            raise PlaceholderMismatchError(f"unterminated {modality.name.lower()} placeholder at position {i}")
        spans.append(_Span(modality, i, j + 1))
        i = j + 1
    return spans


def _check_modalities(found: list[Modality], items: list[MediaItem]) -> None:
    given = [item.modality for item in items]
    if found == given:
        return
    for modality in Modality:
        placeholders, data = found.count(modality), given.count(modality)
        if placeholders != data:
            name = modality.name.lower()
            raise PlaceholderMismatchError(
                f"{name} placeholder/data mismatch: {placeholders} placeholder(s) in the prompt, "
                f"{data} {name} item(s) given"
            )
    found_names, given_names = [m.name.lower() for m in found], [m.name.lower() for m in given]
    raise PlaceholderMismatchError(f"media order mismatch: prompt has {found_names}, items are {given_names}")


def expand_placeholders(
    ids: list[int], items: list[MediaItem], config: ProcessorConfig, encode_text: EncodeText
) -> list[int]:
    """Replace each short placeholder in `ids` by its item's full token run (items in prompt order)."""
    spans = _scan_media_runs(ids, config.tokens, expanded=False)
    _check_modalities([span.modality for span in spans], items)
    out, cursor = [], 0
    for span, item in zip(spans, items):
        out += ids[cursor:span.begin] + media_token_ids(item, config, encode_text)
        cursor = span.end
    return out + ids[cursor:]


@dataclass(frozen=True, slots=True)
class PromptTableIds:
    input_ids: list[int]  # pad tokens replaced by vocab_size + row
    rows_per_item: list[int]  # prompt-table rows each item must contribute, in prompt order


def _item_pad_rows(item: MediaItem, config: ProcessorConfig) -> tuple[int, int]:
    """(vision rows, audio rows) an item contributes, from its encoder inputs."""
    if item.modality == Modality.IMAGE:
        return int(item.grid_thw.prod()) // config.merge_size**2, 0
    if item.modality == Modality.AUDIO:
        return 0, int(item.audio_token_len)
    audio = int(item.segment_lens.sum()) if item.has_sound else 0
    return int(item.video_grid_thw.prod()) // config.merge_size**2, audio


def assign_prompt_table_ids(
    input_ids: list[int], items: list[MediaItem], config: ProcessorConfig, vocab_size: int
) -> PromptTableIds:
    """Rewrite the pad tokens of expanded placeholder runs to prompt-table ids (module docstring order).

    Every pad token must belong to exactly one item's run, and each run must hold exactly the rows the
    item's encoder inputs produce; anything else raises PlaceholderMismatchError.
    """
    tokens = config.tokens
    out = list(input_ids)
    spans = _scan_media_runs(input_ids, tokens, expanded=True)
    _check_modalities([span.modality for span in spans], items)
    vision_pad = {Modality.IMAGE: tokens.image, Modality.VIDEO: tokens.video}
    next_row, rows_per_item = 0, []
    for index, (span, item) in enumerate(zip(spans, items)):
        vision_rows, audio_rows = _item_pad_rows(item, config)
        vision_seen = audio_seen = other_pads = 0
        for pos in range(span.begin, span.end):
            token = input_ids[pos]
            if token == vision_pad.get(item.modality):
                out[pos] = vocab_size + next_row + vision_seen
                vision_seen += 1
            elif token == tokens.audio:
                out[pos] = vocab_size + next_row + vision_rows + audio_seen
                audio_seen += 1
            elif token in (tokens.image, tokens.video):
                other_pads += 1
        if other_pads or (vision_seen, audio_seen) != (vision_rows, audio_rows) \
                or vision_rows + audio_rows != item.num_tokens:
            raise PlaceholderMismatchError(
                f"{item.modality.name.lower()} item {index}: prompt has {vision_seen + audio_seen + other_pads} pad "
                f"tokens, its encoder inputs give {vision_rows + audio_rows} rows (item says {item.num_tokens})"
            )
        next_row += item.num_tokens
        rows_per_item.append(item.num_tokens)
    return PromptTableIds(out, rows_per_item)


def check_encoder_rows(expected: list[int], produced: list[int]) -> None:
    """The encoders' rows per item must equal the rows the prompt reserves for it."""
    if len(expected) != len(produced):
        raise PlaceholderMismatchError(f"encoder returned {len(produced)} items, the prompt has {len(expected)}")
    for index, (want, got) in enumerate(zip(expected, produced)):
        if want != got:
            raise PlaceholderMismatchError(
                f"media item {index}: encoder produced {got} rows, the prompt has {want} pad tokens"
            )
