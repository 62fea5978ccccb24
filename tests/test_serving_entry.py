"""The entry model (`ensemble`, a decoupled BLS model) on the real tritonserver: clients that vanish in every way
free their generation, one client cannot stop another's request, and integers / floats are range-checked without
wrap-around on HTTP and gRPC."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from conftest import SERVED_MAX_MODEL_LEN
from test_serving_e2e import assert_still_serving, client_for, kv_blocks, run
from tools.traffic import held_resources, metric, vanish_grpc, vanish_http

VANISHING_CLIENTS = 200
AT_ONCE = 16  # clients streaming at the same time
LONG = SERVED_MAX_MODEL_LEN - 128  # max_tokens of a vanishing client: it would run for many seconds


def wait_until_idle(server, timeout_s: float) -> tuple[float, dict]:
    """Seconds until every KV block is free and neither the entry nor mimo_llm holds a request; raises after
    `timeout_s`."""
    start = time.monotonic()
    while True:
        metrics = server.metrics()
        held = {name: value for name, value in held_resources(metrics, ()).items() if value}
        if not held:
            return time.monotonic() - start, kv_blocks(server)
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"still held {timeout_s} s after the last client left: {held}")
        time.sleep(0.05)


@pytest.mark.parametrize("way", ["grpc-cancel", "grpc-channel-closed", "http-socket-closed"])
def test_vanishing_clients_free_everything_at_once(triton_server, way):
    def vanish(index):
        text = f"Client {index} says hello"
        if way == "http-socket-closed":
            vanish_http(triton_server.http_url, text, LONG)
        else:
            vanish_grpc(triton_server.grpc_url, text, LONG, "cancel" if way == "grpc-cancel" else "close")

    with ThreadPoolExecutor(AT_ONCE) as pool:
        list(pool.map(vanish, range(VANISHING_CLIENTS)))
    # every client has left; each generation would otherwise run LONG tokens
    elapsed, blocks = wait_until_idle(triton_server, timeout_s=2.0)
    assert all(blocks[pool, "total"] > 0 for pool, _ in blocks)
    deadline = time.monotonic() + 10
    while metric(triton_server.metrics(), "nv_inference_pending_request_count", model="ensemble") != 0:
        assert time.monotonic() < deadline, "Triton still counts ensemble requests pending"
        time.sleep(0.1)
    for model in ("preprocessing", "mimo_encoder", "mimo_llm"):
        assert metric(triton_server.metrics(), "nv_inference_pending_request_count", model=model) == 0, model
    assert_still_serving(triton_server)


def stream_tokens(server, model: str, arrays: dict[str, np.ndarray], request_id: str, first: threading.Event):
    """Runs one streamed request to the end on its own connection; returns (token ids, error message or None)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = []
    for name, array in arrays.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
        inputs[-1].set_data_from_numpy(array)
    client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
    ids, error_message = [], None
    try:
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                error_message = error.message()
                break
            output = result.as_numpy("output_ids")
            if output is not None:
                ids += output.reshape(-1).tolist()
                first.set()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        first.set()
        client.stop_stream()
        client.close()
    return ids, error_message


def send_stop(server, model: str, request_id: str) -> str | None:
    """A TensorRT-LLM `stop` for `request_id`, from a connection of its own; the error message, if any."""
    stop = grpcclient.InferInput("stop", [1, 1], "BOOL")
    stop.set_data_from_numpy(np.array([[True]]))
    responses: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, [stop], request_id=request_id, enable_empty_final_response=True)
        result, error = responses.get(timeout=60)
        client.stop_stream()
    return None if error is None else error.message()


def test_one_client_cannot_stop_another_clients_request(triton_server):
    with client_for(triton_server, "grpc") as client:
        solo = run(client, "Count with me", max_tokens=48, temperature=0.0)[1].token_ids
    request = {"text_input": np.array([[b"Count with me"]], dtype=np.object_),
               "max_tokens": np.array([[48]], dtype=np.int64), "temperature": np.array([[0.0]], dtype=np.float32),
               "stream": np.array([[True]])}  # fmt: skip
    first, other_first = threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        victim = pool.submit(stream_tokens, triton_server, "ensemble", request, "shared-id", first)
        assert first.wait(60)
        # the same id from another client: its own request runs, and its stops (to the entry or mimo_llm) end nothing
        other = pool.submit(stream_tokens, triton_server, "ensemble", request, "shared-id", other_first)
        assert "'stop'" in send_stop(triton_server, "ensemble", "shared-id")  # the entry has no such input
        assert send_stop(triton_server, "mimo_llm", "shared-id") is None
        assert victim.result() == (solo, None)
        assert other.result() == (solo, None)


