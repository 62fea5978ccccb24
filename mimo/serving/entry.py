"""The entry model (`ensemble`) without Triton: client inputs checked, the steps called, clients that leave noticed.

Each request runs on a worker thread: preprocessing -> mimo_encoder (skipped for a request without media: a step whose
inputs are all earlier steps' outputs, every one empty) -> mimo_llm (streamed), each mimo_llm response
detokenized here (`mimo.serving.detokenize`, as the postprocessing model does for direct callers) and sent on. The
mimo_llm request id is the entry's own uuid4, never the client's, so no client can name (stop) another's
generation. One watcher thread asks every in-flight request `is_cancelled()` each check period; for a client that
left it sends mimo_llm a `stop` with that generation's id (again each period until the stream ends: a stop that
reaches mimo_llm before the request itself finds nothing), and a request still in preprocessing or the encoder ends
there. While the server drains (`mimo.serving.lifecycle`) new requests are refused and open ones end with
SHUTTING_DOWN.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import contextlib
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mimo.serving import lifecycle
from mimo.serving.contract import ENTRY, MODELS, ModelSpec, Step, TensorSpec, entry_steps, numpy_type
from mimo.serving.detokenize import IncrementalDetokenizer, detokenized_outputs

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
# Triton error codes the entry answers with (model.py maps them to pb_utils.TritonError codes)
INVALID_ARG, UNAVAILABLE, CANCELLED, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL"


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    low_open: bool = False  # (low, high] instead of [low, high]

    def __contains__(self, value) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def describe(self, integer: bool) -> str:
        low, high = (int(self.low), int(self.high)) if integer else (f"{self.low:g}", f"{self.high:g}")
        return f"{'an integer' if integer else 'a finite number'} in {'(' if self.low_open else '['}{low}, {high}]"


# what the engine accepts (mimo.engine.SamplingParams), within the INT32 of the step inputs they become
RANGES = {
    "max_tokens": Range(1, INT32_MAX),
    "top_k": Range(0, INT32_MAX),
    "random_seed": Range(0, 2**63 - 1),
    "temperature": Range(0.0, float(np.finfo(np.float32).max)),
    "top_p": Range(0.0, 1.0, low_open=True),
}


class EntryError(Exception):
    """Ends one request with an error response: `code` is one of the codes above."""

    def __init__(self, message: str, code: str = INTERNAL):
        super().__init__(message)
        self.code = code


def check_client_inputs(inputs: Mapping[str, np.ndarray], spec: tuple[TensorSpec, ...] = ENTRY.inputs) -> None:
    """Raises EntryError (INVALID_ARG) naming the input that is missing, not one value, or out of range.

    Triton checks the declared dtypes; the integers are declared INT64 / UINT64, so no protocol wraps them before
    this check (HTTP JSON would wrap an INT32: 2**32 + 4 arrived as 4).
    """
    for tensor in spec:
        array = inputs.get(tensor.name)
        if array is None:
            if not tensor.optional:
                raise EntryError(f"missing required input '{tensor.name}'", INVALID_ARG)
            continue
        if tensor.dtype == "BYTES" or tensor.ragged:
            continue  # text and media: preprocessing checks them
        if array.size != 1:
            raise EntryError(f"{tensor.name} must hold exactly one value, got {array.size}", INVALID_ARG)
        valid = RANGES.get(tensor.name)
        if valid is None:
            continue
        value = array.reshape(()).item()
        integer = tensor.dtype != "FP32"
        if (not integer and not math.isfinite(value)) or value not in valid:
            raise EntryError(f"{tensor.name} must be {valid.describe(integer)}, got {value}", INVALID_ARG)


class Client(Protocol):
    """The client's request: a Triton request and its response sender in model.py."""

    def is_cancelled(self) -> bool: ...

    def send(self, outputs: dict[str, np.ndarray], final: bool) -> None: ...

    def send_error(self, error: EntryError) -> None:
        """Ends the request with an error response."""


# the language role's first step, run on the entry's worker (mimo.serving.language): the request's inputs ->
# mimo_llm inputs that no declared step gives (its planned input_ids, its prompt table from the encoder servers),
# held (the landing slice) until the mimo_llm stream ends
Prepare = Callable[[Mapping[str, np.ndarray]], contextlib.AbstractContextManager[Mapping[str, object]]]


