"""Turns a scheduled step into model inputs, runs the model and samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo.engine.kv_cache import KVCache, LayerKind
from mimo.engine.paged_attention import DeviceBlockTables, PagedAttention, PagedAttentionMetadata
from mimo.engine.sampling import Sampler, SamplingParams
from mimo.engine.scheduler import ScheduledChunk
from mimo.engine.transfer import to_device
from mimo.models.language_model import MiMoV2ForCausalLM


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """Everything one step needs, detached from the sequences so the forward can run without the engine lock."""

    input_ids: torch.Tensor  # [T] sequences' chunks concatenated; ids >= vocab_size index the step's prompt table
    table_rows: list[torch.Tensor]  # the step's prompt table [P, H], in parts: the rows each chunk reads, in order
    attention: PagedAttentionMetadata
    logits_indices: torch.Tensor  # [N] flat index of the last token of each chunk that samples
    sampling: list[SamplingParams]  # [N]
    generators: list[torch.Generator | None]  # [N]


class ModelRunner:
    """Flattens a step's chunks into model inputs, runs the forward over the paged KV and samples."""

    def __init__(self, model: MiMoV2ForCausalLM, kv_cache: KVCache, sampler: Sampler, sliding_window: int | None,
                 max_num_seqs: int, max_blocks_per_seq: dict[LayerKind, int], device: torch.device):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.sliding_window = sliding_window
        self.device = device
        self.block_tables = {kind: DeviceBlockTables(kind, max_num_seqs, max_blocks_per_seq[kind], device)
                             for kind in kv_cache.kinds}

    def prepare(self, chunks: list[ScheduledChunk]) -> ModelInputs:
        """Reads the scheduled sequences (under the engine lock) into device inputs; T = tokens of all chunks."""
        input_ids: list[int] = []
        table_rows: list[torch.Tensor] = []
        num_table_rows = 0
        logits_indices = []
        sampling_chunks = []
        vocab_size = self.vocab_size
        for chunk in chunks:
            seq = chunk.seq
            ids = seq.token_ids[chunk.start:chunk.end]
            rows = [i - vocab_size for i in ids if i >= vocab_size] if seq.prompt_table is not None else []
            if rows:  # a prompt chunk with media: its rows [lo, hi) of the request's table join the step's table
                lo, hi = min(rows), max(rows) + 1
                table_rows.append(seq.prompt_table[lo:hi])
                shift = num_table_rows - lo
                ids = [i + shift if i >= vocab_size else i for i in ids]
                num_table_rows += hi - lo
            input_ids += ids
            if chunk.samples:
                logits_indices.append(len(input_ids) - 1)
                sampling_chunks.append(chunk)
        attention = PagedAttentionMetadata.build(
            starts=[c.start for c in chunks],
            counts=[c.num_tokens for c in chunks],
            block_tables={kind: tables.tables([c.seq for c in chunks]) for kind, tables in self.block_tables.items()},
            block_size=self.kv_cache.block_size,
            sliding_window=self.sliding_window,
            device=self.device,
        )
        return ModelInputs(
            input_ids=to_device(input_ids, self.device),
            table_rows=table_rows,
            attention=attention,
            logits_indices=to_device(logits_indices, self.device),
            sampling=[c.seq.sampling for c in sampling_chunks],
            generators=[c.seq.generator for c in sampling_chunks],
        )

    @torch.inference_mode()
    def execute(self, inputs: ModelInputs) -> list[int]:
        """Runs the step; returns the sampled token of each sampling chunk, in order."""
        model = self.model
        rows = inputs.table_rows
        table = (rows[0] if len(rows) == 1 else torch.cat(rows)) if rows else None  # [P, H]
        input_embeds = model.embed(inputs.input_ids, table)  # [T, H], each token embedded once
        hidden = model(inputs.attention.query_positions, PagedAttention(self.kv_cache, inputs.attention),
                       input_embeds)  # [T, H]
        if not inputs.sampling:
            return []
        logits = model.compute_logits(hidden.index_select(0, inputs.logits_indices))  # [N, V] float32
        return self.sampler(logits, inputs.sampling, inputs.generators).tolist()
