"""mimo_llm's Triton-free core: request conversion and the generation loop over a real tiny engine."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hf_reference import randomize_weights, tiny_hub_config
from mimo.config import MiMoV2Config
from mimo.engine import EngineConfig, InvalidRequestError, LLMEngine, SamplingParams, generate
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.serving.detokenize import DETOKENIZATION_WINDOW
from mimo.serving.lifecycle import SHUTTING_DOWN
from mimo.serving.llm import (IDLE_WAKE_S, GenerationLoop, LLMRequest, LLMResponse, ServerShuttingDown,
                              convert_llm_request, parse_stop_words, speculative_rates, stop_target)  # fmt: skip


def tensors(**values) -> dict[str, torch.Tensor]:
    """Request tensors as Triton delivers them: a leading batch dimension of 1."""
    return {name: torch.tensor([value]) for name, value in values.items()}


def test_converts_tensorrt_llm_inputs():
    request = convert_llm_request(tensors(
        input_ids=[5, 6, 7, 0], input_lengths=3, request_output_len=4, end_id=9, pad_id=0, runtime_top_k=3,
        runtime_top_p=0.5, temperature=0.75, random_seed=11, streaming=True,
        stop_words_list=[[1, 2, 3, -1], [2, 3, -1, -1]],
    ))  # fmt: skip
    assert request.prompt_ids == [5, 6, 7]
    assert request.streaming and request.prompt_table is None
    assert request.sampling == SamplingParams(
        max_tokens=4, temperature=0.75, top_k=3, top_p=0.5, seed=11, end_id=9,
        stop_token_sequences=((1, 2), (3,)),
    )  # fmt: skip


def test_speculative_decoding_opt_out_and_rates():
    assert convert_llm_request(tensors(input_ids=[1], request_output_len=2)).sampling.speculative
    opted_out = convert_llm_request(tensors(input_ids=[1], request_output_len=2, speculative_decoding=[False]))
    assert not opted_out.sampling.speculative
    assert speculative_rates({"verifications": 0, "draft_tokens": 0, "accepted_tokens": 0}) == {
        "acceptance_rate": 0.0, "accept_length": 0.0}
    assert speculative_rates({"verifications": 4, "draft_tokens": 8, "accepted_tokens": 6}) == {
        "acceptance_rate": 0.75, "accept_length": 2.5}


def test_defaults_and_prompt_table_rows():
    table = torch.randn(1, 5, 8)
    request = convert_llm_request({**tensors(input_ids=[1, 2], request_output_len=2, prompt_vocab_size=3),
                                   "prompt_embedding_table": table})  # fmt: skip
    assert request.sampling == SamplingParams(max_tokens=2) and not request.streaming
    assert torch.equal(request.prompt_table, table[0, :3])
    empty = convert_llm_request({**tensors(input_ids=[1], request_output_len=1, prompt_vocab_size=0),
                                 "prompt_embedding_table": torch.zeros(1, 0, 8)})  # fmt: skip
    assert empty.prompt_table is None


@pytest.mark.parametrize(
    "inputs, message",
    [
        (tensors(input_ids=[1]), "missing required input 'request_output_len'"),
        (tensors(input_ids=[1], request_output_len=0), "request_output_len must be an int >= 1"),
        (tensors(input_ids=[1], request_output_len=2, temperature=float("nan")), "'temperature' must be a finite"),
        (tensors(input_ids=[1], request_output_len=2, runtime_top_p=0.0), "runtime_top_p must be a number in"),
        (tensors(input_ids=[1, 2], input_lengths=3, request_output_len=2), "input_lengths 3 must be in [1, 2]"),
        (tensors(input_ids=[1], request_output_len=2, prompt_vocab_size=2), "needs a prompt_embedding_table"),
    ],
)
def test_bad_inputs_name_the_tensor(inputs, message):
    with pytest.raises(InvalidRequestError) as error:
        convert_llm_request(inputs)
    assert message in str(error.value)


def test_stop_words_offsets_must_be_increasing():
    with pytest.raises(InvalidRequestError, match="end offset"):
        parse_stop_words(torch.tensor([[[1, 2], [2, 1]]]))


@pytest.fixture(scope="module")
def model():
    model = MiMoV2ForCausalLM(MiMoV2Config.from_hf_config(tiny_hub_config())).eval()
    randomize_weights(model, seed=0)
    return model


@pytest.fixture
def engine(model):
    return LLMEngine(model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=32, block_size=4, max_model_len=64,
                                         num_full_blocks=64))  # fmt: skip


class ListSink:
    def __init__(self, cancel_after: int | None = None, fail_sends: bool = False):
        self.responses: list[LLMResponse] = []
        self.errors: list[tuple[str, str]] = []  # (message, code)
        self.done = threading.Event()
        self.cancel_after = cancel_after
        self.fail_sends = fail_sends

    def send(self, response, final):
        if self.fail_sends:
            self.done.set()
            raise ConnectionError("client gone")
        self.responses.append(response)
        if final:
            self.done.set()

    def send_error(self, message, code="internal"):
        self.errors.append((message, code))
        self.done.set()

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.responses) >= self.cancel_after


def wait_all_free(engine: LLMEngine, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.kv_stats()
        if all(pool["free_blocks"] == pool["total_blocks"] for pool in stats.values()):
            return stats
        time.sleep(0.01)
    raise AssertionError(f"KV blocks still held: {engine.kv_stats()}")


@pytest.fixture
def loop(engine):
    loop = GenerationLoop(engine, cancellation_check_period_s=0.0)
    loop.start()
    yield loop
    loop.shutdown()


PROMPTS = [[3, 17, 42, 8, 9], [11, 12], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]


def test_streamed_and_whole_responses_equal_offline_greedy(model, loop):
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    offline_engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=32, block_size=4,
                                                   max_model_len=64, num_full_blocks=64))  # fmt: skip
    expected = generate(offline_engine, PROMPTS, greedy)
    sinks = [ListSink() for _ in PROMPTS] + [ListSink() for _ in PROMPTS]
    for i, sink in enumerate(sinks):
        loop.submit(LLMRequest(PROMPTS[i % 3], greedy, None, streaming=i < 3), sink)
    for sink in sinks:
        assert sink.done.wait(60)
    for i, sink in enumerate(sinks[:3]):
        streamed = [t for r in sink.responses for t in r.output_ids]
        assert streamed == expected[i]
        assert len(sink.responses) > 1 and sink.responses[-1].finish_reason == "length"
        assert all(r.finish_reason == "" for r in sink.responses[:-1])
        for response in sink.responses:
            done = response.sequence_length - len(response.output_ids)
            assert response.preceding_ids == streamed[max(0, done - DETOKENIZATION_WINDOW) : done]
    for i, sink in enumerate(sinks[3:]):
        assert [r.output_ids for r in sink.responses] == [expected[i]]
        assert sink.responses[0].preceding_ids == [] and sink.responses[0].sequence_length == 12
    wait_all_free(loop.engine)


class SlowSink(ListSink):
    """A client whose every send takes `delay_s` (a loaded Triton process), recording the threads that call it."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s = delay_s
        self.threads: set[str] = set()

    def send(self, response, final):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        super().send(response, final)

    def is_cancelled(self):
        self.threads.add(threading.current_thread().name)
        return False


