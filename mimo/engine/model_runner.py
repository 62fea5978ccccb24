"""Turns a scheduled step into model inputs, runs the model, samples or verifies, and drafts with the MTP layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo.engine.kv_cache import KVCache, LayerKind
from mimo.engine.paged_attention import DeviceBlockTables, PagedAttention, PagedAttentionMetadata, use_attention_kernel
from mimo.engine.sampling import Sampler
from mimo.engine.scheduler import ChunkResult, ScheduledChunk
from mimo.engine.speculative import Drafter
from mimo.engine.step_tokens import StepTokens, step_table
from mimo.engine.transfer import to_device
from mimo.models.language_model import MiMoV2ForCausalLM


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """Everything one step needs. The forward runs without the engine lock: besides these it reads only what the
    loop thread alone changes (the chunks' sequences' tokens and MTP state) or nobody does (sampling, tables)."""

    input_ids: torch.Tensor  # [T] sequences' chunks (and drafts) concatenated; ids >= vocab_size index the table
    table_rows: list[torch.Tensor]  # the step's prompt table [P, H], in parts: the rows each chunk reads, in order
    attention: PagedAttentionMetadata
    logits_indices: torch.Tensor  # [N] flat index of each row whose next token is sampled or verified
    chunks: list[ScheduledChunk]
    offsets: list[int]  # [B] first flat row of each chunk
    block_tables: dict[LayerKind, tuple[torch.Tensor, torch.Tensor]]  # per pool: the chunks' tables, lengths


class ModelRunner:
    """Flattens a step's chunks into model inputs, runs the forward over the paged KV, samples or verifies each
    sampling chunk's drafts, then (with `num_speculative_tokens`) runs the MTP layers to draft the next ones."""

    def __init__(self, model: MiMoV2ForCausalLM, kv_cache: KVCache, sampler: Sampler, sliding_window: int | None,
                 max_num_seqs: int, max_blocks_per_seq: dict[LayerKind, int], device: torch.device,
                 num_speculative_tokens: int = 0, attention_kernel: str = "auto"):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.sliding_window = sliding_window
        self.device = device
        self.use_attention_kernel = use_attention_kernel(attention_kernel, device)
        self.block_tables = {kind: DeviceBlockTables(kind, max_num_seqs, max_blocks_per_seq[kind], device)
                             for kind in kv_cache.kinds}
        self.drafter = (Drafter(model, kv_cache, sampler, num_speculative_tokens, sliding_window, device,
                                self.use_attention_kernel) if num_speculative_tokens else None)

    def prepare(self, chunks: list[ScheduledChunk]) -> ModelInputs:
        """Reads the scheduled sequences (under the engine lock) into device inputs; T = tokens of all chunks."""
        tokens = StepTokens(self.vocab_size)
        offsets = []
        logits_indices = []
        for chunk in chunks:
            seq = chunk.seq
            offsets.append(len(tokens.ids))
            ids = seq.token_ids[chunk.start:chunk.end - chunk.num_drafts]
            if chunk.num_drafts:
                ids = ids + seq.draft.drafts[:chunk.num_drafts]
            tokens.add(seq, ids)
            if chunk.samples:  # the last token, and each draft: 1 + num_drafts rows
                logits_indices += range(len(tokens.ids) - 1 - chunk.num_drafts, len(tokens.ids))
        block_tables = {kind: tables.tables([c.seq for c in chunks]) for kind, tables in self.block_tables.items()}
        attention = PagedAttentionMetadata.build(
            starts=[c.start for c in chunks],
            counts=[c.num_tokens for c in chunks],
            block_tables=block_tables,
            block_size=self.kv_cache.block_size,
            sliding_window=self.sliding_window,
            device=self.device,
            use_kernel=self.use_attention_kernel,
        )
        return ModelInputs(
            input_ids=to_device(tokens.ids, self.device),
            table_rows=tokens.table_rows,
            attention=attention,
            logits_indices=to_device(logits_indices, self.device),
            chunks=list(chunks),
            offsets=offsets,
            block_tables=block_tables,
        )

    @torch.inference_mode()
    def execute(self, inputs: ModelInputs) -> list[ChunkResult]:
        """Runs the step; returns what each chunk got, in order."""
        model = self.model
        input_embeds = model.embed(inputs.input_ids, step_table(inputs.table_rows))  # [T, H], each token embedded once
        hidden = model.model(inputs.attention.query_positions, PagedAttention(self.kv_cache, inputs.attention),
                             input_embeds)  # [T, H] before the final norm (what the MTP layers read)
        sampled = self._sample(inputs, hidden)
        drafts = {}
        if self.drafter is not None:
            drafts = self.drafter.step(inputs.chunks, inputs.offsets, hidden, sampled,
                                       inputs.block_tables[LayerKind.SLIDING])
        return [ChunkResult(*sampled.get(i, ([], 0)), drafts.get(i)) for i in range(len(inputs.chunks))]

    def _sample(self, inputs: ModelInputs, hidden: torch.Tensor) -> dict[int, tuple[list[int], int]]:
        """Per sampling chunk (by index): its emitted tokens and how many of its drafts the target accepted."""
        chunks = inputs.chunks
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        if not sampling:
            return {}
        model = self.model
        logits = model.compute_logits(model.model.norm(hidden).index_select(0, inputs.logits_indices))  # [N, V]
        plain, speculative, plain_rows, speculative_rows = [], [], [], []
        row = 0
        for i in sampling:
            rows = range(row, row + 1 + chunks[i].num_drafts)
            row = rows.stop
            if chunks[i].seq.draft is None:
                plain.append(i)
                plain_rows += rows
            else:
                speculative.append(i)
                speculative_rows += rows
        results = {}
        if plain:
            plain_logits = logits if not speculative else logits.index_select(0, to_device(plain_rows, self.device))
            seqs = [chunks[i].seq for i in plain]
            tokens = self.sampler(plain_logits, [s.sampling for s in seqs], [s.generator for s in seqs]).tolist()
            results.update((i, ([token], 0)) for i, token in zip(plain, tokens))
        if speculative:
            seqs = [chunks[i].seq for i in speculative]
            num_drafts = [chunks[i].num_drafts for i in speculative]
            verified = self.sampler.verify(
                logits.index_select(0, to_device(speculative_rows, self.device)),
                [s.sampling for s in seqs], [s.generator for s in seqs],
                [s.draft.drafts[:n] for s, n in zip(seqs, num_drafts)],
                [None if s.draft.draft_probs is None else s.draft.draft_probs[:n] for s, n in zip(seqs, num_drafts)],
            )  # fmt: skip
            results.update(zip(speculative, verified))
        return results