class Steps(Protocol):
    """The models the entry calls (BLS in model.py). Inputs are the entry's numpy arrays or earlier step outputs,
    passed on as they came (a GPU prompt table stays where it is); a failed step raises EntryError."""

    def infer(self, model: str, inputs: Mapping[str, object]) -> dict[str, object]: ...

    def is_empty(self, value: object) -> bool:
        """Whether a step output holds no elements (a text-only request's packed media: no items)."""

    def stream(self, model: str, inputs: Mapping[str, object], request_id: str) -> Iterator[dict[str, np.ndarray]]:
        """The responses of a decoupled model, as numpy arrays (a response without tensors: {})."""

    def stop(self, model: str, request_id: str) -> None:
        """TensorRT-LLM's `stop` for the in-flight request `request_id` of a decoupled model."""


@dataclass
class _InFlight:
    client: Client
    inputs: dict[str, np.ndarray]
    llm_id: str
    llm_started: bool = False
    cancelled: bool = False  # the client left
    draining: bool = False  # the server is shutting down
    final_sent: bool = False
    # held around every response and around is_cancelled(): Triton frees a request's response factory with its
    # final response, and is_cancelled() after that crashes tritonserver (TRITONBACKEND_ResponseFactoryIsCancelled).
    # One lock for all requests of the entry: these stub calls from several threads at once were seen to corrupt the
    # stub's heap ("double free or corruption") under the vanishing-clients test.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client_left(self) -> bool:
        with self.lock:
            return not self.final_sent and self.client.is_cancelled()


