"""Convert a hub checkpoint into a tensor / expert parallel deployment artifact (layout: mimo.parallel.deploy).

    python -m builders convert --checkpoint HUB --tp N [--ep M] [--dtype bf16|fp8] --out DEPLOY [--no-progress]

Every rank file gets only its slice, as the rank's layers state it (`mimo.models.linear`, planned by
`mimo.loading.language_model_reads`). The fused qkv_proj is re-sharded for the target TP by one row gather from its
interleaved layout (`fused_qkv.interleaved_rows_for_rank`; any TP, KV heads replicated beyond their count); a split
q/k/v checkpoint is handled as a fused one interleaved at 1.
`--dtype fp8` keeps FP8 weights in FP8 with a fresh 128x128 grid per rank tensor (`fp8.gather_rows_blockwise`:
blocks that come from one source block are copied bit-exact, others re-quantized once); `--dtype bf16` stores them
dequantized. Floating tensors keep their stored dtype. Rank files keep hub names: `qkv_proj` as `[Q_r; K_r; V_r]`,
gate / up and every expert's projections one tensor each (the layers stack them at load, each with its own grid).

Memory: one source tensor group (a weight, its scale grid; q/k/v of a split checkpoint) and its rank slices at a
time; rank files are written with a streaming safetensors writer. The artifact is built in a temp directory next
to DEPLOY and appears in one rename, so a failure or Ctrl-C leaves no partial artifact.
"""

import argparse
import dataclasses
import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mimo.config import MiMoV2Config
from mimo.loading import AUDIO_TOKENIZER_DIR, WeightRead, build_module, check_reads, language_model_reads, read_stored
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.linear import QKVParallelLinear
from mimo.parallel.deploy import (
    DEPLOY_FORMAT,
    DEPLOY_VERSION,
    ENCODER_DIR,
    LLM_DIR,
    MANIFEST_FILE,
    MTP_DIR,
    WEIGHT_DTYPES,
    rank_file_name,
    sha256_file,
)
from mimo.parallel.mapping import Mapping, ParallelRank
from mimo.weights.checkpoint import INDEX_FILE, SCALE_SUFFIX, HubCheckpoint, Role, atomic_directory, tensor_role
from mimo.weights.fp8 import FP8_DTYPE, StoredWeight, gather_rows_blockwise, scale_grid_shape
from mimo.weights.safetensors_writer import SAFETENSORS_DTYPES, StreamingSafetensorsWriter

ENCODER_WEIGHTS = "model.safetensors"
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="hub checkpoint directory")
    parser.add_argument("--tp", type=int, required=True, help="tensor parallel size (= world size)")
    parser.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert parallel size within --tp (experts split by EP, their intermediate dim by tp / ep)",
    )
    parser.add_argument("--dtype", choices=WEIGHT_DTYPES, default="bf16", help="how FP8 weights are stored")
    parser.add_argument("--out", type=Path, required=True, help="deployment artifact directory to (re)create")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> None:
    out = convert(args.checkpoint, args.out, tp=args.tp, ep=args.ep, dtype=args.dtype, progress=not args.no_progress)
    print(f"wrote {out}")


@dataclass(frozen=True)
class RankTensor:
    """What rank `rank` stores under `name`: positions `index` along `dim` of the job's stacked source (None: all)."""

    folder: str
    rank: int
    name: str
    dim: int
    index: torch.Tensor | None


@dataclass(frozen=True)
class ConvertJob:
    """Source tensors read together (`read.hub_names`, stacked along rows) and the rank tensors made from them."""

    read: WeightRead
    outputs: tuple[RankTensor, ...]


