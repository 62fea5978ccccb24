"""`mimo_llm` without Triton: TensorRT-LLM-style request tensors -> engine requests, and the generation loop.

Request tensors keep their batch dimension (`[1, ...]`), as Triton delivers them for `max_batch_size > 0`.
Outputs follow `tensorrt_llm` with `exclude_input_in_output: true` and beam width 1 (shapes without the batch
dimension): `output_ids [1, n]` (the new tokens of this response; every generated token when not streaming),
`sequence_length [1]` (tokens generated so far), plus `preceding_ids [1, <= DETOKENIZATION_WINDOW]` for the
stateless detokenizer and `finish_reason [1]` ("" until the last response, then "stop" or "length").
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from mimo.engine import EngineConfig, InvalidRequestError, LLMEngine, RequestOutput, SamplingParams, engine_knobs
from mimo.serving.contract import STOP_REQUEST_ID
from mimo.serving.detokenize import DETOKENIZATION_WINDOW
from mimo.serving.lifecycle import SHUTTING_DOWN, draining
from mimo.serving.triton_config import knob_parameters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LLMRequest:
    prompt_ids: list[int]
    sampling: SamplingParams
    prompt_table: torch.Tensor | None  # [P, hidden] on the device it arrived on
    streaming: bool


@dataclass(frozen=True)
class LLMResponse:
    output_ids: list[int]
    preceding_ids: list[int]
    sequence_length: int
    finish_reason: str  # "" until the last response

    def as_arrays(self) -> dict[str, np.ndarray]:
        """Response tensors with their batch dimension: `[1, beam=1, n]` ids, `[1, 1]` length and reason."""
        return {
            "output_ids": np.array([[self.output_ids]], dtype=np.int32).reshape(1, 1, -1),
            "preceding_ids": np.array([[self.preceding_ids]], dtype=np.int32).reshape(1, 1, -1),
            "sequence_length": np.array([[self.sequence_length]], dtype=np.int32),
            "finish_reason": np.array([[self.finish_reason.encode()]], dtype=np.object_),
        }


def _single(inputs: Mapping[str, torch.Tensor], name: str, default=None):
    """The one value of a `[1, 1]` (or `[1]`) request tensor, as a Python number."""
    tensor = inputs.get(name)
    if tensor is None:
        if default is None:
            raise InvalidRequestError(f"missing required input '{name}'")
        return default
    if tensor.numel() != 1:
        raise InvalidRequestError(f"input '{name}' must hold exactly one value, got shape {list(tensor.shape)}")
    value = tensor.reshape(()).item()
    if isinstance(value, float) and not np.isfinite(value):
        raise InvalidRequestError(f"input '{name}' must be a finite number, got {value}")
    return value


def parse_stop_words(stop_words_list: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """TensorRT-LLM `stop_words_list [1, 2, L]`: row 0 the concatenated ids, row 1 each word's end offset (-1 pad)."""
    if stop_words_list.dim() != 3 or stop_words_list.shape[:2] != (1, 2):
        raise InvalidRequestError(f"input 'stop_words_list' must be [1, 2, L], got {list(stop_words_list.shape)}")
    ids, offsets = stop_words_list[0].tolist()
    words, start = [], 0
    for end in offsets:
        if end < 0:
            break
        if not start < end <= len(ids):
            raise InvalidRequestError(f"input 'stop_words_list' has end offset {end} outside ({start}, {len(ids)}]")
        words.append(tuple(ids[start:end]))
        start = end
    return tuple(words)


def is_stop_request(inputs: Mapping[str, torch.Tensor]) -> bool:
    """TensorRT-LLM's `stop`: true asks to end the in-flight request that has this request's id."""
    return "stop" in inputs and bool(_single(inputs, "stop"))


def stop_target(request_id: str, parameters_json: str) -> str:
    """The id a `stop` ends: its request parameter `stop_request_id` if given (BLS callers), else its own id."""
    try:
        parameters = json.loads(parameters_json or "{}")
    except ValueError:
        raise InvalidRequestError(f"request parameters are not JSON: {parameters_json[:80]!r}") from None
    target = parameters.get(STOP_REQUEST_ID, request_id)
    if not isinstance(target, str):
        raise InvalidRequestError(f"request parameter '{STOP_REQUEST_ID}' must be a string, got {target!r}")
    return target


