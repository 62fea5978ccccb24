"""PagedAttention over full and sliding-ring pools equals attention over each sequence's whole history."""

import pytest
import torch

from mimo.engine.block_manager import BlockManager, sliding_ring_tokens
from mimo.engine.kv_cache import KVCache, KVLayerSpec, LayerKind
from mimo.engine.paged_attention import DeviceBlockTables, PagedAttention, PagedAttentionMetadata
from mimo.engine.sampling import SamplingParams
from mimo.engine.scheduler import ChunkResult, Scheduler
from mimo.engine.sequence import Sequence, SequenceStatus
from mimo.models.attention import attention_with_sinks

WINDOW, BLOCK_SIZE, MAX_CHUNK, NUM_Q_HEADS = 5, 2, 3, 4
SPECS = [KVLayerSpec(LayerKind.FULL, 2, 6, 4), KVLayerSpec(LayerKind.SLIDING, 1, 8, 4)]
LAYER_WINDOWS = [None, WINDOW]


def test_matches_whole_history_attention_across_chunks_ring_wraps_and_preemption():
    torch.manual_seed(0)
    # 14 full blocks of 2 tokens: the three sequences (13, 18 and 9 tokens at most) cannot all keep their KV
    num_blocks = {LayerKind.FULL: 14, LayerKind.SLIDING: 40}
    manager = BlockManager(BLOCK_SIZE, num_blocks, sliding_ring_tokens(WINDOW, MAX_CHUNK))
    scheduler = Scheduler(manager, max_num_seqs=3, max_num_batched_tokens=5, max_chunk=MAX_CHUNK)
    kv_cache = KVCache(SPECS, num_blocks, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    device_tables = {kind: DeviceBlockTables(kind, 3, 10, torch.device("cpu")) for kind in num_blocks}
    sinks = [None, torch.randn(NUM_Q_HEADS)]
    history = {}  # request id -> per layer (k, v) of every token so far
    for name, prompt_len in (("a", 7), ("b", 12), ("c", 3)):
        scheduler.add(Sequence(name, [0] * prompt_len, SamplingParams(max_tokens=6, temperature=0.0), None, None))
        history[name] = [(torch.empty(0, s.num_kv_heads, s.head_dim), torch.empty(0, s.num_kv_heads, s.v_head_dim))
                         for s in SPECS]
    ring_capacity = BLOCK_SIZE * manager.blocks_needed(LayerKind.SLIDING, scheduler.waiting[1], 0)
    assert ring_capacity == 8  # window 5 + chunk 3: sequence "b" (18 tokens) wraps its ring twice

    num_recomputed = 0
    while scheduler.has_unfinished():
        chunks = scheduler.schedule()
        for chunk in chunks:
            if chunk.start == 0 and history[chunk.seq.request_id][0][0].shape[0] > 0:  # preempted earlier
                num_recomputed += 1
                history[chunk.seq.request_id] = [(k[:0], v[:0]) for k, v in history[chunk.seq.request_id]]
        metadata = PagedAttentionMetadata.build(
            [c.start for c in chunks], [c.num_tokens for c in chunks],
            {kind: tables.tables([c.seq for c in chunks]) for kind, tables in device_tables.items()},
            BLOCK_SIZE, WINDOW, torch.device("cpu"))
        backend = PagedAttention(kv_cache, metadata)
        num_tokens = sum(c.num_tokens for c in chunks)
        for layer_idx, spec in enumerate(SPECS):
            q = torch.randn(num_tokens, NUM_Q_HEADS, spec.head_dim)
            k = torch.randn(num_tokens, spec.num_kv_heads, spec.head_dim)
            v = torch.randn(num_tokens, spec.num_kv_heads, spec.v_head_dim)
            out = backend.attend(layer_idx, q, k, v, sliding_window=LAYER_WINDOWS[layer_idx],
                                 sinks=sinks[layer_idx], scale=0.3)
            offset = 0
            for chunk in chunks:
                rows = slice(offset, offset + chunk.num_tokens)
                offset += chunk.num_tokens
                seen_k, seen_v = history[chunk.seq.request_id][layer_idx]
                seen_k, seen_v = torch.cat([seen_k, k[rows]]), torch.cat([seen_v, v[rows]])
                history[chunk.seq.request_id][layer_idx] = seen_k, seen_v
                expected = attention_with_sinks(
                    q[rows], seen_k, seen_v, q_pos=torch.arange(chunk.start, chunk.end),
                    k_pos=torch.arange(chunk.end), scale=0.3, sliding_window=LAYER_WINDOWS[layer_idx],
                    sinks=sinks[layer_idx])
                torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-6)
        scheduler.postprocess(chunks, [ChunkResult([1] if c.samples else []) for c in chunks])
    assert [h[0][0].shape[0] for h in history.values()] == [12, 17, 8]  # prompt + 6 tokens, minus the last
    assert num_recomputed > 0


