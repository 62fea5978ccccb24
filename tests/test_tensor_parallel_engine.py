"""The continuous-batching engine over a TP 2 deployment (rank 0 drives a gloo worker) generates what one process
generates from the source checkpoint, through chunked prefill, decode, sliding rings and a prompt table, with and
without MTP speculative decoding."""


import threading

import pytest
import torch

from builders.convert import convert
from builders.tiny import build_checkpoint
from mimo.engine import EngineConfig, LLMEngine
from mimo.engine.engine import generate
from mimo.engine.sampling import SamplingParams
from mimo.engine.speculative import ReplayDrafts
from mimo.loading import load_language_model
from mimo.parallel.rank_driver import TensorParallelRanks, rank_devices

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def engine_config(**overrides):
    # chunks of 8 tokens: prompts longer than the sliding window (16) prefill over several steps
    return EngineConfig(**{"max_num_seqs": 4, "max_num_batched_tokens": 8, "block_size": 4, "max_model_len": 128,
                           "num_full_blocks": 128} | overrides)


@pytest.mark.parametrize("k", [0, 2])
def test_tp2_engine_matches_one_process(tmp_path, k):
    """k = 2: MTP layers on both ranks (their forwards announced like the decoder's), drafting on their own and
    then replaying the expected tokens (every draft accepted)."""
    checkpoint = build_checkpoint(tmp_path / "ckpt", fp8=True)
    deploy = convert(checkpoint, tmp_path / "deploy", tp=2, ep=2, progress=False)
    # The artifact stores bf16 weights; the reference holds the source in the same rounding.
    reference = load_language_model(checkpoint, torch.bfloat16, "cpu", dequantize_fp8=True).float()
    vocab_size, hidden_size = reference.config.vocab_size, reference.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in (5, 23, 40)]
    table = torch.randn(6, hidden_size, generator=generator)
    prompts.append(prompts[0] + [vocab_size + i for i in range(6)] + prompts[1][:3])  # ids >= vocab read the table
    tables = [None, None, None, table]
    expected = generate(LLMEngine(reference, engine_config()), prompts, GREEDY, tables)

    ranks = TensorParallelRanks(deploy, torch.device("cpu"), torch.float32, with_mtp=k > 0)
    try:
        engine = LLMEngine(ranks.model, engine_config(num_speculative_tokens=k))
        ranks.serve(engine.runner.kv_cache)
        assert engine.runner.kv_cache.k[0].shape[2] == 2  # full layers: 4 KV heads, 2 per rank
        assert generate(engine, prompts, GREEDY, tables) == expected
        if k:
            recorded = {f"generate-{i}": p + out for i, (p, out) in enumerate(zip(prompts, expected))}
            engine.runner.drafter.test_draft_override = ReplayDrafts(recorded, vocab_size)
            before = engine.speculative_stats()
            assert generate(engine, prompts, GREEDY, tables) == expected
            after = engine.speculative_stats()
            accepted = after["accepted_tokens"] - before["accepted_tokens"]
            assert accepted == after["draft_tokens"] - before["draft_tokens"] > 0
    finally:
        ranks.shutdown()


def test_rank_devices():
    cpu = torch.device("cpu")
    assert rank_devices(cpu, 2) == [cpu, cpu]
    assert rank_devices(torch.device("cuda", 2), 2, (2, 3)) == [torch.device("cuda", 2), torch.device("cuda", 3)]
    with pytest.raises(ValueError, match=r"needs 2 GPUs for its ranks, the first being 2; got \[0, 1\]"):
        rank_devices(torch.device("cuda", 2), 2, (0, 1))


def test_shutdown_before_serve_stops_the_workers(tmp_path):
    """An engine that fails to build on rank 0 (here a bad knob; on a server, a KV cache that does not fit) leaves
    the workers waiting for the KV geometry: shutdown releases them, and they exit cleanly instead of hanging
    in their broadcast."""
    deploy = convert(build_checkpoint(tmp_path / "ckpt"), tmp_path / "deploy", tp=2, ep=2, progress=False)
    ranks = TensorParallelRanks(deploy, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="attention_kernel"):
        LLMEngine(ranks.model, engine_config(attention_kernel="no-such-kernel"))
    stopper = threading.Thread(target=ranks.shutdown, daemon=True)
    stopper.start()
    stopper.join(timeout=60)
    assert not stopper.is_alive(), "shutdown before serve hangs"
    assert [worker.exitcode for worker in ranks._workers] == [0]
