"""The entry's wire conversion for its loopback gRPC stream to mimo_llm (mimo.serving.loopback)."""

import ml_dtypes
import numpy as np
import pytest
import torch

from mimo.serving.detokenize import DETOKENIZATION_WINDOW
from mimo.serving.llm import LLMResponse
from mimo.serving.loopback import LOOPBACK_DEFAULT_URL, infer_input, merge_responses, self_grpc_url, wire_array
from mimo.serving.lifecycle import SELF_GRPC_URL_ENV


@pytest.mark.parametrize("dtype, wire", [(torch.bfloat16, "BF16"), (torch.float32, "FP32"), (torch.int32, "INT32"),
                                         (torch.bool, "BOOL")])  # fmt: skip
def test_a_tensor_goes_on_the_wire_bit_for_bit(dtype, wire):
    tensor = (torch.randn(5, 7) * 100).to(dtype)
    array = wire_array(tensor)
    assert array.tobytes() == tensor.contiguous().view(torch.uint8).numpy().tobytes()
    grpc_input = infer_input("prompt_embedding_table", tensor)
    assert grpc_input.datatype() == wire and grpc_input.shape() == [5, 7]
    if dtype == torch.bfloat16:
        assert array.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(array.astype(np.float32), tensor.float().numpy())


def test_numpy_inputs_pass_through_unchanged():
    ids = np.arange(12, dtype=np.int32).reshape(1, 12)
    assert wire_array(ids) is ids
    assert infer_input("input_ids", ids).datatype() == "INT32"


def test_the_server_address_comes_from_the_launcher(monkeypatch):
    monkeypatch.delenv(SELF_GRPC_URL_ENV, raising=False)
    assert self_grpc_url() == LOOPBACK_DEFAULT_URL
    monkeypatch.setenv(SELF_GRPC_URL_ENV, "127.0.0.1:41234")
    assert self_grpc_url() == "127.0.0.1:41234"


def streamed(tokens: list[int], cuts: list[int], finish_reason: str) -> list[dict[str, np.ndarray]]:
    """mimo_llm's streamed responses of `tokens`, a new response at each cut (`GenerationLoop`'s layout)."""
    bounds = [0, *cuts, len(tokens)]
    return [LLMResponse(tokens[a:b], tokens[max(0, a - DETOKENIZATION_WINDOW):a], b,
                        finish_reason if b == len(tokens) else "").as_arrays() for a, b in zip(bounds, bounds[1:])]


def test_responses_that_arrived_together_merge_into_the_one_response_of_all_their_tokens():
    tokens = list(range(100, 130))
    responses = streamed(tokens, [3, 4, 11, 12, 13, 20], "length")
    for first, last in [(0, 7), (1, 4), (2, 3), (3, 7), (5, 6)]:
        merged = merge_responses(responses[first:last])
        start = int(responses[first]["sequence_length"].item()) - responses[first]["output_ids"].size
        end = int(responses[last - 1]["sequence_length"].item())
        expected = LLMResponse(tokens[start:end], tokens[max(0, start - DETOKENIZATION_WINDOW):start], end,
                               "length" if end == len(tokens) else "").as_arrays()
        assert merged.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(merged[name], expected[name])
            assert merged[name].dtype == expected[name].dtype
    assert merge_responses([{}, responses[2], {}]) is responses[2]  # an empty final response adds nothing
    assert merge_responses([{}]) == {}


# LoopbackStreams against a real tritonserver's mimo_llm: many requests on one multiplexed gRPC stream

LLM_OUTPUTS = ("output_ids", "preceding_ids", "finish_reason")


def llm_inputs(prompt: list[int], max_tokens: int) -> dict:
    arrays = {"input_ids": np.array([prompt], dtype=np.int32), "input_lengths": np.array([[len(prompt)]], np.int32),
              "request_output_len": np.array([[max_tokens]], dtype=np.int32), "streaming": np.array([[True]]),
              "temperature": np.array([[0.0]], dtype=np.float32)}
    return {name: infer_input(name, array) for name, array in arrays.items()}


def generated(streams, prompt: list[int], max_tokens: int, request_id: str) -> list[int]:
    batches = streams.stream("mimo_llm", llm_inputs(prompt, max_tokens), request_id, LLM_OUTPUTS)
    return [int(t) for batch in batches for response in batch if response for t in response["output_ids"].ravel()]


