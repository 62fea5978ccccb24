"""Attention over the paged KV pools: the engine's `AttentionBackend`.

Per step the model runner builds one `PagedAttentionMetadata` (index tensors on the device, from the
`DeviceBlockTables` and a few host lists, with no device->host sync); every layer then writes its new k/v at the
step's slots and attends each sequence's queries over that sequence's cached keys: on CUDA with the Triton kernel
of `mimo.engine.attention_kernel` (varlen, reading the device block tables directly), elsewhere with the reference
path, a per-sequence gather + `attention_with_sinks` loop. `ATTENTION_KERNELS` names the choice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mimo.engine.kv_cache import KVCache, LayerKind
from mimo.engine.sequence import Sequence, SequenceStatus
from mimo.engine.transfer import to_device
from mimo.models.attention import attention_with_sinks


# how PagedAttention computes: "auto" = the Triton kernel on CUDA devices, the reference path elsewhere;
# "triton" anywhere (on a CPU device only under Triton's interpreter, TRITON_INTERPRET=1); "reference" anywhere
ATTENTION_KERNELS = ("auto", "triton", "reference")


def use_attention_kernel(choice: str, device: torch.device) -> bool:
    """Whether `choice` (one of `ATTENTION_KERNELS`) runs the Triton kernel on `device`; refuses what cannot run."""
    if choice not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {choice!r} is not one of {', '.join(ATTENTION_KERNELS)}")
    if choice == "reference" or (choice == "auto" and device.type != "cuda"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"attention kernel {choice!r} on {device} needs the triton package ({exc})") from exc
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention kernel 'triton' on a {device.type} device runs only under Triton's interpreter "
                         "(TRITON_INTERPRET=1)")
    return True


@dataclass(frozen=True, slots=True)
class PoolMetadata:
    """Where one layer kind's KV of this step goes and which cached keys each sequence attends."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    block_table: torch.Tensor  # [B, W] physical block of logical block b at column b % table_lens
    table_lens: torch.Tensor  # [B]
    key_counts: list[int]  # keys per sequence (host)
    key_slots: torch.Tensor | None  # reference path: [K] flat cache slots of every attended key, sequences concatenated
    key_positions: torch.Tensor | None  # reference path: [K] their token positions


@dataclass(frozen=True, slots=True)
class PagedAttentionMetadata:
    query_positions: torch.Tensor  # [T] positions of the step's tokens, sequences concatenated
    query_counts: list[int]  # tokens per sequence (host)
    pools: dict[LayerKind, PoolMetadata]
    sliding_window: int | None
    cu_query: torch.Tensor  # [B + 1] int32 first flat row of each sequence's tokens, then T
    seq_ends: torch.Tensor  # [B] int32 one past each sequence's last position this step
    use_kernel: bool  # the Triton kernel (else the reference gather + attention_with_sinks loop)

    @classmethod
    def build(cls, starts: list[int], counts: list[int],
              block_tables: dict[LayerKind, tuple[torch.Tensor, torch.Tensor]], block_size: int,
              sliding_window: int | None, device: torch.device, use_kernel: bool = False) -> PagedAttentionMetadata:
        """Index tensors for sequences that compute tokens `[starts[i], starts[i] + counts[i])` this step.

        `block_tables[kind]` = (tables `[B, width]`, lengths `[B]`). A table maps logical block `b` of a sequence to
        physical block `table[b % length]`: the identity for full-attention tables, the ring for sliding ones (whose
        positions outside the window are never read). The kernel reads the tables itself; only the reference path
        needs every attended key's slot.
        """
        ends = [s + n for s, n in zip(starts, counts)]
        query_seq, query_positions = _flat_ranges(starts, counts, device)
        pools = {}
        for kind, (table, table_lens) in block_tables.items():
            key_starts = [0] * len(starts) if kind is LayerKind.FULL else [max(0, s - sliding_window) for s in starts]
            key_counts = [e - s for s, e in zip(key_starts, ends)]
            key_slots = key_positions = None
            if not use_kernel:
                key_seq, key_positions = _flat_ranges(key_starts, key_counts, device)
                key_slots = cache_slots(table, table_lens, key_seq, key_positions, block_size)
            pools[kind] = PoolMetadata(
                slot_mapping=cache_slots(table, table_lens, query_seq, query_positions, block_size),
                block_table=table,
                table_lens=table_lens,
                key_counts=key_counts,
                key_slots=key_slots,
                key_positions=key_positions,
            )
        cu_query = [0]
        for n in counts:
            cu_query.append(cu_query[-1] + n)
        return cls(query_positions, counts, pools, sliding_window, to_device(cu_query, device, torch.int32),
                   to_device(ends, device, torch.int32), use_kernel)


@dataclass(slots=True)
class _Row:
    index: int
    blocks: list[int]  # the sequence's block table this row mirrors
    num_copied: int


