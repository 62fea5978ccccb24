"""`mimo_encoder` without Triton: packed media items of several requests -> one prompt table per request.

The items of all requests in one Triton batch are encoded together: images and videos each go through the vision
tower in as few forwards as `max_encoder_batch_patches` allows (consecutive items while their patches fit; an item
with more goes alone), standalone audio in one forward, a video's sound track trimmed to its units. Images and
videos arrive as uint8 frames, resized, normalised and patchified here on the towers' device just before their
forward (JPEGs sent undecoded are decoded here first, in one nvJPEG call on a GPU). A request's
table lists, item by item in prompt order, the item's vision rows and then its audio rows, matching the ids
`MiMoProcessor.assign_prompt_table_ids` gave its pad tokens. The table stays on the towers' device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mimo.engine.engine import check_positive_knob, knob, knob_help
from mimo.loading import load_audio_encoder, load_audio_tokenizer, load_vision_tower
from mimo.models.multimodal_encoder import MiMoMultimodalEncoder
from mimo.processing.config import ProcessorConfig
from mimo.processing.errors import ProcessingError
from mimo.processing.image import decode_jpeg_frames, decoded_grid, frames_of, vision_patches
from mimo.processing.items import MediaItem, Modality, unpack_items
from mimo.processing.video import frame_size
from mimo.processing.placeholders import check_encoder_rows
from mimo.serving.triton_config import knob_parameters
from mimo.weights.checkpoint import HubCheckpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """mimo_encoder's served knobs (`knob` fields, as EngineConfig's)."""

    max_encoder_batch_patches: int = knob(32768, "vision patches one vision-tower forward takes at most (4 patches "
                                                 "per LM token); a Triton batch's images, and its videos, are split "
                                                 "into forwards of consecutive items that fit, an item with more "
                                                 "goes alone")  # fmt: skip

    def __post_init__(self):
        for name in encoder_knobs():
            check_positive_knob(self, name)


def encoder_knobs() -> dict[str, str]:
    """The served EncoderConfig fields and their help text, in declaration order."""
    return knob_help(EncoderConfig)


def encoder_config(model_config: Mapping) -> EncoderConfig:
    """EncoderConfig from the `mimo_encoder` config.pbtxt parameters."""
    return EncoderConfig(**knob_parameters(model_config, encoder_knobs()))


def budget_chunks(sizes: list[int], budget: int) -> list[range]:
    """Consecutive runs of `sizes` whose sum stays within `budget`; a size above it makes a run of its own."""
    chunks, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > budget:
            chunks.append(range(start, index))
            start, total = index, 0
        total += size
    if sizes:
        chunks.append(range(start, len(sizes)))
    return chunks


def load_multimodal_encoder(checkpoint: str | Path | HubCheckpoint, dtype: torch.dtype, device: torch.device, *,
                            audio_tokenizer: HubCheckpoint | None = None) -> MiMoMultimodalEncoder:  # fmt: skip
    """The three towers, reading only the vision and audio tensors of `checkpoint` and its audio tokenizer's folder
    (`audio_tokenizer`: that folder opened by the caller, to count the reads)."""
    ckpt = checkpoint if isinstance(checkpoint, HubCheckpoint) else HubCheckpoint(checkpoint)
    return MiMoMultimodalEncoder(
        load_vision_tower(ckpt, dtype, device),
        load_audio_encoder(ckpt, dtype, device),
        load_audio_tokenizer(ckpt.path, dtype, device, ckpt=audio_tokenizer),
    ).eval()


def unpack_request(arrays: Mapping[str, np.ndarray]) -> list[MediaItem]:
    """One request's packed tensors (with their batch dimension of 1) -> its media items."""
    return unpack_items({name: array[0] for name, array in arrays.items()})


