"""mimo.serving.entry without Triton: range checks, and the request lifecycle over steps run in this process."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from mimo.processing.items import PACKED_MEDIA_TENSORS
from mimo.serving import lifecycle
from mimo.serving.detokenize import IncrementalDetokenizer
from mimo.serving.entry import CANCELLED, INVALID_ARG, UNAVAILABLE, Entry, EntryError, check_client_inputs

PERIOD_S = 0.01


def client_inputs(**overrides) -> dict[str, np.ndarray]:
    inputs = {"text_input": np.array([[b"Hi"]], dtype=np.object_), "max_tokens": np.array([[4]], dtype=np.int64)}
    inputs.update(overrides)
    return inputs


@pytest.mark.parametrize(
    "name, array, message",
    [
        ("max_tokens", np.array([[2**32 + 4]], np.int64), "max_tokens must be an integer in [1, 2147483647], got 4294967300"),
        ("max_tokens", np.array([[0]], np.int64), "max_tokens must be an integer in [1, 2147483647], got 0"),
        ("max_tokens", np.array([[3, 4]], np.int64), "max_tokens must hold exactly one value, got 2"),
        ("top_k", np.array([[-1]], np.int64), "top_k must be an integer in [0, 2147483647], got -1"),
        ("random_seed", np.array([[2**63]], np.uint64), "random_seed must be an integer in [0, 9223372036854775807]"),
        ("temperature", np.array([[np.nan]], np.float32), "temperature must be a finite number in [0, 3.40282e+38]"),
        ("top_p", np.array([[1.5]], np.float32), "top_p must be a finite number in (0, 1], got 1.5"),
        ("top_p", np.array([[np.inf]], np.float32), "top_p must be a finite number in (0, 1], got inf"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_are_refused_naming_the_field(name, array, message):
    with pytest.raises(EntryError) as error:
        check_client_inputs(client_inputs(**{name: array}))
    assert str(error.value).startswith(message) and error.value.code == INVALID_ARG


def test_limits_themselves_are_accepted_and_required_inputs_checked():
    check_client_inputs(client_inputs(max_tokens=np.array([[2**31 - 1]], np.int64),
                                      top_k=np.array([[0]], np.int64), top_p=np.array([[1.0]], np.float32),
                                      random_seed=np.array([[2**63 - 1]], np.uint64),
                                      temperature=np.array([[0.0]], np.float32)))  # fmt: skip
    with pytest.raises(EntryError, match="missing required input 'max_tokens'"):
        check_client_inputs({"text_input": np.array([[b"Hi"]], dtype=np.object_)})


class Client:
    def __init__(self):
        self.responses, self.errors, self.cancelled, self.done = [], [], False, threading.Event()
        self.cancel_checks_after_final = 0

    def is_cancelled(self):
        if self.done.is_set():
            self.cancel_checks_after_final += 1  # Triton would crash here
        return self.cancelled

    def send(self, outputs, final):
        self.responses.append(outputs)
        if final:
            self.done.set()

    def send_error(self, error):
        self.errors.append((str(error), error.code))
        self.done.set()

    def wait_streaming(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.responses:
            assert time.monotonic() < deadline, "no response"
            time.sleep(0.005)


class Steps:
    """preprocessing / mimo_encoder answer at once unless `hold` is set; mimo_llm streams one token per 10 ms until
    it has sent `tokens` or is stopped (then, as mimo_llm does, with a final response, finish_reason "cancelled")."""

    def __init__(self, tokens: int = 1000, media_items: int | None = None):
        self.tokens, self.hold, self.released = tokens, None, threading.Event()
        self.calls, self.stopped, self.llm_inputs = [], set(), None
        self.media_items = media_items  # None: preprocessing answers without the packed media tensors

    def infer(self, model, inputs):
        self.calls.append(model)
        if self.hold == model:
            self.released.wait(10)
        if model == "preprocessing":
            packed = {} if self.media_items is None else {name: np.zeros((self.media_items,) * rank, dtype)
                                                          for name, (dtype, rank) in PACKED_MEDIA_TENSORS.items()}
            return {"input_ids": "ids", "input_lengths": "n", "end_id": "e", "pad_id": "p", "stop_words_list": "s",
                    **packed}  # fmt: skip
        return {"prompt_embedding_table": "table", "prompt_vocab_size": "rows"}

    def is_empty(self, value):
        return np.asarray(value).size == 0

    def stream(self, model, inputs, request_id):
        self.calls.append(model)
        self.llm_inputs, self.llm_id = inputs, request_id
        for index in range(self.tokens):
            stopped = request_id in self.stopped
            reason = b"cancelled" if stopped else b"length" if index == self.tokens - 1 else b""
            yield {"output_ids": np.array([[[100 + index]]], np.int32), "preceding_ids": np.zeros((1, 1, 0), np.int32),
                   "finish_reason": np.array([[reason]], dtype=np.object_)}  # fmt: skip
            if stopped:
                return
            time.sleep(0.01)

    def stop(self, model, request_id):
        assert model == "mimo_llm"
        self.stopped.add(request_id)


@pytest.fixture(scope="module")
def detokenizer(tiny_checkpoint):
    return IncrementalDetokenizer(Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")))


def started(steps, detokenizer, counts=None):
    return Entry(steps, detokenizer, PERIOD_S, workers=4, on_in_flight=None if counts is None else counts.append).start()


def test_a_request_streams_through_the_steps_with_its_own_llm_id(detokenizer):
    steps, client, counts = Steps(tokens=3), Client(), []
    entry = started(steps, detokenizer, counts)
    entry.submit(client, client_inputs(top_k=np.array([[5]], np.int64)))
    assert client.done.wait(10) and client.errors == []
    assert [r["output_ids"].tolist() for r in client.responses] == [[[100]], [[101]], [[102]]]
    assert client.responses[-1]["finish_reason"].item() == b"length"
    assert steps.calls == ["preprocessing", "mimo_encoder", "mimo_llm"]
    assert len(steps.llm_id) == 32 and int(steps.llm_id, 16) >= 0  # uuid4 hex, never a client's id
    # range-checked client integers are narrowed to the INT32 step inputs; step outputs passed on as they came
    assert steps.llm_inputs["request_output_len"].dtype == np.int32 and steps.llm_inputs["runtime_top_k"] == 5
    assert steps.llm_inputs["prompt_embedding_table"] == "table" and steps.llm_inputs["input_ids"] == "ids"
    entry.shutdown()
    assert counts[0] == 1 and counts[-1] == 0 and client.cancel_checks_after_final == 0


@pytest.mark.parametrize("items", [0, 2])
def test_mimo_encoder_runs_only_for_requests_with_media(detokenizer, items):
    steps, client = Steps(tokens=2, media_items=items), Client()
    entry = started(steps, detokenizer)
    entry.submit(client, client_inputs())
    assert client.done.wait(10) and client.errors == []
    if items:
        assert steps.calls == ["preprocessing", "mimo_encoder", "mimo_llm"]
        assert steps.llm_inputs["prompt_embedding_table"] == "table"
    else:  # nothing to encode: no round trip, and mimo_llm gets no table
        assert steps.calls == ["preprocessing", "mimo_llm"]
        assert "prompt_embedding_table" not in steps.llm_inputs and "prompt_vocab_size" not in steps.llm_inputs
    entry.shutdown()


def test_a_client_that_leaves_mid_stream_has_its_generation_stopped(detokenizer):
    steps, client = Steps(), Client()
    entry = started(steps, detokenizer)
    entry.submit(client, client_inputs())
    client.wait_streaming()
    client.cancelled = True
    assert client.done.wait(10)
    assert steps.stopped == {steps.llm_id}
    assert client.errors == [("request cancelled: the client left", CANCELLED)]
    assert len(client.responses) < 100 and entry.num_in_flight() == 0
    time.sleep(5 * PERIOD_S)
    assert client.cancel_checks_after_final == 0
    entry.shutdown()


@pytest.mark.parametrize("stage", ["preprocessing", "mimo_encoder"])
def test_a_client_that_leaves_before_the_llm_ends_there(detokenizer, stage):
    steps, client = Steps(), Client()
    steps.hold = stage
    entry = started(steps, detokenizer)
    entry.submit(client, client_inputs())
    client.cancelled = True
    time.sleep(5 * PERIOD_S)  # the watcher notices while the step runs
    steps.released.set()
    assert client.done.wait(10)
    assert "mimo_llm" not in steps.calls and steps.stopped == set()
    assert client.errors == [("request cancelled: the client left", CANCELLED)]
    assert entry.num_in_flight() == 0
    entry.shutdown()


def test_bad_inputs_are_answered_at_once_and_nothing_runs(detokenizer):
    steps, client = Steps(), Client()
    entry = started(steps, detokenizer)
    entry.submit(client, client_inputs(max_tokens=np.array([[-3]], np.int64)))
    assert client.errors == [("max_tokens must be an integer in [1, 2147483647], got -3", INVALID_ARG)]
    assert steps.calls == [] and entry.num_in_flight() == 0
    entry.shutdown()


def test_a_failed_step_ends_the_request_with_its_error(detokenizer):
    class Failing(Steps):
        def infer(self, model, inputs):
            raise EntryError("text_input is empty", INVALID_ARG)

    client = Client()
    entry = started(Failing(), detokenizer)
    entry.submit(client, client_inputs())
    assert client.done.wait(10) and client.errors == [("text_input is empty", INVALID_ARG)]
    entry.shutdown()


def test_draining_refuses_new_requests_and_ends_open_streams(detokenizer, tmp_path, monkeypatch):
    drain_file = tmp_path / "drain"
    monkeypatch.setenv("MIMO_DRAIN_FILE", str(drain_file))
    steps, open_client, late = Steps(), Client(), Client()
    entry = started(steps, detokenizer)
    entry.submit(open_client, client_inputs())
    open_client.wait_streaming()
    drain_file.touch()
    assert lifecycle.draining()
    assert open_client.done.wait(10)
    assert open_client.errors == [(lifecycle.SHUTTING_DOWN, UNAVAILABLE)] and steps.stopped == {steps.llm_id}
    entry.submit(late, client_inputs())
    assert late.errors == [(lifecycle.SHUTTING_DOWN, UNAVAILABLE)]
    entry.shutdown()
