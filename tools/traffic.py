"""Client behaviours for the reliability tests and the soak: clients that vanish mid-stream in each way a real one
can (gRPC call cancelled, gRPC channel closed, HTTP socket closed), and reading what a server holds from its
metrics endpoint (KV blocks, requests in flight, Triton's pending counts) and from /proc (memory of its processes).
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from mimo.serving.lifecycle import IN_FLIGHT_METRIC
from tools.server_process import descendants

ENTRY = "ensemble"


def series(metrics_text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Every series `name` whose labels include `labels`: (all its labels, its value) each."""
    found = []
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{(.*?)\}})? (\S+)$", metrics_text, re.MULTILINE):
        its_labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if labels.items() <= its_labels.items():
            found.append((its_labels, float(match.group(2))))
    return found


def metric(metrics_text: str, name: str, **labels: str) -> float:
    """The sum of the series `name` whose labels include `labels` (e.g. `model="ensemble"`: one series per entry
    instance); raises if there is none."""
    values = [value for _, value in series(metrics_text, name, **labels)]
    if not values:
        raise LookupError(f"no {name} series with {labels or 'any labels'}")
    return sum(values)


def kv_blocks(metrics_text: str) -> dict[tuple[str, str], float]:
    """`mimo_kv_blocks{pool,state}`: {(pool, "free" | "total"): blocks}."""
    pattern = re.compile(r'^mimo_kv_blocks\{pool="(\w+)",state="(\w+)"\} (\S+)$', re.MULTILINE)
    return {(pool, state): float(value) for pool, state, value in pattern.findall(metrics_text)}


def held_resources(metrics_text: str, models: tuple[str, ...]) -> dict[str, float]:
    """What is still held: KV blocks in use per pool, the requests the entry and mimo_llm hold open, Triton's pending
    requests per model in `models`. All zero on an idle server."""
    blocks = kv_blocks(metrics_text)
    held = {f"kv_blocks_in_use[{pool}]": blocks[pool, "total"] - blocks[pool, "free"] for pool, _ in blocks}
    for model in ("ensemble", "mimo_llm"):
        held[f"in_flight[{model}]"] = metric(metrics_text, IN_FLIGHT_METRIC, model=model)
    for model in models:
        held[f"pending[{model}]"] = metric(metrics_text, "nv_inference_pending_request_count", model=model)
    return held


def streamed_request(text: str, max_tokens: int, request_id: str = "") -> service_pb2.ModelInferRequest:
    """A raw gRPC ModelInferRequest for the entry model: greedy, streamed."""
    request = service_pb2.ModelInferRequest(model_name=ENTRY, id=request_id)
    for name, array, datatype in (("text_input", np.array([[text.encode()]], dtype=np.object_), "BYTES"),
                                  ("max_tokens", np.array([[max_tokens]], dtype=np.int64), "INT64"),
                                  ("temperature", np.array([[0.0]], dtype=np.float32), "FP32"),
                                  ("stream", np.array([[True]]), "BOOL")):  # fmt: skip
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        raw = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
        request.raw_input_contents.append(raw)
    return request


def vanish_grpc(grpc_url: str, text: str, max_tokens: int, how: str) -> None:
    """A raw gRPC stream that receives its first token, then cancels the call (`how="cancel"`) or closes its
    channel (`how="close"`) without ever half-closing its side: the client vanishes."""
    if how not in ("cancel", "close"):
        raise ValueError(f"how must be 'cancel' or 'close', got {how!r}")
    channel = grpc.insecure_channel(grpc_url)
    left = threading.Event()

    def requests():
        yield streamed_request(text, max_tokens)
        left.wait()

    call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
    try:
        response = next(call)
        if response.error_message:
            raise RuntimeError(response.error_message)
    finally:
        if how == "cancel":
            call.cancel()
        left.set()
        channel.close()


def vanish_http(http_url: str, text: str, max_tokens: int) -> None:
    """An HTTP generate_stream request whose socket closes after the first server-sent event."""
    body = json.dumps({"text_input": text, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}).encode()
    host, port = http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v2/models/%s/generate_stream HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (ENTRY.encode(), host.encode(), len(body), body))  # fmt: skip
        received = b""
        while b"data:" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"the server closed the stream first: {received!r}")
            received += chunk
        if b'"error"' in received:
            raise RuntimeError(received.decode(errors="replace"))
        sock.shutdown(socket.SHUT_RDWR)


def process_tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and every process below it (the server, its backend stubs, TP ranks)."""
    total = 0
    for process in (pid, *descendants(pid)):
        try:
            status = Path(f"/proc/{process}/status").read_text()
        except OSError:  # exited meanwhile
            continue
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(found.group(1)) * 1024 if found else 0
    return total