def test_layer_called_with_another_window_is_refused():
    num_blocks = {LayerKind.FULL: 4, LayerKind.SLIDING: 4}
    kv_cache = KVCache(SPECS, num_blocks, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    one_block = (torch.tensor([[0]]), torch.tensor([1]))
    metadata = PagedAttentionMetadata.build([0], [2], {LayerKind.FULL: one_block, LayerKind.SLIDING: one_block},
                                            BLOCK_SIZE, WINDOW, torch.device("cpu"))
    q, k, v = torch.zeros(2, 4, 8), torch.zeros(2, 1, 8), torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match="layer 1 \\(sliding attention\\) called with sliding_window=7"):
        PagedAttention(kv_cache, metadata).attend(1, q, k, v, sliding_window=7, sinks=None, scale=1.0)


def test_device_block_tables_copy_growth_and_refresh_replaced_tables():
    manager = BlockManager(BLOCK_SIZE, {LayerKind.FULL: 20}, ring_tokens=None)
    tables = DeviceBlockTables(LayerKind.FULL, num_rows=1, max_blocks=8, device=torch.device("cpu"))
    seq = Sequence("a", [0] * 3, SamplingParams(max_tokens=9, temperature=0.0), None, None)
    seq.status = SequenceStatus.RUNNING
    manager.allocate(seq, 3)
    table, lengths = tables.tables([seq])
    assert table.tolist() == [seq.block_tables[LayerKind.FULL]] and lengths.tolist() == [2]
    manager.allocate(seq, 7)  # grows in place
    assert tables.tables([seq])[0].tolist() == [seq.block_tables[LayerKind.FULL]]
    manager.free(seq)  # preempted and readmitted before the next step: a new table, still RUNNING
    manager.pools[LayerKind.FULL].allocate(3)
    manager.allocate(seq, 5)
    assert tables.tables([seq])[0].tolist() == [seq.block_tables[LayerKind.FULL]] == [[7, 8, 9]]
    seq.status = SequenceStatus.FINISHED  # gives its only row to the next sequence
    other = Sequence("b", [0] * 2, SamplingParams(max_tokens=1, temperature=0.0), None, None)
    other.status = SequenceStatus.RUNNING
    manager.allocate(other, 2)
    assert tables.tables([other])[0].tolist() == [other.block_tables[LayerKind.FULL]]


def test_device_block_tables_follow_a_trimmed_table():
    """Rejected drafts give back a sequence's last full blocks; the next growth may bring other blocks there."""
    manager = BlockManager(BLOCK_SIZE, {LayerKind.FULL: 4}, ring_tokens=None)
    tables = DeviceBlockTables(LayerKind.FULL, num_rows=1, max_blocks=4, device=torch.device("cpu"))
    seq = Sequence("a", [0] * 5, SamplingParams(max_tokens=3, temperature=0.0), None, None)
    seq.status = SequenceStatus.RUNNING
    manager.allocate(seq, 6)
    assert tables.tables([seq])[0].tolist() == [[0, 1, 2]]
    manager.trim(seq, 4)
    assert seq.block_tables[LayerKind.FULL] == [0, 1] and manager.stats()["full"]["free_blocks"] == 2
    manager.allocate(seq, 6)  # block 3 now, 2 went back to the end of the free list
    assert tables.tables([seq])[0].tolist() == [[0, 1, 3]]
