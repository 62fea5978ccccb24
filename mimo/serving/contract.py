"""The Triton model graph, declared once: each model's tensors and parameters, and the ensemble's steps.

`python -m builders repository` renders every config.pbtxt from this module. The ensemble's maps are derived
(`ensemble_steps`): a step input reads the output of that name of the latest earlier step, else the ensemble input
of that name (or of its client name, `CLIENT_NAMES`). The media tensors from preprocessing to mimo_encoder are
`mimo.processing.items.PACKED_MEDIA_TENSORS`; mimo_llm keeps TensorRT-LLM's `tensorrt_llm` tensor names; the
ensemble's inputs and outputs are the client contract (README "Ensemble contract"). Every model has
`max_batch_size > 0`, so dims here exclude the batch dimension each request tensor carries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mimo.engine import engine_knobs
from mimo.processing.items import PACKED_MEDIA_TENSORS
from mimo.serving.preprocess import MEDIA_INPUTS

EMBEDDING = "EMBEDDING"  # dtype placeholder: the deployment's weight / prompt-table dtype
_NUMPY_TYPES = {
    np.dtype(np.int8): "INT8", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
    np.dtype(np.uint64): "UINT64", np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
    np.dtype(np.bool_): "BOOL", np.dtype(np.object_): "BYTES",
}


class ContractError(ValueError):
    """The declared graph is inconsistent (a step input nothing provides, a dtype that differs on a wire)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton type without `TYPE_` (FP32, INT64, BYTES, ...) or EMBEDDING
    dims: tuple[int, ...]  # without the batch dimension; an input with a -1 is batched ragged
    optional: bool = False
    scalar: bool = False  # dims [1] that the model receives reshaped to [] (one value per request)
    comment: str = ""

    @property
    def ragged(self) -> bool:
        return -1 in self.dims


@dataclass(frozen=True)
class ModelSpec:
    name: str
    comment: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: Mapping[str, str]  # string parameters model.py reads -> what they are (rendered as comments)
    decoupled: bool = False


@dataclass(frozen=True)
class EnsembleSpec:
    comment: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[str, ...]  # model names, in order


@dataclass(frozen=True)
class Step:
    model: str
    input_map: dict[str, str]  # model input -> ensemble tensor
    output_map: dict[str, str]  # model output -> ensemble tensor


def triton_type(dtype: np.dtype) -> str:
    return _NUMPY_TYPES[np.dtype(dtype)]


def _packed() -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, triton_type(dtype), (-1,) * rank, comment="media items packed for mimo_encoder "
                            "(mimo.processing.items.pack_items; absent fields empty, rows -1)")
                 for name, (dtype, rank) in PACKED_MEDIA_TENSORS.items())  # fmt: skip


def _int32(name: str, **kwargs) -> TensorSpec:
    return TensorSpec(name, "INT32", (1,), **kwargs)


CHECKPOINT_DIR = {"checkpoint_dir": "hub checkpoint (or a deployment's encoder/ folder) the model reads"}

PREPROCESSING = ModelSpec(
    name="preprocessing",
    comment="chat template, tokenization, media decode + patchify, placeholders -> prompt-table ids (>= vocab_size); "
            "refuses a request that cannot fit max_model_len before any encoder work",
    inputs=(
        TensorSpec("text_input", "BYTES", (1,)),
        *(TensorSpec(name, "BYTES", (-1,), optional=True,
                     comment="each item an encoded file, or a data:<mime>;base64,<payload> URL (for JSON transports)")
          for name in MEDIA_INPUTS),  # fmt: skip
        TensorSpec("stop_words", "BYTES", (-1,), optional=True),
        _int32("max_tokens", optional=True, comment="with max_tokens: prompt + max_tokens must fit max_model_len"),
    ),
    outputs=(
        TensorSpec("input_ids", "INT32", (-1,)),
        _int32("input_lengths"),
        _int32("end_id"),
        _int32("pad_id"),
        TensorSpec("stop_words_list", "INT32", (2, -1)),
        *_packed(),
    ),
    parameters={**CHECKPOINT_DIR, "max_model_len": "mimo_llm's max_model_len (the same value)"},
)

