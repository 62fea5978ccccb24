"""mimo_llm: the continuous-batching engine behind TensorRT-LLM's `tensorrt_llm` tensor names (decoupled)."""

import json
import traceback

import triton_python_backend_utils as pb_utils

from mimo.engine import LLMEngine
from mimo.loading import load_language_model
from mimo.parallel.rank_driver import TensorParallelRanks
from mimo.serving.lifecycle import IN_FLIGHT_DESCRIPTION, IN_FLIGHT_METRIC
from mimo.serving.llm import (GenerationLoop, LLMResponse, ServerShuttingDown, convert_llm_request, engine_config,
                              is_stop_request, speculative_rates, stop_target)  # fmt: skip
from mimo.serving.triton_config import exit_stub_process, instance_device, model_parameter, torch_dtype, torch_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_SPECULATIVE_METRICS = (  # published as mimo_spec_<name> with MTP on (LLMEngine.speculative_stats, speculative_rates)
    ("verifications", "COUNTER", "sequence-steps of mimo_llm that verified MTP drafts"),
    ("draft_tokens", "COUNTER", "MTP draft tokens mimo_llm verified"),
    ("accepted_tokens", "COUNTER", "MTP draft tokens the target accepted"),
    ("acceptance_rate", "GAUGE", "accepted / verified MTP draft tokens since start"),
    ("accept_length", "GAUGE", "tokens per verify of a sequence since start (bonus included)"),
)


class TritonResponseSink:
    def __init__(self, request):
        self._request = request
        self._sender = request.get_response_sender()

    def send(self, response: LLMResponse, final: bool) -> None:
        tensors = [pb_utils.Tensor(name, array) for name, array in response.as_arrays().items()]
        self._sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)

    def send_error(self, message: str, code: str = "internal") -> None:
        error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code.upper()))
        self._sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def send_invalid(self, message: str) -> None:
        error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
        self._sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def send_final_empty(self) -> None:
        self._sender.send(flags=FINAL)

    def is_cancelled(self) -> bool:
        return self._request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("mimo_llm streams tokens: set model_transaction_policy { decoupled: true }")
        device = instance_device(args)
        dtype = torch_dtype(model_parameter(model_config, "dtype"))
        deploy_dir = model_parameter(model_config, "deploy_dir")
        config = engine_config(model_config, device, dtype)
        with_mtp = config.num_speculative_tokens > 0
        self.ranks = None
        if deploy_dir:  # this instance is rank 0 of the artifact's tensor-parallel ranks and starts the others
            rank_gpus = [int(gpu) for gpu in model_parameter(model_config, "rank_gpus").split(",") if gpu]
            self.ranks = TensorParallelRanks(deploy_dir, device, dtype, rank_gpus, with_mtp=with_mtp)
            model = self.ranks.model
        else:
            model = load_language_model(model_parameter(model_config, "checkpoint_dir"), dtype, device,
                                        with_mtp=with_mtp)
        try:
            self.engine = LLMEngine(model, config)
        except BaseException:
            if self.ranks is not None:  # the other ranks wait for this one's KV geometry
                self.ranks.shutdown()
            raise
        if self.ranks is not None:
            self.ranks.serve(self.engine.runner.kv_cache)
        if self.engine.warms_up_at_load:
            pb_utils.Logger.log_info(f"mimo_llm warmed up in {self.engine.warm_up():.1f} s")
        period_s = model_parameter(model_config, "cancellation_check_period_ms", int) / 1000
        self.loop = GenerationLoop(self.engine, period_s, publish_metrics=self._publish_gauges)
        self._init_metrics()
        self.loop.start()
        pb_utils.Logger.log_info(f"mimo_llm on {device} ({dtype}), KV pools {self.engine.kv_stats()}")

    def _init_metrics(self):
        # a MetricFamily must outlive its Metric objects
        self.kv_family = pb_utils.MetricFamily(
            name="mimo_kv_blocks", description="KV-cache blocks of mimo_llm per pool", kind=pb_utils.MetricFamily.GAUGE
        )
        self.kv_gauges = {
            (pool, state): self.kv_family.Metric(labels={"pool": pool, "state": state})
            for pool in self.engine.kv_stats()
            for state in ("free", "total")
        }
        # what the launcher's drain waits for (see mimo.serving.lifecycle)
        self.in_flight_family = pb_utils.MetricFamily(
            name=IN_FLIGHT_METRIC, description=IN_FLIGHT_DESCRIPTION,
            kind=pb_utils.MetricFamily.GAUGE,
        )  # fmt: skip
        self.in_flight = self.in_flight_family.Metric(labels={"model": "mimo_llm"})
        self.spec_families, self.spec_metrics, self.spec_published = [], {}, self.engine.speculative_stats()
        if self.engine.config.num_speculative_tokens:
            for name, kind, description in _SPECULATIVE_METRICS:
                self.spec_families.append(pb_utils.MetricFamily(name=f"mimo_spec_{name}", description=description,
                                                                kind=getattr(pb_utils.MetricFamily, kind)))
                self.spec_metrics[name] = self.spec_families[-1].Metric(labels={})
        self._publish_gauges()
        # lets a GPU deployment check that prompt tables arrive on the GPU (no host round trip from the encoder)
        self.table_family = pb_utils.MetricFamily(
            name="mimo_prompt_tables", description="prompt_embedding_tables received, by device",
            kind=pb_utils.MetricFamily.COUNTER,
        )  # fmt: skip
        self.table_counters = {}

    def _publish_gauges(self):
        self._publish_in_flight()
        for pool, stats in self.engine.kv_stats().items():
            self.kv_gauges[pool, "free"].set(stats["free_blocks"])
            self.kv_gauges[pool, "total"].set(stats["total_blocks"])
        if self.spec_metrics:
            stats = self.engine.speculative_stats()
            for name, value in stats.items():
                self.spec_metrics[name].increment(value - self.spec_published[name])
            self.spec_published = stats
            for name, value in speculative_rates(stats).items():
                self.spec_metrics[name].set(value)

    def _publish_in_flight(self):
        self.in_flight.set(self.loop.num_active())

    def _count_prompt_table(self, table):
        device = str(table.device)
        if device not in self.table_counters:
            self.table_counters[device] = self.table_family.Metric(labels={"device": device})
        self.table_counters[device].increment(1)

    def execute(self, requests):
        for request in requests:
            sink = TritonResponseSink(request)
            try:
                inputs = torch_inputs(request)
                if is_stop_request(inputs):
                    # the entry stops the generation of a client that left this way (2.51 BLS iterators cannot cancel)
                    self.loop.abort_client_request(stop_target(request.request_id(), request.parameters()))
                    sink.send_final_empty()
                    continue
                llm_request = convert_llm_request(inputs, self.engine.hidden_size)
                if llm_request.prompt_table is not None:
                    self._count_prompt_table(llm_request.prompt_table)
                self.loop.submit(llm_request, sink, request.request_id())
            except ValueError as error:  # InvalidRequestError and bad tensor contents: this request only
                sink.send_invalid(str(error))
            except ServerShuttingDown as error:
                sink.send_error(str(error), "unavailable")
            except Exception as error:  # noqa: BLE001 - fail this request only; the others and the model go on
                pb_utils.Logger.log_error(f"mimo_llm could not queue a request: {traceback.format_exc()}")
                sink.send_error(f"{type(error).__name__}: {error}")
        self._publish_in_flight()
        return None

    def finalize(self):
        self.loop.shutdown()
        if self.ranks is not None:
            self.ranks.shutdown()
        exit_stub_process()  # see there: the stub's own teardown can hang after CUDA work
