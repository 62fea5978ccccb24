"""The `tritonserver` launcher runs the bundled server with a Python-backend model and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from mimo.serving.lifecycle import SELF_GRPC_URL_ENV
from tools import launcher
from triton_harness import (TritonServer, descendants, pid_alive, server_binary_pid, server_environ, shm_prefix, shm_regions,
                            wait_gone)  # fmt: skip

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

ECHO_MODEL = """
import sys
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        import ssl  # an extension module: loads only if the stub embeds this interpreter's own libpython

        pb_utils.Logger.log_info(f"stub interpreter: {sys.executable}")

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * 2)])
            for r in requests
        ]
"""


HOLD_CONFIG = """
name: "hold"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# a stream-holding model that ignores the drain: it keeps every request open and counts it as in flight
HOLD_MODEL = """
import triton_python_backend_utils as pb_utils
from mimo.serving.lifecycle import IN_FLIGHT_METRIC

class TritonPythonModel:
    def initialize(self, args):
        self.family = pb_utils.MetricFamily(name=IN_FLIGHT_METRIC, description="held", kind=pb_utils.MetricFamily.GAUGE)
        self.in_flight = self.family.Metric(labels={"model": "hold"})
        self.held = []

    def execute(self, requests):
        self.held += [(r, r.get_response_sender()) for r in requests]
        self.in_flight.set(len(self.held))
        return None
"""


def write_model(repo: Path, name: str, config: str, model: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)
    (repo / name / "1" / "model.py").write_text(model)


@pytest.fixture
def echo_repository(tmp_path: Path) -> Path:
    write_model(tmp_path / "repo", "echo", ECHO_CONFIG, ECHO_MODEL)
    return tmp_path / "repo"


@pytest.fixture
def held_server(tmp_path: Path):
    """A server whose `hold` model holds one request that it never ends, even when the launcher drains."""
    write_model(tmp_path / "repo", "hold", HOLD_CONFIG, HOLD_MODEL)
    server = TritonServer(tmp_path / "repo", tmp_path / "server.log").start()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: None)
    x = grpcclient.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    client.async_stream_infer("hold", [x])
    deadline = time.monotonic() + 30
    while 'mimo_requests_in_flight{model="hold"} 1' not in server.metrics():
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    yield server
    client.close()
    server.stop()


def infer_echo(server: TritonServer) -> list[float]:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]}]}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/echo/infer", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())["outputs"][0]["data"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serves_python_model_and_stops_cleanly_on_signal(echo_repository, tmp_path, signum):
    server = TritonServer(echo_repository, tmp_path / "server.log").start()
    try:
        assert infer_echo(server) == [2.0, 4.0, 6.0]
        server_processes = descendants(server.process.pid)
        assert len(server_processes) >= 2, "expected tritonserver and its Python-backend stub"
        prefix = shm_prefix(server)
        assert prefix.startswith("mimo_triton_") and shm_regions(prefix), "the stub holds a region while up"
    finally:
        returncode = server.stop(signum)
    assert returncode == 0, server.log_tail()
    assert "Signal (%d) received" % signum in server.log()
    assert "drain: nothing in flight" in server.log() and "still running" not in server.log()  # exited by itself
    assert f"stub interpreter: {Path(sys.executable).parent}" in server.log()
    assert wait_gone(server_processes) == set()
    assert shm_regions(prefix) == []


def test_drain_deadline_passed_is_reported_and_exits_1(held_server):
    processes = descendants(held_server.process.pid)
    start = time.monotonic()
    held_server.process.send_signal(signal.SIGTERM)
    returncode = held_server.process.wait(30)
    elapsed = time.monotonic() - start
    assert returncode == 1, held_server.log_tail()
    bound = launcher.DRAIN_DEADLINE_S + launcher.SERVER_EXIT_GRACE_S
    assert bound <= elapsed < bound + 3
    # the seconds it reports are measured: at least the deadline, the tenths left to the scheduler (5.1 s was seen
    # under load)
    reported = re.search(r"drain: 1 requests in flight after (\d+\.\d) s", held_server.log())
    assert reported, held_server.log_tail()
    assert launcher.DRAIN_DEADLINE_S <= float(reported.group(1)) < launcher.DRAIN_DEADLINE_S + 3
    assert wait_gone(processes, 5) == set()


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_during_the_drain_stops_at_once(held_server, second):
    processes = descendants(held_server.process.pid)
    prefix = shm_prefix(held_server)
    held_server.process.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # well inside the drain deadline: the held request keeps it waiting
    start = time.monotonic()
    held_server.process.send_signal(second)
    assert held_server.process.wait(5) == 128 + second
    assert time.monotonic() - start < 1.5
    assert f"second signal ({signal.Signals(second).name}): stopped the server at once" in held_server.log()
    assert wait_gone(processes, 5) == set()
    assert shm_regions(prefix) == []


