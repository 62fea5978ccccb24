"""CUDA graphs of the MTP drafting passes: all k MTP layers, their logits and greedy drafts in one graph per
batch-size bucket, so a speculative decode step costs one replay where the eager drafter issues every layer's
kernels from Python and reads each layer's draft back to the host.

The eager drafter (`mimo.engine.speculative.Drafter`) computes, per layer L and sequence, the positions
`[mtp_done[L], n)` (n: the target's KV after the step): a number of rows that depends on how many drafts the
target accepted. A graph needs fixed shapes, so every sequence computes a window of `R = 2k` rows here, positions
`[n - R, n)`, which holds every layer's rows in steady decoding (at most k + 1 + L of them: the a + 1 positions the
step verified and the L before them the layer computed from drafts). A window row below `mtp_done[L]` already
has its layer-L KV; the graph computes it but writes its KV into the scratch block (the padding rows' block of the
decode graphs), so the cache keeps what it holds and the real rows attend exactly what they do eagerly. Row r of
layer L reads token `n - R + r + L + 1`: a verified token (set by the host), or, past the last one, the draft of
layer `r + L - R` of the same replay (on the device: `tokens_L = [known[L:], drafts[:L]]`). Each layer drafts
from its row n - 1 by argmax, so only all-greedy batches replay a graph; the others, steps whose rows do not fit
the window (the first steps after a prefill), and multimodal tokens inside a window run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo.engine.cuda_graphs import bucket_for, capture_graphs, graph_buckets, uniform_rows
from mimo.engine.kv_cache import KVCache, LayerKind
from mimo.engine.paged_attention import DeviceBlockTables, PagedAttention, PagedAttentionMetadata, PoolMetadata, \
    cache_slots
from mimo.engine.transfer import copy_into, to_device
from mimo.models.language_model import MiMoV2ForCausalLM

NOT_WRITTEN = 1 << 62  # `done` of a padding sequence: none of its rows writes KV


@dataclass(frozen=True, slots=True)
class DraftStep:
    """A drafting pass that replays the graph of `bucket`; its first `num_seqs` sequences are real."""

    bucket: int
    num_seqs: int


class DraftGraphs:
    """The drafting graphs of one engine: `prepare` fills a step's static inputs (or says it runs eagerly),
    `replay` runs the graph and returns each real sequence's k drafts.

    Static inputs per bucket B: known tokens [B, R] (token n - R + 1 + j at column j), first positions n - R [B],
    per layer the first position whose KV is written [k, B] (flat, long, one host-to-device copy), the sliding
    pool's block tables [B, W] and lengths [B] (copied on the device from the step's), and the target's hidden
    states of the window rows [B * R, H] (gathered on the device). On a device without CUDA graphs `replay` runs
    the same static-input forward eagerly.
    """

    def __init__(self, model: MiMoV2ForCausalLM, kv_cache: KVCache, sliding_tables: DeviceBlockTables,
                 sliding_window: int, num_layers: int, max_num_seqs: int, max_model_len: int, device: torch.device):
        if sliding_tables.pad_block is None:
            raise ValueError("DraftGraphs: the sliding block tables have no scratch block (pad_block)")
        self.model = model
        self.kv_cache = kv_cache
        self.pad_block = sliding_tables.pad_block
        self.sliding_window = sliding_window
        self.num_layers = num_layers
        self.rows_per_seq = 2 * num_layers
        self.buckets = graph_buckets(max_num_seqs)
        self.max_keys = min(max_model_len, sliding_window + self.rows_per_seq)
        self.vocab_size = model.config.vocab_size
        self.device = device
        self.replays = 0
        largest, rows = self.buckets[-1], self.rows_per_seq
        self.inputs = torch.zeros(largest * (rows + 1 + num_layers), dtype=torch.long, device=device)
        self.tables = torch.zeros(largest, sliding_tables.table.shape[1], dtype=torch.long, device=device)
        self.lengths = torch.ones(largest, dtype=torch.long, device=device)
        dtype = model.model.embed_tokens.weight.dtype  # the target's hidden states'
        self.hidden = torch.zeros(largest * rows, model.config.hidden_size, dtype=dtype, device=device)
        self._graphs, self._outputs = capture_graphs(sorted(self.buckets, reverse=True), self._fill_padding,
                                                     self._forward, device)

    def prepare(self, pending: list, source: torch.Tensor,
                sliding_tables: tuple[torch.Tensor, torch.Tensor]) -> DraftStep | None:
        """Fills the static inputs for the drafter's `pending` sequences (`speculative._Pending`, in the order of
        the step's block tables) if a graph runs their pass; None: run it eagerly. `source` holds the hidden
        states their rows name (`_Pending.hidden_row`)."""
        bucket = bucket_for(len(pending), self.buckets)
        if bucket is None:
            return None
        rows, k = self.rows_per_seq, self.num_layers
        known, starts, dones, hidden_rows = [], [], [[] for _ in range(k)], []
        for item in pending:
            n = item.num_computed
            first = n - rows
            if not item.samples or not item.seq.sampling.is_greedy or first < 0:
                return None
            layer_rows = [item.rows(layer) for layer in range(k)]
            if any(r.stop != n or not first <= r.start < n for r in layer_rows):
                return None
            lowest = min(r.start for r in layer_rows)
            strip = [item.token(first + 1 + j) if first + 1 + j > lowest else 0 for j in range(rows)]
            if max(strip) >= self.vocab_size:  # a multimodal position: its embedding is in the prompt table
                return None
            known += strip
            starts.append(first)
            for layer in range(k):
                dones[layer].append(layer_rows[layer].start)
            hidden_rows += [item.hidden_row(p) if p >= lowest else 0 for p in range(first, n)]
        pad = bucket - len(pending)
        values = known + [0] * (pad * rows) + starts + [0] * pad
        for layer_dones in dones:
            values += layer_dones + [NOT_WRITTEN] * pad
        copy_into(self.inputs[:bucket * (rows + 1 + k)], values)
        tables, lengths = sliding_tables
        num_seqs = len(pending)
        select = to_device([item.index for item in pending], self.device)  # their rows of the step's tables
        self.tables[:num_seqs, :tables.shape[1]].copy_(tables.index_select(0, select))
        self.lengths[:num_seqs].copy_(lengths.index_select(0, select))
        self.lengths[num_seqs:bucket].fill_(1)
        index = to_device(hidden_rows + [0] * (pad * rows), self.device)
        torch.index_select(source, 0, index, out=self.hidden[:bucket * rows])
        return DraftStep(bucket, num_seqs)

    def replay(self, step: DraftStep) -> list[list[int]]:
        """Runs the pass; each real sequence's k greedy drafts (one read-back)."""
        graph = self._graphs.get(step.bucket)
        if graph is not None:
            graph.replay()
            drafts = self._outputs[step.bucket]
        else:
            drafts = self._forward(step.bucket)
        self.replays += 1
        return drafts[:step.num_seqs].tolist()

    def _fill_padding(self, bucket: int) -> None:
        rows, k = self.rows_per_seq, self.num_layers
        copy_into(self.inputs, [0] * (bucket * rows) + [0] * bucket + [NOT_WRITTEN] * (k * bucket))
        self.lengths.fill_(1)

    @torch.inference_mode()
    def _forward(self, bucket: int) -> torch.Tensor:
        """The captured work: static inputs -> the k MTP layers in turn -> their drafts `[bucket, k]`."""
        device, rows, k = self.device, self.rows_per_seq, self.num_layers
        flat = bucket * rows
        known = self.inputs[:flat].view(bucket, rows)
        starts = self.inputs[flat:flat + bucket]
        dones = self.inputs[flat + bucket:flat + bucket + k * bucket].view(k, bucket)
        row_seq, positions, cu_query, seq_ends = uniform_rows(starts, rows)
        table, lengths = self.tables[:bucket], self.lengths[:bucket]
        block_size = self.kv_cache.block_size
        slots = cache_slots(table, lengths, row_seq, positions, block_size)
        scratch = self.pad_block * block_size + positions % block_size
        last_rows = torch.arange(bucket, device=device) * rows + rows - 1
        hidden = self.hidden[:flat]
        model = self.model
        drafts = []
        for layer in range(k):
            tokens = torch.cat([known[:, layer:], *[d[:, None] for d in drafts]], dim=1)  # [bucket, rows]
            written = positions >= dones[layer][row_seq]
            pool = PoolMetadata(slot_mapping=torch.where(written, slots, scratch), block_table=table,
                                table_lens=lengths, key_counts=[self.max_keys] * bucket, key_slots=None,
                                key_positions=None)  # fmt: skip
            metadata = PagedAttentionMetadata(
                query_positions=positions, query_counts=[rows] * bucket, pools={LayerKind.SLIDING: pool},
                sliding_window=self.sliding_window, cu_query=cu_query, seq_ends=seq_ends, use_kernel=True,
            )  # fmt: skip
            draft_hidden = model.forward_mtp(layer, positions, PagedAttention(self.kv_cache, metadata),
                                             tokens.reshape(-1), hidden)  # [flat, H]
            drafts.append(model.compute_logits(draft_hidden.index_select(0, last_rows)).argmax(dim=-1))  # [bucket]
        return torch.stack(drafts, dim=1)  # [bucket, k]
