"""The Triton model graph, declared once: each model's tensors and parameters, the steps the entry calls, the roles.

`python -m builders repository` renders every config.pbtxt from this module, for one role (`ROLES`): `colocated`
(the whole pipeline in one server), `encoder` (the media path of one item: encode_item = media_preprocessing ->
mimo_encoder, a Triton ensemble) or `language` (the entry, mimo_llm, postprocessing). The entry model clients call
(`ensemble`, a decoupled Python BLS model) calls its `steps` in order; the inputs of each step are derived
(`entry_steps`): a step input reads the output of that name of the latest earlier step, else the entry's input of
that name (or of its client name, `CLIENT_NAMES`). The media tensors from preprocessing to mimo_encoder are
`mimo.processing.items.PACKED_MEDIA_TENSORS`; mimo_llm keeps TensorRT-LLM's `tensorrt_llm` tensor names; the
entry's inputs and outputs are the client contract (README "Ensemble contract"). Every model has
`max_batch_size > 0`, so dims here exclude the batch dimension each request tensor carries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mimo.engine import engine_knobs
from mimo.epd.direct_write import (IPC_HANDLE_BYTES, LANDING_CUDA_DEVICE, LANDING_CUDA_HANDLE, LANDING_OFFSET,
                                    LANDING_REGION, LANDING_REGION_BYTE_SIZE)  # fmt: skip
from mimo.epd.handoff import (ENCODE_ITEM_NIXL as ENCODE_ITEM_NIXL_NAME, HANDOFF_MODES, HANDOFF_US, NIXL_AGENT,
                               NIXL_AGENT_METADATA, NIXL_DESCRIPTOR, TABLE_SHAPE)  # fmt: skip
from mimo.epd.item_encoding import ENCODER_METADATA, ITEM_METADATA, MEDIA_BYTES, OUTPUT_BYTE_SIZE
from mimo.processing.items import PACKED_MEDIA_TENSORS
from mimo.serving.encode import encoder_knobs
from mimo.serving.preprocess import MEDIA_INPUTS

EMBEDDING = "EMBEDDING"  # dtype placeholder: the deployment's weight / prompt-table dtype
# the deployment dtypes (`--dtype`) and the Triton type EMBEDDING is for each; the torch dtype is torch's of that
# name (mimo.serving.triton_config.torch_dtype), its element size that dtype's itemsize
EMBEDDING_DTYPES = {"float32": "FP32", "bfloat16": "BF16", "float16": "FP16"}
_NUMPY_TYPES = {
    np.dtype(np.int8): "INT8", np.dtype(np.uint8): "UINT8", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
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


# the parts of a checkpoint a model's instances read (mimo.weights.checkpoint roles; the audio tokenizer's folder)
WEIGHTS = ("language", "vision", "audio", "audio_tokenizer")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    comment: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: Mapping[str, str]  # string parameters model.py reads -> what they are (rendered as comments)
    decoupled: bool = False
    steps: tuple[str, ...] = ()  # a BLS model: the models it calls, in order; an ensemble: its steps
    platform: str = "python"  # or "ensemble": a Triton ensemble over `steps` (no model.py, no parameters)
    weights: tuple[str, ...] = ()  # of WEIGHTS: what its instances load (the roles' loading tests count them)


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


SPECULATIVE_DECODING = ("false: this request decodes without MTP drafts (default true; only a deployment with "
                        "num_speculative_tokens > 0 drafts; greedy tokens are the same either way)")
STOP_REQUEST_ID = "stop_request_id"  # request parameter of a mimo_llm `stop`: the id of the request to end
JPEG_TO_ENCODER = ("yes: a JPEG that nvJPEG shows as PIL does travels undecoded and mimo_encoder decodes it "
                   "(mimo.processing.image.jpeg_on_encoder; builders repository --jpeg-decode)")
CHECKPOINT_DIR = {"checkpoint_dir": "hub checkpoint (or a deployment's encoder/ folder) the model reads"}

PREPROCESSING = ModelSpec(
    name="preprocessing",
    comment="chat template, tokenization, media decode (uint8 frames), placeholders -> prompt-table ids (>= vocab_size); "
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
    parameters={**CHECKPOINT_DIR, "max_model_len": "mimo_llm's max_model_len (the same value)",
                "jpeg_to_encoder": JPEG_TO_ENCODER},
)

_ITEM_INPUTS = (
    TensorSpec(MEDIA_BYTES, "BYTES", (1,), comment="the raw encoded file of ONE media item (never patches or a mel)"),
    TensorSpec(ITEM_METADATA, "BYTES", (1,), comment="the language side's plan of the item: mimo.epd.metadata JSON "
                                                     "(version, modality, content_hash, num_tokens, grids, video "
                                                     "timestamps and units); checked against what the bytes give"),
    TensorSpec(OUTPUT_BYTE_SIZE, "INT64", (1,), optional=True,
               comment="the byte size of the landing slice the output goes to: must be num_tokens x hidden x the "
                       "dtype's size, checked before any decoding"),
)

_LANDING_INPUTS = (
    TensorSpec(LANDING_REGION, "BYTES", (1,), optional=True,
               comment="handoff shm: the landing slice the encoder writes the rows into itself (mimo.epd.direct_write; "
                       "its byte size is output_byte_size): the region's POSIX shared-memory key (system) or its "
                       "unique name (CUDA), under which the encoder keeps its mapping"),
    TensorSpec(LANDING_CUDA_HANDLE, "UINT8", (IPC_HANDLE_BYTES,), optional=True,
               comment="a CUDA region: its cudaIpcMemHandle"),
    TensorSpec(LANDING_CUDA_DEVICE, "INT64", (1,), optional=True, comment="a CUDA region: the GPU it is on"),
    TensorSpec(LANDING_REGION_BYTE_SIZE, "INT64", (1,), optional=True, comment="the region's byte size"),
    TensorSpec(LANDING_OFFSET, "INT64", (1,), optional=True, comment="the slice's first byte in the region"),
)
_WRITTEN_OUTPUTS = (
    TensorSpec(TABLE_SHAPE, "INT64", (3,), comment="the shape of the rows: [1, num_tokens, hidden]"),
    TensorSpec(HANDOFF_US, "INT64", (1,), comment="the write of the rows into the landing slice, as the writer timed "
                                                  "it (0: no slice named, the rows are in prompt_embedding_table)"),
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
    weights=("vision", "audio", "audio_tokenizer"),
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
        TensorSpec("speculative_decoding", "BOOL", (1,), optional=True, comment=SPECULATIVE_DECODING),
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
    weights=("language",),
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
        TensorSpec("speculative_decoding", "BOOL", (1,), optional=True, comment=SPECULATIVE_DECODING),
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
        "landing_device": "where the landing pool lives: 'cpu' (system shared memory) or 'cuda:N' (memory of mimo_llm's "
                          "GPU N: prompt tables reach mimo_llm from there by reference, device to device)",
        "landing_pool_bytes": "the landing pool's size (registered with this server for mimo_llm's table input; on the "
                              "language server the encoder servers write the rows into it)",
    },
    decoupled=True,
    steps=("preprocessing", "mimo_encoder", "mimo_llm"),
)

MEDIA_PREPROCESSING = ModelSpec(
    name="media_preprocessing",
    comment="the encoder role's media step: one item's raw bytes + its planned metadata -> its packed encoder "
            "inputs, after checking the bytes give exactly the plan (content hash, rows, grid, timestamps, units)",
    inputs=(*_ITEM_INPUTS, *_LANDING_INPUTS),
    outputs=(*_packed(), TensorSpec(ENCODER_METADATA, "BYTES", (1,), comment="the item's metadata as the encoder "
                                                                               "found it (equal to the plan)")),
    parameters={**CHECKPOINT_DIR, "dtype": "mimo_encoder's: the size of a row of the output, with hidden_size",
                "jpeg_to_encoder": JPEG_TO_ENCODER},
)

ENCODE_ITEM = ModelSpec(
    name="encode_item",
    comment="what the language server calls, one media item per request: media_preprocessing -> mimo_encoder. "
            "Name a landing slice (landing_*, output_byte_size) and mimo_encoder writes the rows there itself, "
            "complete before the response; else the rows come in prompt_embedding_table",
    inputs=(*_ITEM_INPUTS, *_LANDING_INPUTS),
    outputs=(
        TensorSpec("prompt_embedding_table", EMBEDDING, (-1, -1), comment="[1, num_tokens, hidden]: the item's rows "
                                                                         "(none when written into a slice)"),
        TensorSpec(ENCODER_METADATA, "BYTES", (1,)),
        *_WRITTEN_OUTPUTS,
    ),
    parameters={},
    steps=("media_preprocessing", "mimo_encoder"),
    platform="ensemble",
)

ENCODE_ITEM_NIXL = ModelSpec(
    name=ENCODE_ITEM_NIXL_NAME,
    comment="what the language server calls with handoff nixl, one media item per request: encode_item (BLS), then "
            "a NIXL WRITE of its rows into the caller's landing slice (mimo.epd.nixl_transfer), complete before the "
            "response, which carries the metadata and the rows' shape only",
    inputs=(
        *_ITEM_INPUTS[:2],
        dataclasses.replace(_ITEM_INPUTS[2], optional=False,
                            comment="the byte size of the landing slice: must be num_tokens x hidden x the dtype's "
                                    "size and nixl_descriptor's"),  # fmt: skip
        TensorSpec(NIXL_AGENT, "BYTES", (1,), comment="the language server's NIXL agent: its name, its metadata "
                                                      "(NIXL's binary encoding, loaded once per agent name) and the "
                                                      "slice [address, byte size, device id, 0 DRAM / 1 VRAM]"),
        TensorSpec(NIXL_AGENT_METADATA, "UINT8", (-1,), comment=""),
        TensorSpec(NIXL_DESCRIPTOR, "INT64", (4,), comment=""),
    ),
    outputs=(
        TensorSpec(ENCODER_METADATA, "BYTES", (1,)),
        TensorSpec(TABLE_SHAPE, "INT64", (3,), comment="the shape of the rows written: [1, num_tokens, hidden]"),
        TensorSpec(HANDOFF_US, "INT64", (1,), comment="the WRITE's time from post to completion"),
    ),
    parameters={"transfer_timeout_ms": "how long a WRITE may take; past it the request fails saying the WRITE may "
                                       "still land (the language side then keeps the slice quarantined)"},
    steps=("encode_item",),
)
# encode_item's mimo_encoder (the encoder role's, the language role's fallback): the colocated one, plus the landing
# slice it writes the rows into itself when a request names one
SLICE_WRITING_ENCODER = dataclasses.replace(
    MIMO_ENCODER, inputs=(*MIMO_ENCODER.inputs, _ITEM_INPUTS[2], *_LANDING_INPUTS),
    outputs=(*MIMO_ENCODER.outputs, *_WRITTEN_OUTPUTS),
    comment=MIMO_ENCODER.comment + "; with a landing slice named (mimo.epd.direct_write), the rows are written there "
                                   "by this model before it answers, and prompt_embedding_table is empty",
)  # fmt: skip
TEST_FAULT_ROWS = "test_fault_rows"
# the encoder role's mimo_encoder: that one, plus a fault that only tests turn on
ENCODER_ROLE_ENCODER = dataclasses.replace(SLICE_WRITING_ENCODER, parameters={
    **MIMO_ENCODER.parameters,
    TEST_FAULT_ROWS: "TEST ONLY, 0 in production: every table this server answers has this many rows more (> 0) "
                     "or fewer (< 0) than its item has, so that tests see the language side reject it",
})  # fmt: skip

# the language entry's parameters (contract.LANGUAGE_ENTRY; builders repository --role language flags)
LANGUAGE_PARAMETERS = {
    "max_model_len": "mimo_llm's max_model_len (the same value): the plan refuses what cannot fit",
    "dtype": "the prompt-table dtype (the encoder servers' and mimo_llm's)",
    "encoder_urls": "the encoder servers' gRPC host:port addresses, comma-separated",
    "encoder_urls_file": "a file of more encoder server addresses (one per line or comma-separated, # comments), "
                         "re-read when its mtime changes; empty: none",
    "encoder_timeout_ms": "the deadline of one encode_item request; past it the item is retried on another server",
    "encoder_attempts": "rounds of encoding a request's items (a failed item is retried on a server it has not "
                        "failed on) before the request fails",
    "handoff": f"how encoder servers' rows reach the landing pool ({' / '.join(HANDOFF_MODES)}): shm, same host "
               "(mimo_encoder writes them into the pool itself: system shared memory, or CUDA IPC on a GPU); nixl, across hosts (the encoder WRITEs into the "
               "pool with NIXL, DRAM or VRAM; refused at load if NIXL cannot start here); grpc, anywhere (rows in the "
               "response, copied in)",
    "local_encoder": "true: this server also serves encode_item (its own mimo_encoder), which encodes the items "
                     "every encoder server failed (or all of them when none is up); false: such a request fails",
    "embedding_cache_bytes": "an LRU cache of encoded items' rows by content hash, in the landing region's memory, "
                             "that serves repeats without an encoder server; 0: off",
}

LANGUAGE_ENTRY = dataclasses.replace(
    ENTRY, steps=("mimo_llm",), parameters={**ENTRY.parameters, **LANGUAGE_PARAMETERS},
    comment="the serving contract (README \"Ensemble contract\") on the language server: the same inputs and "
            "outputs as the colocated entry; it plans the prompt and has its items encoded by the encoder servers "
            "(encode_item), then calls mimo_llm (streamed) and detokenizes in-process",
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in (PREPROCESSING, MIMO_ENCODER, MIMO_LLM, POSTPROCESSING, ENTRY)
}  # the colocated graph, which the entry runs
# step input -> the entry input it reads where the names differ (TensorRT-LLM names vs the client's)
CLIENT_NAMES = {"request_output_len": "max_tokens", "runtime_top_k": "top_k", "runtime_top_p": "top_p",
                "streaming": "stream"}  # fmt: skip


def entry_steps(entry: ModelSpec = ENTRY, models: Mapping[str, ModelSpec] = MODELS, *,
                narrowing: bool = True) -> list[Step]:  # fmt: skip
    """The entry's steps with the source of each step input, derived from the declared tensors.

    An entry input may be a wider integer than the step input it feeds (the entry range-checks and narrows it;
    not in a Triton ensemble: `narrowing=False`); otherwise dtype and dims must match. Raises ContractError for a
    required input that nothing provides or a wire whose dtype or dims differ.
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
            _check_wire(spec, tensor, f"{model_name} input {tensor.name!r}", narrowing=narrowing and from_client)
            input_map[tensor.name] = key
        for tensor in model.outputs:
            available[tensor.name] = (tensor, f"{model_name}.{tensor.name}", False)
        steps.append(Step(model_name, input_map))
    return steps


