"""Render the Triton model repository for a checkpoint and print the `tritonserver` command that serves it.

    python -m builders repository (--checkpoint DIR | --deploy DEPLOY) --out REPO [--role colocated|encoder|language]
                                  [--device cpu|gpu] [--encoder-instances K] [--encoder-gpus 0,1] [--llm-gpus 2,3]
                                  [--max-batch N] [--max-num-seqs N] [--max-model-len N] [--kv-cache-memory-bytes B] ...

Writes the `config.pbtxt` of every model of the role (`mimo.serving.contract.ROLES`: colocated, the default, is the
whole pipeline; encoder is `encode_item` = media_preprocessing -> mimo_encoder; language is the entry, mimo_llm and
postprocessing) from the graph declared in `mimo.serving.contract` (tensors, ensemble maps, parameter names) with
this deployment's values, and copies each `model_repository/<model>/1/model.py` (a Triton ensemble has none). The
flags are the fields of `RepositorySettings` and the knobs of `mimo.engine.EngineConfig` (mimo_llm) and
`mimo.serving.encode.EncoderConfig` (mimo_encoder), each with the default and help of its field. `--device gpu`
puts mimo_encoder and mimo_llm on KIND_GPU and lets the prompt table reach mimo_llm in GPU memory; the printed
command then sizes Triton's CUDA memory pool for the prompt tables that can be in flight between the two. GPU
instances are placed explicitly (`gpus: [...]`): Triton would otherwise put `count` instances on every GPU, and
several mimo_llm instances are several independent engines.

`--deploy` serves a deployment artifact (`python -m builders convert`): preprocessing, mimo_encoder and
postprocessing read its `encoder/` folder; mimo_llm's one instance is rank 0 of the artifact's tensor-parallel ranks
and starts the others itself (rank r on `--llm-gpus[r]` with `--device gpu`, all on the host with cpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mimo.config import MiMoV2Config
from mimo.engine import EngineConfig, engine_knobs
from mimo.engine.engine import knob_help
from mimo.epd.handoff import HANDOFF_MODES
from mimo.epd.orchestrate import parse_urls
from mimo.parallel.deploy import ENCODER_DIR, DeployArtifact
from mimo.processing.image import nvjpeg_available
from mimo.serving import contract
from mimo.serving.contract import EMBEDDING, ModelSpec, TensorSpec
from mimo.serving.encode import EncoderConfig, encoder_knobs
from mimo.serving.triton_config import torch_dtype

MODEL_FILES = Path(__file__).resolve().parents[1] / "model_repository"  # <model>/1/model.py
MODELS = tuple(contract.MODELS)
_CONFIG_TYPES = {"BYTES": "STRING"}  # a model config's name for the BYTES tensor type
_DEVICE_DEFAULTS = {  # dtype, KV-cache bytes
    "cpu": ("float32", 256 * 2**20),
    "gpu": ("bfloat16", 16 * 2**30),
}
# RepositorySettings field -> the config whose `knob` fields it overrides (each knob a flag and a model parameter)
KNOB_CONFIGS = {"engine": EngineConfig, "encoder": EncoderConfig}
_KNOB_DEFAULTS = {f.name: f.default for config in KNOB_CONFIGS.values() for f in dataclasses.fields(config)}
_SERVED_DEFAULT_NOTES = {  # where the served value is not the EngineConfig default itself
    "max_model_len": "at most the checkpoint's max_position_embeddings",
    "kv_cache_memory_bytes": "256 MiB on cpu, 16 GiB on gpu, unless --num-full-blocks",
}


def _gpu_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids like 0,1; got {text!r}") from None


def setting(default, help: str, **argument):
    """A RepositorySettings field and its `builders repository` flag (`argument`: argparse type / choices)."""
    return field(default=default, metadata={"help": help, **argument})


@dataclass(frozen=True)
class RepositorySettings:
    checkpoint: Path  # a hub checkpoint; with `deploy`, the artifact's encoder/ folder (`for_deploy`)
    deploy: Path | None = None  # a deployment artifact whose tensor-parallel ranks mimo_llm runs
    role: str = setting("colocated", "which server: the whole pipeline, an encoder server or the language server",
                        choices=tuple(contract.ROLES))  # fmt: skip
    device: str = setting("cpu", "where mimo_encoder and mimo_llm run", choices=tuple(_DEVICE_DEFAULTS))
    dtype: str | None = setting(None, "weights and prompt tables (default: float32 on cpu, bfloat16 on gpu)",
                                type=str, choices=tuple(contract.EMBEDDING_DTYPES))  # fmt: skip
    max_batch: int = setting(16, "max_batch_size of every model")
    encoder_instances: int = setting(1, "mimo_encoder instances (per encoder GPU with --device gpu)")
    encoder_gpus: tuple[int, ...] = setting((0,), "comma-separated GPU ids for mimo_encoder instances (--device gpu)",
                                            type=_gpu_ids)  # fmt: skip
    llm_gpus: tuple[int, ...] = setting((0,), "the GPU id of each rank of the mimo_llm engine (--device gpu; one "
                                              "without --deploy)", type=_gpu_ids)  # fmt: skip
    # preprocessing runs one request at a time per instance: a slow media item holds only its own instance
    preprocessing_instances: int = setting(max(2, min(8, (os.cpu_count() or 2) // 2)),
                                           "instances of preprocessing (half the CPU cores, 2 to 8)")
    jpeg_decode: str = setting("auto", "where JPEGs are decoded: encoder (preprocessing ships them undecoded and "
                                       "mimo_encoder decodes them with nvJPEG, torchvision's decode_jpeg on its GPU), "
                                       "preprocessing (PIL, on the CPU), or auto: encoder with --device gpu where "
                                       "torchvision's CUDA JPEG decoder is there, else preprocessing",
                               choices=("auto", "encoder", "preprocessing"))  # fmt: skip
    queue_delay_us: int = setting(100, "dynamic-batching delay of mimo_llm and postprocessing (us)")
    encoder_queue_delay_us: int = setting(2000, "dynamic-batching delay of mimo_encoder (us)")
    cancellation_check_period_ms: int = setting(50, "how often mimo_llm and the entry ask Triton which requests "
                                                     "were cancelled")  # fmt: skip
    entry_workers: int = setting(64, "requests one instance of the entry model (`ensemble`) runs at once; later "
                                     "ones wait")  # fmt: skip
    entry_instances: int = setting(1, "instances of the entry model (`ensemble`), each a process of its own: the "
                                      "entry's per-token Python (detokenization, response sends) then runs under "
                                      "as many GILs; Triton hands each request to one of them")  # fmt: skip
    max_media_tokens: int = setting(16384, "prompt-table rows one request may need (sizes the CUDA memory pool on "
                                           "gpu)")  # fmt: skip
    encoder_urls: str = setting("", "--role language: the encoder servers' gRPC host:port addresses, comma-separated")
    encoder_urls_file: str = setting("", "--role language: a file of more encoder server addresses, re-read when it "
                                         "changes (the list changes without a restart)")  # fmt: skip
    encoder_timeout_ms: int = setting(30000, "--role language: the deadline of one encode_item request; --role "
                                              "encoder: how long a NIXL WRITE may take")  # fmt: skip
    encoder_attempts: int = setting(3, "--role language: rounds of encoding a request's items before it fails")
    landing_pool_mb: int = setting(0, "the landing pool in MiB, where prompt tables reach mimo_llm by reference "
                                      "(system shared memory on cpu, mimo_llm's GPU memory on gpu); 0: 64 on cpu, "
                                      "room for 4 requests of --max-media-tokens rows on gpu")  # fmt: skip
    handoff: str = setting("shm", "--role language: how rows reach the landing pool: shm (Triton shared memory, "
                                  "same host), nixl (the encoder server WRITEs them with NIXL, across hosts), grpc "
                                  "(in the response, copied in; nothing to install)", choices=HANDOFF_MODES)  # fmt: skip
    local_encoder: bool = setting(False, "--role language: also load mimo_encoder and media preprocessing here, to "
                                         "encode the items every encoder server failed (counted as fallbacks)")
    embedding_cache_mb: int = setting(0, "--role language: an LRU cache of encoded items' rows (MiB, in the landing "
                                         "region's memory) that serves repeated media without an encoder (0: off)")
    test_fault_rows: int = setting(0, "TEST ONLY, --role encoder: answer every item with this many rows more or "
                                      "fewer than it has, to test that the language side rejects it (0: off)")
    engine: Mapping[str, int] = field(default_factory=dict)  # EngineConfig knobs that differ from their defaults
    encoder: Mapping[str, int] = field(default_factory=dict)  # EncoderConfig knobs that differ from their defaults

    def __post_init__(self):
        if self.handoff not in HANDOFF_MODES:
            raise ValueError(f"handoff must be one of {', '.join(HANDOFF_MODES)}, got {self.handoff!r}")
        if self.role not in contract.ROLES:
            raise ValueError(f"role must be one of {sorted(contract.ROLES)}, got {self.role!r}")
        if self.device not in _DEVICE_DEFAULTS:
            raise ValueError(f"device must be one of {sorted(_DEVICE_DEFAULTS)}, got {self.device!r}")
        for group, config in KNOB_CONFIGS.items():
            unknown, knobs = sorted(set(getattr(self, group)) - set(knob_help(config))), ", ".join(knob_help(config))
            if unknown:
                raise ValueError(f"{group} settings {unknown} are not {config.__name__} knobs ({knobs})")
        if self.jpeg_decode not in ("auto", "encoder", "preprocessing"):
            raise ValueError(f"jpeg_decode must be auto, encoder or preprocessing, got {self.jpeg_decode!r}")
        if self.jpeg_decode == "encoder" and self.device != "gpu":
            raise ValueError("--jpeg-decode encoder decodes with nvJPEG on the encoder's GPU: it needs --device gpu")
        if self.role == "language" and not (self.encoder_urls or self.encoder_urls_file or self.local_encoder):
            raise ValueError("--role language needs its encoder servers: --encoder-urls or --encoder-urls-file (or "
                             "--local-encoder)")
        for name, role in (("local_encoder", "language"), ("embedding_cache_mb", "language"),
                           ("test_fault_rows", "encoder")):  # fmt: skip
            if getattr(self, name) and self.role != role:
                raise ValueError(f"{_flag(name)} is for --role {role}, not {self.role}")
        for name in ("max_batch", "encoder_instances", "preprocessing_instances", "entry_workers", "entry_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.embedding_cache_mb < 0:
            raise ValueError(f"embedding_cache_mb must be >= 0, got {self.embedding_cache_mb}")
        parse_urls(self.encoder_urls, "--encoder-urls")  # raises naming the address that is not host:port
        if not self.encoder_gpus or len(set(self.encoder_gpus)) != len(self.encoder_gpus):
            raise ValueError(f"encoder_gpus must list distinct GPU ids, got {list(self.encoder_gpus)}")
        ranks = self.world_size
        if ranks == 1 and len(self.llm_gpus) != 1:
            raise ValueError(f"llm_gpus must name the one GPU of the mimo_llm engine, got {list(self.llm_gpus)}")
        if self.device == "gpu" and (len(self.llm_gpus) != ranks or len(set(self.llm_gpus)) != ranks):
            raise ValueError(f"llm_gpus must name {ranks} distinct GPUs, one per rank of the mimo_llm engine, "
                             f"got {list(self.llm_gpus)}")  # fmt: skip
        if any(g < 0 for g in (*self.encoder_gpus, *self.llm_gpus)):
            raise ValueError(f"GPU ids must be >= 0, got encoder {list(self.encoder_gpus)}, llm {list(self.llm_gpus)}")

    @classmethod
    def for_deploy(cls, deploy: Path, **settings) -> RepositorySettings:
        return cls(checkpoint=Path(deploy) / ENCODER_DIR, deploy=Path(deploy), **settings)

    @property
    def world_size(self) -> int:
        """Ranks of the mimo_llm engine: the artifact's world size, 1 for a hub checkpoint."""
        return 1 if self.deploy is None else DeployArtifact.open(self.deploy).mapping.world_size

    @property
    def jpeg_to_encoder(self) -> bool:
        """Whether JPEGs travel to mimo_encoder undecoded (`jpeg_decode`; auto asks this host for nvJPEG)."""
        if self.jpeg_decode == "auto":
            return self.device == "gpu" and nvjpeg_available()
        return self.jpeg_decode == "encoder"

    @property
    def role_spec(self) -> contract.RoleSpec:
        return contract.server_role(self.role, self.local_encoder)

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or _DEVICE_DEFAULTS[self.device][0]

    @property
    def pool_gpus(self) -> list[int]:
        """The GPUs prompt tables live on: where they are computed and where mimo_llm (its rank 0) reads them."""
        return sorted({*self.encoder_gpus, self.llm_gpus[0]})

    def engine_knobs(self, config: MiMoV2Config) -> dict[str, int | None]:
        """Every served EngineConfig knob: the override, else its default (see _SERVED_DEFAULT_NOTES); validated."""
        knobs = {name: self.engine.get(name, _KNOB_DEFAULTS[name]) for name in engine_knobs()}
        if "max_model_len" not in self.engine:
            knobs["max_model_len"] = min(config.max_position_embeddings, knobs["max_model_len"])
        if knobs["kv_cache_memory_bytes"] is None and knobs["num_full_blocks"] is None:
            knobs["kv_cache_memory_bytes"] = _DEVICE_DEFAULTS[self.device][1]
        EngineConfig(**knobs)  # raises ValueError naming a bad value
        if knobs["num_speculative_tokens"] > config.num_nextn_predict_layers:
            raise ValueError(f"num_speculative_tokens={knobs['num_speculative_tokens']} needs as many MTP layers; "
                             f"{self.checkpoint} has {config.num_nextn_predict_layers}")
        return knobs

    def encoder_knobs(self) -> dict[str, int]:
        """Every served EncoderConfig knob: the override, else its default; validated."""
        knobs = {name: self.encoder.get(name, _KNOB_DEFAULTS[name]) for name in encoder_knobs()}
        EncoderConfig(**knobs)  # raises ValueError naming a bad value
        return knobs


