"""The entry's requests to mimo_llm on its own server, over one shared gRPC stream, instead of a decoupled BLS call.

Why not BLS: with python_backend 2.51, a decoupled BLS stream open inside a request whose client cancels corrupts
the calling stub's heap ("corrupted size vs. prev_size", "Stub process 'ensemble_0_0' is not healthy") or crashes
tritonserver, within seconds under vanishing clients; the same load with non-decoupled BLS only, or with the
decoupled step called over gRPC, ran thousands of requests clean (docs/ARCHITECTURE.md "Entry model"). The
stream is never cancelled either (cancelling a gRPC stream with responses in flight is the other 2.51 crash):
a generation is ended with a `stop` request, and its responses are read (or dropped) up to its final one.

The server's own gRPC address comes from the launcher (`SELF_GRPC_URL_ENV`), which knows the flags it was given.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import grpc
import ml_dtypes
import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from mimo.epd.landing import LandingError, LandingPool, Lease
from mimo.serving.contract import EMBEDDING_DTYPES, POSTPROCESSING, STOP_REQUEST_ID
from mimo.serving.lifecycle import SELF_GRPC_URL_ENV
from mimo.serving.entry import CANCELLED, INTERNAL, INVALID_ARG, UNAVAILABLE, EntryError
from mimo.serving.triton_config import torch_dtype

LOOPBACK_DEFAULT_URL = "127.0.0.1:8001"  # tritonserver's default when the launcher did not say
ENTRY_CODES = {"StatusCode.INVALID_ARGUMENT": INVALID_ARG, "StatusCode.UNAVAILABLE": UNAVAILABLE,
               "StatusCode.CANCELLED": CANCELLED}  # fmt: skip


class LoopbackError(Exception):
    """A stream failed: `status` is Triton's gRPC status name (e.g. StatusCode.INVALID_ARGUMENT)."""

    def __init__(self, message: str, status: str | None):
        super().__init__(message)
        self.status = status


def self_grpc_url() -> str:
    return os.environ.get(SELF_GRPC_URL_ENV) or LOOPBACK_DEFAULT_URL


def wire_array(value: np.ndarray | torch.Tensor) -> np.ndarray:
    """A step input as numpy for the wire; a torch tensor (a GPU prompt table) is copied to the host, bfloat16 kept
    as ml_dtypes.bfloat16 (Triton BF16). With a device landing pool (`LoopbackLLM`) a GPU table never comes here."""
    if isinstance(value, np.ndarray):
        return value
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()


def infer_input(name: str, value: np.ndarray | torch.Tensor) -> grpcclient.InferInput:
    """The wire tensor (its bytes copied into the request now)."""
    array = wire_array(value)
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


TABLE_DTYPES = tuple(map(torch_dtype, EMBEDDING_DTYPES))  # what a prompt table may be (contract EMBEDDING)


def triton_dtype(dtype: torch.dtype) -> str:
    """Triton's name for a torch dtype, as the wire would send it (`wire_array`)."""
    return np_to_triton_dtype(wire_array(torch.empty(0, dtype=dtype)).dtype)


@dataclass(frozen=True, slots=True)
class SlicedInput:
    """A request input that is already in a slice of a landing region this server has registered: sent by reference
    (Triton reads it device to device from a CUDA region). The slice is the request's until mimo_llm's first
    response: by then its model has taken the input."""

    lease: Lease
    dtype: torch.dtype
    shape: tuple[int, ...]

    def infer_input(self, name: str) -> grpcclient.InferInput:
        tensor = grpcclient.InferInput(name, list(self.shape), triton_dtype(self.dtype))
        tensor.set_shared_memory(*self.lease.output_region)
        return tensor


