"""The language role's entry step (`mimo.serving.entry.Prepare`): plan the request here, have its items encoded by
the encoder servers into one landing slice (`mimo.epd.orchestrate`), hand mimo_llm the planned ids and that table.

The landing region lives where mimo_llm reads its table (`landing_device`: system shared memory on a CPU
deployment, the LM GPU's memory on a GPU one) and is registered with this server too, so the table goes to mimo_llm
by reference (`mimo.serving.loopback.SlicedInput`): on a GPU, encoder server -> landing slice -> mimo_llm's input is
device to device all the way. The slice is released once mimo_llm answered (it has taken its input by then), before
it generates; on an error before that too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from mimo.epd.cache import EmbeddingCache
from mimo.epd.handoff import make_handoff
from mimo.epd.landing import LandingError, LandingPool
from mimo.epd.orchestrate import EncodeError, Metrics, Orchestrator, parse_urls
from mimo.processing.errors import ProcessingError
from mimo.processing.processor import MiMoProcessor
from mimo.serving.entry import INVALID_ARG, UNAVAILABLE, EntryError
from mimo.serving.loopback import SlicedInput, self_grpc_url
from mimo.serving.preprocess import plan_preprocessing


class LanguagePrepare:
    """`Prepare` of the language entry: plan, encode, yield mimo_llm's inputs, release the slice."""

    def __init__(self, processor: MiMoProcessor, max_model_len: int, orchestrator: Orchestrator,
                 report: Callable[[str], None] | None = None):  # fmt: skip
        self.processor, self.max_model_len, self.orchestrator = processor, max_model_len, orchestrator
        self.report = report  # gets one line per request with media: which encoder gave each item's rows

    @classmethod
    def build(cls, processor: MiMoProcessor, parameters: Mapping[str, str], hidden_size: int, row_dtype,
              pool: LandingPool, metrics: Metrics | None = None,
              report: Callable[[str], None] | None = None) -> LanguagePrepare:  # fmt: skip
        """From the entry's parameters (contract.LANGUAGE_PARAMETERS, as strings) and its landing pool; with
        `local_encoder`, this server's own encode_item (at its gRPC address, `loopback.self_grpc_url`) is the
        fallback encoder."""
        urls = parse_urls(parameters["encoder_urls"], "parameter encoder_urls")
        urls_file = parameters["encoder_urls_file"] or None
        if parameters["local_encoder"] not in ("true", "false"):
            raise ValueError(f"parameter local_encoder must be true or false, got {parameters['local_encoder']!r}")
        local = parameters["local_encoder"] == "true"
        if not urls and not urls_file and not local:
            raise ValueError("the language entry needs encoder servers: set encoder_urls or encoder_urls_file (or "
                             "local_encoder)")
        cache_bytes = int(parameters["embedding_cache_bytes"])
        orchestrator = Orchestrator(pool, urls, urls_file, processor.config, hidden_size, row_dtype,
                                    timeout_s=int(parameters["encoder_timeout_ms"]) / 1000,
                                    attempts=int(parameters["encoder_attempts"]), metrics=metrics,
                                    handoff=make_handoff(parameters["handoff"], pool.region),
                                    fallback_url=self_grpc_url() if local else None,
                                    cache=EmbeddingCache(cache_bytes) if cache_bytes else None)  # fmt: skip
        return cls(processor, int(parameters["max_model_len"]), orchestrator, report)

    @contextlib.contextmanager
    def __call__(self, inputs: Mapping[str, np.ndarray]) -> Iterator[dict[str, object]]:
        try:
            llm_inputs, plan = plan_preprocessing(self.processor, inputs, self.max_model_len)
        except ProcessingError as error:
            raise EntryError(str(error), INVALID_ARG) from None
        origins: list[str] = []
        try:
            lease = self.orchestrator.encode(plan, origins)
        except (EncodeError, LandingError) as error:
            raise EntryError(f"encoding the request's media failed: {error}", UNAVAILABLE) from None
        if origins and self.report is not None:
            self.report(describe_origins(plan, origins))
        if lease is None:
            yield llm_inputs
            return
        with lease:  # LoopbackLLM releases it at mimo_llm's first response; here at the latest
            llm_inputs["prompt_embedding_table"] = SlicedInput(lease, self.orchestrator.row_dtype,
                                                               self.orchestrator.table_shape(plan))
            llm_inputs["prompt_vocab_size"] = np.array([[plan.total_rows]], dtype=np.int32)
            yield llm_inputs

    def close(self) -> None:
        self.orchestrator.close()
        self.orchestrator.handoff.close()  # the pool is the entry's


ORIGINS_PREFIX = "mimo_epd items:"


def describe_origins(plan, origins: list[str]) -> str:
    """`mimo_epd items: 0 image 6 rows <- localhost:8101; 1 audio 13 rows <- local:localhost:8001; ...`: the line
    the language server logs per request with media (the demo reads it)."""
    parts = [f"{index} {item.metadata.modality.name.lower()} {item.metadata.num_tokens} rows <- {origin}"
             for index, (item, origin) in enumerate(zip(plan.items, origins))]
    return f"{ORIGINS_PREFIX} {'; '.join(parts)}"