def instance_group(count: int, gpus: tuple[int, ...] | None) -> str:
    """One `instance_group` entry: `count` CPU instances, or `count` instances on each listed GPU."""
    if gpus is None:
        return f"{{ count: {count} kind: KIND_CPU }}"
    return f"{{ count: {count} kind: KIND_GPU gpus: [ {', '.join(map(str, gpus))} ] }}"


@dataclass(frozen=True)
class Deployment:
    """One model's values in this deployment (its tensors and parameter names come from the contract)."""

    queue_delay_us: int | None  # None: not dynamically batched
    instance_group: str
    parameters: dict[str, object]


def deployments(settings: RepositorySettings) -> dict[str, Deployment]:
    config = MiMoV2Config.from_pretrained(settings.checkpoint)
    gpu = settings.device == "gpu"
    checkpoint = str(settings.checkpoint.resolve())
    knobs = settings.engine_knobs(config)
    return {
        # execute() works through a batch request by request: batching would make each wait for the slowest
        "preprocessing": Deployment(None, instance_group(settings.preprocessing_instances, None),
                                    {"checkpoint_dir": checkpoint, "max_model_len": knobs["max_model_len"],
                                     "jpeg_to_encoder": _yes_no(settings.jpeg_to_encoder)}),
        # the encoder role's: one item per request, decoding on the CPU as preprocessing does
        "media_preprocessing": Deployment(None, instance_group(settings.preprocessing_instances, None),
                                          {"checkpoint_dir": checkpoint, "dtype": settings.resolved_dtype,
                                           "jpeg_to_encoder": _yes_no(settings.jpeg_to_encoder)}),
        "mimo_encoder": Deployment(
            settings.encoder_queue_delay_us,
            instance_group(settings.encoder_instances, settings.encoder_gpus if gpu else None),
            {"checkpoint_dir": checkpoint, "dtype": settings.resolved_dtype, **settings.encoder_knobs(),
             **({contract.TEST_FAULT_ROWS: settings.test_fault_rows} if settings.role == "encoder" else {})},
        ),
        "mimo_llm": Deployment(settings.queue_delay_us, instance_group(1, settings.llm_gpus[:1] if gpu else None), {
            "checkpoint_dir": "" if settings.deploy else checkpoint,
            "deploy_dir": str(settings.deploy.resolve()) if settings.deploy else "",
            "rank_gpus": ",".join(map(str, settings.llm_gpus)) if gpu else "",
            "dtype": settings.resolved_dtype,
            **knobs,
            "cancellation_check_period_ms": settings.cancellation_check_period_ms,
            "FORCE_CPU_ONLY_INPUT_TENSORS": "no" if gpu else "yes",
        }),  # fmt: skip
        # as many as media_preprocessing: each holds its request through encode_item (BLS) and the WRITE
        "encode_item_nixl": Deployment(None, instance_group(settings.preprocessing_instances, None),
                                       {"transfer_timeout_ms": settings.encoder_timeout_ms}),
        # one instance: each streamed mimo_llm response reaches it as a request of its own, and two instances
        # could hand a stream's pieces back out of order
        "postprocessing": Deployment(settings.queue_delay_us, instance_group(1, None), {"checkpoint_dir": checkpoint}),
        # its requests run on each instance's worker threads; more instances, more GILs for the per-token work
        "ensemble": Deployment(settings.queue_delay_us, instance_group(settings.entry_instances, None), {
            "checkpoint_dir": checkpoint,
            "cancellation_check_period_ms": settings.cancellation_check_period_ms,
            "workers": settings.entry_workers,
            "landing_device": f"cuda:{settings.llm_gpus[0]}" if gpu else "cpu",
            "landing_pool_bytes": landing_pool_bytes(settings, config.hidden_size),
            **(language_parameters(settings, knobs) if settings.role == "language" else {}),
        }),
    }


