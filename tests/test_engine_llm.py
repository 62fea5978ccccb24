"""LLMEngine on a tiny random MiMo-V2 model: batching is invisible, KV is always given back."""

import threading

import pytest
import torch
from hf_reference import mimo_greedy, random_tiny_model

from mimo.engine import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams, generate
from mimo.models.attention import NoCacheAttention
from mimo.models.language_model import MiMoV2ForCausalLM

VOCAB, HIDDEN = 96, 32
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model() -> MiMoV2ForCausalLM:
    # sliding window 8 with block size 4 and chunks of at most 6: rings of 4 blocks, which long prompts wrap
    return random_tiny_model(DEVICE)


def make_engine(model, **overrides) -> LLMEngine:
    config = dict(max_num_seqs=6, max_num_batched_tokens=16, max_prefill_chunk=6, block_size=4, max_model_len=64,
                  num_full_blocks=96, seed=0)
    return LLMEngine(model, EngineConfig(**(config | overrides)))


def prompt(length: int, salt: int) -> list[int]:
    return [(salt * 31 + 7 * i) % VOCAB for i in range(length)]


def run_to_completion(engine: LLMEngine) -> dict[str, tuple[list[int], str]]:
    tokens: dict[str, list[int]] = {}
    reasons = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return {rid: (tokens[rid], reasons[rid]) for rid in tokens}


def assert_all_blocks_free(engine: LLMEngine) -> None:
    for pool in engine.kv_stats().values():
        assert pool["free_blocks"] == pool["total_blocks"]


@pytest.mark.parametrize("length", [3, 9, 21, 30])
def test_greedy_matches_no_cache_recompute(model, length):
    """Prompts shorter and longer than the window, prefilled over several 6-token chunks."""
    engine = make_engine(model)
    p = prompt(length, length)
    assert generate(engine, [p], GREEDY) == [mimo_greedy(model, p, GREEDY.max_tokens)]
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("num_full_blocks", [160, 20], ids=["ample_kv", "preempting_kv"])
def test_concurrent_requests_get_their_solo_outputs(model, preemptions, num_full_blocks):
    engine = make_engine(model, num_full_blocks=num_full_blocks, max_num_seqs=18, max_num_batched_tokens=48)
    lengths = [1, 5, 12, 30, 2, 17, 8, 25, 3, 11, 40, 6, 14, 9, 21, 4, 33, 7]
    requests = {f"r{i}": (prompt(n, i), SamplingParams(max_tokens=6 + i % 8, temperature=0.0))
                for i, n in enumerate(lengths)}
    tokens = {rid: [] for rid in requests}
    pending = list(requests)
    for rid in pending[:12]:
        engine.add_request(rid, *requests[rid])
    num_steps = most_running = 0
    while engine.has_unfinished():
        if num_steps in (1, 2, 3):  # later arrivals join a running batch
            for rid in pending[10 + 2 * num_steps:12 + 2 * num_steps]:
                engine.add_request(rid, *requests[rid])
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        most_running = max(most_running, len(engine.scheduler.running))
        num_steps += 1
    for rid, (p, params) in requests.items():
        assert tokens[rid] == mimo_greedy(model, p, params.max_tokens), rid
    assert (len(preemptions) > 0) == (num_full_blocks == 20)
    assert most_running >= (16 if num_full_blocks == 160 else 4)
    assert_all_blocks_free(engine)


def test_abort_mid_decode_frees_kv_at_once(model):
    engine = make_engine(model)
    kept, aborted = prompt(7, 1), prompt(13, 2)
    engine.add_request("kept", kept, GREEDY)
    engine.add_request("aborted", aborted, GREEDY)
    received = {"kept": [], "aborted": []}
    while len(received["aborted"]) < 3:  # both prompts done, "aborted" is decoding
        for out in engine.step():
            received[out.request_id] += out.new_token_ids
    free_before = engine.kv_stats()["full"]["free_blocks"]
    assert engine.abort("aborted")
    assert engine.kv_stats()["full"]["free_blocks"] == free_before + 4  # 13 + 3 tokens in 4-token blocks
    assert not engine.abort("aborted") and not engine.abort("never-added")
    outputs = run_to_completion(engine)
    assert outputs["aborted"] == ([], "cancelled")
    assert received["kept"] + outputs["kept"][0] == mimo_greedy(model, kept, GREEDY.max_tokens)
    assert_all_blocks_free(engine)


def test_abort_while_waiting(model):
    engine = make_engine(model, max_num_seqs=1)
    engine.add_request("running", prompt(4, 1), GREEDY)
    engine.add_request("waiting", prompt(4, 2), GREEDY)
    engine.step()
    assert engine.abort("waiting")
    outputs = run_to_completion(engine)
    assert outputs["waiting"] == ([], "cancelled") and outputs["running"][1] == "length"