def test_mimo_llm_refuses_an_id_already_in_flight(triton_server):
    request = {"input_ids": np.arange(3, 30, dtype=np.int32)[None], "streaming": np.array([[True]]),
               "request_output_len": np.array([[LONG]], dtype=np.int32)}  # fmt: skip
    first, second = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream_tokens, triton_server, "mimo_llm", request, "direct-id", first)
        assert first.wait(60)
        ids, error = stream_tokens(triton_server, "mimo_llm", request, "direct-id", second)
        assert ids == [] and "request id 'direct-id' is already in flight" in error
        assert send_stop(triton_server, "mimo_llm", "direct-id") is None  # TensorRT-LLM's stop, for direct callers
        ids, error = running.result()
        assert error is None and 0 < len(ids) < LONG  # ended by the stop, with a final response
    wait_until_idle(triton_server, timeout_s=10)


def http_generate(server, body: str) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/ensemble/generate", data=body.encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]


def grpc_error(server, arrays: dict[str, np.ndarray]) -> str:
    ids, error = stream_tokens(server, "ensemble", arrays, "", threading.Event())
    assert error is not None, f"the server accepted it and generated {ids}"
    return error


RANGE_CASES = [
    ("max_tokens", 2**32 + 4, "max_tokens must be an integer in [1, 2147483647], got 4294967300"),
    ("top_k", 2**32 + 1, "top_k must be an integer in [0, 2147483647], got 4294967297"),
    ("max_tokens", 2**40, "max_tokens must be an integer in [1, 2147483647], got 1099511627776"),
    ("max_tokens", -3, "max_tokens must be an integer in [1, 2147483647], got -3"),
    ("top_k", -1, "top_k must be an integer in [0, 2147483647], got -1"),
    ("random_seed", 2**64 - 1, "random_seed must be an integer in [0, 9223372036854775807], got 18446744073709551615"),
    ("temperature", float("nan"), "temperature must be a finite number in [0, 3.40282e+38], got nan"),
    ("temperature", float("inf"), "temperature must be a finite number in [0, 3.40282e+38], got inf"),
    ("temperature", -0.5, "temperature must be a finite number in [0, 3.40282e+38], got -0.5"),
    ("top_p", float("-inf"), "top_p must be a finite number in (0, 1], got -inf"),
    ("top_p", 0.0, "top_p must be a finite number in (0, 1], got 0.0"),
]
DTYPES = {"max_tokens": np.int64, "top_k": np.int64, "random_seed": np.uint64, "temperature": np.float32,
          "top_p": np.float32}  # fmt: skip


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("field, value, message", RANGE_CASES, ids=[f"{f}={v}" for f, v, _ in RANGE_CASES])
def test_out_of_range_numbers_are_refused_naming_the_field(triton_server, protocol, field, value, message):
    fields = {"text_input": "Hi", "max_tokens": 2, field: value}
    if protocol == "http":
        status, error = http_generate(triton_server, json.dumps(fields))  # NaN / Infinity: Triton parses them
        assert status == 400 and error == message
    else:
        arrays = {name: np.array([[v.encode() if name == "text_input" else v]],
                                 dtype=np.object_ if name == "text_input" else DTYPES[name])
                  for name, v in fields.items()}  # fmt: skip
        assert message in grpc_error(triton_server, arrays)


@pytest.mark.parametrize(
    "body",
    ['{"text_input": "Hi", "max_tokens": 18446744073709551620}', '{"text_input": "Hi", "max_tokens": 4.5}',
     '{"text_input": "Hi", "max_tokens": 2, "random_seed": -1}', '{"text_input": "Hi", "max_tokens": 2, "top_k": 1e3}'],
    ids=["beyond-int64", "fraction", "negative-seed", "float-top-k"],
)  # fmt: skip
def test_json_numbers_that_fit_no_declared_type_are_refused_not_wrapped(triton_server, body):
    # Triton's JSON conversion refuses these before any model runs (its message does not name the field)
    status, error = http_generate(triton_server, body)
    assert status != 200 and "Unable to parse" in error
    assert_still_serving(triton_server)


def test_in_range_numbers_over_http_generate(triton_server):
    body = {"text_input": "Hi", "max_tokens": 3, "top_k": 2**31 - 1, "top_p": 1.0, "temperature": 0.0,
            "random_seed": 2**63 - 1}  # fmt: skip
    status, reply = http_generate(triton_server, json.dumps(body))
    assert status == 200 and len(json.loads(reply)["output_ids"]) == 3
