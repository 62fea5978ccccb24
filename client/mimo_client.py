"""MiMoClient: multimodal chat against the `ensemble` model over Triton gRPC or HTTP, streamed as it arrives.

    client = MiMoClient("localhost:8001", protocol="grpc")
    for item in client.generate("What is in the picture?", images=[png_bytes], max_tokens=64):
        print(item if isinstance(item, str) else item.summary_line())

`generate` yields text pieces as they arrive, then one `GenerationSummary`. The ensemble has a decoupled step,
which Triton serves only through gRPC bidirectional streaming and HTTP's generate extension:
  gRPC  `async_stream_infer`; the `stream` input chooses one response per token or one at the end
  HTTP  `/generate_stream` (server-sent events) or `/generate`; these take JSON, so media go as base64
        `data:` URLs
`shared_memory="system"` (or "cuda", on a machine with a GPU next to the server) places the media inputs in a
registered shared-memory region instead of the request body (gRPC only). A consumer that stops iterating early
cancels the stream (gRPC) or closes the socket (HTTP); the server then stops the generation.
"""

from __future__ import annotations

import base64
import json
import queue
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

MEDIA_INPUTS = {"images": "image_bytes_input", "audios": "audio_bytes_input", "videos": "video_bytes_input"}
OUTPUTS = ("text_output", "output_ids", "finish_reason")
RESPONSE_TIMEOUT_S = 600.0


class GenerationError(RuntimeError):
    """The server refused or failed the request; the message is the server's."""


@dataclass
class GenerationSummary:
    text: str
    token_ids: list[int]
    finish_reason: str
    ttft_s: float  # request sent -> first response carrying tokens
    latency_s: float  # request sent -> last response
    responses: int
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # per response: (s after sending, its tokens)

    @property
    def tokens_per_s(self) -> float:
        """Streamed: tokens after the first per second after the first; one response: tokens per second overall."""
        if self.responses > 1 and len(self.token_ids) > 1 and self.latency_s > self.ttft_s:
            return (len(self.token_ids) - 1) / (self.latency_s - self.ttft_s)
        return len(self.token_ids) / self.latency_s if self.latency_s > 0 else 0.0

    def summary_line(self) -> str:
        return (f"[{len(self.token_ids)} tokens, finish_reason={self.finish_reason}, TTFT {self.ttft_s * 1000:.1f} ms, "
                f"{self.tokens_per_s:.1f} tokens/s, total {self.latency_s:.3f} s]")  # fmt: skip