def test_tokens_that_wait_for_a_busy_sender_go_out_together_in_order(model, loop):
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    offline_engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=32, block_size=4,
                                                   max_model_len=64, num_full_blocks=64))  # fmt: skip
    expected = generate(offline_engine, [PROMPTS[0]], greedy)[0]
    sink = SlowSink(delay_s=0.2)
    loop.submit(LLMRequest(PROMPTS[0], greedy, None, streaming=True), sink)
    assert sink.done.wait(60)
    streamed = [t for r in sink.responses for t in r.output_ids]
    assert streamed == expected
    # the engine stepped on while a send took 0.2 s: a later response carried every token since (how many the
    # first one carries depends on how far the engine got before the sender took it: on 2 CI cores, often 2)
    assert len(sink.responses) < len(expected) and max(len(r.output_ids) for r in sink.responses) > 1
    for response in sink.responses:
        done = response.sequence_length - len(response.output_ids)
        assert response.preceding_ids == streamed[max(0, done - DETOKENIZATION_WINDOW) : done]
    assert [r.finish_reason for r in sink.responses] == [""] * (len(sink.responses) - 1) + ["length"]
    assert sink.threads == {"mimo-response-sender"}  # the stepping thread never calls the client
    wait_all_free(loop.engine)


def test_an_idle_loop_waits_for_work_instead_of_spinning(engine, monkeypatch):
    """With a cancellation period of 0 (check at every send) the stepping thread still sleeps while idle: it
    looks for work at most every IDLE_WAKE_S, and a request wakes it at once."""
    waits = []
    wait_for_work = engine.wait_for_work
    monkeypatch.setattr(engine, "wait_for_work", lambda timeout=None: waits.append(timeout) or wait_for_work(timeout))
    loop = GenerationLoop(engine, cancellation_check_period_s=0.0)
    loop.start()
    try:
        time.sleep(0.5)
        idle_waits = len(waits)
        sink = ListSink()
        loop.submit(LLMRequest(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0), None, False), sink)
        assert sink.done.wait(60) and len(sink.responses[0].output_ids) == 3
    finally:
        loop.shutdown()
    assert set(waits) == {IDLE_WAKE_S}
    assert idle_waits <= 0.5 / IDLE_WAKE_S + 2, f"{idle_waits} waits in 0.5 s idle: the stepping thread spins"