class Entry:
    """Runs client requests over the steps on `workers` threads and watches for clients that leave."""

    def __init__(self, steps: Steps, detokenizer: IncrementalDetokenizer, check_period_s: float, workers: int,
                 on_in_flight: Callable[[int], None] | None = None, entry: ModelSpec = ENTRY,
                 models: Mapping[str, ModelSpec] = MODELS, prepare: Prepare | None = None):  # fmt: skip
        self.steps, self.detokenizer, self.check_period_s = steps, detokenizer, check_period_s
        self.prepare = prepare
        self.on_in_flight = on_in_flight
        self.inputs = entry.inputs
        self._client_inputs = {tensor.name for tensor in entry.inputs}
        self.plan = entry_steps(entry, models)
        # (step, step input) -> its spec: the dtype a client input is narrowed to
        self._consumers = {(step.model, tensor.name): tensor for step in self.plan
                           for tensor in models[step.model].inputs}  # fmt: skip
        self._in_flight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._client_lock = threading.Lock()  # see _InFlight.lock
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mimo-entry")
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="mimo-entry-watcher", daemon=True)

    def start(self) -> Entry:
        self._watcher.start()
        return self

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ends every open request with SHUTTING_DOWN (stopping its generation), waiting at most `timeout_s`."""
        with self._lock:
            jobs = list(self._in_flight.values())
        for job in jobs:
            job.draining = True
            if job.llm_started:
                self._stop(job)
        deadline = time.monotonic() + timeout_s
        while self.num_in_flight() and time.monotonic() < deadline:
            time.sleep(self.check_period_s)
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def submit(self, client: Client, inputs: dict[str, np.ndarray]) -> None:
        """Checks the inputs at once (a bad request is answered here) and queues the request for a worker."""
        try:
            check_client_inputs(inputs, self.inputs)
            if lifecycle.draining():
                raise EntryError(lifecycle.SHUTTING_DOWN, UNAVAILABLE)
        except EntryError as error:
            with self._client_lock:
                client.send_error(error)
            return
        job = _InFlight(client, inputs, llm_id=uuid.uuid4().hex, lock=self._client_lock)
        with self._lock:
            self._in_flight[job.llm_id] = job
            count = len(self._in_flight)
        self._publish(count)
        self._pool.submit(self._run, job)

    def _run(self, job: _InFlight) -> None:
        try:
            self._serve(job)
        except EntryError as error:
            self._end(job, error)
        except Exception as error:  # noqa: BLE001 - fail this request only
            logger.exception("entry request failed")
            self._end(job, EntryError(f"{type(error).__name__}: {error}", INTERNAL))
        finally:
            with self._lock:
                del self._in_flight[job.llm_id]
                count = len(self._in_flight)
            self._publish(count)

    def _serve(self, job: _InFlight) -> None:
        available: dict[str, object] = dict(job.inputs)  # entry input names, then `<model>.<output>`
        *before, llm = self.plan
        self._check_wanted(job)
        with self.prepare(job.inputs) if self.prepare else contextlib.nullcontext({}) as prepared:
            for step in before:
                self._check_wanted(job)
                inputs = self._step_inputs(step, available)
                if self._nothing_to_do(step, inputs):
                    continue  # its outputs stay absent: the later steps' inputs they feed are optional
                outputs = self.steps.infer(step.model, inputs)
                available.update({f"{step.model}.{name}": tensor for name, tensor in outputs.items()})
            with self._lock:  # the watcher sends stops only once this is set
                self._check_wanted(job)
                job.llm_started = True
            try:
                inputs = {**self._step_inputs(llm, available), **prepared}
                for response in self.steps.stream(llm.model, inputs, job.llm_id):
                    if response:
                        self._forward(job, response)
            except EntryError:
                self._check_wanted(job)  # we stopped it: say why
                raise
        if not job.final_sent:
            self._check_wanted(job)  # a generation we stopped ends with finish_reason "cancelled", not forwarded
            raise EntryError(f"{llm.model} ended the stream without a final response", INTERNAL)

    def _forward(self, job: _InFlight, response: dict[str, np.ndarray]) -> None:
        outputs = detokenized_outputs(self.detokenizer, response["output_ids"], response["preceding_ids"],
                                      response["finish_reason"])  # fmt: skip
        final = bool(outputs["finish_reason"].item())
        if job.cancelled or job.draining:
            return  # the generation is being stopped; the request ends with why
        try:
            with job.lock:  # never beside an is_cancelled() of the watcher on the same request
                job.final_sent = final
                job.client.send(outputs, final)
        except Exception as error:  # noqa: BLE001 - the client went away: its generation must not go on
            logger.warning("sending to a client failed (%s); stopping its generation", error)
            job.cancelled = True
            self._stop(job)

    def _nothing_to_do(self, step: Step, inputs: Mapping[str, object]) -> bool:
        """A step fed only by earlier steps' outputs, all of them empty (mimo_encoder for a text-only request)."""
        given = {name: source for name, source in step.input_map.items() if name in inputs}
        if not given or any(source in self._client_inputs for source in given.values()):
            return False
        return all(self.steps.is_empty(inputs[name]) for name in given)

    def _check_wanted(self, job: _InFlight) -> None:
        if job.draining:
            raise EntryError(lifecycle.SHUTTING_DOWN, UNAVAILABLE)
        if job.cancelled:
            raise EntryError("request cancelled: the client left", CANCELLED)

    def _end(self, job: _InFlight, error: EntryError) -> None:
        with job.lock:
            if job.final_sent:
                return
            job.final_sent = True
            try:
                job.client.send_error(error)
            except Exception as send_error:  # noqa: BLE001 - nobody is listening any more
                logger.info("could not send the final error to a client (%s)", send_error)

    def _step_inputs(self, step: Step, available: Mapping[str, object]) -> dict[str, object]:
        inputs = {}
        for name, source in step.input_map.items():
            value = available.get(source)
            if value is None:
                continue  # an optional client input not given
            if isinstance(value, np.ndarray):  # a client input, range-checked: narrow it to the step's dtype
                value = value.astype(numpy_type(self._consumers[step.model, name].dtype), copy=False)
            inputs[name] = value
        return inputs

    def _watch(self) -> None:
        while not self._stopping.wait(self.check_period_s):
            try:
                self._check_clients()
            except Exception:  # noqa: BLE001 - a dead watcher would let every leaving client's generation run on
                logger.exception("entry watcher iteration failed")

    def _check_clients(self) -> None:
        drain = lifecycle.draining()
        with self._lock:
            jobs = list(self._in_flight.values())
        for job in jobs:
            if not job.cancelled and job.client_left():
                job.cancelled = True
            job.draining = job.draining or drain
            with self._lock:
                stop = job.llm_started and (job.cancelled or job.draining) and job.llm_id in self._in_flight
            if stop:
                self._stop(job)

    def _stop(self, job: _InFlight) -> None:
        try:
            self.steps.stop(self.plan[-1].model, job.llm_id)
        except EntryError as error:
            logger.warning("stopping generation %s failed: %s", job.llm_id, error)

    def _publish(self, count: int) -> None:
        if self.on_in_flight is not None:
            self.on_in_flight(count)