def convert_llm_request(inputs: Mapping[str, torch.Tensor], hidden_size: int | None = None) -> LLMRequest:
    """Triton request tensors (names of the `tensorrt_llm` model) -> `LLMRequest`; raises InvalidRequestError.

    `hidden_size` (the model's) is the width a `prompt_embedding_table` must have; None leaves that to the engine.
    """
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise InvalidRequestError("missing required input 'input_ids'")
    prompt_ids = input_ids.reshape(-1).tolist()
    if "input_lengths" in inputs:
        length = _single(inputs, "input_lengths")
        if not 0 < length <= len(prompt_ids):
            raise InvalidRequestError(f"input_lengths {length} must be in [1, {len(prompt_ids)}] (the input_ids given)")
        prompt_ids = prompt_ids[:length]
    if "pad_id" in inputs and _single(inputs, "pad_id") < 0:
        raise InvalidRequestError("pad_id must be >= 0")
    stop_words = inputs.get("stop_words_list")
    try:
        sampling = SamplingParams(
            max_tokens=_single(inputs, "request_output_len"),
            temperature=_single(inputs, "temperature", 1.0),
            top_k=_single(inputs, "runtime_top_k", 0),
            top_p=_single(inputs, "runtime_top_p", 1.0),
            seed=_single(inputs, "random_seed") if "random_seed" in inputs else None,
            end_id=_single(inputs, "end_id") if "end_id" in inputs else None,
            stop_token_sequences=parse_stop_words(stop_words) if stop_words is not None else (),
            speculative=bool(_single(inputs, "speculative_decoding", True)),
        )
    except InvalidRequestError as error:
        # name the Triton input, not the engine field, in what the client reads
        message = str(error)
        for field_name, tensor_name in _SAMPLING_INPUT_NAMES.items():
            message = message.replace(f"SamplingParams.{field_name} ", f"{tensor_name} ")
        raise InvalidRequestError(message) from None
    streaming = bool(_single(inputs, "streaming", False))
    return LLMRequest(prompt_ids, sampling, _prompt_table(inputs, hidden_size), streaming)


_SAMPLING_INPUT_NAMES = {
    "max_tokens": "request_output_len", "temperature": "temperature", "top_k": "runtime_top_k",
    "top_p": "runtime_top_p", "seed": "random_seed", "end_id": "end_id", "stop_token_sequences": "stop_words_list",
}


def _prompt_table(inputs: Mapping[str, torch.Tensor], hidden_size: int | None) -> torch.Tensor | None:
    table = inputs.get("prompt_embedding_table")
    if table is None:
        if "prompt_vocab_size" in inputs and _single(inputs, "prompt_vocab_size") != 0:
            raise InvalidRequestError("prompt_vocab_size > 0 needs a prompt_embedding_table")
        return None
    if table.dim() == 3 and table.shape[0] == 1:
        table = table[0]
    if table.dim() != 2 or (hidden_size is not None and table.shape[1] != hidden_size):
        raise InvalidRequestError(f"prompt_embedding_table must be [1, P, {hidden_size or 'hidden'}] (the model's "
                                  f"hidden size), got {list(inputs['prompt_embedding_table'].shape)}")  # fmt: skip
    rows = _single(inputs, "prompt_vocab_size", table.shape[0])
    if not 0 <= rows <= table.shape[0]:
        raise InvalidRequestError(f"prompt_vocab_size {rows} must be in [0, {table.shape[0]}] (the table's rows)")
    if not rows:
        return None
    # one host sync per request (the table may be on the GPU): here at the boundary, never per step
    if not torch.isfinite(table[:rows]).all():
        raise InvalidRequestError("prompt_embedding_table holds non-finite values (NaN or inf)")
    # the request's input buffers are released once execute() returns; the engine keeps the table until it finishes
    return table[:rows].clone()


class ResponseSink(Protocol):
    """Where one request's responses go (a Triton response sender in `mimo_llm`)."""

    def send(self, response: LLMResponse, final: bool) -> None: ...

    def send_error(self, message: str, code: str = "internal") -> None:
        """Ends the request with an error response; `code`: "internal" | "cancelled" | "unavailable"."""

    def is_cancelled(self) -> bool: ...


@dataclass
class _Active:
    request_id: str  # the engine's
    sink: ResponseSink
    streaming: bool
    client_id: str  # the Triton request id ("" if the client gave none); `stop` requests name it
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # generated tokens already handed to a response (streaming)
    stopped: bool = False  # ended by a `stop` request
    ending: _Ending | None = None  # how the request ended, once it has; then it is no longer active


@dataclass(frozen=True, slots=True)
class _Ending:
    finish_reason: str  # a final response with the tokens: "stop" | "length" | "cancelled" (a `stop`)
    error: str | None = None  # instead, a final error response with this message ...
    code: str = "internal"  # ... and code


@dataclass(frozen=True, slots=True)
class _Send:
    """One response for the sender thread, taken from a request's state under the loop's lock."""

    request: _Active
    response: LLMResponse | None  # None: the error of `ending`
    ending: _Ending | None  # None: a streamed, not final, response


class ServerShuttingDown(RuntimeError):
    """A request that arrived while the server drains (`mimo.serving.lifecycle`): refused, nothing queued."""