def test_stop_conditions_and_finish_reasons(model):
    p = prompt(11, 3)
    reference = mimo_greedy(model, p, 8)
    # end_id: the first token (after the first) that did not occur before, so the stop is unambiguous
    k = next(i for i in range(1, 8) if reference[i] not in reference[:i])
    engine = make_engine(model)
    engine.add_request("end_id", p, SamplingParams(max_tokens=8, temperature=0.0, end_id=reference[k]))
    stops = [[VOCAB - 1, VOCAB - 2], reference[2:4]]
    engine.add_request("stop_seq", p, SamplingParams(max_tokens=8, temperature=0.0, stop_token_sequences=stops))
    engine.add_request("length", p, SamplingParams(max_tokens=5, temperature=0.0))
    outputs = run_to_completion(engine)
    assert outputs["end_id"] == (reference[:k], "stop")  # end_id itself is not reported
    stop_end = next(j for j in range(2, 5) if reference[j - 2:j] in stops)
    assert outputs["stop_seq"] == (reference[:stop_end], "stop")  # the stop sequence is reported
    assert outputs["length"] == (reference[:5], "length")
    assert_all_blocks_free(engine)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=1234)
    p = prompt(10, 4)
    solo = generate(make_engine(model), [p], seeded)[0]
    assert generate(make_engine(model, seed=99), [p], seeded)[0] == solo
    neighbours = [prompt(n, n) for n in (3, 20, 7, 15)]
    params = [SamplingParams(max_tokens=9, temperature=0.8), GREEDY,
              SamplingParams(max_tokens=12, temperature=1.0, seed=1234), SamplingParams(max_tokens=4, top_p=0.5)]
    batched = generate(make_engine(model, seed=7), neighbours + [p], params + [seeded])
    assert batched[-1] == solo
    other_seed = generate(make_engine(model), [p], SamplingParams(max_tokens=12, temperature=1.0, top_k=40,
                                                                   top_p=0.95, seed=4321))[0]
    assert other_seed != solo


def greedy_with_table(model, prompt_ids: list[int], table: torch.Tensor, n: int) -> list[int]:
    """No-cache greedy over a prompt whose ids >= vocab_size index `table`."""
    ids = list(prompt_ids)
    for _ in range(n):
        embeds = model.embed(torch.tensor(ids, device=DEVICE), table.to(DEVICE))
        hidden = model(torch.arange(len(ids), device=DEVICE), NoCacheAttention([len(ids)]), embeds)
        ids.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return ids[len(prompt_ids):]


