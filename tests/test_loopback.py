"""The entry's wire conversion for its loopback gRPC stream to mimo_llm (mimo.serving.loopback)."""

import ml_dtypes
import numpy as np
import pytest
import torch

from mimo.serving.loopback import LOOPBACK_DEFAULT_URL, infer_input, self_grpc_url, wire_array
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
