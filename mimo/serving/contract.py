"""The Triton model graph, declared once: each model's tensors and parameters, and the steps the entry calls.

`python -m builders repository` renders every config.pbtxt from this module. The entry model clients call
(`ensemble`, a decoupled Python BLS model) calls its `steps` in order; the inputs of each step are derived
(`entry_steps`): a step input reads the output of that name of the latest earlier step, else the entry's input of
that name (or of its client name, `CLIENT_NAMES`). The media tensors from preprocessing to mimo_encoder are
`mimo.processing.items.PACKED_MEDIA_TENSORS`; mimo_llm keeps TensorRT-LLM's `tensorrt_llm` tensor names; the
entry's inputs and outputs are the client contract (README "Ensemble contract"). Every model has
`max_batch_size > 0`, so dims here exclude the batch dimension each request tensor carries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mimo.engine import engine_knobs
from mimo.processing.items import PACKED_MEDIA_TENSORS
from mimo.serving.encode import encoder_knobs
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
    steps: tuple[str, ...] = ()  # a BLS model: the models it calls, in order


@dataclass(frozen=True)
class Step:
    model: str
    input_map: dict[str, str]  # step input -> its source: an entry input's name, or `<step model>.<output name>`


def triton_type(dtype: np.dtype) -> str:
    return _NUMPY_TYPES[np.dtype(dtype)]


def numpy_type(triton: str) -> np.dtype:
    return next(dtype for dtype, name in _NUMPY_TYPES.items() if name == triton)


def _packed() -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, triton_type(dtype), (-1,) * rank, comment="media items packed for mimo_encoder "
                            "(mimo.processing.items.pack_items; absent fields empty, rows -1)")
                 for name, (dtype, rank) in PACKED_MEDIA_TENSORS.items())  # fmt: skip


def _int32(name: str, **kwargs) -> TensorSpec:
    return TensorSpec(name, "INT32", (1,), **kwargs)


STOP_REQUEST_ID = "stop_request_id"  # request parameter of a mimo_llm `stop`: the id of the request to end
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
    parameters={**CHECKPOINT_DIR, "dtype": "weights and prompt tables", **encoder_knobs()},
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
                   comment="true: end the in-flight request that was sent with this request's id, or with the id "
                           "in the request parameter `stop_request_id` (BLS callers: python_backend routes decoupled "
                           "BLS responses by request id); ids are unique among in-flight requests"),
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

ENTRY = ModelSpec(
    name="ensemble",
    comment="the serving contract (README \"Ensemble contract\"): a decoupled Python BLS model that calls "
            "preprocessing -> mimo_encoder -> mimo_llm (streamed) and detokenizes in-process; streams when `stream` "
            "is true (gRPC streaming or HTTP generate_stream); a client that leaves (stream cancelled, channel or "
            "socket closed) has its generation stopped",
    inputs=(
        TensorSpec("text_input", "BYTES", (1,)),
        *(TensorSpec(name, "BYTES", (-1,), optional=True) for name in MEDIA_INPUTS),
        TensorSpec("max_tokens", "INT64", (1,), comment="integers are INT64 / UINT64 so that no protocol wraps them "
                                                        "(HTTP JSON would for INT32); the entry checks their ranges"),
        TensorSpec("temperature", "FP32", (1,), optional=True),
        TensorSpec("top_k", "INT64", (1,), optional=True),
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
    parameters={
        **CHECKPOINT_DIR,
        "cancellation_check_period_ms": "how often the entry asks Triton which of its requests' clients left",
        "workers": "requests the entry runs at once (one thread each); later ones wait in its queue",
    },
    decoupled=True,
    steps=("preprocessing", "mimo_encoder", "mimo_llm"),
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in (PREPROCESSING, MIMO_ENCODER, MIMO_LLM, POSTPROCESSING, ENTRY)
}
# step input -> the entry input it reads where the names differ (TensorRT-LLM names vs the client's)
CLIENT_NAMES = {"request_output_len": "max_tokens", "runtime_top_k": "top_k", "runtime_top_p": "top_p",
                "streaming": "stream"}  # fmt: skip


def entry_steps(entry: ModelSpec = ENTRY, models: Mapping[str, ModelSpec] = MODELS) -> list[Step]:
    """The entry's steps with the source of each step input, derived from the declared tensors.

    An entry input may be a wider integer than the step input it feeds (the entry range-checks and narrows it);
    otherwise dtype and dims must match. Raises ContractError for a required input that nothing provides or a wire
    whose dtype or dims differ.
    """
    # tensor name -> (its spec, its source key, whether an entry input)
    available: dict[str, tuple[TensorSpec, str, bool]] = {t.name: (t, t.name, True) for t in entry.inputs}
    steps: list[Step] = []
    for model_name in entry.steps:
        model = models[model_name]
        input_map = {}
        for tensor in model.inputs:
            source = available.get(tensor.name) or available.get(CLIENT_NAMES.get(tensor.name, ""))
            if source is None:
                if not tensor.optional:
                    raise ContractError(f"{model_name} input {tensor.name!r} is required but nothing provides it")
                continue
            spec, key, from_client = source
            _check_wire(spec, tensor, f"{model_name} input {tensor.name!r}", narrowing=from_client)
            input_map[tensor.name] = key
        for tensor in model.outputs:
            available[tensor.name] = (tensor, f"{model_name}.{tensor.name}", False)
        steps.append(Step(model_name, input_map))
    return steps


_INTEGERS = {"INT8", "INT32", "INT64", "UINT64"}


def _check_wire(produced: TensorSpec, consumed: TensorSpec, what: str, narrowing: bool = False) -> None:
    same_type = produced.dtype == consumed.dtype or (narrowing and {produced.dtype, consumed.dtype} <= _INTEGERS)
    if not same_type or produced.dims != consumed.dims:
        raise ContractError(f"{what} is {consumed.dtype} {list(consumed.dims)}, but its source "
                            f"{produced.name!r} is {produced.dtype} {list(produced.dims)}")  # fmt: skip
