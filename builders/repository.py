"""Render the Triton model repository for a checkpoint and print the `tritonserver` command that serves it.

    python -m builders repository (--checkpoint DIR | --deploy DEPLOY) --out REPO [--device cpu|gpu]
                                  [--encoder-instances K] [--encoder-gpus 0,1] [--llm-gpus 2,3] [--max-batch N]
                                  [--max-num-seqs N] [--max-model-len N] [--kv-cache-memory-bytes B]

Fills the `${...}` placeholders of `model_repository/*/config.pbtxt` (the checkpoint path becomes a model
parameter) and copies each `1/model.py`. `--device gpu` puts mimo_encoder and mimo_llm on KIND_GPU and lets the
prompt table reach mimo_llm in GPU memory; the printed command then sizes Triton's CUDA memory pool for the
prompt tables that can be in flight between the two. GPU instances are placed explicitly (`gpus: [...]`): Triton
would otherwise put `count` instances on every GPU, and several mimo_llm instances are several independent engines.

`--deploy` serves a deployment artifact (`python -m builders convert`): preprocessing, mimo_encoder and
postprocessing read its `encoder/` folder; mimo_llm's one instance is rank 0 of the artifact's tensor-parallel
ranks and starts the others itself (rank r on `--llm-gpus[r]` with `--device gpu`, all on the host with cpu).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from mimo.config import MiMoV2Config
from mimo.parallel.deploy import ENCODER_DIR, DeployArtifact
from mimo.serving.triton_config import fill_template

TEMPLATES = Path(__file__).resolve().parents[1] / "model_repository"
MODELS = ("preprocessing", "mimo_encoder", "mimo_llm", "postprocessing", "ensemble")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_TRITON_TYPES = {"float32": "TYPE_FP32", "bfloat16": "TYPE_BF16", "float16": "TYPE_FP16"}
_DEVICE_DEFAULTS = {  # dtype, KV-cache bytes
    "cpu": ("float32", 256 * 2**20),
    "gpu": ("bfloat16", 16 * 2**30),
}


@dataclass(frozen=True)
class RepositorySettings:
    checkpoint: Path  # a hub checkpoint; with `deploy`, the artifact's encoder/ folder (`for_deploy`)
    deploy: Path | None = None  # a deployment artifact whose tensor-parallel ranks mimo_llm runs
    device: str = "cpu"
    dtype: str | None = None  # None = the device's default
    max_batch: int = 16
    encoder_instances: int = 1  # per encoder GPU on gpu
    encoder_gpus: tuple[int, ...] = (0,)
    llm_gpus: tuple[int, ...] = (0,)  # one engine: the GPU of each of its ranks (one without `deploy`)
    processing_instances: int = 1
    queue_delay_us: int = 100
    encoder_queue_delay_us: int = 2000
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None = the checkpoint's max_position_embeddings, at most 8192
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # None = the device's default
    cancellation_check_period_ms: int = 50
    max_media_tokens: int = 16384  # prompt-table rows one request may need; sizes the CUDA pool

    def __post_init__(self):
        if self.device not in _DEVICE_DEFAULTS:
            raise ValueError(f"device must be one of {sorted(_DEVICE_DEFAULTS)}, got {self.device!r}")
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
    def resolved_dtype(self) -> str:
        return self.dtype or _DEVICE_DEFAULTS[self.device][0]

    @property
    def pool_gpus(self) -> list[int]:
        """The GPUs prompt tables live on: where they are computed and where mimo_llm (its rank 0) reads them."""
        return sorted({*self.encoder_gpus, self.llm_gpus[0]})


def instance_group(count: int, gpus: tuple[int, ...] | None) -> str:
    """One `instance_group` entry: `count` CPU instances, or `count` instances on each listed GPU."""
    if gpus is None:
        return f"{{ count: {count} kind: KIND_CPU }}"
    return f"{{ count: {count} kind: KIND_GPU gpus: [ {', '.join(map(str, gpus))} ] }}"


def model_values(settings: RepositorySettings) -> dict[str, dict[str, object]]:
    """The placeholder values of each model's config.pbtxt."""
    config = MiMoV2Config.from_pretrained(settings.checkpoint)
    gpu = settings.device == "gpu"
    dtype = settings.resolved_dtype
    checkpoint = str(settings.checkpoint.resolve())
    batching = {"max_batch_size": settings.max_batch, "max_queue_delay_microseconds": settings.queue_delay_us}
    return {
        "preprocessing": {**batching, "instances": settings.processing_instances, "checkpoint_dir": checkpoint},
        "mimo_encoder": {
            "max_batch_size": settings.max_batch,
            "encoder_queue_delay_microseconds": settings.encoder_queue_delay_us,
            "instance_group": instance_group(settings.encoder_instances, settings.encoder_gpus if gpu else None),
            "embedding_type": _TRITON_TYPES[dtype],
            "checkpoint_dir": checkpoint,
            "dtype": dtype,
        },
        "mimo_llm": {
            **batching,
            "instance_group": instance_group(1, settings.llm_gpus[:1] if gpu else None),  # rank 0
            "rank_gpus": ",".join(map(str, settings.llm_gpus)) if gpu else "",
            "embedding_type": _TRITON_TYPES[dtype],
            "checkpoint_dir": "" if settings.deploy else checkpoint,
            "deploy_dir": str(settings.deploy.resolve()) if settings.deploy else "",
            "dtype": dtype,
            "max_num_seqs": settings.max_num_seqs,
            "max_num_batched_tokens": settings.max_num_batched_tokens,
            "max_model_len": settings.max_model_len or min(config.max_position_embeddings, 8192),
            "block_size": settings.block_size,
            "kv_cache_memory_bytes": settings.kv_cache_memory_bytes or _DEVICE_DEFAULTS[settings.device][1],
            "cancellation_check_period_ms": settings.cancellation_check_period_ms,
            "force_cpu_only_input_tensors": "no" if gpu else "yes",
        },
        "postprocessing": {**batching, "instances": settings.processing_instances, "checkpoint_dir": checkpoint},
        "ensemble": {"max_batch_size": settings.max_batch},
    }