def language_parameters(settings: RepositorySettings, knobs: Mapping[str, int | None]) -> dict[str, object]:
    """The language entry's own parameters (contract.LANGUAGE_PARAMETERS)."""
    return {
        "max_model_len": knobs["max_model_len"],
        "dtype": settings.resolved_dtype,
        "encoder_urls": settings.encoder_urls,
        "encoder_urls_file": str(Path(settings.encoder_urls_file).resolve()) if settings.encoder_urls_file else "",
        "encoder_timeout_ms": settings.encoder_timeout_ms,
        "encoder_attempts": settings.encoder_attempts,
        "handoff": settings.handoff,
        "local_encoder": "true" if settings.local_encoder else "false",
        "embedding_cache_bytes": settings.embedding_cache_mb << 20,
    }


def landing_pool_bytes(settings: RepositorySettings, hidden_size: int) -> int:
    if settings.landing_pool_mb:
        return settings.landing_pool_mb << 20
    if settings.device == "gpu":
        return 4 * settings.max_media_tokens * hidden_size * torch_dtype(settings.resolved_dtype).itemsize
    return 64 << 20


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _quote(value: object) -> str:
    text = "" if value is None else str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, 116, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")


def _tensor_lines(section: str, tensors: tuple[TensorSpec, ...], embedding: str,
                  batched_inputs: bool = False) -> list[str]:  # fmt: skip
    lines, previous_comment = [f"{section} ["], ""
    for index, tensor in enumerate(tensors):
        if tensor.comment != previous_comment:
            lines += _comment(tensor.comment, "  ")
            previous_comment = tensor.comment
        dtype = embedding if tensor.dtype == EMBEDDING else _CONFIG_TYPES.get(tensor.dtype, tensor.dtype)
        text = f'{{ name: "{tensor.name}" data_type: TYPE_{dtype} dims: [ {", ".join(map(str, tensor.dims))} ]'
        if tensor.scalar:
            text += " reshape: { shape: [ ] }"
        if batched_inputs and tensor.ragged:
            text += " allow_ragged_batch: true"
        if tensor.optional:
            text += " optional: true"
        lines.append(f"  {text} }}{',' if index < len(tensors) - 1 else ''}")
    return lines + ["]"]


