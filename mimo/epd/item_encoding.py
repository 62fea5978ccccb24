"""The encoder role's media step (`media_preprocessing`): one item's raw bytes and planned metadata -> its packed
encoder inputs, checked against the plan before any encoder runs.

In order: the metadata is parsed and checked (`mimo.epd.metadata`); the landing slice's byte size, when given, must
be exactly the planned rows x hidden_size x the encoder dtype's size, and a slice named must lie inside its region
(`mimo.epd.direct_write.SliceTarget`; both refused before decoding); the content hash of
the bytes and this server's processor settings must be the plan's (another file, or servers whose processor
settings differ); the item is decoded as the colocated preprocessing decodes it; what it gives must equal the plan
field by field. Every refusal is a ProcessingError naming the field. The language side checks the response in turn
(`check_encoded_item`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mimo.config import MiMoV2Config
from mimo.models.vision_tower import VisionConfig
from mimo.epd.direct_write import OUTPUT_BYTE_SIZE, SliceTarget
from mimo.epd.metadata import ItemMetadata, MetadataError, content_hash
from mimo.processing.chat import MediaPart
from mimo.processing.config import ProcessorConfig
from mimo.processing.items import pack_items
from mimo.processing.processor import preprocess_media, processor_config_from_checkpoint
from mimo.serving.triton_config import torch_dtype

MEDIA_BYTES = "media_bytes"  # BYTES [1]: the raw encoded file of one item
ITEM_METADATA = "item_metadata"  # BYTES [1]: the plan's ItemMetadata JSON
ENCODER_METADATA = "encoder_metadata"  # BYTES [1]: the metadata the encoder found (equal to the plan)


class ItemPreprocessor:
    def __init__(self, config: ProcessorConfig, hidden_size: int, dtype: str, *, jpeg_to_encoder: bool = False):
        self.config, self.hidden_size, self.dtype = config, hidden_size, dtype
        self.value_bytes = torch_dtype(dtype).itemsize
        self.jpeg_to_encoder = jpeg_to_encoder  # JPEGs left for mimo_encoder to decode (nvJPEG)
        self.row_bytes = hidden_size * self.value_bytes

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, dtype: str, *, jpeg_to_encoder: bool = False
                        ) -> ItemPreprocessor:  # fmt: skip
        """The processor settings and the encoders' output width (vision out_hidden_size, the LM's hidden size)."""
        vision = VisionConfig.from_dict(MiMoV2Config.from_pretrained(checkpoint_dir).vision_config)
        return cls(processor_config_from_checkpoint(checkpoint_dir), vision.out_hidden_size, dtype,
                   jpeg_to_encoder=jpeg_to_encoder)

    def preprocess(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's inputs (batch dimension of 1) -> every media_preprocessing output (batch dimension of 1)."""
        planned = ItemMetadata.from_tensor(inputs.get(ITEM_METADATA), self.config, ITEM_METADATA)
        if OUTPUT_BYTE_SIZE in inputs:
            self._check_slice(inputs[OUTPUT_BYTE_SIZE], planned.num_tokens)
        SliceTarget.from_inputs(inputs)  # a slice named is well formed and inside its region (mimo_encoder maps it)
        data = inputs.get(MEDIA_BYTES)
        if data is None or data.size != 1 or not isinstance(data.reshape(-1)[0], bytes):
            raise MetadataError(f"{MEDIA_BYTES} must hold exactly one encoded file (BYTES)")
        data = data.reshape(-1)[0]
        found_hash = content_hash(planned.modality, data, self.config)
        if found_hash != planned.content_hash:
            raise MetadataError(f"{ITEM_METADATA}.content_hash is {planned.content_hash}, but {MEDIA_BYTES} with this "
                                f"encoder server's processor settings hash to {found_hash}: another file, or "
                                "servers whose processor settings differ")  # fmt: skip
        item = preprocess_media(MediaPart(planned.modality, data), self.config, jpeg_to_encoder=self.jpeg_to_encoder)
        found = ItemMetadata.of(item, found_hash, self.config)
        planned.check_matches(found, "decoding the item", ITEM_METADATA)
        outputs = {name: array[np.newaxis] for name, array in pack_items([item]).items()}
        outputs[ENCODER_METADATA] = found.to_tensor()[np.newaxis]
        return outputs

    def _check_slice(self, array: np.ndarray, num_tokens: int) -> None:
        if array.size != 1:
            raise MetadataError(f"{OUTPUT_BYTE_SIZE} must hold exactly one value, got {array.size}")
        byte_size, expected = int(array.reshape(-1)[0]), num_tokens * self.row_bytes
        if byte_size != expected:
            raise MetadataError(f"{OUTPUT_BYTE_SIZE} is {byte_size}, but the item's embeddings are {expected} bytes "
                                f"({ITEM_METADATA}.num_tokens {num_tokens} x hidden_size {self.hidden_size} x "
                                f"{self.value_bytes} bytes of {self.dtype})")  # fmt: skip


def check_encoded_item(planned: ItemMetadata, encoder_metadata: np.ndarray | None, rows_shape: Sequence[int],
                       config: ProcessorConfig, hidden_size: int, server: str) -> None:  # fmt: skip
    """The language side's check of an encode_item response before its rows are used: the metadata the encoder
    found must be the plan, and prompt_embedding_table must be [1, num_tokens, hidden_size]. MetadataError names the
    field and `server`."""
    try:
        found = ItemMetadata.from_tensor(encoder_metadata, config, ENCODER_METADATA)
    except MetadataError as error:
        raise MetadataError(f"{server}: {error}") from None
    planned.check_matches(found, server, ENCODER_METADATA)
    expected = [1, planned.num_tokens, hidden_size]
    if list(rows_shape) != expected:
        raise MetadataError(f"prompt_embedding_table from {server} is {list(rows_shape)}, the plan needs {expected}")