class LoopbackStreams:
    """Decoupled requests to models of this server, multiplexed on one gRPC stream (`ModelStreamInfer` carries any
    number of requests; each response names its request's id, error responses too). One reader thread routes the
    responses to their requests, where a stream per request cost three threads (tritonclient's reader, gRPC's
    request consumer, the channel's poller) all contending for the stub's GIL. A stream that fails fails the
    requests on it; the next request opens a new one."""

    def __init__(self, url: str | None = None):
        self.url = url or self_grpc_url()
        self._stream: _SharedStream | None = None
        self._lock = threading.Lock()

    def stream(self, model: str, inputs: Mapping[str, grpcclient.InferInput], request_id: str,
               outputs: tuple[str, ...], parameters: Mapping[str, str] | None = None
               ) -> Iterator[list[dict[str, np.ndarray]]]:  # fmt: skip
        """The responses of one request (a response without tensors: {}), up to and including the final one, in
        batches: each batch is every response that had arrived since the previous one was taken (at least one), so
        a reader that falls behind catches up in one step. `request_id` must be unique among in-flight requests.

        Raises LoopbackError for an error response (after the batch of the responses before it). Leaving the loop
        early leaves the request running to its end, its responses dropped (no cancellation: the module docstring).
        """
        request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        for tensor in inputs.values():  # what tritonclient's own request builder reads of an InferInput
            request.inputs.append(tensor._get_tensor())
            if tensor._get_content() is not None:
                request.raw_input_contents.append(tensor._get_content())
        request.outputs.extend(service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs)
        for key, value in (parameters or {}).items():
            request.parameters[key].string_param = value
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        responses: queue.SimpleQueue = queue.SimpleQueue()
        shared = self._shared()
        shared.submit(request, responses)
        final = False
        try:
            while not final:
                batch, item = [], responses.get()
                while True:
                    if isinstance(item, LoopbackError):
                        final = True
                        if batch:
                            yield batch
                        raise item
                    result = grpcclient.InferResult(item)
                    batch.append({tensor.name: result.as_numpy(tensor.name) for tensor in item.outputs})
                    final = item.parameters["triton_final_response"].bool_param
                    if final or responses.empty():
                        break
                    item = responses.get()
                yield batch
        finally:
            if not final:
                shared.abandon(request_id)

    def close(self) -> None:
        with self._lock:
            shared, self._stream = self._stream, None
        if shared is not None:
            shared.close()

    def _shared(self) -> _SharedStream:
        with self._lock:
            if self._stream is None or not self._stream.alive:
                self._stream = _SharedStream(self.url)
            return self._stream


class _SharedStream:
    """One `ModelStreamInfer` call and the thread that reads it: responses go to the queue of the request they name
    (a `ModelInferResponse`, or a LoopbackError that ends the request)."""

    def __init__(self, url: str):
        # the message limits tritonclient's own channel sets (a prompt table crosses as bytes on a CPU server)
        limit = grpcclient.MAX_GRPC_MESSAGE_SIZE
        self._channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", limit),
                                                            ("grpc.max_receive_message_length", limit)])
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # None ends the request side
        self._open: dict[str, queue.SimpleQueue | None] = {}  # request id -> its queue (None: abandoned)
        self._lock = threading.Lock()
        self.alive = True
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._responses = stub.ModelStreamInfer(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, name="mimo-loopback-reader", daemon=True)
        self._reader.start()

    def submit(self, request, responses: queue.SimpleQueue) -> None:
        with self._lock:
            if not self.alive:
                responses.put(LoopbackError("the loopback stream to this server closed", "StatusCode.UNAVAILABLE"))
                return
            if request.id in self._open:
                raise ValueError(f"request id {request.id!r} is already in flight on the loopback stream")
            self._open[request.id] = responses
        self._requests.put(request)

    def abandon(self, request_id: str) -> None:
        """Its remaining responses are dropped (the request still runs to its final response)."""
        with self._lock:
            if request_id in self._open:
                self._open[request_id] = None

    def close(self) -> None:
        """Ends the request side; the server finishes what is in flight, then the reader ends with the stream."""
        self._requests.put(None)
        self._reader.join(timeout=30)
        with self._lock:
            idle = not self._open
        if idle:  # closing the channel under open requests would cancel them (the module docstring)
            self._channel.close()

    def _read(self) -> None:
        try:
            for message in self._responses:
                response = message.infer_response
                error = message.error_message
                # an error response ends its request, final flag or not (an unknown model's has none)
                done = bool(error) or response.parameters["triton_final_response"].bool_param
                with self._lock:
                    responses = self._open.pop(response.id, None) if done else self._open.get(response.id)
                if responses is not None:
                    responses.put(LoopbackError(error, None) if error else response)
            failure = ("the loopback stream to this server ended", "StatusCode.UNAVAILABLE")
        except grpc.RpcError as rpc_error:
            failure = (rpc_error.details() or str(rpc_error), str(rpc_error.code()))
        with self._lock:
            self.alive = False
            open_requests, self._open = self._open, {}
        for responses in open_requests.values():
            if responses is not None:
                responses.put(LoopbackError(*failure))