def model_config_text(spec: ModelSpec, deployment: Deployment, max_batch_size: int, embedding: str) -> str:
    """The config.pbtxt of one backend model; `deployment.parameters` must be exactly the declared ones."""
    missing = sorted(spec.parameters.keys() - deployment.parameters.keys())
    unused = sorted(deployment.parameters.keys() - spec.parameters.keys())
    if missing or unused:
        raise ValueError(f"{spec.name}: parameters without a value {missing}; "
                         f"values for undeclared parameters {unused}")
    lines = [*_comment(f"{spec.name}: {spec.comment}"), f'name: "{spec.name}"', 'backend: "python"',
             f"max_batch_size: {max_batch_size}"]  # fmt: skip
    if spec.decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    if deployment.queue_delay_us is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {deployment.queue_delay_us} }}")
    lines.append("")
    lines += _tensor_lines("input", spec.inputs, embedding, batched_inputs=True)
    lines += _tensor_lines("output", spec.outputs, embedding)
    lines += ["", f"instance_group [ {deployment.instance_group} ]", ""]
    for name, help_text in spec.parameters.items():
        lines += _comment(help_text)
        lines.append(f'parameters {{ key: "{name}" value {{ string_value: {_quote(deployment.parameters[name])} }} }}')
    return "\n".join(lines) + "\n"