def cuda_memory_pool_bytes(settings: RepositorySettings, hidden_size: int) -> int:
    """Per GPU: room for every prompt table one round of encoder batches can have in flight to mimo_llm, twice over."""
    table_bytes = settings.max_media_tokens * hidden_size * _DTYPE_BYTES[settings.resolved_dtype]
    encoder_instances = settings.encoder_instances * len(settings.encoder_gpus)
    return 2 * encoder_instances * settings.max_batch * table_bytes


def render_repository(settings: RepositorySettings, out: Path, templates: Path = TEMPLATES) -> list[str]:
    """Write the repository into `out` (replacing it); returns the tritonserver command line that serves it."""
    values = model_values(settings)
    if out.exists():
        shutil.rmtree(out)
    for model in MODELS:
        (out / model / "1").mkdir(parents=True)
        text = (templates / model / "config.pbtxt").read_text()
        (out / model / "config.pbtxt").write_text(fill_template(text, values[model]))
        source = templates / model / "1" / "model.py"
        if source.exists():
            shutil.copy2(source, out / model / "1" / "model.py")
    command = ["tritonserver", f"--model-repository={out.resolve()}"]
    if settings.device == "gpu":
        hidden = MiMoV2Config.from_pretrained(settings.checkpoint).hidden_size
        pool = cuda_memory_pool_bytes(settings, hidden)
        command += [f"--cuda-memory-pool-byte-size={gpu}:{pool}" for gpu in settings.pool_gpus]
    return command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RepositorySettings(checkpoint=Path())
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="hub checkpoint directory")
    source.add_argument("--deploy", type=Path, help="deployment artifact (python -m builders convert)")
    parser.add_argument("--out", type=Path, required=True, help="model repository to (re)create")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPE_BYTES), default=None,
                        help="weights and prompt tables (default: float32 on cpu, bfloat16 on gpu)")  # fmt: skip
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="max_batch_size of every model")
    parser.add_argument("--encoder-instances", type=int, default=defaults.encoder_instances,
                        help="mimo_encoder instances (per encoder GPU with --device gpu)")  # fmt: skip
    parser.add_argument("--encoder-gpus", type=_gpu_ids, default=defaults.encoder_gpus,
                        help="comma-separated GPU ids for mimo_encoder instances (--device gpu)")  # fmt: skip
    parser.add_argument("--llm-gpus", type=_gpu_ids, default=defaults.llm_gpus,
                        help="the GPU id of each rank of the mimo_llm engine (--device gpu)")  # fmt: skip
    parser.add_argument("--processing-instances", type=int, default=defaults.processing_instances,
                        help="instances of preprocessing and of postprocessing")  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--max-media-tokens", type=int, default=defaults.max_media_tokens,
                        help="prompt-table rows one request may need (sizes the CUDA memory pool on gpu)")  # fmt: skip


def _gpu_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids like 0,1; got {text!r}") from None


def settings_from_args(args: argparse.Namespace) -> RepositorySettings:
    checkpoint = args.checkpoint if args.deploy is None else args.deploy / ENCODER_DIR
    return RepositorySettings(
        checkpoint=checkpoint, deploy=args.deploy, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
        encoder_instances=args.encoder_instances, encoder_gpus=args.encoder_gpus, llm_gpus=args.llm_gpus,
        processing_instances=args.processing_instances,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_media_tokens=args.max_media_tokens,
    )  # fmt: skip


def run(args: argparse.Namespace) -> None:
    print(shlex.join(render_repository(settings_from_args(args), args.out)))