def convert(
    checkpoint: str | Path, out: str | Path, *, tp: int, ep: int = 1, dtype: str = "bf16", progress: bool = True
) -> Path:
    """Write the deployment artifact of `checkpoint` for `tp` ranks (`ep` of them splitting the experts) to `out`."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {WEIGHT_DTYPES}")
    ckpt = HubCheckpoint(checkpoint)
    hub_config = json.loads((ckpt.path / "config.json").read_text())
    config = MiMoV2Config.from_hf_config(hub_config)
    mapping = Mapping.create(tp, ep)
    mapping.check_model(config)
    language_names = ckpt.names(Role.LANGUAGE, Role.MTP)
    source_is_fp8 = any(name.endswith(SCALE_SUFFIX) for name in language_names)
    if dtype == "fp8" and not source_is_fp8:
        raise ValueError(f"--dtype fp8 needs an FP8 checkpoint; {ckpt.path} stores its language model unquantized")
    jobs = plan_jobs(ckpt, config, mapping, language_names)
    keep_fp8 = dtype == "fp8"

    out = Path(out)
    with atomic_directory(out, marker_files=(MANIFEST_FILE,)) as tmp:
        _write_encoder(ckpt, tmp / ENCODER_DIR, progress)
        folders = [LLM_DIR] + ([MTP_DIR] if config.num_nextn_predict_layers else [])
        for folder in folders:
            (tmp / folder).mkdir()
        plans: dict[tuple[str, int], list] = {(f, r): [] for f in folders for r in range(mapping.world_size)}
        for job in jobs:
            for rank_tensor, (shape, out_dtype) in zip(job.outputs, _output_specs(ckpt, job, keep_fp8), strict=True):
                entries = rank_file_entries(rank_tensor.name, out_dtype, shape)
                plans[rank_tensor.folder, rank_tensor.rank].extend(entries)
        with ExitStack() as open_files:
            writers = {
                (folder, rank): open_files.enter_context(
                    StreamingSafetensorsWriter(tmp / folder / rank_file_name(rank), planned, {"rank": str(rank)})
                )
                for (folder, rank), planned in plans.items()
            }
            release_after = _last_uses(ckpt, [_hub_names(job) for job in jobs])
            for i, job in enumerate(tqdm(jobs, desc="language model", unit="tensor", disable=not progress)):
                _write_job(ckpt, job, keep_fp8, writers)  # its tensors are freed before the next group is read
                for shard in release_after.get(i, ()):
                    ckpt.release(shard)
            for writer in writers.values():
                writer.finish()
        _write_json(tmp / LLM_DIR / "config.json", _llm_config(hub_config, config, mapping, keep_fp8))
        _write_json(tmp / MANIFEST_FILE, _manifest(tmp, ckpt.path, mapping, dtype))
    return out


def _write_job(ckpt: HubCheckpoint, job: ConvertJob, keep_fp8: bool, writers: dict) -> None:
    source = _read_source(ckpt, job, keep_fp8)
    for rank_tensor in job.outputs:
        for name, tensor in _take(source, rank_tensor):
            writers[rank_tensor.folder, rank_tensor.rank].write(name, tensor)


def _hub_names(job: ConvertJob) -> list[str]:
    return [name for hub in job.read.hub_names for name in (hub, hub + SCALE_SUFFIX)]


def _last_uses(ckpt: HubCheckpoint, reads: list[list[str]]) -> dict[int, list[Path]]:
    """For each step of `reads`, the shards no later step reads (released then, so one shard or two stay mapped)."""
    last_use = {ckpt.shard_of(name): step for step, names in enumerate(reads) for name in names if name in ckpt}
    release_after: dict[int, list[Path]] = {}
    for shard, step in last_use.items():
        release_after.setdefault(step, []).append(shard)
    return release_after


def plan_jobs(ckpt: HubCheckpoint, config: MiMoV2Config, mapping: Mapping, names: list[str]) -> list[ConvertJob]:
    """Validate every language / MTP tensor against each rank's model (headers only) and plan every rank's slices.

    The slices are the rank models' own (`language_model_reads`: the layers' `shard_index`), so a rank file holds
    exactly what `load_language_model` would give that rank from the hub checkpoint. A rank file stores hub names:
    a qkv_proj fused as `[Q_r; K_r; V_r]`, other stacked parts (gate, up) one tensor each.
    """
    rank_reads = []
    for rank in range(mapping.world_size):
        parallel = ParallelRank(mapping, rank)
        model = build_module(lambda: MiMoV2ForCausalLM(config, parallel), torch.bfloat16)  # meta: names, shapes
        rank_reads.append(language_model_reads(model, fused_qkv_tp=config.fused_qkv_tp, rank_files=False))
    check_reads([ckpt], names, [read for reads in rank_reads for read in reads])
    jobs: dict[tuple[str, ...], tuple[WeightRead, list[RankTensor]]] = {}
    for rank, reads in enumerate(rank_reads):
        for read in (part for read in reads for part in per_stored_tensor(read)):
            folder = MTP_DIR if tensor_role(read.hub_names[0]) == Role.MTP else LLM_DIR
            name = read.target if isinstance(read.layer, QKVParallelLinear) else read.hub_names[0]
            jobs.setdefault(read.hub_names, (read, []))[1].append(RankTensor(folder, rank, name, read.dim, read.index))
    ordered = [ConvertJob(read, tuple(outputs)) for read, outputs in jobs.values()]
    # Shard by shard: each shard is mapped once, and released after its last tensor.
    return sorted(ordered, key=lambda job: ckpt.shard_of(job.read.hub_names[0]).name)


def per_stored_tensor(read: WeightRead) -> list[WeightRead]:
    """Stacked parts (gate, up) as one read each, so a job holds one source tensor; q, k, v stay together (their
    rank tensor is the fused `[Q_r; K_r; V_r]`)."""
    if len(read.hub_names) == 1 or isinstance(read.layer, QKVParallelLinear):
        return [read]
    parts = zip(read.hub_names, read.shapes, read.layer.part_indices(), strict=True)
    return [dataclasses.replace(read, hub_names=(n,), shapes=(shape,), index=index) for n, shape, index in parts]


def _output_specs(ckpt: HubCheckpoint, job: ConvertJob, keep_fp8: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each of `job.outputs`, from the headers alone."""
    read = job.read
    full_shape = (sum(shape[0] for shape in read.shapes), *read.shapes[0][1:])
    first = read.hub_names[0]
    if ckpt.is_fp8(first):
        stored_dtype = FP8_DTYPE if keep_fp8 else torch.bfloat16
    else:
        stored_dtype = _TORCH_DTYPES[ckpt.dtype(first)]
    specs = []
    for out in job.outputs:
        shape = list(full_shape)
        if out.index is not None:
            shape[out.dim] = out.index.numel()
        specs.append((tuple(shape), stored_dtype))
    return specs


