"""`mimo_encoder` without Triton: packed media items of several requests -> one prompt table per request.

All items of all requests in one Triton batch go through each tower in one forward (images, videos and standalone
audio each batched; a video's sound track is trimmed to its units). A request's table lists, item by item in prompt
order, the item's vision rows and then its audio rows, matching the ids `MiMoProcessor.assign_prompt_table_ids`
gave its pad tokens. The table stays on the towers' device.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from mimo.loading import load_audio_encoder, load_audio_tokenizer, load_vision_tower
from mimo.models.multimodal_encoder import MiMoMultimodalEncoder
from mimo.processing.items import MediaItem, Modality, unpack_items
from mimo.processing.placeholders import check_encoder_rows
from mimo.weights.checkpoint import HubCheckpoint

logger = logging.getLogger(__name__)


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
    def __init__(self, encoder: MiMoMultimodalEncoder):
        self.encoder = encoder
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
        if images:
            embedded = self.encoder.encode_images(
                self._cat([items[i].pixel_values for i in images]), torch.cat([items[i].grid_thw for i in images])
            )
            for i, table in zip(images, embedded):
                rows[i].append(table)
        videos = [i for i, item in enumerate(items) if item.modality == Modality.VIDEO]
        if videos:
            embedded = self.encoder.encode_videos(
                self._cat([items[i].pixel_values_videos for i in videos]),
                torch.cat([items[i].video_grid_thw for i in videos]),
            )
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
