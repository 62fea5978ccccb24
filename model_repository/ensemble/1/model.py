"""ensemble: the entry model clients call, a decoupled BLS model over preprocessing -> mimo_encoder -> mimo_llm.

A Triton ensemble does not see its client leave; a decoupled Python model does (`request.is_cancelled()`), so the
entry is this model and the logic is `mimo.serving.entry`. On the language server (its config has the language
parameters, contract.LANGUAGE_PARAMETERS) the media go to the encoder servers instead (`mimo.serving.language`).
"""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from mimo.config import MiMoV2Config
from mimo.epd.landing import LandingPool, landing_region
from mimo.epd.orchestrate import COUNTERS
from mimo.processing.processor import MiMoProcessor
from mimo.serving.contract import ENTRY, LANGUAGE_ENTRY, LANGUAGE_PARAMETERS, MODELS
from mimo.serving.detokenize import IncrementalDetokenizer
from mimo.serving.entry import Entry, EntryError
from mimo.serving.language import LanguagePrepare
from mimo.serving.lifecycle import IN_FLIGHT_DESCRIPTION, IN_FLIGHT_METRIC, shm_prefix
from mimo.serving.loopback import LoopbackLLM
from mimo.serving.triton_config import exit_stub_process, model_parameter, torch_dtype

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CODES = ("INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL")  # mimo.serving.entry's codes = TritonError's names


def triton_error(error: EntryError):
    # pb_utils.TritonError exists only once the stub has loaded its C module (not at import time)
    return pb_utils.TritonError(str(error), getattr(pb_utils.TritonError, error.code))


def entry_error(error) -> EntryError:
    code = next((name for name in CODES if getattr(pb_utils.TritonError, name) == error.code()), "INTERNAL")
    return EntryError(error.message(), code)


class TritonClient:
    def __init__(self, request):
        self._request = request
        self._sender = request.get_response_sender()

    def is_cancelled(self) -> bool:
        return self._request.is_cancelled()

    def send(self, outputs, final):
        tensors = [pb_utils.Tensor(name, array) for name, array in outputs.items()]
        self._sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)

    def send_error(self, error):
        self._sender.send(pb_utils.InferenceResponse(error=triton_error(error)), flags=FINAL)


class Steps(LoopbackLLM):
    """preprocessing and mimo_encoder through BLS, their outputs passed on as the pb_utils.Tensor they came as;
    mimo_llm over gRPC to this server (LoopbackLLM; mimo.serving.loopback says why not BLS)."""

    def infer(self, model, inputs):
        tensors = [value if isinstance(value, pb_utils.Tensor) else pb_utils.Tensor(name, value)
                   for name, value in inputs.items()]  # fmt: skip
        outputs = [tensor.name for tensor in MODELS[model].outputs]
        response = pb_utils.InferenceRequest(model_name=model, inputs=tensors, requested_output_names=outputs).exec()
        if response.has_error():
            raise entry_error(response.error())
        return {tensor.name(): tensor for tensor in response.output_tensors()}

    def is_empty(self, value):
        return 0 in (value.shape() if isinstance(value, pb_utils.Tensor) else value.shape)

    def stream(self, model, inputs, request_id):
        # DLPack for every step output: numpy has no bfloat16, and a GPU prompt table stays a tensor to the wire
        arrays = {name: torch.from_dlpack(value.to_dlpack()) if isinstance(value, pb_utils.Tensor) else value
                  for name, value in inputs.items()}  # fmt: skip
        return super().stream(model, arrays, request_id)


