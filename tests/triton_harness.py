"""Test helpers around the real tritonserver: the server process itself, and /proc inspection of what it leaves."""

from __future__ import annotations

import time
from pathlib import Path

from tools.server_process import TritonServer, descendants, free_ports

__all__ = ["TritonServer", "descendants", "free_ports", "pid_alive", "server_binary_pid", "server_environ", "shm_prefix",
           "shm_regions", "wait_gone"]  # fmt: skip


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: set[int], timeout_s: float = 30.0) -> set[int]:
    """Waits until none of `pids` is alive; returns those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if pid_alive(p)}


def server_binary_pid(server: TritonServer) -> int:
    return next(p for p in descendants(server.process.pid) if Path(f"/proc/{p}/exe").resolve().name == "tritonserver")


def server_environ(server: TritonServer) -> dict[str, str]:
    """The environment the launcher gave the tritonserver binary."""
    raw = Path(f"/proc/{server_binary_pid(server)}/environ").read_bytes().decode()
    return dict(entry.split("=", 1) for entry in raw.split("\0") if "=" in entry)


def shm_prefix(server: TritonServer) -> str:
    """The Python-backend shared-memory prefix the launcher gave this server (other servers may run beside it)."""
    arguments = Path(f"/proc/{server_binary_pid(server)}/cmdline").read_bytes().decode().split("\0")
    (value,) = [a.split("shm-region-prefix-name=", 1)[1] for a in arguments if "shm-region-prefix-name=" in a]
    return value


def shm_regions(prefix: str) -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(prefix + "*")]
