"""Block manager and scheduler as plain Python (no model)."""

import pytest

from mimo.engine.block_manager import BlockManager, BlockPool, sliding_ring_tokens
from mimo.engine.kv_cache import LayerKind
from mimo.engine.sampling import SamplingParams
from mimo.engine.scheduler import ChunkResult, Scheduler
from mimo.engine.sequence import FinishReason, Sequence, SequenceStatus

FULL, SLIDING = LayerKind.FULL, LayerKind.SLIDING


def make_seq(name: str, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0.0), None, None)


def make_scheduler(num_full=64, num_sliding=64, window=8, max_chunk=4, max_num_seqs=8, budget=16, block_size=4,
                   admission_interval=1):
    blocks = BlockManager(block_size, {FULL: num_full, SLIDING: num_sliding}, sliding_ring_tokens(window, max_chunk))
    return Scheduler(blocks, max_num_seqs, budget, max_chunk, admission_interval)


def run_step(scheduler: Scheduler, token: int = 1):
    chunks = scheduler.schedule()
    finished = scheduler.postprocess(chunks, [ChunkResult([token] if c.samples else []) for c in chunks])
    return chunks, finished


def test_block_pool_refuses_over_allocation():
    pool = BlockPool(3)
    assert pool.allocate(2) == [0, 1]
    with pytest.raises(RuntimeError, match="allocating 2 KV blocks with 1 free"):
        pool.allocate(2)
    pool.free([0, 1])
    assert pool.num_free == 3


def test_full_blocks_grow_and_sliding_ring_is_fixed():
    manager = BlockManager(4, {FULL: 100, SLIDING: 100}, ring_tokens=sliding_ring_tokens(8, 4))
    long_seq = make_seq("a", 30, max_tokens=20)
    manager.allocate(long_seq, 9)
    assert len(long_seq.block_tables[FULL]) == 3
    assert len(long_seq.block_tables[SLIDING]) == 3  # window 8 + chunk 4 = 12 tokens
    manager.allocate(long_seq, 40)
    assert len(long_seq.block_tables[FULL]) == 10
    assert len(long_seq.block_tables[SLIDING]) == 3
    short_seq = make_seq("b", 3, max_tokens=2)  # never longer than 5 tokens: 2 blocks suffice
    manager.allocate(short_seq, 3)
    assert len(short_seq.block_tables[SLIDING]) == 2
    manager.free(long_seq)
    manager.free(short_seq)
    assert manager.stats() == {"full": {"free_blocks": 100, "total_blocks": 100},
                               "sliding": {"free_blocks": 100, "total_blocks": 100}}


def test_chunked_prefill_respects_budgets_and_finishes():
    scheduler = make_scheduler(budget=10, max_chunk=4, max_num_seqs=2)
    for name, n in (("a", 9), ("b", 3), ("c", 2)):
        scheduler.add(make_seq(name, n, max_tokens=2))
    chunks, _ = run_step(scheduler)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in chunks] == [("a", 0, 4), ("b", 0, 3)]
    assert [s.request_id for s in scheduler.waiting] == ["c"]  # max_num_seqs
    chunks, results = run_step(scheduler)
    # a continues its prompt; b decodes its first sampled token
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in chunks] == [("a", 4, 4), ("b", 3, 1)]
    assert [(s.request_id, s.finish_reason) for s, _ in results] == [("b", FinishReason.LENGTH)]
    chunks, _ = run_step(scheduler)  # b left, c joins in the same step
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in chunks] == [("a", 8, 1), ("c", 0, 2)]
    while scheduler.has_unfinished():
        run_step(scheduler)
    assert all(s["free_blocks"] == s["total_blocks"] for s in scheduler.block_manager.stats().values())


def test_admission_waits_for_blocks_first_come_first_served():
    scheduler = make_scheduler(num_full=5)
    big, small = make_seq("big", 16, max_tokens=4), make_seq("small", 2, max_tokens=4)
    scheduler.add(make_seq("first", 8, max_tokens=4))  # 2 full blocks
    scheduler.add(big)  # needs 4 full blocks: only 3 left
    scheduler.add(small)  # would fit, but must not overtake `big`
    chunks, _ = run_step(scheduler)
    assert [c.seq.request_id for c in chunks] == ["first"]
    assert big.block_tables[FULL] == [] and big.status is SequenceStatus.WAITING