def test_prompt_table_rows_feed_the_model(model):
    # 5 multimodal rows at positions 4..8, split over the 6-token chunk boundary
    p = prompt(4, 5) + [VOCAB + r for r in range(5)] + prompt(6, 6)
    tables = [torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    engine = make_engine(model)
    with_tables = generate(engine, [p, p, prompt(9, 7)], GREEDY, [tables[0], tables[1], None])
    assert with_tables[0] == greedy_with_table(model, p, tables[0], GREEDY.max_tokens)
    assert with_tables[1] == greedy_with_table(model, p, tables[1], GREEDY.max_tokens)
    assert with_tables[0] != with_tables[1]
    assert_all_blocks_free(engine)


@pytest.mark.parametrize(("request_id", "ids", "params", "table", "message"), [
    ("a", [], GREEDY, None, "prompt_ids is empty"),
    ("a", [1] * 60, GREEDY, None, "prompt length 60 \\+ max_tokens 10 = 70 exceeds max_model_len 64"),
    ("a", [1, -2], GREEDY, None, "prompt id -2 is negative"),
    ("a", [1, "x"], GREEDY, None, "prompt_ids must be a sequence of ints"),
    ("a", [1, VOCAB], GREEDY, None, "needs prompt_table row 0, but the request has no prompt_table"),
    ("a", [1, VOCAB + 2], GREEDY, torch.zeros(2, HIDDEN), "a prompt_table of 2 rows"),
    ("a", [1, VOCAB], GREEDY, torch.zeros(2, HIDDEN + 1), "prompt_table must be \\[P, 32\\] \\(hidden_size\\)"),
    ("a", [1], SamplingParams(end_id=VOCAB), None, "end_id 96 >= vocab_size 96"),
    ("a", [1], SamplingParams(stop_token_sequences=[[1, VOCAB]]), None, "stop_token_sequences hold ids >= vocab"),
    ("a", [1], {"max_tokens": 3}, None, "sampling must be a SamplingParams"),
    ("", [1], GREEDY, None, "request_id must be a non-empty str"),
    ("dup", [1], GREEDY, None, "request_id 'dup' is already in use"),
])
def test_invalid_requests_are_refused_before_allocating(model, request_id, ids, params, table, message):
    engine = make_engine(model)
    engine.add_request("dup", [1, 2], GREEDY)
    engine.step()
    stats = engine.kv_stats()
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(request_id, ids, params, table)
    assert engine.kv_stats() == stats
    assert set(run_to_completion(engine)) == {"dup"}


def test_generate_leaves_the_engine_idle_when_a_prompt_is_refused(model):
    engine = make_engine(model)
    with pytest.raises(InvalidRequestError, match="request 'generate-1': prompt_ids is empty"):
        generate(engine, [[1, 2], [], [3]], GREEDY)
    assert not engine.has_unfinished()
    assert_all_blocks_free(engine)


def test_requests_from_other_threads_while_a_loop_thread_steps(model):
    engine = make_engine(model)
    requests = {f"t{i}": prompt(3 + 4 * i, 10 + i) for i in range(8)}
    tokens = {rid: [] for rid in requests}
    done = threading.Event()

    def loop():
        finished = 0
        while finished < len(requests):
            if engine.wait_for_work(timeout=5.0):
                for out in engine.step():
                    tokens[out.request_id] += out.new_token_ids
                    finished += out.finished
        done.set()

    def submit(ids):
        for rid in ids:
            engine.add_request(rid, requests[rid], GREEDY)

    loop_thread = threading.Thread(target=loop)
    loop_thread.start()
    submitters = [threading.Thread(target=submit, args=(list(requests)[i::4],)) for i in range(4)]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join()
    assert done.wait(timeout=120)
    loop_thread.join()
    for rid, p in requests.items():
        assert tokens[rid] == mimo_greedy(model, p, GREEDY.max_tokens), rid
    assert not engine.wait_for_work(timeout=0.01)
    assert_all_blocks_free(engine)


def test_failed_step_finishes_its_requests_with_an_error(model, monkeypatch):
    engine = make_engine(model)
    engine.add_request("a", prompt(5, 1), GREEDY)
    engine.add_request("b", prompt(9, 2), GREEDY)

    def broken(hidden):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(engine.runner.model, "compute_logits", broken)
    outputs = engine.step()
    assert {(o.request_id, o.finish_reason, o.error) for o in outputs} == {
        ("a", "error", "RuntimeError: device fell over"), ("b", "error", "RuntimeError: device fell over")}
    assert not engine.has_unfinished()
    assert_all_blocks_free(engine)
    monkeypatch.undo()
    assert generate(engine, [prompt(5, 1)], GREEDY) == [mimo_greedy(model, prompt(5, 1), GREEDY.max_tokens)]


def test_config_sizes_pools_from_a_memory_budget(model):
    block_size, window, chunk, max_num_seqs = 4, 8, 6, 6
    # per block: full layers 0, 3 (1 kv head, 12 + 8 dims); sliding layers 1, 2 (2 kv heads, 12 + 8 dims); fp32
    full_block = 2 * block_size * 1 * 20 * 4
    sliding_block = 2 * block_size * 2 * 20 * 4
    ring = -(-(window + chunk) // block_size)
    budget = max_num_seqs * ring * sliding_block + 50 * full_block + 7
    engine = make_engine(model, num_full_blocks=None, kv_cache_memory_bytes=budget)
    assert engine.kv_stats() == {"full": {"free_blocks": 50, "total_blocks": 50},
                                 "sliding": {"free_blocks": max_num_seqs * ring,
                                             "total_blocks": max_num_seqs * ring}}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"num_full_blocks": None}, "exactly one of num_full_blocks and kv_cache_memory_bytes"),
    ({"kv_cache_memory_bytes": 10**6}, "exactly one of num_full_blocks and kv_cache_memory_bytes"),
    ({"num_full_blocks": 15}, "15 full-attention blocks, below the 16 one max_model_len=64 sequence needs"),
    ({"num_sliding_blocks": 3}, "num_sliding_blocks=3 is below one sequence's ring of 4 blocks"),
    ({"max_prefill_chunk": 17}, "max_prefill_chunk=17 exceeds max_num_batched_tokens=16"),
    ({"block_size": 0}, "EngineConfig.block_size must be a positive int"),
    ({"dtype": torch.bfloat16}, "EngineConfig.dtype=torch.bfloat16 but the model is torch.float32"),
    ({"device": "meta"}, "EngineConfig.device=meta but the model is on"),
])
def test_bad_engine_config(model, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_engine(model, **overrides)


def test_config_device_may_omit_the_index(model):
    """"cuda" names the model's "cuda:0" (the serving side passes either)."""
    assert make_engine(model, device=DEVICE.type).device == model.lm_head.weight.device