MIMO_ENCODER = ModelSpec(
    name="mimo_encoder",
    comment="batched vision/audio encoding -> this request's prompt_embedding_table, left on the device it was "
            "computed on (a GPU instance hands it to mimo_llm through DLPack, never through host memory)",
    inputs=_packed(),
    outputs=(
        TensorSpec("prompt_embedding_table", EMBEDDING, (-1, -1)),
        _int32("prompt_vocab_size"),
    ),
    parameters={**CHECKPOINT_DIR, "dtype": "weights and prompt tables"},
)

MIMO_LLM = ModelSpec(
    name="mimo_llm",
    comment="continuous-batching MiMo language model, TensorRT-LLM `tensorrt_llm` tensor names, streamed (decoupled)",
    inputs=(
        TensorSpec("input_ids", "INT32", (-1,), optional=True,
                   comment="input_ids and request_output_len are required by every request except a `stop`"),
        _int32("input_lengths", optional=True, scalar=True),
        _int32("request_output_len", optional=True, scalar=True),
        _int32("end_id", optional=True, scalar=True),
        _int32("pad_id", optional=True, scalar=True),
        TensorSpec("stop_words_list", "INT32", (2, -1), optional=True),
        _int32("runtime_top_k", optional=True, scalar=True),
        TensorSpec("runtime_top_p", "FP32", (1,), optional=True, scalar=True),
        TensorSpec("temperature", "FP32", (1,), optional=True, scalar=True),
        TensorSpec("random_seed", "UINT64", (1,), optional=True, scalar=True),
        TensorSpec("streaming", "BOOL", (1,), optional=True),
        TensorSpec("prompt_embedding_table", EMBEDDING, (-1, -1), optional=True),
        _int32("prompt_vocab_size", optional=True, scalar=True),
        TensorSpec("stop", "BOOL", (1,), optional=True,
                   comment="true: end the in-flight request that was sent with this request's id (the request id is "
                           "the key)"),
    ),
    outputs=(
        TensorSpec("output_ids", "INT32", (-1, -1)),
        TensorSpec("sequence_length", "INT32", (-1,)),
        TensorSpec("preceding_ids", "INT32", (-1, -1),
                   comment="the last generated ids before output_ids, for stateless incremental detokenization"),
        TensorSpec("finish_reason", "BYTES", (1,)),
    ),
    parameters={
        "checkpoint_dir": "hub checkpoint (empty with deploy_dir)",
        "deploy_dir": "deployment artifact: this instance is rank 0 and starts ranks 1..N-1 itself (on rank_gpus)",
        "rank_gpus": "the GPU of each rank, comma-separated (empty on cpu)",
        "dtype": "weights, KV cache and prompt tables",
        **engine_knobs(),
        "cancellation_check_period_ms": "how often the generation loop asks Triton which requests were cancelled",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no on a GPU instance: the encoder's prompt table arrives in GPU memory (no "
                                        "host round trip)",
    },
    decoupled=True,
)

POSTPROCESSING = ModelSpec(
    name="postprocessing",
    comment="stateless incremental detokenization of mimo_llm responses (see mimo/serving/detokenize.py)",
    inputs=(
        TensorSpec("output_ids", "INT32", (-1, -1)),
        TensorSpec("preceding_ids", "INT32", (-1, -1)),
        TensorSpec("finish_reason", "BYTES", (1,)),
    ),
    outputs=(
        TensorSpec("text_output", "BYTES", (1,)),
        TensorSpec("output_ids", "INT32", (-1,), comment="passed through so that every ensemble output comes from "
                                                          "this one step"),
        TensorSpec("finish_reason", "BYTES", (1,)),
    ),
    parameters=CHECKPOINT_DIR,
)