@dataclass
class _Collector:
    """Accumulates responses into text pieces and the summary."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    responses: int = 0

    arrivals: list[tuple[float, int]] = field(default_factory=list)

    def add(self, text: str, token_ids: Sequence[int], finish_reason: str) -> str:
        self.responses += 1
        now = time.perf_counter()
        self.arrivals.append((now - self.started, len(token_ids)))
        if token_ids and self.first_token_at is None:
            self.first_token_at = now
        self.token_ids += [int(t) for t in token_ids]
        self.pieces.append(text)
        self.finish_reason = finish_reason or self.finish_reason
        return text

    def summary(self) -> GenerationSummary:
        now = time.perf_counter()
        first = self.first_token_at if self.first_token_at is not None else now
        return GenerationSummary("".join(self.pieces), self.token_ids, self.finish_reason, first - self.started,
                                 now - self.started, self.responses, self.arrivals)  # fmt: skip


def _check_number(name: str, value, kind: type, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return kind(value)


def request_arrays(text: str, media: dict[str, Sequence[bytes]], max_tokens: int, temperature: float | None,
                   top_k: int | None, top_p: float | None, seed: int | None, stop_words: Sequence[str],
                   stream: bool, speculative_decoding: bool | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The ensemble's input tensors (batch dimension 1); optional ones only when given."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    arrays = {
        "text_input": np.array([[text.encode()]], dtype=np.object_),
        "max_tokens": np.array([[_check_number("max_tokens", max_tokens, int, 1, 2**31 - 1)]], dtype=np.int64),
        "stream": np.array([[stream]], dtype=bool),
    }
    for kwarg, name in MEDIA_INPUTS.items():
        items = list(media.get(kwarg, ()))
        if items:
            for item in items:
                if not isinstance(item, (bytes, bytearray)):
                    raise ValueError(f"{kwarg} must be encoded files as bytes, got {type(item).__name__}")
            arrays[name] = np.array([[bytes(item) for item in items]], dtype=np.object_)
    if temperature is not None:
        arrays["temperature"] = np.array([[_check_number("temperature", temperature, float, 0.0)]], dtype=np.float32)
    if top_k is not None:
        arrays["top_k"] = np.array([[_check_number("top_k", top_k, int, 0, 2**31 - 1)]], dtype=np.int64)
    if top_p is not None:
        arrays["top_p"] = np.array([[_check_number("top_p", top_p, float, 0.0, 1.0)]], dtype=np.float32)
    if seed is not None:
        arrays["random_seed"] = np.array([[_check_number("seed", seed, int, 0, 2**63 - 1)]], dtype=np.uint64)
    if stop_words:
        arrays["stop_words"] = np.array([[w.encode() for w in stop_words]], dtype=np.object_)
    if speculative_decoding is not None:
        if not isinstance(speculative_decoding, bool):
            raise ValueError(f"speculative_decoding must be a bool, got {speculative_decoding!r}")
        arrays["speculative_decoding"] = np.array([[speculative_decoding]], dtype=bool)
    return arrays


def data_url(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


class _SharedMemoryInputs:
    """Media inputs placed in registered shared-memory regions (system, or CUDA on `device_id`)."""

    def __init__(self, client, kind: str, device_id: int = 0):
        if kind == "cuda":
            import tritonclient.utils.cuda_shared_memory as shm_module  # needs cuda-python and a GPU
        else:
            import tritonclient.utils.shared_memory as shm_module
        self.client, self.kind, self.device_id, self.shm = client, kind, device_id, shm_module
        self.regions: list[tuple[str, object]] = []

    def place(self, infer_input, array: np.ndarray) -> None:
        payload = serialize_byte_tensor(array).item()
        name = f"mimo-client-{uuid.uuid4().hex}"
        data = np.frombuffer(payload, dtype=np.uint8)
        if self.kind == "cuda":
            handle = self.shm.create_shared_memory_region(name, len(payload), self.device_id)
            self.regions.append((name, handle))
            self.shm.set_shared_memory_region(handle, [data])
            self.client.register_cuda_shared_memory(name, self.shm.get_raw_handle(handle), self.device_id, len(payload))
        else:
            handle = self.shm.create_shared_memory_region(name, "/" + name, len(payload))
            self.regions.append((name, handle))
            self.shm.set_shared_memory_region(handle, [data])
            self.client.register_system_shared_memory(name, "/" + name, len(payload))
        infer_input.set_shared_memory(name, len(payload))

    def release(self) -> None:
        for name, handle in self.regions:
            try:
                if self.kind == "cuda":
                    self.client.unregister_cuda_shared_memory(name)
                else:
                    self.client.unregister_system_shared_memory(name)
            finally:
                self.shm.destroy_shared_memory_region(handle)
        self.regions = []


class MiMoClient:
    """One connection; runs one generation at a time (use one client per concurrent request)."""

    def __init__(self, url: str, protocol: str = "grpc", model: str = "ensemble", shared_memory: str = "none",
                 cuda_device_id: int = 0, response_timeout_s: float = RESPONSE_TIMEOUT_S):  # fmt: skip
        """`response_timeout_s`: the longest wait for the next response (TimeoutError / queue.Empty past it)."""
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        if shared_memory not in ("none", "system", "cuda"):
            raise ValueError(f"shared_memory must be 'none', 'system' or 'cuda', got {shared_memory!r}")
        if shared_memory != "none" and protocol != "grpc":
            raise ValueError("shared memory needs tensor inputs: use protocol='grpc' (HTTP generate takes JSON)")
        self.url, self.protocol, self.model = url, protocol, model
        self.shared_memory, self.cuda_device_id = shared_memory, cuda_device_id
        self.response_timeout_s = response_timeout_s
        self._client = grpcclient.InferenceServerClient(url) if protocol == "grpc" else None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> MiMoClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, text: str, images: Sequence[bytes] = (), audios: Sequence[bytes] = (),
                 videos: Sequence[bytes] = (), max_tokens: int = 64, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_words: Sequence[str] = (), stream: bool = True,
                 speculative_decoding: bool | None = None) -> Iterator[str | GenerationSummary]:  # fmt: skip
        """Yields the reply's text pieces as they arrive, then one GenerationSummary; raises GenerationError.
        `speculative_decoding=False` opts out of MTP drafting on a deployment that drafts."""
        arrays = request_arrays(text, {"images": images, "audios": audios, "videos": videos}, max_tokens,
                                temperature, top_k, top_p, seed, stop_words, stream, speculative_decoding)  # fmt: skip
        if self.protocol == "http":
            return self._generate_http(arrays, stream)
        return self._generate_grpc(arrays)

    def _inputs(self, arrays: dict[str, np.ndarray], shm: _SharedMemoryInputs | None) -> list:
        inputs = []
        for name, array in arrays.items():
            infer_input = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            if shm is not None and name in MEDIA_INPUTS.values():
                shm.place(infer_input, array)
            else:
                infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)
        return inputs

    def _generate_grpc(self, arrays: dict[str, np.ndarray]) -> Iterator[str | GenerationSummary]:
        shm = None if self.shared_memory == "none" else _SharedMemoryInputs(self._client, self.shared_memory,
                                                                             self.cuda_device_id)  # fmt: skip
        try:
            inputs = self._inputs(arrays, shm)
            collector = _Collector()
            yield from self._grpc_stream(inputs, [grpcclient.InferRequestedOutput(n) for n in OUTPUTS], collector)
            yield collector.summary()
        finally:
            if shm is not None:
                shm.release()

    def _grpc_stream(self, inputs, outputs, collector: _Collector) -> Iterator[str]:
        responses: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: responses.put((result, error)))
        finished = False
        try:
            self._client.async_stream_infer(self.model, inputs, outputs=outputs, enable_empty_final_response=True)
            while not finished:
                result, error = responses.get(timeout=self.response_timeout_s)
                if error is not None:
                    finished = True
                    raise GenerationError(error.message())
                finished = result.get_response().parameters["triton_final_response"].bool_param
                if result.as_numpy("text_output") is not None:
                    yield self._add_result(collector, result)
        finally:
            # the consumer stopped early: cancelling the stream tells the server to stop the generation
            self._client.stop_stream(cancel_requests=not finished)

    @staticmethod
    def _add_result(collector: _Collector, result) -> str:
        text = result.as_numpy("text_output").reshape(-1)[0].decode()
        finish_reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
        return collector.add(text, result.as_numpy("output_ids").reshape(-1).tolist(), finish_reason)

    def _generate_http(self, arrays: dict[str, np.ndarray], stream: bool) -> Iterator[str | GenerationSummary]:
        body = {}
        for name, array in arrays.items():
            values = array.reshape(-1).tolist()
            if name in MEDIA_INPUTS.values():
                body[name] = [data_url(v) for v in values]
            elif name in ("text_input", "stop_words"):
                decoded = [v.decode() for v in values]
                body[name] = decoded[0] if name == "text_input" else decoded
            else:
                body[name] = values[0]
        collector = _Collector()
        try:
            reply = self._post(f"{self.model}/{'generate_stream' if stream else 'generate'}", body)
        except urllib.error.HTTPError as error:
            raise GenerationError(_error_message(error.read())) from None
        with reply:  # a consumer that stops early closes the socket: the server stops the generation
            for line in reply if stream else [b"data:" + reply.read()]:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[len(b"data:") :])
                if "error" in event:
                    raise GenerationError(event["error"])
                ids = event["output_ids"]
                yield collector.add(event["text_output"], ids if isinstance(ids, list) else [ids],
                                    event["finish_reason"])  # fmt: skip
        yield collector.summary()

    def _post(self, path: str, body: dict):
        request = urllib.request.Request(f"http://{self.url}/v2/models/{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")  # fmt: skip
        return urllib.request.urlopen(request, timeout=self.response_timeout_s)


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError):
        return body.decode(errors="replace")
