"""A `tritonserver` started through the project launcher on free ports, waited for, and stopped cleanly."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0  # the launcher bounds its own stop (drain deadline + exit grace, tools/launcher.py)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc, so it works for grandchildren like the backend stubs)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.add(child)
            frontier.append(child)
    return found


class TritonServer:
    """One `tritonserver` launched via `python -m tools.launcher` on free ports."""

    def __init__(self, model_repository: Path, log_path: Path, extra_args: list[str] = ()):
        self.model_repository = Path(model_repository)
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "tools.launcher",
            f"--model-repository={self.model_repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> TritonServer:
        self.launch()
        return self.wait_ready(time.monotonic() + timeout_s)

    def launch(self) -> None:
        """Starts the process without waiting for it (`wait_ready`): several servers load at once."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, deadline: float) -> TritonServer:
        """Waits until the launched server is ready; stops it and raises if it exits or `deadline` (monotonic)
        passes first."""
        timeout_s = deadline - time.monotonic()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}\n{self.log_tail()}")
            if self.is_ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f}s\n{self.log_tail()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            return reply.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signals the launcher and waits; returns its exit status. Kills it only past the timeout."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                # the launcher's reaper then ends the server's process group and removes its regions
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"tritonserver did not stop within {STOP_TIMEOUT_S:.0f}s\n{self.log_tail()}")
        return self.process.returncode


def start_together(servers: list[TritonServer], timeout_s: float = READY_TIMEOUT_S) -> list[TritonServer]:
    """Launches every server, then waits for all of them (they load at once); if one fails, stops them all and
    raises its error."""
    deadline = time.monotonic() + timeout_s
    launched = []
    try:
        for server in servers:
            server.launch()
            launched.append(server)
        return [server.wait_ready(deadline) for server in servers]
    except BaseException:
        for server in launched:
            with contextlib.suppress(RuntimeError):  # the first error is the one to report
                server.stop()
        raise
