"""Turns a scheduled step into model inputs, runs the model, samples or verifies, and drafts with the MTP layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo.engine.cuda_graphs import DecodeGraphs, GraphStep
from mimo.engine.draft_graphs import DraftGraphs
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
    loop thread alone changes (the chunks' sequences' tokens and MTP state) or nobody does (sampling, tables).

    A step that replays a decode graph has `graph` set and no eager inputs (input_ids, attention, logits_indices
    None, no table_rows or block_tables): the graph's static inputs hold them, and every row is sampled.
    """

    input_ids: torch.Tensor | None  # [T] sequences' chunks (and drafts) concatenated; ids >= vocab_size: the table
    table_rows: list[torch.Tensor]  # the step's prompt table [P, H], in parts: the rows each chunk reads, in order
    attention: PagedAttentionMetadata | None
    logits_indices: torch.Tensor | None  # [N] flat index of each row whose next token is sampled or verified
    chunks: list[ScheduledChunk]
    offsets: list[int]  # [B] first flat row of each chunk
    block_tables: dict[LayerKind, tuple[torch.Tensor, torch.Tensor]]  # per pool: the chunks' tables, lengths
    graph: GraphStep | None = None
    fed: torch.Tensor | None = None  # [B] a fed decode step's ids on the device (`prepare`)


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device: its forward and sampling, and the copy of the sampled tokens to the host,
    which `ModelRunner.complete` waits for. A step with MTP drafting ran to its end at launch (`results`)."""

    chunks: list[ScheduledChunk]
    tokens: torch.Tensor | None = None  # [S] sampled ids on the device, one per sampling chunk, in order
    host_tokens: torch.Tensor | None = None  # [S] their copy in pinned host memory once `ready`
    ready: torch.cuda.Event | None = None
    results: list[ChunkResult] | None = None

    def fed_tokens(self, seqs: list) -> torch.Tensor:
        """The token each of `seqs` (sampling sequences of this step) sampled, on the device `[len(seqs)]`: the
        input ids of the step that continues them, before the host has read them."""
        row = {chunk.seq: i for i, chunk in enumerate(c for c in self.chunks if c.samples)}
        rows = [row[seq] for seq in seqs]
        if rows == list(range(self.tokens.numel())):
            return self.tokens
        return self.tokens.index_select(0, to_device(rows, self.tokens.device))


class ModelRunner:
    """Flattens a step's chunks into model inputs, runs the forward over the paged KV, samples or verifies each
    sampling chunk's drafts, then (with `num_speculative_tokens`) runs the MTP layers to draft the next ones."""

    def __init__(self, model: MiMoV2ForCausalLM, kv_cache: KVCache, sampler: Sampler, sliding_window: int | None,
                 max_num_seqs: int, max_blocks_per_seq: dict[LayerKind, int], device: torch.device,
                 num_speculative_tokens: int = 0, attention_kernel: str = "auto", cuda_graphs: bool = False,
                 max_model_len: int | None = None):
        """`cuda_graphs`: capture the decode graphs (`mimo.engine.cuda_graphs`; the caller has checked
        `graphs_unavailable`), whose padding rows write each pool's last block: the block manager must never hand
        it out. `max_model_len` sizes their attention splits."""
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.sliding_window = sliding_window
        self.device = device
        self.use_attention_kernel = use_attention_kernel(attention_kernel, device)
        self.block_tables = {
            kind: DeviceBlockTables(kind, max_num_seqs, max_blocks_per_seq[kind], device,
                                    pad_block=kv_cache.num_blocks[kind] - 1 if cuda_graphs else None)
            for kind in kv_cache.kinds
        }  # fmt: skip
        self.drafter = (Drafter(model, kv_cache, sampler, num_speculative_tokens, sliding_window, device,
                                self.use_attention_kernel) if num_speculative_tokens else None)
        self.graphs = None
        if cuda_graphs:
            if max_model_len is None:
                raise ValueError("ModelRunner: cuda_graphs needs max_model_len")
            query_lens = (1, 1 + num_speculative_tokens) if num_speculative_tokens else (1,)
            self.graphs = DecodeGraphs(model, kv_cache, self.block_tables, sliding_window, max_num_seqs, query_lens,
                                       max_model_len, device)
            self.graphs.capture()
            if self.drafter is not None:
                self.drafter.graphs = DraftGraphs(model, kv_cache, self.block_tables[LayerKind.SLIDING],
                                                  sliding_window, num_speculative_tokens, max_num_seqs, max_model_len,
                                                  device)  # fmt: skip

    def prepare(self, chunks: list[ScheduledChunk], allow_graph: bool = True,
                fed: torch.Tensor | None = None) -> ModelInputs:
        """Reads the scheduled sequences (under the engine lock) into device inputs; T = tokens of all chunks.
        A decode step that a graph runs only fills the graph's static inputs (unless `allow_graph` is False).
        `fed` `[B]`: a decode step whose chunks' one token each is still on the device (`LaunchedStep.fed_tokens`:
        the sequences do not hold it yet)."""
        if fed is not None and not all(c.num_tokens == 1 and c.samples and not c.num_drafts for c in chunks):
            raise ValueError("ModelRunner.prepare: fed tokens feed decode chunks of one token only")
        if self.graphs is not None and allow_graph:
            step = self.graphs.prepare(chunks, fed)
            if step is not None:
                offsets = [i * step.query_len for i in range(len(chunks))]
                return ModelInputs(None, [], None, None, list(chunks), offsets, {}, step, fed)
        tokens = StepTokens(self.vocab_size)
        offsets = []
        logits_indices = []
        for chunk in chunks:
            seq = chunk.seq
            offsets.append(len(tokens.ids))
            ids = [0] if fed is not None else seq.token_ids[chunk.start:chunk.end - chunk.num_drafts]
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
            input_ids=fed if fed is not None else to_device(tokens.ids, self.device),
            table_rows=tokens.table_rows,
            attention=attention,
            logits_indices=to_device(logits_indices, self.device),
            chunks=list(chunks),
            offsets=offsets,
            block_tables=block_tables,
            fed=fed,
        )

    def execute(self, inputs: ModelInputs) -> list[ChunkResult]:
        """Runs the step; returns what each chunk got, in order."""
        return self.complete(self.launch(inputs))

    @torch.inference_mode()
    def launch(self, inputs: ModelInputs) -> LaunchedStep:
        """Queues the step's forward and sampling, and the sampled tokens' copy to the host, without waiting for
        the device. With MTP drafting the step runs to its end here (verification reads the tokens on the host)."""
        hidden, logits = self.forward(inputs)
        if self.drafter is not None:
            sampled = self._sample(inputs, logits)
            tables = inputs.block_tables if inputs.graph is None else self.graphs.tables(inputs.graph)
            drafts = self.drafter.step(inputs.chunks, inputs.offsets, hidden, sampled, tables[LayerKind.SLIDING])
            return LaunchedStep(inputs.chunks, results=[ChunkResult(*sampled.get(i, ([], 0)), drafts.get(i))
                                                        for i in range(len(inputs.chunks))])
        seqs = [chunk.seq for chunk in inputs.chunks if chunk.samples]
        if not seqs:
            return LaunchedStep(inputs.chunks)
        tokens = self.sampler(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        if tokens.device.type == "cpu":
            return LaunchedStep(inputs.chunks, tokens, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return LaunchedStep(inputs.chunks, tokens, host, ready)

    def complete(self, step: LaunchedStep) -> list[ChunkResult]:
        """Waits for a launched step's tokens; returns what each chunk got, in order."""
        if step.results is not None:
            return step.results
        if step.ready is not None:
            step.ready.synchronize()
        tokens = iter([] if step.host_tokens is None else step.host_tokens.tolist())
        return [ChunkResult([next(tokens)]) if chunk.samples else ChunkResult() for chunk in step.chunks]

    @torch.inference_mode()
    def forward(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target forward: pre-norm hidden states `[T, H]` (what the MTP layers read) and the float32 logits
        `[N, V]` of the rows `logits_indices` names (None when no chunk samples); a graph step replays its graph."""
        if inputs.graph is not None:
            return self.graphs.replay(inputs.graph)
        model = self.model
        input_embeds = model.embed(inputs.input_ids, step_table(inputs.table_rows))  # [T, H], each token embedded once
        hidden = model.model(inputs.attention.query_positions, PagedAttention(self.kv_cache, inputs.attention),
                             input_embeds)  # [T, H]
        if not any(chunk.samples for chunk in inputs.chunks):
            return hidden, None
        return hidden, model.compute_logits(model.model.norm(hidden).index_select(0, inputs.logits_indices))

    def _sample(self, inputs: ModelInputs, logits: torch.Tensor | None) -> dict[int, tuple[list[int], int]]:
        """Per sampling chunk (by index): its emitted tokens and how many of its drafts the target accepted."""
        chunks = inputs.chunks
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        if not sampling:
            return {}
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
