"""Overlapped steps (`EngineConfig.overlap_steps`): the host launches step N+1, fed by step N's tokens on the device,
before it reads them. On the CPU every op runs at once, so these tests check what overlap must keep: each request's
tokens and finish reason equal those of the engine without overlap (greedy and seeded sampling), whatever joins,
leaves, stops early or is preempted meanwhile, and every KV block comes back. The GPU tests check the same with
CUDA graphs replaying the fed steps (tests/test_cuda_graphs_gpu.py)."""

import pytest
import torch
from hf_reference import mimo_greedy, random_tiny_model

from mimo.engine import EngineConfig, LLMEngine, SamplingParams
from mimo.models.language_model import MiMoV2ForCausalLM

VOCAB = 96
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model() -> MiMoV2ForCausalLM:
    return random_tiny_model(DEVICE)


@pytest.fixture(scope="module")
def mtp_model() -> MiMoV2ForCausalLM:
    return random_tiny_model(DEVICE, num_nextn_predict_layers=2)


def make_engine(model, overlap: int | None, **overrides) -> LLMEngine:
    config = dict(max_num_seqs=4, max_num_batched_tokens=16, max_prefill_chunk=6, block_size=4, max_model_len=64,
                  num_full_blocks=96, seed=0, overlap_steps=overlap, cuda_graphs=0)
    return LLMEngine(model, EngineConfig(**config | overrides))


def prompt(length: int, salt: int) -> list[int]:
    return [(salt * 31 + 7 * i + 3) % VOCAB for i in range(length)]


def fed_steps(engine: LLMEngine) -> list[int]:
    """Counts the steps the runner prepares from the previous step's device tokens (batch size of each)."""
    counted, prepare = [], engine.runner.prepare

    def counting(chunks, allow_graph=True, fed=None):
        if fed is not None:
            counted.append(len(chunks))
        return prepare(chunks, allow_graph, fed)

    engine.runner.prepare = counting
    return counted


def drive(engine: LLMEngine, requests: dict, late: dict, abort_after: dict[str, int]):
    """Adds `requests`, steps, adds each of `late` once the first request has that many tokens, aborts each of
    `abort_after` once it has received that many: (tokens and finish reason per request, steps)."""
    tokens = {request_id: [] for request_id in (*requests, *late)}
    reasons = {}
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, ids, params)
    first = next(iter(requests))
    pending = dict(late)
    steps = 0
    while engine.has_unfinished() or pending:
        for request_id, (after, ids, params) in list(pending.items()):
            if len(tokens[first]) >= after or not engine.has_unfinished():
                engine.add_request(request_id, ids, params)
                del pending[request_id]
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
            if output.finished:
                reasons[output.request_id] = output.finish_reason
        steps += 1
        for request_id, count in abort_after.items():
            if request_id not in reasons and len(tokens[request_id]) >= count:
                engine.abort(request_id)
    return {request_id: (tokens[request_id], reasons[request_id]) for request_id in tokens}, steps


def mixed_requests(model):
    """Greedy, seeded and stopping requests of different lengths; one joins late, one is aborted."""
    reference = mimo_greedy(model, prompt(9, 2), 12)
    k = next(i for i in range(3, 12) if reference[i] not in reference[:i])  # a clean end_id stop at token k
    requests = {
        "greedy": (prompt(5, 1), SamplingParams(max_tokens=20, temperature=0.0)),
        "end_id": (prompt(9, 2), SamplingParams(max_tokens=12, temperature=0.0, end_id=reference[k])),
        "stop": (prompt(9, 2), SamplingParams(max_tokens=12, temperature=0.0,
                                              stop_token_sequences=[reference[4:6]])),
        "seeded": (prompt(14, 3), SamplingParams(max_tokens=15, temperature=0.9, top_k=20, seed=7)),
    }
    late = {"late": (6, prompt(11, 4), SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=3)),
            "aborted": (2, prompt(7, 5), SamplingParams(max_tokens=30, temperature=0.0))}
    return requests, late, {"aborted": 4}, reference, k