class EncoderMetrics:
    """mimo.epd.orchestrate.Metrics on the metrics port. The gauges are this entry instance's (label `instance`:
    each instance routes its own requests); the counters are shared by the instances (Triton adds them up)."""

    def __init__(self, instance):
        self.instance = instance
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        # the families are kept: a Metric whose family was deleted refuses every operation
        self.tokens = pb_utils.MetricFamily(name="mimo_epd_encoder_outstanding_tokens", kind=gauge,
                                            description="prompt-table rows in flight on each encoder server")
        self.slices_family = pb_utils.MetricFamily(name="mimo_epd_landing_slices_in_use", kind=gauge,
                                                   description="landing-pool slices held by requests")
        self.slices = self.slices_family.Metric(labels={"instance": instance})
        self.families = {name: pb_utils.MetricFamily(name=f"mimo_epd_{name}_total", kind=counter, description=text)
                         for name, text in COUNTERS.items()}  # fmt: skip
        self.counters = {}  # (name, labels) -> its Metric
        self._servers = {}

    def outstanding_tokens(self, url, tokens):
        if url not in self._servers:
            self._servers[url] = self.tokens.Metric(labels={"encoder": url, "instance": self.instance})
        self._servers[url].set(tokens)

    def count(self, name, value=1, labels=None):
        key = (name, tuple(sorted((labels or {}).items())))
        if key not in self.counters:
            self.counters[key] = self.families[name].Metric(labels=dict(labels or {}))
        self.counters[key].increment(value)

    def slices_in_use(self, slices):
        self.slices.set(slices)


def language_prepare(model_config, checkpoint, pool, instance):
    parameters = {name: model_parameter(model_config, name) for name in LANGUAGE_PARAMETERS}
    hidden = MiMoV2Config.from_pretrained(checkpoint).hidden_size
    return LanguagePrepare.build(MiMoProcessor.from_checkpoint(checkpoint), parameters, hidden,
                                 torch_dtype(parameters["dtype"]), pool, EncoderMetrics(instance),
                                 report=pb_utils.Logger.log_info)  # fmt: skip


def landing_pool(model_config, language):
    """Where prompt tables reach mimo_llm by reference; none on a CPU colocated server (tables go as bytes)."""
    device = model_parameter(model_config, "landing_device")
    if device == "cpu" and not language:
        return None
    region = landing_region(model_parameter(model_config, "landing_pool_bytes", int), device, shm_prefix())
    return LandingPool(region)


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the entry streams: set model_transaction_policy { decoupled: true }")
        checkpoint = model_parameter(model_config, "checkpoint_dir")
        detokenizer = IncrementalDetokenizer.from_checkpoint(checkpoint)
        self.input_names = [tensor["name"] for tensor in model_config["input"]]
        # what the launcher's drain waits for (see mimo.serving.lifecycle)
        self.family = pb_utils.MetricFamily(name=IN_FLIGHT_METRIC, kind=pb_utils.MetricFamily.GAUGE,
                                            description=IN_FLIGHT_DESCRIPTION)  # fmt: skip
        # one series per instance (they would overwrite one gauge); the drain adds them up
        instance = args["model_instance_name"]
        self.gauge = self.family.Metric(labels={"model": "ensemble", "instance": instance})
        period_s = model_parameter(model_config, "cancellation_check_period_ms", int) / 1000
        workers = model_parameter(model_config, "workers", int)
        # the language server: its config has the language parameters (contract.LANGUAGE_ENTRY)
        language = "encoder_urls" in model_config.get("parameters", {})
        self.pool = pool = landing_pool(model_config, language)
        self.prepare = language_prepare(model_config, checkpoint, pool, instance) if language else None
        self.steps = Steps(device_pool=pool if pool is not None and pool.region.kind == "cuda" else None)
        self.entry = Entry(self.steps, detokenizer, period_s, workers, on_in_flight=self.gauge.set,
                           entry=LANGUAGE_ENTRY if language else ENTRY, prepare=self.prepare).start()
        self.gauge.set(0)

    def execute(self, requests):
        for request in requests:
            # copied now: a decoupled request's input buffers are released once execute returns
            inputs = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = np.array(tensor.as_numpy())
            self.entry.submit(TritonClient(request), inputs)
        return None

    def finalize(self):
        self.entry.shutdown()
        if self.prepare is not None:
            self.prepare.close()
        self.steps.close()
        if self.pool is not None:
            self.pool.close()
        exit_stub_process()  # a worker still blocked in a BLS call must not hold the stub (its threads are joined)