def test_waiting_requests_join_a_running_batch_every_admission_interval_steps():
    scheduler = make_scheduler(admission_interval=3, max_num_seqs=2)
    scheduler.add(make_seq("first", 3, max_tokens=12))
    assert [c.seq.request_id for c in run_step(scheduler)[0]] == ["first"]  # an idle batch admits at once
    scheduler.add(make_seq("second", 3, max_tokens=2))
    scheduler.add(make_seq("third", 3, max_tokens=2))
    admitted = []
    for _ in range(9):
        admitted.append([c.seq.request_id for c in run_step(scheduler)[0] if c.seq.request_id != "first"])
    # second waits two steps, joins on the third; third waits for its slot (max_num_seqs 2) to free, which a
    # batch that is full does not count as held back, then joins with the interval's next turn
    assert admitted == [[], [], ["second"], ["second"], [], [], ["third"], ["third"], []]


def test_an_admission_turn_cut_short_by_the_token_budget_goes_on_at_the_next_step():
    scheduler = make_scheduler(admission_interval=4, budget=8, max_chunk=8)
    scheduler.add(make_seq("first", 3, max_tokens=20))
    run_step(scheduler)
    for name in "abcd":
        scheduler.add(make_seq(name, 3, max_tokens=20))
    admitted = [[c.seq.request_id for c in run_step(scheduler)[0] if c.start == 0] for _ in range(6)]
    # the turn: a and b fill the budget (1 decode + 3 + 3 of 8 tokens, c's prompt cut to 1), c goes on, d joins
    assert admitted == [[], [], [], ["a", "b", "c"], ["d"], []]


def test_decode_growth_preempts_newest_and_recomputes_it():
    # 3 full blocks of 4 tokens: two 4-token prompts fit, their 5th tokens do not.
    scheduler = make_scheduler(num_full=3, budget=16, max_chunk=8)
    old, new = make_seq("old", 4, max_tokens=3), make_seq("new", 4, max_tokens=3)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # both prefill and sample
    chunks, _ = run_step(scheduler)  # old grows to 2 blocks; new cannot and is preempted
    assert [c.seq.request_id for c in chunks] == ["old"]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_tables[FULL] == []
    assert list(scheduler.waiting) == [new]
    while old.status is not SequenceStatus.FINISHED:
        run_step(scheduler)
    chunks, _ = run_step(scheduler)  # readmitted: prompt + its sampled token recomputed at once
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in chunks] == [("new", 0, 5)]


def test_finish_releases_waiting_and_running_sequences():
    scheduler = make_scheduler(max_num_seqs=1)
    running, waiting = make_seq("r", 5), make_seq("w", 5)
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)
    scheduler.finish(running, FinishReason.CANCELLED)
    scheduler.finish(waiting, FinishReason.CANCELLED)
    assert not scheduler.has_unfinished()
    assert running.block_tables == {FULL: [], SLIDING: []}
    assert all(s["free_blocks"] == s["total_blocks"] for s in scheduler.block_manager.stats().values())


def test_postprocess_skips_sequences_finished_during_the_step():
    scheduler = make_scheduler()
    seq = make_seq("a", 3)
    scheduler.add(seq)
    chunks = scheduler.schedule()
    scheduler.finish(seq, FinishReason.CANCELLED)  # an abort while the forward runs
    assert scheduler.postprocess(chunks, [ChunkResult([7])]) == []
    assert seq.output_ids == [] and seq.finish_reason is FinishReason.CANCELLED


@pytest.mark.parametrize(("sampled", "expected_ids", "expected_tokens", "reason"), [
    ([5, 9], [5], [5], FinishReason.STOP),  # end_id 9 is not reported
    ([3, 4], [3, 4], [3, 4], FinishReason.STOP),  # stop sequence (3, 4) is reported
    ([1, 2, 3], [1, 2, 3], [1, 2, 3], FinishReason.LENGTH),
])
def test_stop_conditions(sampled, expected_ids, expected_tokens, reason):
    params = SamplingParams(max_tokens=3, temperature=0.0, end_id=9, stop_token_sequences=[[3, 4], [8, 8, 8]])
    seq = Sequence("a", [3, 8, 8], params, None, None)  # the prompt alone never matches a stop sequence
    reported = []
    for token in sampled:
        reported += seq.append_token(token)
    assert seq.output_ids == expected_ids and reported == expected_tokens
    assert seq.finish_reason is reason