IDLE_WAKE_S = 0.05  # how often an idle stepping thread looks for a drain or a shutdown (work wakes it at once)


class GenerationLoop:
    """Two threads: one steps the engine and records each request's new tokens; one sends the responses.

    The stepping thread never waits on a send (a response sender's call is a round trip to the Triton process):
    the next step runs while the last one's tokens go out. The sender takes every request with something new at
    once; a request whose tokens of several steps accumulated while the sender was busy gets them in one response
    (as an MTP step's several tokens), one that has a single new token gets it at once. Every stub call of the loop
    (`send`, `send_error`, `is_cancelled`, `publish_metrics`) happens on the sender thread.

    Cancellation: every `cancellation_check_period_s` the sender asks each sink `is_cancelled()` and aborts those
    requests, which frees their KV at once. A sink that fails to send is treated as cancelled. `publish_metrics`
    runs at most once per period, and within a period of the last step (not again while nothing steps).
    Drain: once the launcher starts a shutdown (`draining()`), the loop aborts every request it holds and ends
    each with a final SHUTTING_DOWN error; `submit` refuses new ones.
    """

    def __init__(
        self,
        engine: LLMEngine,
        cancellation_check_period_s: float,
        publish_metrics: Callable[[], None] | None = None,
    ):
        self.engine = engine
        self.cancellation_check_period_s = cancellation_check_period_s
        self.publish_metrics = publish_metrics
        self._active: dict[str, _Active] = {}
        self._by_client: dict[str, str] = {}  # client id -> engine request id, for the in-flight ones with an id
        self._lock = threading.Lock()
        self._ready: dict[str, _Active] = {}  # requests with something to send, in the order they got it
        self._ready_added = threading.Condition(self._lock)
        self._running = threading.Event()
        self._sending = False  # the sender thread runs; cleared (under the lock) to end it once it has sent all
        self._thread = threading.Thread(target=self._run, name="mimo-generation-loop", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="mimo-response-sender", daemon=True)
        self._next_request = 0
        self._steps = 0  # engine steps so far: the metrics are published again only after one

    def start(self) -> None:
        self._running.set()
        self._sending = True
        self._sender.start()
        self._thread.start()

    def shutdown(self) -> None:
        """Stops stepping, aborts what is still running and ends those requests with an error."""
        self._running.clear()
        if self._thread.is_alive():
            self._thread.join()
        self._end_all()
        with self._lock:
            self._sending = False
            self._ready_added.notify_all()
        if self._sender.is_alive():
            self._sender.join()
        with self._lock:  # never started: the errors go out from here
            sends = self._take_ready()
        self._send_all(sends)

    def submit(self, request: LLMRequest, sink: ResponseSink, client_id: str = "") -> str:
        """Queues a converted request; raises ServerShuttingDown while draining, InvalidRequestError if the engine
        refuses it or `client_id` is already in flight (ids are unique among in-flight requests, so a `stop` names
        one); nothing is queued then."""
        if draining():
            raise ServerShuttingDown(SHUTTING_DOWN)
        with self._lock:
            if client_id in self._by_client:
                raise InvalidRequestError(f"request id {client_id!r} is already in flight: ids must be unique among "
                                          "in-flight requests")  # fmt: skip
            request_id = f"req-{self._next_request}"
            self._next_request += 1
            self._active[request_id] = _Active(request_id, sink, request.streaming, client_id)
            if client_id:
                self._by_client[client_id] = request_id
        try:
            self.engine.add_request(request_id, request.prompt_ids, request.sampling, request.prompt_table)
        except Exception:
            with self._lock:
                self._forget(request_id)
            raise
        with self._lock:
            ended = request_id not in self._active
        if ended:  # a drain ended it between the two locks, before the engine held it to abort
            self.engine.abort(request_id)
        return request_id

    def abort_client_request(self, client_id: str) -> bool:
        """Aborts the in-flight request sent under `client_id` (TensorRT-LLM's `stop`); False if there is none."""
        if not client_id:
            raise InvalidRequestError("a stop request needs the request id of the request to stop")
        with self._lock:
            request_id = self._by_client.get(client_id)
            if request_id is not None:
                self._active[request_id].stopped = True
        return request_id is not None and self.engine.abort(request_id)

    def _forget(self, request_id: str) -> _Active | None:
        """Under the lock: the request leaves the active ones (its client id is free again)."""
        request = self._active.pop(request_id, None)
        if request is not None and request.client_id:
            self._by_client.pop(request.client_id, None)
        return request

    def num_active(self) -> int:
        with self._lock:
            return len(self._active)

    def _run(self) -> None:
        while self._running.is_set():
            try:
                self._iterate()
            except Exception:  # noqa: BLE001 - a dead loop would hang every request; log and keep serving
                logger.exception("generation loop iteration failed")

    def _iterate(self) -> None:
        if draining():
            self._end_all()
        if not self.engine.wait_for_work(timeout=IDLE_WAKE_S):
            return
        outputs = self.engine.step()
        with self._lock:
            self._steps += 1
            for output in outputs:
                self._record(output)

    def _record(self, output: RequestOutput) -> None:
        """Under the lock: a step's output joins its request's state; the sender is woken if it has a response."""
        request = self._forget(output.request_id) if output.finished else self._active.get(output.request_id)
        if request is None:
            return
        request.generated += output.new_token_ids
        if output.finish_reason == "error":
            request.ending = _Ending("", f"generation failed: {output.error}")
        elif output.finish_reason == "cancelled" and request.stopped:
            # TensorRT-LLM's `stop`: a final response with the tokens so far. Not the CANCELLED error: the
            # entry's decoupled BLS response iterator (Triton 2.51) was seen never to end on that one.
            request.ending = _Ending("cancelled")
        elif output.finish_reason == "cancelled":
            request.ending = _Ending("", "request cancelled", "cancelled")
        elif output.finished:
            request.ending = _Ending(output.finish_reason or "")
        elif not (request.streaming and output.new_token_ids):
            return
        self._ready[request.request_id] = request
        self._ready_added.notify()

    def _end_all(self) -> None:
        """Aborts every request (its KV is free at once) and ends it with a final SHUTTING_DOWN error."""
        with self._lock:
            active, self._active, self._by_client = self._active, {}, {}
            for request in active.values():
                request.ending = _Ending("", SHUTTING_DOWN, "unavailable")
                self._ready[request.request_id] = request
            self._ready_added.notify()
        for request_id in active:
            self.engine.abort(request_id)

    def _send_loop(self) -> None:
        period = self.cancellation_check_period_s
        last_check = last_publish = 0.0
        published_steps = -1
        while True:
            with self._lock:
                if not self._ready and self._sending:
                    self._ready_added.wait(period or None)
                if not self._ready and not self._sending:
                    return
                sends = self._take_ready()
                steps = self._steps
            try:
                self._send_all(sends)
                now = time.monotonic()
                if now - last_check >= period:
                    last_check = now
                    self._abort_cancelled()
                if self.publish_metrics is not None and steps != published_steps and now - last_publish >= period:
                    last_publish, published_steps = now, steps
                    self.publish_metrics()
            except Exception:  # noqa: BLE001 - a dead sender would hang every request; log and keep sending
                logger.exception("response sender iteration failed")

    def _take_ready(self) -> list[_Send]:
        """Under the lock: the response of every request with something new, its state marked as sent."""
        sends = []
        for request in self._ready.values():
            start = request.sent if request.streaming else 0
            if request.ending is not None and request.ending.error is not None:
                sends.append(_Send(request, None, request.ending))
                continue
            response = LLMResponse(
                output_ids=request.generated[start:],
                preceding_ids=request.generated[max(0, start - DETOKENIZATION_WINDOW) : start],
                sequence_length=len(request.generated),
                finish_reason=request.ending.finish_reason if request.ending is not None else "",
            )
            request.sent = len(request.generated)
            sends.append(_Send(request, response, request.ending))
        self._ready = {}
        return sends

    def _send_all(self, sends: list[_Send]) -> None:
        for send in sends:
            request = send.request
            try:
                if send.response is None:
                    request.sink.send_error(send.ending.error, send.ending.code)
                else:
                    request.sink.send(send.response, final=send.ending is not None)
            except Exception as error:  # noqa: BLE001 - the client went away; its request must not hold KV
                logger.warning("sending to %s failed (%s); aborting it", request.request_id, error)
                if send.ending is None:
                    self.engine.abort(request.request_id)

    def _abort_cancelled(self) -> None:
        with self._lock:
            active = list(self._active.items())
        for request_id, request in active:
            if request.sink.is_cancelled():
                self.engine.abort(request_id)


def speculative_rates(stats: Mapping[str, int]) -> dict[str, float]:
    """The rates of the engine's MTP counters (`LLMEngine.speculative_stats`), 0 before any verification:
    `acceptance_rate` = accepted / drafted, `accept_length` = tokens per verify of a sequence (bonus included)."""
    verifications = stats["verifications"]
    return {
        "acceptance_rate": stats["accepted_tokens"] / stats["draft_tokens"] if stats["draft_tokens"] else 0.0,
        "accept_length": 1 + stats["accepted_tokens"] / verifications if verifications else 0.0,
    }


def engine_config(model_config: Mapping, device: torch.device, dtype: torch.dtype) -> EngineConfig:
    """EngineConfig from the `mimo_llm` config.pbtxt parameters: one per knob (`engine_knobs`), "" for None."""
    return EngineConfig(**knob_parameters(model_config, engine_knobs()), device=device, dtype=dtype)