def test_metrics_are_published_once_per_period_while_stepping_and_not_when_idle(engine):
    publishes: list[tuple[float, str, int]] = []  # (when, thread, blocks free then)
    loop = GenerationLoop(engine, cancellation_check_period_s=0.05, publish_metrics=lambda: publishes.append(
        (time.monotonic(), threading.current_thread().name, engine.kv_stats()["full"]["free_blocks"])))
    loop.start()
    try:
        sink = ListSink()
        loop.submit(LLMRequest(PROMPTS[0], SamplingParams(max_tokens=30, temperature=0.0), None, True), sink)
        assert sink.done.wait(60)
        time.sleep(0.3)  # a few periods: the state after the last step is published
        idle = len(publishes)
        time.sleep(0.3)
    finally:
        loop.shutdown()
    assert len(publishes) == idle, "nothing steps: nothing to publish"
    assert publishes[-1][2] == engine.kv_stats()["full"]["total_blocks"]  # the last one saw every block free
    gaps = [b[0] - a[0] for a, b in zip(publishes, publishes[1:])]
    assert all(gap >= 0.04 for gap in gaps) and {thread for _, thread, _ in publishes} == {"mimo-response-sender"}


def test_cancelled_request_frees_its_kv_at_once(loop):
    sink = ListSink(cancel_after=1)
    loop.submit(LLMRequest(PROMPTS[0], SamplingParams(max_tokens=40, temperature=0.0), None, True), sink)
    assert sink.done.wait(60)
    assert sink.errors == [("request cancelled", "cancelled")]
    wait_all_free(loop.engine)
    assert loop.num_active() == 0


