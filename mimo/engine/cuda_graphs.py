"""CUDA graphs of the decode step: the decoder stack, final norm and logits, captured per batch-size bucket.

A decode-only step (every sequence feeds q generated tokens and samples after each: q = 1, or 1 + k when it
verifies k MTP drafts) replays the graph of the smallest bucket (1, 2, 4, ..., `max_num_seqs`) that holds its batch,
captured at engine start. The step fills the graph's static inputs with one host-to-device copy: the token ids,
each sequence's first position, and per KV pool its row of the `DeviceBlockTables` mirror and its table length.
Everything else is derived on the device inside the graph (positions, cache slots through the ring of a sliding
pool, the block tables gathered from the mirror), so a replay reads nothing back to the host. The rows that pad a
batch up to its bucket are sequences of q tokens at position 0 whose table is the mirror's pad row: they write only
the scratch block each pool keeps for them, and their outputs are never read. Prompt-table rows occur only in
prefill chunks, so a graph embeds token ids only.

The attention kernel chooses its key splits from host lengths: the graphs are captured for the longest context
(`max_model_len`) and stay exact for shorter ones (their extra splits find no keys). Prefill and mixed steps run
eagerly. All graphs share one memory pool, captured from the most rows down; a replay's outputs are read
before the next replay (the pool reuses one graph's temporaries for another's outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mimo.engine.kv_cache import KVCache, LayerKind
from mimo.engine.paged_attention import (DeviceBlockTables, PagedAttention, PagedAttentionMetadata, PoolMetadata,
                                         cache_slots)
from mimo.engine.scheduler import ScheduledChunk
from mimo.engine.transfer import copy_into
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.moe import MiMoV2MoE, resolve_impl


def graph_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes graphs are captured for: the powers of two below `max_num_seqs`, then `max_num_seqs`."""
    buckets = []
    while (size := 1 << len(buckets)) < max_num_seqs:
        buckets.append(size)
    return buckets + [max_num_seqs]