@pytest.mark.parametrize("num_full_blocks", [96, 14], ids=["roomy", "preempting"])
def test_overlapped_steps_give_every_request_the_tokens_of_steps_in_turn(model, num_full_blocks, preemptions):
    requests, late, abort_after, reference, k = mixed_requests(model)
    sizes = dict(num_full_blocks=num_full_blocks, max_model_len=40)  # 14 blocks of 4: fewer than 5 requests need
    plain = make_engine(model, 0, **sizes)
    expected, plain_steps = drive(plain, requests, late, abort_after)
    preempted_plain = len(preemptions)
    overlapped = make_engine(model, 1, **sizes)
    assert overlapped.overlap and not plain.overlap
    fed = fed_steps(overlapped)
    got, _ = drive(overlapped, requests, late, abort_after)
    aborted_expected, aborted_got = expected.pop("aborted"), got.pop("aborted")
    assert got == expected
    assert expected["end_id"] == (reference[:k], "stop")  # what the step after the stop computed is dropped
    assert expected["greedy"][0] == mimo_greedy(model, prompt(5, 1), 20)
    # an abort lands a step later or earlier: what arrived is the request's own token stream, then "cancelled"
    solo = mimo_greedy(model, prompt(7, 5), 30)
    for tokens, reason in (aborted_expected, aborted_got):
        assert reason == "cancelled" and len(tokens) >= 4 and tokens == solo[:len(tokens)]
    if num_full_blocks == 96:
        assert len(fed) > plain_steps // 3  # most decode steps were launched ahead of the tokens they follow
    else:  # requests wait for blocks most of the run, and those steps are scheduled in turn
        assert fed and preempted_plain and len(preemptions) > preempted_plain  # both engines preempted
    for pool in overlapped.kv_stats().values():
        assert pool["free_blocks"] == pool["total_blocks"]
    assert not overlapped.has_unfinished()


@pytest.mark.parametrize("overlap", [0, 1])
def test_admitting_every_few_steps_gives_every_request_the_same_tokens(model, overlap):
    """`admission_interval`: late requests join a running batch only every 3rd step, in turn and overlapped (where
    a step held back is a fed continuation); each request's tokens are those of admitting at every step."""
    requests, late, abort_after, _, _ = mixed_requests(model)
    del late["aborted"], abort_after["aborted"]  # when an abort lands depends on the steps, not on admission
    expected, _ = drive(make_engine(model, 0), requests, late, abort_after)
    engine = make_engine(model, overlap, admission_interval=3)
    admitting, prepare = [], engine.runner.prepare

    def counting(chunks, allow_graph=True, fed=None):  # every step, fed or scheduled
        admitting.append(any(chunk.start == 0 for chunk in chunks))
        return prepare(chunks, allow_graph, fed)

    engine.runner.prepare = counting
    got, _ = drive(engine, requests, late, abort_after)
    assert got == expected
    # the token budget admits three of the first four requests, the turn goes on with the fourth at the next
    # step, and "late" waits for a later turn
    steps = [i for i, admitted in enumerate(admitting) if admitted]
    turns = [i for i in steps if i - 1 not in steps]
    assert steps[:2] == [0, 1] and len(turns) >= 2, admitting
    assert all(later - earlier >= 3 for earlier, later in zip(turns, turns[1:])), admitting
    for pool in engine.kv_stats().values():
        assert pool["free_blocks"] == pool["total_blocks"]


def test_a_step_that_fails_ahead_fails_its_requests_and_the_engine_goes_on(model, monkeypatch):
    engine = make_engine(model, 1)
    fed = fed_steps(engine)
    engine.add_request("a", prompt(5, 1), SamplingParams(max_tokens=8, temperature=0.0))
    outputs = []
    while not fed:  # until a step has been launched fed by the one ahead of it
        outputs += engine.step()
    runner = engine.runner

    def broken(step):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(runner, "complete", broken)
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason, o.error) for o in outputs] == [
        ("a", "error", "RuntimeError: device fell over")]
    monkeypatch.undo()
    assert not engine.has_unfinished() and engine.step() == []
    for pool in engine.kv_stats().values():
        assert pool["free_blocks"] == pool["total_blocks"]
    engine.add_request("b", prompt(5, 1), SamplingParams(max_tokens=8, temperature=0.0))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == mimo_greedy(model, prompt(5, 1), 8)


def test_overlap_defaults_to_cuda_engines(model):
    assert make_engine(model, None).overlap is (DEVICE.type == "cuda")
    assert make_engine(model, 1).overlap and not make_engine(model, 0).overlap
    with pytest.raises(ValueError, match="overlap_steps must be none, 0 or 1"):
        EngineConfig(num_full_blocks=8, overlap_steps=2)


def test_overlap_is_off_with_mtp_and_refused_when_asked_for(mtp_model):
    assert not make_engine(mtp_model, None, num_speculative_tokens=2).overlap
    with pytest.raises(ValueError, match="overlap_steps=1 cannot run with num_speculative_tokens"):
        make_engine(mtp_model, 1, num_speculative_tokens=2)