def test_stop_by_client_request_id_frees_its_kv(loop):
    sink, other = ListSink(), ListSink()
    loop.submit(LLMRequest(PROMPTS[0], SamplingParams(max_tokens=40, temperature=0.0), None, True), sink, "client-a")
    loop.submit(LLMRequest(PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0), None, True), other, "client-b")
    assert loop.abort_client_request("client-a") is True
    # TensorRT-LLM's stop: a final response with the tokens so far, not an error
    assert sink.done.wait(60) and sink.errors == [] and sink.responses[-1].finish_reason == "cancelled"
    assert other.done.wait(60) and other.responses[-1].finish_reason == "length"
    assert loop.abort_client_request("client-a") is False
    with pytest.raises(InvalidRequestError, match="needs the request id"):
        loop.abort_client_request("")
    wait_all_free(loop.engine)


def test_a_stop_names_its_target_by_its_own_id_or_a_parameter():
    assert stop_target("abc", "{}") == "abc" and stop_target("abc", "") == "abc"
    assert stop_target("own-id", '{"stop_request_id": "target"}') == "target"
    with pytest.raises(InvalidRequestError, match="'stop_request_id' must be a string"):
        stop_target("x", '{"stop_request_id": 5}')


def test_an_id_already_in_flight_is_refused(loop):
    first, again = ListSink(), ListSink()
    long = SamplingParams(max_tokens=40, temperature=0.0)
    loop.submit(LLMRequest(PROMPTS[0], long, None, True), first, "same-id")
    with pytest.raises(InvalidRequestError, match="request id 'same-id' is already in flight"):
        loop.submit(LLMRequest(PROMPTS[1], long, None, True), again, "same-id")
    assert loop.num_active() == 1  # the refused one holds nothing
    assert loop.abort_client_request("same-id") is True
    assert first.done.wait(60) and first.responses[-1].finish_reason == "cancelled"
    loop.submit(LLMRequest(PROMPTS[1], SamplingParams(max_tokens=2, temperature=0.0), None, True), again, "same-id")
    assert again.done.wait(60) and again.responses[-1].finish_reason == "length"  # free again once it ended
    wait_all_free(loop.engine)


def test_client_gone_aborts_the_request(loop):
    sink = ListSink(fail_sends=True)
    loop.submit(LLMRequest(PROMPTS[1], SamplingParams(max_tokens=40, temperature=0.0), None, True), sink)
    assert sink.done.wait(60)
    wait_all_free(loop.engine)


def test_refused_request_queues_nothing(loop):
    with pytest.raises(InvalidRequestError, match="exceeds max_model_len 64"):
        loop.submit(LLMRequest(PROMPTS[0], SamplingParams(max_tokens=100), None, True), ListSink())
    assert loop.num_active() == 0


def test_stop_ends_unfinished_requests_with_an_error(engine):
    loop = GenerationLoop(engine, cancellation_check_period_s=0.1)
    sink = ListSink()
    loop.submit(LLMRequest(PROMPTS[0], SamplingParams(max_tokens=40), None, True), sink)
    loop.shutdown()  # never started: the request is still queued
    assert sink.errors == [(SHUTTING_DOWN, "unavailable")]
    wait_all_free(engine)


def test_drain_ends_every_request_and_refuses_new_ones(loop, monkeypatch, tmp_path):
    drain_file = tmp_path / "draining"
    monkeypatch.setenv("MIMO_DRAIN_FILE", str(drain_file))
    sinks = [ListSink() for _ in range(4)]
    for i, sink in enumerate(sinks):
        loop.submit(LLMRequest(PROMPTS[i % 3], SamplingParams(max_tokens=40, temperature=0.0), None, i % 2 == 0), sink)
    drain_file.touch()
    for sink in sinks:
        assert sink.done.wait(60)
        assert sink.errors == [(SHUTTING_DOWN, "unavailable")]
        assert all(r.finish_reason == "" for r in sink.responses)  # no final token response besides the error
    with pytest.raises(ServerShuttingDown, match=SHUTTING_DOWN):
        loop.submit(LLMRequest(PROMPTS[0], SamplingParams(max_tokens=4), None, True), ListSink())
    assert loop.num_active() == 0
    wait_all_free(loop.engine)
