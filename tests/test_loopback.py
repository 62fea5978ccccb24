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