@dataclass(frozen=True)
class EnsembleStep:
    model: str
    input_map: dict[str, str]  # step input -> ensemble tensor
    output_map: dict[str, str]  # step output -> ensemble tensor


def ensemble_steps(ensemble: ModelSpec, models: Mapping[str, ModelSpec]) -> list[EnsembleStep]:
    """A Triton ensemble's steps with their input and output maps, derived as `entry_steps` derives a BLS entry's.

    A step output is mapped where a later step reads it (ensemble tensor `_<model>_<output>`) and, under the
    ensemble output's own name, where it is the latest producer of that name. Raises ContractError for a
    decoupled step, an ensemble output no step produces, or anything `entry_steps` refuses.
    """
    decoupled = [name for name in ensemble.steps if models[name].decoupled]
    if decoupled:
        raise ContractError(f"ensemble {ensemble.name}: step {decoupled[0]} is decoupled (not supported here)")
    plan = entry_steps(ensemble, models, narrowing=False)

    def tensor(source: str) -> str:
        return "_" + source.replace(".", "_") if "." in source else source

    steps = [EnsembleStep(step.model, {k: tensor(v) for k, v in step.input_map.items()}, {}) for step in plan]
    consumed = {value for step in steps for value in step.input_map.values()}
    for step in steps:
        for output in models[step.model].outputs:
            if tensor(f"{step.model}.{output.name}") in consumed:
                step.output_map[output.name] = tensor(f"{step.model}.{output.name}")
    for output in ensemble.outputs:
        producer = next((step for step in reversed(steps) if any(o.name == output.name for o in
                                                                  models[step.model].outputs)), None)  # fmt: skip
        if producer is None:
            raise ContractError(f"ensemble {ensemble.name} output {output.name!r} is produced by no step")
        produced = next(o for o in models[producer.model].outputs if o.name == output.name)
        _check_wire(produced, output, f"ensemble {ensemble.name} output {output.name!r}")
        producer.output_map[output.name] = output.name
    return steps


