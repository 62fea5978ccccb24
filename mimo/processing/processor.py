"""MiMoProcessor: chat messages with media -> input_ids with expanded placeholders + encoder inputs."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from mimo.engine import context_overflow
from mimo.processing.audio import (
    DurationLimit, audio_tokens, audio_tokens_for_mel, max_seconds_for_tokens, preprocess_audio, probe_audio_tokens,
)
from mimo.processing.chat import MediaPart, control_token_pattern, render_chat, split_media
from mimo.processing.config import ProcessorConfig
from mimo.processing.errors import ProcessingError
from mimo.processing.image import decode_image, decoded_grid, image_grid, image_tokens, jpeg_on_encoder
from mimo.processing.items import MediaItem, Modality
from mimo.processing.placeholders import PromptTableIds, assign_prompt_table_ids, expand_placeholders
from mimo.processing.video import decode_video, plan_video, probe_video_tokens


@dataclass(frozen=True, slots=True)
class ContextBudget:
    """A prompt must leave `max_tokens` of `max_model_len` for generation (the engine's rule, `context_overflow`)."""

    max_model_len: int
    max_tokens: int

    def check(self, prompt_len: int, basis: str = "") -> None:
        too_long = context_overflow(prompt_len, self.max_tokens, self.max_model_len)
        if too_long:
            raise ProcessingError(too_long + (f" ({basis})" if basis else ""))

    def room(self, other_tokens: int) -> int:
        """Tokens left for one media item when the rest of the prompt has at least `other_tokens`."""
        return self.max_model_len - self.max_tokens - other_tokens


@dataclass(slots=True)
class ProcessedPrompt:
    input_ids: list[int]  # placeholder runs expanded to their exact token counts
    items: list[MediaItem]  # in prompt order
    media: list[MediaPart]  # the encoded file of each item, in the same order


def read_checkpoint_config(checkpoint_dir: str | Path) -> tuple[dict, dict | None]:
    """(config.json, audio_tokenizer/config.json or None) of a checkpoint; `model_type` and `vocab_size` must be set."""
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise ProcessingError(f"{config_path} not found")
    hf_config = json.loads(config_path.read_text())
    for key in ("model_type", "vocab_size"):
        if key not in hf_config:
            raise ProcessingError(f"{config_path}: '{key}' must be set")
    tokenizer_config_path = checkpoint_dir / "audio_tokenizer" / "config.json"
    audio_tokenizer_config = None
    if tokenizer_config_path.is_file():
        audio_tokenizer_config = json.loads(tokenizer_config_path.read_text())
    return hf_config, audio_tokenizer_config


def processor_config_from_checkpoint(checkpoint_dir: str | Path) -> ProcessorConfig:
    """The processor settings of a checkpoint, without its tokenizer (what the encoder role needs)."""
    return ProcessorConfig.from_hf_config(*read_checkpoint_config(checkpoint_dir))


class MiMoProcessor:
    def __init__(self, tokenizer, config: ProcessorConfig, *, model_type: str, vocab_size: int):
        if vocab_size < len(tokenizer):
            raise ProcessingError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        self.tokenizer = tokenizer
        self.config = config
        self.model_type = model_type
        self.vocab_size = vocab_size  # the LM's; prompt-table ids start here
        self.control_tokens = control_token_pattern(token.content for token in tokenizer.added_tokens_decoder.values())

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "MiMoProcessor":
        """Tokenizer files, config.json (`processor_config`, encoder configs, `model_type`, `vocab_size`) and,
        if present, `audio_tokenizer/config.json`."""
        hf_config, audio_tokenizer_config = read_checkpoint_config(checkpoint_dir)
        # The fast-tokenizer class reads tokenizer.json + tokenizer_config.json only; AutoTokenizer would also
        # resolve config.json's model_type, which transformers does not know for MiMo-V2.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(Path(checkpoint_dir)), local_files_only=True)
        return cls(
            tokenizer, ProcessorConfig.from_hf_config(hf_config, audio_tokenizer_config),
            model_type=hf_config["model_type"], vocab_size=int(hf_config["vocab_size"]),
        )

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def process(
        self, messages: list[dict], *, enable_thinking: bool = True, add_generation_prompt: bool = True,
        tools: list[dict] | None = None, budget: ContextBudget | None = None, decode: bool = True,
        jpeg_to_encoder: bool = False,
    ) -> ProcessedPrompt:
        """Messages -> input_ids with expanded placeholders + media items.

        With a `budget`, a prompt that cannot fit it is refused as early as its length is known: from the text and
        what the media declare (image headers, container durations, demuxed frame counts) before any decoding, while
        decoding an audio (stopped once its samples alone are too long), and exactly at the end.

        `decode=False` plans instead (the language role, before any encoder runs): the same input_ids and items with
        the same token counts, grids, timestamps and units, but without encoder inputs (`plan_media`).
        `jpeg_to_encoder`: see `preprocess_media`.
        """
        rendered, parts = split_media(messages, max_media_items=self.config.max_media_items,
                                      control_tokens=self.control_tokens)  # fmt: skip
        text = render_chat(
            self.tokenizer, rendered, enable_thinking=enable_thinking, add_generation_prompt=add_generation_prompt,
            tools=tools,
        )
        ids = self.encode_text(text)
        known = [self.probe_media(part) for part in parts]  # per item: at least this many tokens
        # each placeholder's pad tokens become its item's run, the rest of its tokens stay: a lower bound
        text_tokens = len(ids) - sum(token in self._pad_tokens for token in ids)
        if budget is not None:
            budget.check(text_tokens + sum(known), "counting the media tokens their headers and containers declare, "
                                                   "before decoding")  # fmt: skip
        items: list[MediaItem] = []
        for index, part in enumerate(parts):
            room = None
            if budget is not None:
                room = budget.room(text_tokens + sum(item.num_tokens for item in items) + sum(known[index + 1:]))
            items.append(self.preprocess_media(part, room=room, jpeg_to_encoder=jpeg_to_encoder) if decode
                         else self.plan_media(part, room=room))  # fmt: skip
        input_ids = expand_placeholders(ids, items, self.config, self.encode_text)
        if budget is not None:
            budget.check(len(input_ids))
        return ProcessedPrompt(input_ids, items, parts)

    @property
    def _pad_tokens(self) -> set[int]:
        tokens = self.config.tokens
        return {tokens.image, tokens.video, tokens.audio}

    def probe_media(self, part: MediaPart) -> int:
        """At least how many tokens the item has, from what its file declares; nothing is decoded (images: exact)."""
        if part.modality == Modality.IMAGE:
            return image_tokens(part.data, self.config)
        if part.modality == Modality.AUDIO:
            return probe_audio_tokens(part.data, self.config, DurationLimit.of(self.config))
        return probe_video_tokens(part.data, self.config)

    def preprocess_media(self, part: MediaPart, room: int | None = None, *, jpeg_to_encoder: bool = False) -> MediaItem:
        """Decode one item; an audio is refused as soon as it has more than `room` tokens (None: no such bound)."""
        return preprocess_media(part, self.config, self._audio_limit(room), jpeg_to_encoder=jpeg_to_encoder)

    def plan_media(self, part: MediaPart, room: int | None = None) -> MediaItem:
        """`preprocess_media` without the encoder inputs, from the file's header and container (see `plan_media`)."""
        return plan_media(part, self.config, self._audio_limit(room))

    def _audio_limit(self, room: int | None) -> DurationLimit:
        limit = DurationLimit.of(self.config)
        seconds = max_seconds_for_tokens(room, self.config) if room is not None else limit.seconds
        if seconds >= limit.seconds:
            return limit
        return DurationLimit(seconds, f"{seconds:g} s, the most audio whose tokens fit the {room} this prompt has "
                                      "left within max_model_len - max_tokens (decoding stopped there)")  # fmt: skip

    def assign_prompt_table_ids(self, prompt: ProcessedPrompt) -> PromptTableIds:
        """Pad tokens -> `vocab_size + row` (row order: `mimo.processing.placeholders`), plus the rows each
        item must get from the encoders (check them with `placeholders.check_encoder_rows`)."""
        return assign_prompt_table_ids(prompt.input_ids, prompt.items, self.config, self.vocab_size)


def preprocess_media(part: MediaPart, config: ProcessorConfig, audio_limit: DurationLimit | None = None, *,
                     jpeg_to_encoder: bool = False) -> MediaItem:  # fmt: skip
    """One item decoded into its encoder inputs; an audio is refused once longer than `audio_limit`. Images and
    videos keep their decoded uint8 frames (mimo_encoder resizes and patchifies them); with `jpeg_to_encoder` a
    JPEG that `jpeg_on_encoder` admits keeps its encoded bytes instead (mimo_encoder decodes it, nvJPEG on a GPU)."""
    if part.modality == Modality.IMAGE:
        size = jpeg_on_encoder(part.data, config) if jpeg_to_encoder else None
        if size is not None:
            return _image_item(decoded_grid(*size, config), config, jpeg=torch.frombuffer(bytearray(part.data),
                               dtype=torch.uint8), frame_shape=torch.tensor([[1, *size]]))  # fmt: skip
        image = decode_image(part.data, max_source_pixels=config.max_source_pixels)
        return _image_item(decoded_grid(image.shape[1], image.shape[2], config), config, frames=image.reshape(-1),
                           frame_shape=torch.tensor([[1, image.shape[1], image.shape[2]]]))  # fmt: skip
    if part.modality == Modality.AUDIO:
        mel = preprocess_audio(part.data, config, audio_limit)
        return _audio_item(audio_tokens_for_mel(mel.shape[0], config), mel=mel)
    video = decode_video(part.data, config)
    sound = video.soundtrack
    return _video_item(
        video.video_grid_thw, video.video_timestamps, video.second_per_grid_ts, config,
        audio_token_len=sound.audio_token_len if sound else None,
        segment_starts=sound.segment_starts if sound else None, segment_lens=sound.segment_lens if sound else None,
        frames=video.frames.reshape(-1), frame_shape=torch.tensor([[video.frames.shape[0], *video.frames.shape[2:]]]),
        mel=sound.mel if sound else None,
    )


def plan_media(part: MediaPart, config: ProcessorConfig, audio_limit: DurationLimit | None = None) -> MediaItem:
    """What `preprocess_media` gives for the item, exactly, less its encoder inputs (pixels, mel): the token count,
    grid, video timestamps and audio units, from the image header, the audio samples counted (not turned into a
    mel) and the video's demuxed frames, first frame and counted sound track. Refused as preprocess_media would
    refuse it, so what this accepts an encoder accepts."""
    if part.modality == Modality.IMAGE:
        return _image_item(torch.tensor([image_grid(part.data, config)]), config)
    if part.modality == Modality.AUDIO:
        return _audio_item(audio_tokens(part.data, config, audio_limit))
    video = plan_video(part.data, config)
    sound = video.soundtrack
    return _video_item(
        torch.tensor([video.video_grid_thw]), torch.tensor(video.video_timestamps, dtype=torch.float64),
        video.second_per_grid_ts, config, audio_token_len=sound.audio_token_len if sound else None,
        segment_starts=torch.tensor(sound.segment_starts) if sound else None,
        segment_lens=torch.tensor(sound.segment_lens) if sound else None,
    )


def _image_item(grid_thw: torch.Tensor, config: ProcessorConfig, **encoder_inputs: torch.Tensor) -> MediaItem:
    return MediaItem(Modality.IMAGE, int(grid_thw.prod()) // config.merge_size**2, grid_thw=grid_thw,
                     **encoder_inputs)  # fmt: skip


def _audio_item(num_tokens: int, mel: torch.Tensor | None = None) -> MediaItem:
    return MediaItem(Modality.AUDIO, num_tokens, mel=mel, audio_token_len=_scalar(num_tokens))


def _video_item(
    grid_thw: torch.Tensor, timestamps: torch.Tensor, second_per_grid_ts: float, config: ProcessorConfig, *,
    audio_token_len: int | None, segment_starts: torch.Tensor | None, segment_lens: torch.Tensor | None,
    frames: torch.Tensor | None = None, frame_shape: torch.Tensor | None = None, mel: torch.Tensor | None = None,
) -> MediaItem:
    video_tokens = int(grid_thw.prod()) // config.merge_size**2
    return MediaItem(
        Modality.VIDEO, video_tokens + (int(segment_lens.sum()) if segment_lens is not None else 0),
        frames=frames, frame_shape=frame_shape, video_grid_thw=grid_thw, video_timestamps=timestamps,
        second_per_grid_ts=_scalar(second_per_grid_ts), mel=mel,
        audio_token_len=_scalar(audio_token_len) if audio_token_len is not None else None,
        segment_starts=segment_starts, segment_lens=segment_lens,
    )


def _scalar(value: int | float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.long)
