"""The served pipeline without Triton: preprocessing -> encoder -> engine, in one process.

The same functions the Triton models call, so `OfflinePipeline.generate` is the reference the e2e tests compare
the server's tokens against (greedy decoding does not depend on batching).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mimo.engine import EngineConfig, LLMEngine, SamplingParams, generate
from mimo.loading import load_language_model
from mimo.processing.items import PACKED_MEDIA_TENSORS
from mimo.processing.processor import MiMoProcessor
from mimo.serving.encode import PromptTableEncoder, load_multimodal_encoder, unpack_request
from mimo.serving.preprocess import preprocess_request


class OfflinePipeline:
    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 kv_cache_memory_bytes: int = 256 * 2**20):  # fmt: skip
        self.processor = MiMoProcessor.from_checkpoint(checkpoint_dir)
        self.encoder = PromptTableEncoder(load_multimodal_encoder(checkpoint_dir, dtype, torch.device(device)),
                                          self.processor.config)  # fmt: skip
        model = load_language_model(checkpoint_dir, dtype, device)
        max_model_len = min(model.config.max_position_embeddings, 4096)
        self.engine = LLMEngine(model, EngineConfig(max_num_seqs=1, max_num_batched_tokens=512, max_model_len=max_model_len,
                                                    kv_cache_memory_bytes=kv_cache_memory_bytes))  # fmt: skip

    def generate(self, text: str, images: Sequence[bytes] = (), audios: Sequence[bytes] = (),
                 videos: Sequence[bytes] = (), max_tokens: int = 16) -> list[int]:  # fmt: skip
        """Greedy token ids for one user message, exactly as the ensemble builds the request."""
        inputs = {"text_input": np.array([[text.encode()]], dtype=np.object_),
                  "max_tokens": np.array([[max_tokens]], dtype=np.int32)}
        for name, items in (("image_bytes_input", images), ("audio_bytes_input", audios), ("video_bytes_input", videos)):
            if items:
                inputs[name] = np.array([list(items)], dtype=np.object_)
        outputs = preprocess_request(self.processor, inputs, self.engine.config.max_model_len)
        items = unpack_request({name: outputs[name] for name in PACKED_MEDIA_TENSORS})
        table = self.encoder.encode([items])[0]
        if isinstance(table, Exception):
            raise table
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, end_id=int(outputs["end_id"][0, 0]))
        prompt = outputs["input_ids"][0].tolist()
        return generate(self.engine, [prompt], sampling, [table if table.shape[0] else None])[0]