def bucket_for(num_seqs: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding `num_seqs` sequences; None past the largest."""
    return next((bucket for bucket in buckets if bucket >= num_seqs), None)


def decode_query_len(chunks: list[ScheduledChunk]) -> int | None:
    """q when every chunk feeds q tokens that are all generated (its last token, then its drafts) and samples after
    each of them; None for any other step (a prefill chunk, a recomputed one, chunks of different lengths)."""
    if not chunks:
        return None
    q = chunks[0].num_tokens
    for chunk in chunks:
        if (chunk.num_tokens != q or not chunk.samples or chunk.num_drafts != q - 1
                or chunk.start < chunk.seq.num_prompt_tokens):
            return None
    return q


def graphs_unavailable(model: MiMoV2ForCausalLM, device: torch.device, use_attention_kernel: bool) -> str | None:
    """Why decode steps cannot replay CUDA graphs with this model on `device`; None when they can."""
    if device.type != "cuda":
        return f"a {device.type} device (CUDA graphs need a CUDA device)"
    if model.parallel.mapping.world_size > 1:
        return ("tensor parallelism: the worker ranks follow rank 0's forwards through module hooks, which a replay "
                "does not run")
    if not use_attention_kernel:
        return "attention_kernel 'reference' sizes its key gathers on the host"
    if any(resolve_impl(m.impl, device) != "fused" for m in model.model.layers.modules() if isinstance(m, MiMoV2MoE)):
        return "the reference MoE (MIMO_MOE_IMPL=reference) reads its per-expert token counts on the host"
    return None


def uniform_rows(starts: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of sequences that each compute q consecutive positions from `starts` [B], flattened: each row's
    sequence and position [B * q], and the attention's `cu_query` [B + 1] and `seq_ends` [B] (int32)."""
    flat = torch.arange(starts.numel() * q, device=starts.device)
    row_seq = flat // q
    cu_query = torch.arange(0, flat.numel() + 1, q, dtype=torch.int32, device=starts.device)
    return row_seq, starts[row_seq] + flat % q, cu_query, (starts + q).to(torch.int32)


@torch.inference_mode()
def capture_graphs(keys: list, fill: Callable[[Any], None], forward: Callable[[Any], Any],
                   device: torch.device) -> tuple[dict, dict]:
    """`forward(key)` of every key captured in a CUDA graph, in the order given (the most rows first: the graphs
    share one memory pool), each after `fill(key)` has written its static inputs (outside the capture) and an eager
    warm-up run (which compiles its kernels): (graphs, outputs) by key. On a device without CUDA graphs only the
    forwards run: no graphs, and `outputs` holds what they returned."""
    graphs, outputs = {}, {}
    if device.type != "cuda":
        for key in keys:
            fill(key)
            outputs[key] = forward(key)
        return graphs, outputs
    pool = torch.cuda.graph_pool_handle()
    with torch.cuda.device(device):
        for key in keys:
            fill(key)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                forward(key)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a served process's other threads may use CUDA meanwhile (not captured)
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                outputs[key] = forward(key)
            graphs[key] = graph
        torch.cuda.synchronize(device)
    return graphs, outputs


@dataclass(frozen=True, slots=True)
class GraphStep:
    """A decode step that replays the graph of (`query_len`, `bucket`); its first `num_seqs` sequences are real."""

    query_len: int
    bucket: int
    num_seqs: int


@dataclass(frozen=True, slots=True)
class _Outputs:
    hidden: torch.Tensor  # [bucket * q, H] pre-norm hidden states (what the MTP layers read)
    logits: torch.Tensor  # [bucket * q, V] float32
    tables: dict[LayerKind, tuple[torch.Tensor, torch.Tensor]]  # per pool: tables [bucket, W] int64, lengths


class DecodeGraphs:
    """The decode graphs of one engine: `prepare` fills a step's static inputs, `replay` runs its graph.

    On a device without CUDA graphs (the CPU tests) `capture` only runs the forwards and `replay` runs the same
    static-input forward eagerly, so everything but the capture itself is exercised there.
    """

    def __init__(self, model: MiMoV2ForCausalLM, kv_cache: KVCache, block_tables: dict[LayerKind, DeviceBlockTables],
                 sliding_window: int | None, max_num_seqs: int, query_lens: tuple[int, ...], max_model_len: int,
                 device: torch.device):
        for kind, tables in block_tables.items():
            if tables.pad_row is None:
                raise ValueError(f"DecodeGraphs: the {kind.value} block tables have no pad row (a scratch block)")
        self.model = model
        self.kv_cache = kv_cache
        self.block_tables = block_tables
        self.kinds = list(block_tables)  # order of the pools in the static inputs
        self.sliding_window = sliding_window
        self.buckets = graph_buckets(max_num_seqs)
        self.query_lens = tuple(sorted(set(query_lens)))
        self.max_model_len = max_model_len
        self.device = device
        self.replays = 0  # graph steps run so far (tests and benchmarks read it)
        largest = self.buckets[-1]
        # per bucket: ids [B * q], first positions [B], then per pool rows [B] and table lengths [B]; a normal
        # tensor (not an inference one), which `prepare` writes outside inference mode
        self.inputs = torch.zeros(largest * (max(self.query_lens) + 1 + 2 * len(self.kinds)), dtype=torch.long,
                                  device=device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[int, int], _Outputs] = {}

    def prepare(self, chunks: list[ScheduledChunk], fed: torch.Tensor | None = None) -> GraphStep | None:
        """Fills the static inputs for `chunks` (under the engine lock) if a graph runs them; None: run eagerly.
        `fed` `[B]`: the chunks' token ids on the device (q = 1; the sequences do not hold them yet)."""
        q = decode_query_len(chunks)
        bucket = bucket_for(len(chunks), self.buckets)
        if q not in self.query_lens or bucket is None:
            return None
        pad = bucket - len(chunks)
        seqs = [chunk.seq for chunk in chunks]
        values = []
        for chunk in chunks if fed is None else ():
            values += chunk.seq.token_ids[chunk.start:chunk.end - chunk.num_drafts]
            if chunk.num_drafts:
                values += chunk.seq.draft.drafts[:chunk.num_drafts]
        values += [0] * (pad * q)
        values += [chunk.start for chunk in chunks] + [0] * pad
        for kind in self.kinds:
            tables = self.block_tables[kind]
            rows, lengths = tables.rows(seqs)
            values += rows + [tables.pad_row] * pad + lengths + [1] * pad
        if fed is None:
            copy_into(self.inputs, values)
        else:  # the ids from the device, then the rest from the host
            self.inputs[:len(chunks)].copy_(fed)
            copy_into(self.inputs[len(chunks):], values)
        return GraphStep(q, bucket, len(chunks))

    def capture(self) -> None:
        """Captures every (q, bucket) graph, most rows first; the inputs are padding rows only, so capture writes
        nothing but the scratch blocks."""
        keys = sorted(((q, bucket) for q in self.query_lens for bucket in self.buckets),
                      key=lambda key: key[0] * key[1], reverse=True)
        self._graphs, self._outputs = capture_graphs(keys, lambda key: self._fill_padding(*key),
                                                     lambda key: self._forward(*key), self.device)

    def replay(self, step: GraphStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the step's graph; returns the real rows' pre-norm hidden states [T, H] and float32 logits [T, V],
        views of the graph's outputs (valid until the next replay)."""
        key = (step.query_len, step.bucket)
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
        else:
            self._outputs[key] = self._forward(*key)
        self.replays += 1
        rows = step.num_seqs * step.query_len
        outputs = self._outputs[key]
        return outputs.hidden[:rows], outputs.logits[:rows]

    def tables(self, step: GraphStep) -> dict[LayerKind, tuple[torch.Tensor, torch.Tensor]]:
        """Per pool, the block tables `[bucket, W]` and lengths `[bucket]` the last replay of `step`'s graph read
        (row i = sequence i of the step; what the MTP layers' eager passes index)."""
        return self._outputs[(step.query_len, step.bucket)].tables

    def _fill_padding(self, q: int, bucket: int) -> None:
        values = [0] * (bucket * q) + [0] * bucket
        for kind in self.kinds:
            values += [self.block_tables[kind].pad_row] * bucket + [1] * bucket
        copy_into(self.inputs, values)

    def _max_keys(self, kind: LayerKind, q: int) -> int:
        if kind is LayerKind.SLIDING:
            return min(self.max_model_len, self.sliding_window + q)
        return self.max_model_len

    def _forward(self, q: int, bucket: int) -> _Outputs:
        """The captured work: static inputs -> attention metadata -> decoder stack -> final norm -> logits."""
        rows = bucket * q
        inputs = self.inputs
        ids = inputs[:rows]
        starts = inputs[rows:rows + bucket]
        row_seq, positions, cu_query, seq_ends = uniform_rows(starts, q)
        block_size = self.kv_cache.block_size
        pools, tables = {}, {}
        offset = rows + bucket
        for kind in self.kinds:
            table_rows = inputs[offset:offset + bucket]
            lengths = inputs[offset + bucket:offset + 2 * bucket]
            offset += 2 * bucket
            table = self.block_tables[kind].table.index_select(0, table_rows).long()  # [bucket, W]
            tables[kind] = (table, lengths)
            pools[kind] = PoolMetadata(
                slot_mapping=cache_slots(table, lengths, row_seq, positions, block_size),
                block_table=table, table_lens=lengths, key_counts=[self._max_keys(kind, q)] * bucket,
                key_slots=None, key_positions=None,
            )  # fmt: skip
        metadata = PagedAttentionMetadata(
            query_positions=positions, query_counts=[q] * bucket, pools=pools, sliding_window=self.sliding_window,
            cu_query=cu_query, seq_ends=seq_ends, use_kernel=True,
        )  # fmt: skip
        model = self.model
        hidden = model.model(positions, PagedAttention(self.kv_cache, metadata), model.embed(ids))  # [rows, H]
        return _Outputs(hidden, model.compute_logits(model.model.norm(hidden)), tables)