class LoopbackLLM:
    """The entry's `Steps.stream` / `Steps.stop` (mimo.serving.entry) for mimo_llm, over `LoopbackStreams`.

    `device_pool`: a landing pool in the LM GPU's memory. A CUDA tensor input (the colocated encoder's prompt table)
    is then copied into a slice of it, device to device, and sent by reference (`SlicedInput`), never through the
    host; without one it is copied to the host for the wire (`wire_array`). The pool's region is registered with
    this server at first use (its gRPC endpoint is not up while the models load).
    """

    def __init__(self, streams: LoopbackStreams | None = None, device_pool: LandingPool | None = None,
                 reserve_timeout_s: float = 30.0):  # fmt: skip
        self.streams = streams or LoopbackStreams()
        self.device_pool, self.reserve_timeout_s = device_pool, reserve_timeout_s
        self._registered: dict[str, object] = {}  # name -> the landing region registered with this server
        self._register_lock = threading.Lock()

    def stream(self, model: str, inputs: Mapping[str, np.ndarray | torch.Tensor | SlicedInput], request_id: str
               ) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
        leases, wire = [], {}
        running = False  # sent and not yet ended
        try:
            for name, value in inputs.items():
                if isinstance(value, torch.Tensor) and value.is_cuda and self.device_pool is not None:
                    value = self._slice_copy(value)
                if isinstance(value, SlicedInput):
                    leases.append(value.lease)
                    self._register(value.lease.pool.region)
                    value.lease.pool.region.synchronize()
                    wire[name] = value.infer_input(name)
                else:
                    wire[name] = infer_input(name, value)
            for response in self._responses(model, wire, request_id):
                for lease in leases:
                    lease.release()
                running = True
                yield response
            running = False
        except EntryError:
            running = False  # an error response ended it
            raise
        finally:
            for lease in leases:
                lease.release()
            if running:  # the caller left before the final response: the generation is not left running unread
                with contextlib.suppress(EntryError):
                    self.stop(model, request_id)

    def close(self) -> None:
        """Unregisters the regions from this server (best effort: it may be shutting down); the pools are their
        owner's to close."""
        if self._registered:
            with contextlib.suppress(Exception), grpcclient.InferenceServerClient(self.streams.url) as client:
                for region in self._registered.values():
                    region.unregister(client)
            self._registered.clear()
        self.streams.close()

    def _slice_copy(self, tensor: torch.Tensor) -> SlicedInput:
        if tensor.dtype not in TABLE_DTYPES:
            raise EntryError(f"a {tensor.dtype} device tensor cannot go to mimo_llm by reference", INTERNAL)
        byte_size = tensor.numel() * tensor.element_size()
        try:
            lease = self.device_pool.reserve(byte_size, self.reserve_timeout_s)
        except LandingError as error:
            raise EntryError(f"no room for the prompt table in the device landing pool: {error}", UNAVAILABLE) from None
        sliced = SlicedInput(lease, tensor.dtype, tuple(tensor.shape))
        lease.view(tensor.dtype, sliced.shape).copy_(tensor)
        return sliced

    def _register(self, region) -> None:
        with self._register_lock:
            if region.name not in self._registered:
                with grpcclient.InferenceServerClient(self.streams.url) as client:
                    try:
                        region.register(client)
                    except InferenceServerException as error:
                        # the language entry's fallback encoder (its own encode_item) registered it first
                        if "ALREADY_EXISTS" not in str(error.status()):
                            raise
                self._registered[region.name] = region

    def stop(self, model: str, request_id: str) -> None:
        # a request of its own with the target in a parameter (mimo.serving.llm.stop_target)
        stop = {"stop": infer_input("stop", np.array([[True]]))}
        for _ in self._responses(model, stop, uuid.uuid4().hex, {STOP_REQUEST_ID: request_id}):
            pass

    def _responses(self, model, inputs, request_id, parameters=None):
        # only what the entry reads: it detokenizes as postprocessing does (one tensor less per streamed response)
        outputs = tuple(tensor.name for tensor in POSTPROCESSING.inputs)
        try:
            for batch in self.streams.stream(model, inputs, request_id, outputs, parameters):
                yield merge_responses(batch)
        except LoopbackError as error:
            raise EntryError(str(error), ENTRY_CODES.get(error.status, INTERNAL)) from None


def merge_responses(responses: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Consecutive streamed responses of one mimo_llm request as the one response it would have sent for all their
    tokens at once (`mimo.serving.llm.LLMResponse`): the `output_ids [1, 1, n]` concatenated, the first's
    `preceding_ids`, the last's `sequence_length` and `finish_reason`. Responses without tensors add nothing."""
    full = [response for response in responses if response]
    if len(full) <= 1:
        return full[0] if full else {}
    merged = dict(full[-1])
    merged["output_ids"] = np.concatenate([response["output_ids"] for response in full], axis=-1)
    merged["preceding_ids"] = full[0]["preceding_ids"]
    return merged