class PromptTableEncoder:
    def __init__(self, encoder: MiMoMultimodalEncoder, processor: ProcessorConfig, config: EncoderConfig = EncoderConfig()):
        self.encoder = encoder
        self.processor = processor  # the checkpoint's processor settings: resize, normalisation, patch geometry
        self.config = config
        weight = next(encoder.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.hidden_size = encoder.visual.config.out_hidden_size

    def encode(self, requests: list[list[MediaItem]]) -> list[torch.Tensor | Exception]:
        """One `[rows, hidden]` table per request, or the error that request alone caused."""
        try:
            return self._encode_together(requests)
        except Exception:  # noqa: BLE001 - find the offending request(s); the others still get their tables
            logger.info("batched encoding failed; encoding %d requests one by one", len(requests))
        results = []
        for items in requests:
            try:
                results.append(self._encode_together([items])[0])
            except Exception as error:  # noqa: BLE001 - this request's failure, reported to it alone
                if not isinstance(error, ValueError):  # ProcessingError is a ValueError: bad input, not a fault
                    logger.exception("encoding a request failed")
                results.append(error)
        return results

    @torch.no_grad()
    def _encode_together(self, requests: list[list[MediaItem]]) -> list[torch.Tensor]:
        items = [item for request in requests for item in request]
        rows: list[list[torch.Tensor]] = [[] for _ in items]  # per item: vision rows, then audio rows

        images = [i for i, item in enumerate(items) if item.modality == Modality.IMAGE]
        decoded = self._decode_jpegs([items[i] for i in images])
        embedded = self._encode_visual(self.encoder.encode_images, [(decoded.get(k, items[i]), items[i].grid_thw)
                                                                    for k, i in enumerate(images)])  # fmt: skip
        for i, table in zip(images, embedded):
            rows[i].append(table)
        videos = [i for i, item in enumerate(items) if item.modality == Modality.VIDEO]
        embedded = self._encode_visual(self.encoder.encode_videos, [(items[i], items[i].video_grid_thw) for i in videos])
        for i, table in zip(videos, embedded):
            rows[i].append(table)
            if items[i].has_sound:
                rows[i].append(self.encoder.encode_video_audio(
                    self._cast(items[i].mel), items[i].segment_starts, items[i].segment_lens
                ))  # fmt: skip
        audios = [i for i, item in enumerate(items) if item.modality == Modality.AUDIO]
        if audios:
            for i, table in zip(audios, self.encoder.encode_audios([self._cast(items[i].mel) for i in audios])):
                rows[i].append(table)

        item_tables = [torch.cat(r) if r else self._empty(self.device) for r in rows]
        tables, start = [], 0
        for request in requests:
            mine = item_tables[start : start + len(request)]
            start += len(request)
            check_encoder_rows([item.num_tokens for item in request], [t.shape[0] for t in mine])
            # a text-only request's empty table goes out from host memory: no zero-byte GPU buffer to hand over
            tables.append(torch.cat(mine) if mine else self._empty(torch.device("cpu")))
        return tables

    def _encode_visual(self, encode: Callable, inputs: list[tuple[MediaItem | torch.Tensor, torch.Tensor]]
                       ) -> list[torch.Tensor]:  # fmt: skip
        """(item or its decoded frames, grid) per image or video -> one table per item, through forwards of at most
        max_encoder_batch_patches; an item's patches are made on the towers' device just before its forward."""
        tables = []
        for chunk in budget_chunks([int(grid.prod()) for _, grid in inputs], self.config.max_encoder_batch_patches):
            pixels = [vision_patches(self._frames(*inputs[i]), inputs[i][1], self.processor) for i in chunk]
            tables += encode(self._cat(pixels), torch.cat([inputs[i][1] for i in chunk]))
        return tables

    def _decode_jpegs(self, images: list[MediaItem]) -> dict[int, torch.Tensor]:
        """The images sent as JPEGs, decoded on the towers' device in one batch: index in `images` -> frames."""
        jpegs = [i for i, item in enumerate(images) if item.jpeg is not None]
        decoded = decode_jpeg_frames([images[i].jpeg for i in jpegs], self.device, self.processor)
        for i, frames in zip(jpegs, decoded):
            shape = [int(v) for v in images[i].frame_shape.reshape(-1)]
            if [frames.shape[0], *frames.shape[2:]] != shape:
                raise ProcessingError(f"a JPEG decoded to {frames.shape[3]}x{frames.shape[2]}, its frame_shape "
                                      f"says {shape}")  # fmt: skip
        return dict(zip(jpegs, decoded))

    def _frames(self, item: MediaItem | torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """An item's uint8 frames [n, 3, H, W] on the towers' device, checked against its grid (the grid the
        processor gives frames of that size and count: shipped frames and grid must agree)."""
        frames = item if isinstance(item, torch.Tensor) else frames_of(item.frames, item.frame_shape).to(self.device)
        n, height, width = frames.shape[0], frames.shape[2], frames.shape[3]
        config = self.processor
        if isinstance(item, torch.Tensor) or item.modality == Modality.IMAGE:
            expected = decoded_grid(height, width, config).reshape(-1).tolist() if n == 1 else None
        else:
            h, w = frame_size(height, width, n, config)
            expected = [-(-n // config.temporal_patch_size), h // config.patch_size, w // config.patch_size]
        if grid.reshape(-1).tolist() != expected:
            raise ProcessingError(f"{n} frame(s) of {width}x{height} give grid_thw {expected}, the item has "
                                  f"{grid.reshape(-1).tolist()}")  # fmt: skip
        return frames

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.dtype)

    def _cat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self._cast(torch.cat(tensors))

    def _empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(0, self.hidden_size, device=device, dtype=self.dtype)


def faulty_table(table: torch.Tensor, extra_rows: int) -> torch.Tensor:
    """TEST ONLY (`builders repository --test-fault-rows`): `table` with `extra_rows` zero rows appended, or with its
    last -`extra_rows` rows dropped: what a broken encoder server would answer."""
    if extra_rows >= 0:
        return torch.cat([table, table.new_zeros(extra_rows, table.shape[1])])
    return table[: max(0, table.shape[0] + extra_rows)]