def ensemble_config_text(spec: ModelSpec, models: Mapping[str, ModelSpec], max_batch_size: int, embedding: str) -> str:
    """The config.pbtxt of a Triton ensemble (`platform: "ensemble"`), its maps from `contract.ensemble_steps`."""
    lines = [*_comment(f"{spec.name}: {spec.comment}"), f'name: "{spec.name}"', 'platform: "ensemble"',
             f"max_batch_size: {max_batch_size}", ""]  # fmt: skip
    lines += _tensor_lines("input", spec.inputs, embedding)
    lines += _tensor_lines("output", spec.outputs, embedding)
    lines += ["", "ensemble_scheduling {", "  step ["]
    steps = contract.ensemble_steps(spec, models)
    for index, step in enumerate(steps):
        lines += ["    {", f'      model_name: "{step.model}"', "      model_version: -1"]
        for section, mapping in (("input_map", step.input_map), ("output_map", step.output_map)):
            entries = [f'        {{ key: "{key}" value: "{value}" }}' for key, value in mapping.items()]
            lines += [f"      {section} [", ",\n".join(entries), "      ]"]
        lines.append("    }," if index < len(steps) - 1 else "    }")
    return "\n".join(lines + ["  ]", "}"]) + "\n"


def cuda_memory_pool_bytes(settings: RepositorySettings, hidden_size: int) -> int:
    """Per GPU: room for every prompt table one round of encoder batches can have in flight to mimo_llm, twice over."""
    table_bytes = settings.max_media_tokens * hidden_size * torch_dtype(settings.resolved_dtype).itemsize
    encoder_instances = settings.encoder_instances * len(settings.encoder_gpus)
    return 2 * encoder_instances * settings.max_batch * table_bytes