@dataclass(frozen=True)
class RoleSpec:
    """What one kind of server runs: its models (rendered by `builders repository --role`), the one its clients
    call, and so the checkpoint parts it loads."""

    name: str
    comment: str
    models: Mapping[str, ModelSpec]
    entry: str

    @property
    def weights(self) -> frozenset[str]:
        return frozenset(part for spec in self.models.values() for part in spec.weights)

    def check(self) -> None:
        """Every model a model of the role calls is in the role, and every step's wires line up (ContractError)."""
        if self.entry not in self.models:
            raise ContractError(f"role {self.name}: its entry {self.entry!r} is not one of its models")
        for spec in self.models.values():
            unknown = sorted(set(spec.weights) - set(WEIGHTS))
            if unknown:
                raise ContractError(f"role {self.name}: {spec.name} loads {unknown[0]!r}, not one of {list(WEIGHTS)}")
            missing = [step for step in spec.steps if step not in self.models]
            if missing:
                raise ContractError(f"role {self.name}: {spec.name} calls {missing[0]}, which the role does not have")
            if spec.platform == "ensemble":
                ensemble_steps(spec, self.models)
            elif spec.steps:
                entry_steps(spec, self.models)


def _role(name: str, comment: str, entry: str, *specs: ModelSpec) -> RoleSpec:
    return RoleSpec(name, comment, {spec.name: spec for spec in specs}, entry)


