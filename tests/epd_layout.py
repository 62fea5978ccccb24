"""The EPD tests' servers (real tritonserver processes on loopback, `builders repository --role encoder|language`)
and what the tests read from them.

One pair of default encoder servers serves the whole session (conftest's `shared_encoders`): a server start costs
~15 s of CPU, and most modules only send them requests. Each module is handed the pair alive, ready and with no
shared-memory region registered (`restore`): a test that kills one of them leaves it for the next module to start
again on its ports, and a language server in shm mode (or an in-process orchestrator) registers its landing region
with each encoder server and leaves it there when it stops. Language servers are each module's own: their settings
are what the modules test.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import tritonclient.grpc as grpcclient

from client import MiMoClient
from tools.server_process import TritonServer

QUESTION = "What do you see and hear?"


def in_parallel(*calls: Callable[[], object]) -> list:
    """The results of `calls`, run side by side (server starts and stops mostly wait: two share 2 cores well)."""
    with ThreadPoolExecutor(max(len(calls), 1)) as pool:
        return list(pool.map(lambda call: call(), calls))


def start_server(settings, root: Path, **role) -> TritonServer:
    from builders.repository import render_repository

    root.mkdir(parents=True, exist_ok=True)
    command = render_repository(dataclasses.replace(settings, **role), root / "repository")
    return TritonServer(root / "repository", root / "tritonserver.log", extra_args=command[2:]).start()


def stop_servers(servers) -> None:
    """Stops every server still running, side by side; each must exit with status 0."""
    running = [server for server in servers if server.process.poll() is None]
    if running:
        codes = in_parallel(*(server.stop for server in running))
        for server, code in zip(running, codes):
            assert code == 0, server.log_tail()


def restart(server: TritonServer, log_path: Path) -> TritonServer:
    """A new server over the same repository on the stopped one's ports (its address in the language servers'
    lists)."""
    fresh = TritonServer(server.model_repository, log_path, extra_args=server.extra_args)
    fresh.http_port, fresh.grpc_port, fresh.metrics_port = server.http_port, server.grpc_port, server.metrics_port
    return fresh.start()


def restore(encoders: list[TritonServer]) -> None:
    """The shared encoder servers as a module expects them: one a test killed started again on its ports (in
    place in `encoders`), each ready, no shared-memory region left registered."""
    dead = [i for i, server in enumerate(encoders) if server.process.poll() is not None]
    logs = [encoders[i].log_path.with_name(f"restarted-{time.monotonic_ns()}.log") for i in dead]
    for i, server in zip(dead, in_parallel(*(partial(restart, encoders[i], log) for i, log in zip(dead, logs)))):
        encoders[i] = server
    for server in encoders:
        assert server.is_ready(), server.log_tail()
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            client.unregister_system_shared_memory()
            client.unregister_cuda_shared_memory()
            assert not client.get_system_shared_memory_status(as_json=True).get("regions")
            assert not client.get_cuda_shared_memory_status(as_json=True).get("regions")


_colocated: dict[tuple[str, str], list[int]] = {}


def tokens(server, text: str = QUESTION, **kwargs) -> list[int]:
    with MiMoClient(server.grpc_url, "grpc") as client:
        return list(client.generate(text, **kwargs))[-1].token_ids


def colocated_tokens(server, text: str = QUESTION, **kwargs) -> list[int]:
    """`tokens` of the session's colocated server, each request asked once per session: the expected tokens of the
    EPD modules' comparisons (greedy or seeded requests, so the same request gives the same tokens)."""
    key = server.grpc_url, repr(sorted({"text": text, **kwargs}.items()))
    if key not in _colocated:
        _colocated[key] = tokens(server, text, **kwargs)
    return _colocated[key]


def encoded_items(server) -> int:
    """encode_item requests the server answered with success."""
    found = re.search(r'nv_inference_request_success\{model="encode_item",version="1"\} (\d+)', server.metrics())
    return int(found.group(1)) if found else 0


def metric(server, name: str) -> float:
    values = re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", server.metrics(), re.M)
    return sum(float(v) for v in values)


def assert_no_slice_in_use(language, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(language, "mimo_epd_landing_slices_in_use") != 0:
        assert time.monotonic() < deadline, "a landing slice is still in use"
        time.sleep(0.1)