def render_repository(settings: RepositorySettings, out: Path, model_files: Path = MODEL_FILES) -> list[str]:
    """Write the repository of `settings.role` into `out` (replacing it); returns the tritonserver command line that
    serves it."""
    role = settings.role_spec
    role.check()
    values = deployments(settings)
    embedding = contract.EMBEDDING_DTYPES[settings.resolved_dtype]
    configs = {name: ensemble_config_text(spec, role.models, settings.max_batch, embedding)
               if spec.platform == "ensemble" else model_config_text(spec, values[name], settings.max_batch, embedding)
               for name, spec in role.models.items()}  # fmt: skip
    if out.exists():
        shutil.rmtree(out)
    for name, text in configs.items():
        (out / name / "1").mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(text)
        if role.models[name].platform != "ensemble":
            shutil.copy2(model_files / name / "1" / "model.py", out / name / "1" / "model.py")
    command = ["tritonserver", f"--model-repository={out.resolve()}"]
    if settings.device == "gpu":
        hidden = MiMoV2Config.from_pretrained(settings.checkpoint).hidden_size
        pool = cuda_memory_pool_bytes(settings, hidden)
        command += [f"--cuda-memory-pool-byte-size={gpu}:{pool}" for gpu in settings.pool_gpus]
    return command


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _setting_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RepositorySettings) if "help" in f.metadata]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="hub checkpoint directory")
    source.add_argument("--deploy", type=Path, help="deployment artifact (python -m builders convert)")
    parser.add_argument("--out", type=Path, required=True, help="model repository to (re)create")
    for f in _setting_fields():
        if isinstance(f.default, bool):
            parser.add_argument(_flag(f.name), action="store_true", help=f.metadata["help"])
            continue
        options = {k: v for k, v in f.metadata.items() if k != "help"}
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        parser.add_argument(_flag(f.name), type=options.pop("type", type(f.default)), default=f.default,
                            help=f.metadata["help"] + ("" if f.default is None else f" (default: {shown})"), **options)
    for group, config in KNOB_CONFIGS.items():
        arguments = parser.add_argument_group(f"{group} ({config.__module__}.{config.__name__})")
        for name, help_text in knob_help(config).items():
            shown = [str(_KNOB_DEFAULTS[name])] if _KNOB_DEFAULTS[name] is not None else []
            shown += [_SERVED_DEFAULT_NOTES[name]] if name in _SERVED_DEFAULT_NOTES else []
            default = f" (default: {', '.join(shown)})" if shown else ""
            arguments.add_argument(_flag(name), type=int, default=None, help=help_text + default)


def settings_from_args(args: argparse.Namespace) -> RepositorySettings:
    values = {f.name: getattr(args, f.name) for f in _setting_fields()}
    for group, config in KNOB_CONFIGS.items():
        values[group] = {name: getattr(args, name) for name in knob_help(config) if getattr(args, name) is not None}
    if args.deploy is not None:
        return RepositorySettings.for_deploy(args.deploy, **values)
    return RepositorySettings(checkpoint=args.checkpoint, **values)


def run(args: argparse.Namespace) -> None:
    print(shlex.join(render_repository(settings_from_args(args), args.out)))