ROLES: dict[str, RoleSpec] = {role.name: role for role in (
    _role("colocated", "the whole pipeline in one server (clients call ensemble)", "ensemble",
          *MODELS.values()),
    _role("encoder", "an encoder server: one media item's raw bytes + metadata in, its rows out (encode_item); "
                     "loads the vision tower, audio tower and audio tokenizer only", "encode_item",
          MEDIA_PREPROCESSING, ENCODER_ROLE_ENCODER, ENCODE_ITEM, ENCODE_ITEM_NIXL),
    _role("language", "the language server clients call (ensemble, the same contract as colocated): plans the "
                      "prompt, has the items encoded by encoder servers, generates; loads no encoder tensor",
          "ensemble", LANGUAGE_ENTRY, MIMO_LLM, POSTPROCESSING),
)}  # fmt: skip


def server_role(name: str, local_encoder: bool = False) -> RoleSpec:
    """ROLES[name]; `local_encoder` (the language role only) adds the encoder role's models, so that the language
    server's entry can encode items itself when the encoder servers fail them (its fallback encoder)."""
    role = ROLES[name]
    if not local_encoder:
        return role
    if name != "language":
        raise ValueError(f"a local encoder is for the language role, not {name!r}")
    local = {spec.name: spec for spec in (MEDIA_PREPROCESSING, SLICE_WRITING_ENCODER, ENCODE_ITEM)}
    comment = ("the language server with a local fallback encoder: the language role's models plus encode_item, "
               "which encodes the items every encoder server failed; loads the language and the encoder tensors")
    return dataclasses.replace(role, comment=comment, models={**role.models, **local})


_INTEGERS = {"INT8", "INT32", "INT64", "UINT64"}


def _check_wire(produced: TensorSpec, consumed: TensorSpec, what: str, narrowing: bool = False) -> None:
    same_type = produced.dtype == consumed.dtype or (narrowing and {produced.dtype, consumed.dtype} <= _INTEGERS)
    if not same_type or produced.dims != consumed.dims:
        raise ContractError(f"{what} is {consumed.dtype} {list(consumed.dims)}, but its source "
                            f"{produced.name!r} is {produced.dtype} {list(produced.dims)}")  # fmt: skip
