"""Client request building (no server): tensor types, validation, and the CLI against a live server."""

import subprocess
import sys

import numpy as np
import pytest

from client.mimo_client import MiMoClient, data_url, request_arrays
from client.sample_media import sample_image
from mimo.serving.contract import ENTRY, numpy_type


def test_request_arrays_match_the_ensemble_inputs():
    arrays = request_arrays("Hi", {"images": [b"png"], "audios": []}, 8, 0.5, 4, 0.9, 7, ["stop"], True, False)
    declared = {tensor.name: numpy_type(tensor.dtype).type for tensor in ENTRY.inputs}
    assert {name: array.dtype.type for name, array in arrays.items()} == {name: declared[name] for name in arrays}
    assert arrays["max_tokens"].dtype == np.int64 and arrays["top_k"].dtype == np.int64
    assert all(array.shape[0] == 1 for array in arrays.values())
    assert arrays["image_bytes_input"].tolist() == [[b"png"]] and arrays["speculative_decoding"].tolist() == [[False]]
    assert set(request_arrays("Hi", {}, 8, None, None, None, None, [], False)) == {"text_input", "max_tokens", "stream"}


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_tokens": "8"}, "max_tokens must be an integer"), ({"max_tokens": 0}, "max_tokens must be in"),
     ({"max_tokens": 2**32 + 4}, "max_tokens must be in"), ({"top_k": 2**32 + 1}, "top_k must be in"),
     ({"temperature": "hot"}, "temperature must be a number"), ({"top_p": 1.5}, "top_p must be in"),
     ({"seed": True}, "seed must be an integer"), ({"images": ["x.png"]}, "images must be encoded files as bytes"),
     ({"speculative_decoding": 0}, "speculative_decoding must be a bool")],
)  # fmt: skip
def test_bad_parameters_fail_before_sending(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiMoClient("localhost:1", "http").generate("Hi", **kwargs)


def test_shared_memory_needs_grpc():
    with pytest.raises(ValueError, match="use protocol='grpc'"):
        MiMoClient("localhost:1", "http", shared_memory="system")


def test_data_url_is_base64():
    assert data_url(b"\x00\xff") == "data:application/octet-stream;base64,AP8="


def test_cli_streams_the_reply_and_prints_the_summary(triton_server, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(sample_image())
    result = subprocess.run(
        [sys.executable, "-m", "client", "--url", triton_server.grpc_url, "--text", "What is this?",
         "--image", str(image), "--max-tokens", "5", "--temperature", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[5 tokens, finish_reason=length, TTFT" in result.stdout
    failed = subprocess.run([sys.executable, "-m", "client", "--url", triton_server.grpc_url, "--text", " "],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert failed.returncode == 1 and "text_input is empty" in failed.stderr
