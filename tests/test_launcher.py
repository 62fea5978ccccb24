"""The `tritonserver` launcher runs the bundled server with a Python-backend model and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tools import launcher
from triton_harness import TritonServer, descendants, pid_alive

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


@pytest.fixture
def echo_repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return repo


def infer_echo(server: TritonServer) -> list[float]:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]}]}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/echo/infer", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())["outputs"][0]["data"]


def server_binary_pid(server: TritonServer) -> int:
    return next(p for p in descendants(server.process.pid) if Path(f"/proc/{p}/exe").resolve().name == "tritonserver")


def shm_prefix(server: TritonServer) -> str:
    """The Python-backend shared-memory prefix the launcher gave this server (other servers may run beside it)."""
    arguments = Path(f"/proc/{server_binary_pid(server)}/cmdline").read_bytes().decode().split("\0")
    (value,) = [a.split("shm-region-prefix-name=", 1)[1] for a in arguments if "shm-region-prefix-name=" in a]
    return value


def shm_regions(prefix: str) -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(prefix + "*")]


def wait_gone(pids: set[int], timeout_s: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if pid_alive(p)}


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
    assert f"stub interpreter: {Path(sys.executable).parent}" in server.log()
    assert wait_gone(server_processes) == set()
    assert shm_regions(prefix) == []


def test_launcher_killed_outright_still_stops_server(echo_repository, tmp_path):
    server = TritonServer(echo_repository, tmp_path / "server.log").start()
    server_processes = descendants(server.process.pid)
    server.process.kill()
    server.process.wait()
    assert wait_gone(server_processes) == set(), server.log_tail()


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
    env = launcher.server_environment(bundle, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    expected = [str(bundle.library_dir), launcher.interpreter_library_dir(), "/opt/lib"]
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [p for p in expected if p]


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