def rank_file_entries(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple]]:
    entries = [(name, dtype, shape)]
    if dtype == FP8_DTYPE:
        entries.append((name + SCALE_SUFFIX, torch.float32, scale_grid_shape(*shape)))
    return entries


def _read_source(ckpt: HubCheckpoint, job: ConvertJob, keep_fp8: bool) -> StoredWeight:
    source = read_stored(dict.fromkeys(job.read.hub_names, ckpt), job.read, "cpu")
    if source.is_fp8 and not keep_fp8:
        return StoredWeight(source.dequantized(torch.bfloat16))
    return source


def _take(source: StoredWeight, out: RankTensor) -> list[tuple[str, torch.Tensor]]:
    """A rank tensor as stored: floating, or FP8 re-blocked on a fresh 128x128 grid of its own."""
    if not source.is_fp8:
        return [(out.name, source.data if out.index is None else source.data.index_select(out.dim, out.index))]
    weight, scale_inv, scale_row_of = source.data, source.scale_inv, source.scale_rows
    if out.dim == 1:  # columns of a plain grid = rows of the transposed weight and grid
        weight, scale_inv, scale_row_of = weight.T, scale_inv.T, source.scale_cols()
    rows = torch.arange(weight.shape[0]) if out.index is None else out.index
    w_fp8, grid = gather_rows_blockwise(weight, scale_inv, scale_row_of, rows)
    if out.dim == 1:
        w_fp8, grid = w_fp8.T.contiguous(), grid.T.contiguous()
    return [(out.name, w_fp8), (out.name + SCALE_SUFFIX, grid)]


def _write_encoder(ckpt: HubCheckpoint, folder: Path, progress: bool) -> None:
    """Config, tokenizer / processor files, vision + audio tensors and the audio tokenizer: no LM tensor."""
    folder.mkdir()
    for file in sorted(ckpt.path.iterdir()):
        if file.is_file() and file.name != INDEX_FILE and not file.name.endswith(".safetensors"):
            shutil.copyfile(file, folder / file.name)
    if (ckpt.path / AUDIO_TOKENIZER_DIR).is_dir():
        shutil.copytree(ckpt.path / AUDIO_TOKENIZER_DIR, folder / AUDIO_TOKENIZER_DIR)
    names = sorted(ckpt.names(Role.VISION, Role.AUDIO), key=lambda name: ckpt.shard_of(name).name)
    if not names:
        return
    planned = [(name, _TORCH_DTYPES[ckpt.dtype(name)], ckpt.shape(name)) for name in names]
    release_after = _last_uses(ckpt, [[name] for name in names])
    with StreamingSafetensorsWriter(folder / ENCODER_WEIGHTS, planned) as writer:
        for i, name in enumerate(tqdm(names, desc="encoders", unit="tensor", disable=not progress)):
            writer.write(name, ckpt.tensor(name))
            for shard in release_after.get(i, ()):
                ckpt.release(shard)
        writer.finish()


def _llm_config(hub_config: dict, config: MiMoV2Config, mapping: Mapping, keep_fp8: bool) -> dict:
    """The hub config (what MiMoV2Config parses) plus the TensorRT-LLM checkpoint keys."""
    llm_config = dict(hub_config)
    if not keep_fp8:
        llm_config.pop("quantization_config", None)
    llm_config.update(
        architecture=config.architecture,
        dtype="bfloat16",
        mapping=mapping.to_dict(),
        quantization={"quant_algo": "FP8_BLOCK_SCALES" if keep_fp8 else None, "kv_cache_quant_algo": None},
    )
    return llm_config


def _manifest(root: Path, source: Path, mapping: Mapping, dtype: str) -> dict:
    files = {
        path.relative_to(root).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
    return {
        "format": DEPLOY_FORMAT,
        "version": DEPLOY_VERSION,
        "source": str(source.resolve()),
        "mapping": mapping.to_dict(),
        "dtype": dtype,
        "files": files,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