ENSEMBLE = EnsembleSpec(
    comment="the serving contract (README \"Ensemble contract\"); streams when `stream` is true (gRPC streaming or "
            "HTTP generate_stream). Every output comes from postprocessing: with a decoupled step in the middle, a "
            "later step may only consume tensors produced after it (Triton server #7275).",
    inputs=(
        TensorSpec("text_input", "BYTES", (1,)),
        *(TensorSpec(name, "BYTES", (-1,), optional=True) for name in MEDIA_INPUTS),
        _int32("max_tokens"),
        TensorSpec("temperature", "FP32", (1,), optional=True),
        _int32("top_k", optional=True),
        TensorSpec("top_p", "FP32", (1,), optional=True),
        TensorSpec("random_seed", "UINT64", (1,), optional=True),
        TensorSpec("stream", "BOOL", (1,), optional=True),
        TensorSpec("stop_words", "BYTES", (-1,), optional=True),
    ),
    outputs=(
        TensorSpec("text_output", "BYTES", (1,)),
        TensorSpec("output_ids", "INT32", (-1,)),
        TensorSpec("finish_reason", "BYTES", (1,)),
    ),
    steps=("preprocessing", "mimo_encoder", "mimo_llm", "postprocessing"),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (PREPROCESSING, MIMO_ENCODER, MIMO_LLM, POSTPROCESSING)}
# step input -> the ensemble input it reads where the names differ (TensorRT-LLM names vs the client's)
CLIENT_NAMES = {"request_output_len": "max_tokens", "runtime_top_k": "top_k", "runtime_top_p": "top_p",
                "streaming": "stream"}  # fmt: skip


def ensemble_steps(ensemble: EnsembleSpec = ENSEMBLE, models: Mapping[str, ModelSpec] = MODELS) -> list[Step]:
    """The ensemble's steps with their input and output maps, derived from the declared tensors.

    A step output is mapped only where a later step or the ensemble's outputs read it. Raises ContractError for a
    required input that nothing provides, a dtype or dims that differ between producer and consumer, a step after a
    decoupled one reading a tensor from before it (Triton server #7275), or an ensemble output no step produces.
    """
    # tensor name -> (its spec, the ensemble tensor carrying it, the index of the step producing it or None)
    available: dict[str, tuple[TensorSpec, str, int | None]] = {t.name: (t, t.name, None) for t in ensemble.inputs}
    steps: list[Step] = []
    after_decoupled: int | None = None  # index of the latest decoupled step so far
    for model_name in ensemble.steps:
        model = models[model_name]
        input_map = {}
        for tensor in model.inputs:
            source = available.get(tensor.name) or available.get(CLIENT_NAMES.get(tensor.name, ""))
            if source is None:
                if not tensor.optional:
                    raise ContractError(f"{model_name} input {tensor.name!r} is required but nothing provides it")
                continue
            spec, ensemble_tensor, producer = source
            if after_decoupled is not None and (producer is None or producer < after_decoupled):
                raise ContractError(f"{model_name} input {tensor.name!r} comes from before the decoupled step "
                                    f"{steps[after_decoupled].model}")  # fmt: skip
            _check_wire(spec, tensor, f"{model_name} input {tensor.name!r}")
            input_map[tensor.name] = ensemble_tensor
        if model.decoupled:
            after_decoupled = len(steps)
        for tensor in model.outputs:
            available[tensor.name] = (tensor, f"_{model_name}_{tensor.name}", len(steps))
        steps.append(Step(model_name, input_map, {}))
    consumed = {value for step in steps for value in step.input_map.values()}
    for step in steps:
        for tensor in models[step.model].outputs:
            if f"_{step.model}_{tensor.name}" in consumed:
                step.output_map[tensor.name] = f"_{step.model}_{tensor.name}"
    for tensor in ensemble.outputs:
        spec, _, producer = available.get(tensor.name, (None, None, None))
        if producer is None:
            raise ContractError(f"ensemble output {tensor.name!r} is produced by no step")
        _check_wire(spec, tensor, f"ensemble output {tensor.name!r}")
        steps[producer].output_map[tensor.name] = tensor.name
    return steps


def _check_wire(produced: TensorSpec, consumed: TensorSpec, what: str) -> None:
    if produced.dtype != consumed.dtype or produced.dims != consumed.dims:
        raise ContractError(f"{what} is {consumed.dtype} {list(consumed.dims)}, but its source "
                            f"{produced.name!r} is {produced.dtype} {list(produced.dims)}")  # fmt: skip
