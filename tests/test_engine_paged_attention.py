"""PagedAttention over full and sliding-ring pools equals attention over each sequence's whole history."""

import pytest
import torch

from mimo.engine.block_manager import BlockManager
from mimo.engine.kv_cache import KVCache, KVLayerSpec, LayerKind
from mimo.engine.paged_attention import PagedAttention, PagedAttentionMetadata
from mimo.engine.sampling import SamplingParams
from mimo.engine.scheduler import Scheduler
from mimo.engine.sequence import Sequence
from mimo.models.attention import attention_with_sinks

WINDOW, BLOCK_SIZE, MAX_CHUNK, NUM_Q_HEADS = 5, 2, 3, 4
SPECS = [KVLayerSpec(LayerKind.FULL, 2, 6, 4), KVLayerSpec(LayerKind.SLIDING, 1, 8, 4)]
LAYER_WINDOWS = [None, WINDOW]


def test_matches_whole_history_attention_across_chunks_and_ring_wraps():
    torch.manual_seed(0)
    num_blocks = {LayerKind.FULL: 40, LayerKind.SLIDING: 40}
    manager = BlockManager(BLOCK_SIZE, num_blocks, WINDOW, MAX_CHUNK)
    scheduler = Scheduler(manager, max_num_seqs=3, max_num_batched_tokens=5, max_chunk=MAX_CHUNK)
    kv_cache = KVCache(SPECS, num_blocks, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    sinks = [None, torch.randn(NUM_Q_HEADS)]
    history = {}  # request id -> per layer (k, v) of every token so far
    for name, prompt_len in (("a", 7), ("b", 12), ("c", 3)):
        scheduler.add(Sequence(name, [0] * prompt_len, SamplingParams(max_tokens=6, temperature=0.0), None, None))
        history[name] = [(torch.empty(0, s.num_kv_heads, s.head_dim), torch.empty(0, s.num_kv_heads, s.v_head_dim))
                         for s in SPECS]
    ring_capacity = BLOCK_SIZE * manager.blocks_needed(LayerKind.SLIDING, scheduler.waiting[1], 0)
    assert ring_capacity == 8  # window 5 + chunk 3: sequence "b" (18 tokens) wraps its ring twice

    while scheduler.has_unfinished():
        chunks = scheduler.schedule()
        metadata = PagedAttentionMetadata.build(
            [c.start for c in chunks], [c.num_tokens for c in chunks],
            {kind: [c.seq.block_tables[kind] for c in chunks] for kind in num_blocks},
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
        scheduler.postprocess(chunks, [1] * sum(c.samples for c in chunks))
    assert [h[0][0].shape[0] for h in history.values()] == [12, 17, 8]  # prompt + 6 tokens, minus the last


def test_layer_called_with_another_window_is_refused():
    num_blocks = {LayerKind.FULL: 4, LayerKind.SLIDING: 4}
    kv_cache = KVCache(SPECS, num_blocks, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    metadata = PagedAttentionMetadata.build([0], [2], {LayerKind.FULL: [[0]], LayerKind.SLIDING: [[1]]},
                                            BLOCK_SIZE, WINDOW, torch.device("cpu"))
    q, k, v = torch.zeros(2, 4, 8), torch.zeros(2, 1, 8), torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match="layer 1 \\(sliding attention\\) called with sliding_window=7"):
        PagedAttention(kv_cache, metadata).attend(1, q, k, v, sliding_window=7, sinks=None, scale=1.0)