def test_metrics_endpoint_follows_the_flags():
    assert launcher.metrics_endpoint([]) == ("127.0.0.1", 8002)
    assert launcher.metrics_endpoint(["--metrics-port", "9", "--metrics-address=::"]) == ("::1", 9)
    assert launcher.metrics_endpoint(["--metrics-address=10.0.0.2", "--metrics-port=7"]) == ("10.0.0.2", 7)
    assert launcher.metrics_endpoint(["--allow-metrics=false"]) is None
    with pytest.raises(ValueError, match="--metrics-port must be a port number, got 'x'"):
        launcher.metrics_endpoint(["--metrics-port=x"])


def test_grpc_endpoint_follows_the_flags():
    assert launcher.grpc_endpoint([]) == "127.0.0.1:8001"
    assert launcher.grpc_endpoint(["--grpc-port", "9", "--grpc-address=::"]) == "[::1]:9"
    assert launcher.grpc_endpoint(["--grpc-address=10.0.0.2", "--grpc-port=7"]) == "10.0.0.2:7"
    assert launcher.grpc_endpoint(["--allow-grpc=false"]) is None
    with pytest.raises(ValueError, match="--grpc-port must be a port number, got 'x'"):
        launcher.grpc_endpoint(["--grpc-port=x"])


def test_launcher_killed_outright_still_stops_server(echo_repository, tmp_path):
    server = TritonServer(echo_repository, tmp_path / "server.log").start()
    server_processes = descendants(server.process.pid)
    prefix, scratch = shm_prefix(server), Path(server_environ(server)["MIMO_DRAIN_FILE"]).parent
    assert server_environ(server)[SELF_GRPC_URL_ENV] == f"127.0.0.1:{server.grpc_port}"  # what the entry streams to
    server.process.kill()
    server.process.wait()
    assert wait_gone(server_processes, 10) == set(), server.log_tail()
    assert shm_regions(prefix) == [] and not scratch.exists()


def test_crashed_server_leaves_no_shared_memory(echo_repository, tmp_path):
    server = TritonServer(echo_repository, tmp_path / "server.log").start()
    server_processes = descendants(server.process.pid)
    prefix = shm_prefix(server)
    assert shm_regions(prefix)
    os.kill(server_binary_pid(server), signal.SIGKILL)
    assert server.process.wait(60) == 128 + signal.SIGKILL
    assert wait_gone(server_processes) == set()
    assert shm_regions(prefix) == []


def test_user_backend_flags_pass_through_unchanged(tmp_path):
    bundle = launcher.find_bundle()
    args = ["--model-repository", "repo", "--backend-directory", str(tmp_path), "--backend-config=python,shm-region-prefix-name=mine_"]
    assert launcher.server_command(bundle, args, None, None) == [str(bundle.binary), *args]
    assert launcher._python_backend_config(args, "shm-region-prefix-name") == "mine_"
    assert launcher._python_backend_config(["--backend-config", "python,shm-region-prefix-name=x"], "shm-region-prefix-name") == "x"
    assert launcher._has_flag(["--backend-directory=/b"], "--backend-directory")


def test_backend_dir_has_the_stub_for_this_interpreter(tmp_path):
    backend_dir = launcher.build_backend_dir(launcher.find_bundle(), tmp_path)
    names = {p.name for p in (backend_dir / "python").iterdir()}
    assert {"libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"} <= names


def test_environment_puts_this_interpreter_and_bundle_libraries_first():
    bundle = launcher.find_bundle()
    env = launcher.server_environment(bundle, Path("/tmp/d"), {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    assert env["MIMO_DRAIN_FILE"] == "/tmp/d"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    expected = [str(bundle.library_dir), launcher.interpreter_library_dir(), "/opt/lib"]
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [p for p in expected if p]
    assert "MIMO_SHM_PREFIX" not in env
    # the models' own regions (landing pools) go under the server's prefix, so its cleanup covers them
    assert launcher.server_environment(bundle, Path("/tmp/d"), {}, shm_prefix="p_")["MIMO_SHM_PREFIX"] == "p_"


def test_missing_binary_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("TRITONSERVER", "/nonexistent/tritonserver")
    monkeypatch.setattr(sys, "argv", ["tritonserver", "--model-repository", "repo"])
    assert launcher.main() == 2
    assert "TRITONSERVER=/nonexistent/tritonserver" in capsys.readouterr().err


def test_kill_process_group_reaps_what_outlives_the_server():
    # a "server" whose child (standing in for a hung Python-backend stub) outlives it in the same session
    import subprocess

    server = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; exit 0"], stdout=subprocess.PIPE,
                              start_new_session=True, text=True)  # fmt: skip
    orphan = int(server.stdout.readline())
    server.wait()
    assert pid_alive(orphan)
    launcher.kill_process_group(server.pid)
    deadline = time.monotonic() + 5
    while pid_alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(orphan)
    launcher.kill_process_group(server.pid)  # an empty group is not an error
