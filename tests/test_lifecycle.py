"""Shutdown with streams open, on the real tritonserver serving the rendered repository.

SIGTERM / SIGINT: the launcher drains (every open stream ends with a final SHUTTING_DOWN error), the server exits
and the launcher exits 0 within 10 s, leaving no process, shared-memory region or scratch directory. SIGKILL of
the launcher: its reaper ends everything within 10 s. The 16 streams are half ensemble, half direct mimo_llm, each
on its own client connection, and stay open after their final response, as idle clients' streams do. The models'
side of the drain alone (streams ended, KV free, new requests refused) runs on the suite's server.
"""

from __future__ import annotations

import queue
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import SERVED_MAX_MODEL_LEN, serving_settings
from mimo.serving.contract import triton_type
from mimo.serving.lifecycle import SHUTTING_DOWN, draining
from test_serving_e2e import wait_kv_all_free
from triton_harness import TritonServer, descendants, server_environ, shm_prefix, shm_regions, wait_gone

STREAMS = 16
STOP_BUDGET_S = 10.0
MAX_TOKENS = SERVED_MAX_MODEL_LEN - 128  # never reached before the signal


def test_draining_follows_the_drain_file(monkeypatch, tmp_path):
    monkeypatch.delenv("MIMO_DRAIN_FILE", raising=False)
    assert not draining()
    drain_file = tmp_path / "draining"
    monkeypatch.setenv("MIMO_DRAIN_FILE", str(drain_file))
    assert not draining()
    drain_file.touch()
    assert draining()
    monkeypatch.setenv("MIMO_DRAIN_FILE", "")
    assert not draining()


@pytest.fixture(scope="module")
def repository(tiny_checkpoint, tmp_path_factory) -> tuple[Path, list[str]]:
    from builders.repository import render_repository

    root = tmp_path_factory.mktemp("lifecycle") / "model_repository"
    return root, render_repository(serving_settings(tiny_checkpoint), root)[2:]


class OpenStream:
    """One streaming request on a client connection of its own, kept open until `close()`."""

    def __init__(self, server: TritonServer, model: str, arrays: dict[str, np.ndarray]):
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        inputs = []
        for name, array in arrays.items():
            inputs.append(grpcclient.InferInput(name, list(array.shape), triton_type(array.dtype)))
            inputs[-1].set_data_from_numpy(array)
        self.client.async_stream_infer(model, inputs, enable_empty_final_response=True)

    def wait_tokens(self) -> None:
        result, error = self.responses.get(timeout=120)
        assert error is None, error.message()

    def final_error(self) -> str:
        """The error that ended the stream; every response before it carried tokens."""
        while True:
            result, error = self.responses.get(timeout=5)
            if error is not None:
                return error.message()
            assert not result.get_response().parameters["triton_final_response"].bool_param, "stream ended normally"

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def ensemble_and_llm_requests() -> tuple[dict, dict]:
    # greedy: sampled at temperature 1 the tiny model may draw the end token early and finish before the signal
    ensemble = {"text_input": np.array([[b"Tell me a long story"]], dtype=np.object_),
                "max_tokens": np.array([[MAX_TOKENS]], dtype=np.int64), "stream": np.array([[True]]),
                "temperature": np.array([[0.0]], dtype=np.float32)}  # fmt: skip
    llm = {"input_ids": np.arange(3, 40, dtype=np.int32)[None], "streaming": np.array([[True]]),
           "request_output_len": np.array([[MAX_TOKENS]], dtype=np.int32)}  # fmt: skip
    return ensemble, llm


def open_streams(server: TritonServer) -> list[OpenStream]:
    ensemble, llm = ensemble_and_llm_requests()
    streams = [OpenStream(server, *(("ensemble", ensemble) if i % 2 else ("mimo_llm", llm))) for i in range(STREAMS)]
    for stream in streams:
        stream.wait_tokens()
    return streams


def test_drain_file_ends_streams_and_refuses_new_requests(triton_server):
    """The models' side of the drain, on the suite's server: the launcher is not signalled, the file is removed after."""
    ensemble, llm = ensemble_and_llm_requests()
    streams = [OpenStream(triton_server, "ensemble", ensemble), OpenStream(triton_server, "mimo_llm", llm)]
    drain_file = Path(server_environ(triton_server)["MIMO_DRAIN_FILE"])
    try:
        for stream in streams:
            stream.wait_tokens()
        drain_file.touch()
        for stream in streams:
            assert SHUTTING_DOWN in stream.final_error()
        wait_kv_all_free(triton_server, timeout_s=2)
        refused = [OpenStream(triton_server, "ensemble", ensemble), OpenStream(triton_server, "mimo_llm", llm)]
        for stream in refused:
            result, error = stream.responses.get(timeout=60)
            assert error is not None and SHUTTING_DOWN in error.message()
            stream.close()
    finally:
        drain_file.unlink(missing_ok=True)
        for stream in streams:
            stream.close()
    answered = OpenStream(triton_server, "mimo_llm", {**llm, "request_output_len": np.array([[2]], dtype=np.int32)})
    answered.wait_tokens()
    answered.close()


class Owned:
    """Everything a running launcher owns: its processes, its shared-memory prefix, its scratch directory."""

    def __init__(self, server: TritonServer):
        self.processes = descendants(server.process.pid) | {server.process.pid}
        assert len(self.processes) >= 7, "launcher, reaper, tritonserver and four stubs"
        self.shm_prefix = shm_prefix(server)
        self.scratch = Path(server_environ(server)["MIMO_DRAIN_FILE"]).parent
        assert shm_regions(self.shm_prefix) and self.scratch.is_dir()

    def assert_gone(self, timeout_s: float) -> None:
        assert wait_gone(self.processes, timeout_s) == set()
        assert shm_regions(self.shm_prefix) == []
        assert not self.scratch.exists()


def start_with_streams(repository, tmp_path) -> tuple[TritonServer, Owned, list[OpenStream]]:
    root, args = repository
    server = TritonServer(root, tmp_path / "tritonserver.log", extra_args=args).start()
    return server, Owned(server), open_streams(server)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_every_open_stream_and_exits_0(repository, tmp_path, signum):
    server, owned, streams = start_with_streams(repository, tmp_path)
    try:
        start = time.monotonic()
        server.process.send_signal(signum)
        returncode = server.process.wait(STOP_BUDGET_S)
        owned.assert_gone(STOP_BUDGET_S - (time.monotonic() - start))
        assert returncode == 0, server.log_tail()
        for stream in streams:
            assert SHUTTING_DOWN in stream.final_error()
    finally:
        for stream in streams:
            stream.close()
        server.stop()
    assert "drain: nothing in flight" in server.log()


def test_launcher_killed_with_streams_open_leaves_nothing(repository, tmp_path):
    server, owned, streams = start_with_streams(repository, tmp_path)
    try:
        server.process.kill()
        server.process.wait()
        owned.assert_gone(STOP_BUDGET_S)
    finally:
        for stream in streams:
            stream.close()
    assert "its reaper killed the server's process group" in server.log()