def test_concurrent_requests_on_one_stream_each_get_their_own_tokens(triton_server):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from mimo.serving.loopback import LoopbackStreams

    streams = LoopbackStreams(triton_server.grpc_url)
    try:
        prompts = [list(range(5 + i, 25 + 2 * i)) for i in range(12)]
        alone = [generated(streams, prompt, 6 + i % 3, f"alone-{i}") for i, prompt in enumerate(prompts)]
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(lambda i: generated(streams, prompts[i], 6 + i % 3, f"together-{i}"),
                                     range(12)))  # fmt: skip
        assert together == alone and all(len(tokens) == 6 + i % 3 for i, tokens in enumerate(alone))
        readers = [t for t in threading.enumerate() if t.name == "mimo-loopback-reader"]
        assert len(readers) == 1  # one stream carried them all
    finally:
        streams.close()


def test_an_error_response_ends_only_its_own_request_and_an_abandoned_one_disturbs_nothing(triton_server):
    from mimo.serving.loopback import LoopbackError, LoopbackStreams

    streams = LoopbackStreams(triton_server.grpc_url)
    try:
        long_one = streams.stream("mimo_llm", llm_inputs(list(range(3, 30)), 40), "abandoned", LLM_OUTPUTS)
        assert next(long_one)  # its first batch, then the reader leaves it: the request runs on, unread
        with pytest.raises(LoopbackError, match="request_output_len must be an int >= 1, got -5"):
            list(streams.stream("mimo_llm", llm_inputs([1, 2, 3], -5), "bad", LLM_OUTPUTS))
        with pytest.raises(LoopbackError, match="not found"):
            list(streams.stream("no_such_model", llm_inputs([1, 2, 3], 4), "unknown", LLM_OUTPUTS))
        duplicate = streams.stream("mimo_llm", llm_inputs([1, 2, 3], 4), "abandoned", LLM_OUTPUTS)
        with pytest.raises(ValueError, match="'abandoned' is already in flight"):
            next(duplicate)
        long_one.close()
        assert generated(streams, list(range(5, 25)), 6, "after") == generated(streams, list(range(5, 25)), 6, "again")
    finally:
        streams.close()


class RecordingStreams:
    """LoopbackStreams' interface: each request gets `batches` (then `error`, if any); stops are recorded."""

    def __init__(self, batches, error=None):
        self.batches, self.error, self.stops = batches, error, []

    def stream(self, model, inputs, request_id, outputs, parameters=None):
        from mimo.serving.contract import STOP_REQUEST_ID

        if "stop" in inputs:
            self.stops.append(parameters[STOP_REQUEST_ID])
            yield [{}]
            return
        yield from self.batches
        if self.error is not None:
            raise self.error


FINAL = {"output_ids": np.array([[[7]]], np.int32), "finish_reason": np.array([["length"]], np.object_)}
PARTIAL = {"output_ids": np.array([[[5]]], np.int32), "finish_reason": np.array([[""]], np.object_)}


def test_a_caller_that_leaves_before_the_final_response_stops_its_generation():
    from mimo.serving.loopback import LoopbackLLM

    streams = RecordingStreams([[PARTIAL], [PARTIAL], [FINAL]])
    responses = LoopbackLLM(streams).stream("mimo_llm", {"input_ids": np.array([[1, 2]], np.int32)}, "left-early")
    next(responses)
    responses.close()
    assert streams.stops == ["left-early"]
    list(LoopbackLLM(streams).stream("mimo_llm", {"input_ids": np.array([[1, 2]], np.int32)}, "read-to-the-end"))
    assert streams.stops == ["left-early"]  # a request that ended is not stopped


def test_a_request_ended_by_an_error_response_is_not_stopped():
    from mimo.serving.entry import EntryError
    from mimo.serving.loopback import LoopbackError, LoopbackLLM

    streams = RecordingStreams([[PARTIAL]], error=LoopbackError("request_output_len must be an int >= 1", None))
    responses = LoopbackLLM(streams).stream("mimo_llm", {"input_ids": np.array([[1, 2]], np.int32)}, "failed")
    next(responses)
    with pytest.raises(EntryError, match="request_output_len"):
        next(responses)
    assert streams.stops == []