class DeviceBlockTables:
    """One pool's block tables of the running sequences, mirrored on the device, one row per sequence.

    While a sequence runs its table only grows, so a step copies just the block ids appended since the previous
    step instead of every table. A sequence that stopped running gives its row back; one readmitted after
    preemption, or whose table was trimmed after rejected drafts, holds a new table (the block manager replaces
    the list) and is copied afresh. With `pad_block` (the decode CUDA graphs' scratch block) one more row,
    `pad_row`, maps every logical block to it: the table of the rows that pad a batch up to its graph's size.
    """

    def __init__(self, kind: LayerKind, num_rows: int, max_blocks: int, device: torch.device,
                 pad_block: int | None = None):
        self.kind = kind
        self.table = torch.zeros(num_rows + (pad_block is not None), max_blocks, dtype=torch.int32, device=device)
        self.pad_row = None
        self.pad_block = pad_block
        if pad_block is not None:
            self.pad_row = num_rows
            self.table[num_rows] = pad_block
        self._free_rows = list(range(num_rows))
        self._rows: dict[Sequence, _Row] = {}

    def rows(self, seqs: list[Sequence]) -> tuple[list[int], list[int]]:
        """Brings the mirror up to date for running `seqs`; returns each one's row and table length (host)."""
        for seq in [s for s in self._rows if s.status is not SequenceStatus.RUNNING]:
            self._free_rows.append(self._rows.pop(seq).index)
        rows, cols, blocks = [], [], []
        for seq in seqs:
            table = seq.block_tables[self.kind]
            row = self._rows.get(seq)
            if row is None or row.blocks is not table:
                row = self._rows[seq] = _Row(self._free_rows.pop() if row is None else row.index, table, 0)
            rows += [row.index] * (len(table) - row.num_copied)
            cols += range(row.num_copied, len(table))
            blocks += table[row.num_copied:]
            row.num_copied = len(table)
        device = self.table.device
        if blocks:
            self.table[to_device(rows, device), to_device(cols, device)] = to_device(blocks, device, torch.int32)
        return [self._rows[seq].index for seq in seqs], [len(seq.block_tables[self.kind]) for seq in seqs]

    def tables(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables `[B, width]` (int64; entries past a table's length are stale) and lengths `[B]` of running `seqs`."""
        rows, lengths = self.rows(seqs)
        device = self.table.device
        return self.table[to_device(rows, device), :max(lengths)].long(), to_device(lengths, device)


def _flat_ranges(starts: list[int], counts: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated `range(starts[i], starts[i] + counts[i])`: (sequence index, position), both `[sum(counts)]`."""
    total = sum(counts)
    starts_t = to_device(starts, device)
    counts_t = to_device(counts, device)
    seq = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t, output_size=total)
    offsets = torch.cumsum(counts_t, 0) - counts_t  # [B] first flat index of each sequence
    return seq, torch.arange(total, device=device) - offsets[seq] + starts_t[seq]


def cache_slots(table: torch.Tensor, table_lens: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor,
                block_size: int) -> torch.Tensor:
    """Flat cache slot of each (sequence, position): `table[seq, (pos // bs) % len] * bs + pos % bs`."""
    block = table[seq, torch.remainder(positions // block_size, table_lens[seq])]
    return block * block_size + positions % block_size


class PagedAttention:
    """`AttentionBackend` over a `KVCache` for one step described by a `PagedAttentionMetadata`."""

    def __init__(self, kv_cache: KVCache, metadata: PagedAttentionMetadata):
        self.kv_cache = kv_cache
        self.metadata = metadata

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               sliding_window: int | None, sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q `[T, Hq, D]`, k `[T, Hk, D]`, v `[T, Hk, Dv]` of the step's new tokens -> `[T, Hq, Dv]`."""
        kind = self.kv_cache.kind(layer_idx)
        expected_window = self.metadata.sliding_window if kind is LayerKind.SLIDING else None
        if sliding_window != expected_window:
            raise ValueError(f"layer {layer_idx} ({kind.value} attention) called with sliding_window={sliding_window}, "
                             f"the KV cache was laid out for {expected_window}")
        pool = self.metadata.pools[kind]
        self.kv_cache.write(layer_idx, pool.slot_mapping, k, v)
        return self._attend_cached(layer_idx, q, pool, sliding_window=sliding_window, sinks=sinks, scale=scale)

    def _attend_cached(self, layer_idx: int, q: torch.Tensor, pool: PoolMetadata, *, sliding_window: int | None,
                       sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
        metadata = self.metadata
        if metadata.use_kernel:
            from mimo.engine.attention_kernel import paged_attention  # imports triton: only where it runs

            return paged_attention(
                q, self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx], block_table=pool.block_table,
                table_lens=pool.table_lens, cu_q=metadata.cu_query, seq_ends=metadata.seq_ends,
                query_counts=metadata.query_counts, key_counts=pool.key_counts, scale=scale,
                sliding_window=sliding_window, sinks=sinks,
            )  # fmt: skip
        keys, values = self.kv_cache.gather(layer_idx, pool.key_slots)  # [K, Hk, D], [K, Hk, Dv]
        outputs = [
            attention_with_sinks(q_seq, k_seq, v_seq, q_pos=q_pos, k_pos=k_pos, scale=scale,
                                 sliding_window=sliding_window, sinks=sinks)
            for q_seq, q_pos, k_seq, v_seq, k_pos in zip(
                q.split(self.metadata.query_counts), self.metadata.query_positions.split(self.metadata.query_counts),
                keys.split(pool.key_counts), values.split(pool.key_counts),
                pool.key_positions.split(pool.key_counts))
        ]
        return torch.cat(outputs)  # [T, Hq, Dv]
