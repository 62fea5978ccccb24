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
from collections.abc import Iterator, Mapping

import numpy as np

from mimo.epd.handoff import make_handoff
from mimo.epd.landing import LandingError, LandingPool
from mimo.epd.orchestrate import EncodeError, Metrics, Orchestrator, parse_urls
from mimo.processing.errors import ProcessingError
from mimo.processing.processor import MiMoProcessor
from mimo.serving.entry import INVALID_ARG, UNAVAILABLE, EntryError
from mimo.serving.loopback import SlicedInput
from mimo.serving.preprocess import plan_preprocessing


class LanguagePrepare:
    """`Prepare` of the language entry: plan, encode, yield mimo_llm's inputs, release the slice."""

    def __init__(self, processor: MiMoProcessor, max_model_len: int, orchestrator: Orchestrator):
        self.processor, self.max_model_len, self.orchestrator = processor, max_model_len, orchestrator

    @classmethod
    def build(cls, processor: MiMoProcessor, parameters: Mapping[str, str], hidden_size: int, row_dtype,
              pool: LandingPool, metrics: Metrics | None = None) -> LanguagePrepare:  # fmt: skip
        """From the entry's parameters (contract.LANGUAGE_PARAMETERS, as strings) and its landing pool."""
        urls = parse_urls(parameters["encoder_urls"], "parameter encoder_urls")
        urls_file = parameters["encoder_urls_file"] or None
        if not urls and not urls_file:
            raise ValueError("the language entry needs encoder servers: set encoder_urls or encoder_urls_file")
        handoff = make_handoff(parameters["handoff"], pool.region)
        orchestrator = Orchestrator(pool, urls, urls_file, processor.config, hidden_size, row_dtype,
                                    timeout_s=int(parameters["encoder_timeout_ms"]) / 1000,
                                    attempts=int(parameters["encoder_attempts"]), metrics=metrics,
                                    handoff=handoff)  # fmt: skip
        return cls(processor, int(parameters["max_model_len"]), orchestrator)

    @contextlib.contextmanager
    def __call__(self, inputs: Mapping[str, np.ndarray]) -> Iterator[dict[str, object]]:
        try:
            llm_inputs, plan = plan_preprocessing(self.processor, inputs, self.max_model_len)
        except ProcessingError as error:
            raise EntryError(str(error), INVALID_ARG) from None
        try:
            lease = self.orchestrator.encode(plan)
        except (EncodeError, LandingError) as error:
            raise EntryError(f"encoding the request's media failed: {error}", UNAVAILABLE) from None
        if lease is None:
            yield llm_inputs
            return
        with lease:  # LoopbackLLM releases it at mimo_llm's first response; here at the latest
            llm_inputs["prompt_embedding_table"] = SlicedInput(lease, self.orchestrator.row_dtype,
                                                               (1, plan.total_rows, self.orchestrator.hidden_size))
            llm_inputs["prompt_vocab_size"] = np.array([[plan.total_rows]], dtype=np.int32)
            yield llm_inputs

    def close(self) -> None:
        self.orchestrator.close()
        self.orchestrator.handoff.close()  # the pool is the entry's
