"""Convert a hub checkpoint into a tensor / expert parallel deployment artifact (layout: mimo.parallel.deploy).

    python -m builders convert --checkpoint HUB --tp N [--ep M] [--dtype bf16|fp8] --out DEPLOY [--no-progress]

Every rank file gets only its slice (rules: mimo.parallel.mapping). The fused qkv_proj is re-sharded for the target
TP by one row gather from its interleaved layout (`fused_qkv.interleaved_rows_for_rank`; any TP, KV heads
replicated beyond their count); a split q/k/v checkpoint is handled as a fused one interleaved at 1.
`--dtype fp8` keeps FP8 weights in FP8 with a fresh 128x128 grid per rank tensor (`fp8.gather_rows_blockwise`:
blocks that come from one source block are copied bit-exact, others re-quantized once); `--dtype bf16` stores them
dequantized. Floating tensors keep their stored dtype.

Memory: one source tensor group (a weight, its scale grid; q/k/v of a split checkpoint) and its rank slices at a
time; rank files are written with a streaming safetensors writer. The artifact is built in a temp directory next
to DEPLOY and appears in one rename, so a failure or Ctrl-C leaves no partial artifact.
"""

import argparse
import functools
import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from builders.streaming_safetensors import SAFETENSORS_DTYPES, StreamingSafetensorsWriter
from mimo.config import MiMoV2Config
from mimo.loading import AUDIO_TOKENIZER_DIR, build_module
from mimo.models.language_model import MiMoV2ForCausalLM
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
from mimo.parallel.mapping import Mapping, rank_split
from mimo.weights.checkpoint import (
    INDEX_FILE,
    SCALE_SUFFIX,
    FusedQKVLayout,
    HubCheckpoint,
    PlannedRead,
    Role,
    atomic_directory,
    plan_state_dict,
    tensor_role,
)
from mimo.weights.fp8 import FP8_DTYPE, dequantize_blockwise, gather_rows_blockwise, scale_grid_shape
from mimo.weights.fused_qkv import (
    QKVGeometry,
    dequantize_interleaved,
    interleaved_rows_for_rank,
    interleaved_scale_rows,
    layer_qkv_geometry,
)

ENCODER_WEIGHTS = "model.safetensors"
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_QKV = ("q_proj.weight", "k_proj.weight", "v_proj.weight")


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
class _Source:
    """A source matrix (or vector) ranks take slices of: floating, or FP8 with the scale row of each of its rows."""

    data: torch.Tensor  # [R, C] or [R]
    scale_inv: torch.Tensor | None = None  # [S, ceil(C/128)]
    scale_row_of: torch.Tensor | None = None  # int64 [R]


@dataclass(frozen=True)
class _RankTensor:
    """What rank `rank` stores under `name`: positions `index` along `dim` of the source (None: all of it)."""

    folder: str
    rank: int
    name: str
    dim: int
    index: torch.Tensor | None


@dataclass(frozen=True)
class _Job:
    """Source tensors read together, and the rank tensors made from them."""

    reads: tuple[PlannedRead, ...]  # one entry, or the q, k, v entries of a split checkpoint
    geometry: QKVGeometry | None  # set for attention projections
    outputs: tuple[_RankTensor, ...]


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
    jobs = _plan_jobs(ckpt, config, mapping, language_names)
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
                plans[rank_tensor.folder, rank_tensor.rank].extend(_file_entries(rank_tensor.name, out_dtype, shape))
        with ExitStack() as open_files:
            writers = {
                (folder, rank): open_files.enter_context(
                    StreamingSafetensorsWriter(tmp / folder / rank_file_name(rank), planned, {"rank": str(rank)})
                )
                for (folder, rank), planned in plans.items()
            }
            release_after = _last_uses(ckpt, [_hub_names(job) for job in jobs])
            for i, job in enumerate(tqdm(jobs, desc="language model", unit="tensor", disable=not progress)):
                source = _read_source(ckpt, job, config, keep_fp8)
                for rank_tensor in job.outputs:
                    for name, tensor in _take(source, rank_tensor):
                        writers[rank_tensor.folder, rank_tensor.rank].write(name, tensor)
                del source  # before the next group is read
                for shard in release_after.get(i, ()):
                    ckpt.release(shard)
            for writer in writers.values():
                writer.finish()
        _write_json(tmp / LLM_DIR / "config.json", _llm_config(hub_config, config, mapping, keep_fp8))
        _write_json(tmp / MANIFEST_FILE, _manifest(tmp, ckpt.path, mapping, dtype))
    return out


def _hub_names(job: _Job) -> list[str]:
    return [name for read in job.reads for name in (read.hub_name, read.scale_name) if name is not None]


def _last_uses(ckpt: HubCheckpoint, reads: list[list[str]]) -> dict[int, list[Path]]:
    """For each step of `reads`, the shards no later step reads (released then, so one shard or two stay mapped)."""
    last_use = {ckpt.shard_of(name): step for step, names in enumerate(reads) for name in names}
    release_after: dict[int, list[Path]] = {}
    for shard, step in last_use.items():
        release_after.setdefault(step, []).append(shard)
    return release_after


def _plan_jobs(ckpt: HubCheckpoint, config: MiMoV2Config, mapping: Mapping, names: list[str]) -> list[_Job]:
    """Validate every language / MTP tensor against the model (headers only) and plan every rank's slices."""
    full_model = build_module(lambda: MiMoV2ForCausalLM(config), torch.bfloat16)  # meta: names and shapes
    layout = FusedQKVLayout(config.fused_qkv_tp, functools.partial(layer_qkv_geometry, config))
    reads = plan_state_dict(ckpt, names, full_model.state_dict(), qkv_layout=layout)
    world = range(mapping.world_size)
    split_qkv: dict[str, dict[str, PlannedRead]] = {}
    jobs = []
    for read in reads:
        folder = MTP_DIR if tensor_role(read.hub_name) == Role.MTP else LLM_DIR
        if read.geometry is not None:  # fused qkv_proj
            jobs.append(_qkv_job((read,), read.hub_name, config, mapping, folder, config.fused_qkv_tp))
            continue
        (module_name,) = read.outputs
        projection = next((p for p in _QKV if module_name.endswith(p)), None)
        if projection is not None:  # split q/k/v: once all three are planned, they are a fused qkv_proj at TP 1
            prefix = module_name.removesuffix(projection)
            group = split_qkv.setdefault(prefix, {})
            group[projection] = read
            if len(group) == len(_QKV):
                reads_qkv = tuple(group[p] for p in _QKV)
                jobs.append(_qkv_job(reads_qkv, prefix + "qkv_proj.weight", config, mapping, folder, ckpt_tp=1))
            continue
        shape = read.outputs[module_name]
        outputs = []
        for r in world:
            split = rank_split(module_name, config, mapping, r)
            if split is not None:
                index = None if split.parts == 1 else split.positions(shape[split.dim])
                outputs.append(_RankTensor(folder, r, read.hub_name, split.dim, index))
        jobs.append(_Job((read,), None, tuple(outputs)))
    # Shard by shard: each shard is mapped once, and released after its last tensor.
    return sorted(jobs, key=lambda job: ckpt.shard_of(job.reads[0].hub_name).name)


def _qkv_job(
    reads: tuple[PlannedRead, ...], qkv_name: str, config: MiMoV2Config, mapping: Mapping, folder: str, ckpt_tp: int
) -> _Job:
    geometry = layer_qkv_geometry(config, qkv_name)
    outputs = tuple(
        _RankTensor(folder, r, qkv_name, 0, interleaved_rows_for_rank(geometry, ckpt_tp, mapping.tp_size, r))
        for r in range(mapping.world_size)
    )
    return _Job(reads, geometry, outputs)


def _output_specs(ckpt: HubCheckpoint, job: _Job, keep_fp8: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each of `job.outputs`, from the headers alone."""
    first = job.reads[0]
    if job.geometry is not None:
        full_shape = (sum(ckpt.shape(read.hub_name)[0] for read in job.reads), ckpt.shape(first.hub_name)[1])
    else:
        full_shape = ckpt.shape(first.hub_name)
    is_fp8 = first.scale_name is not None
    if is_fp8:
        stored_dtype = FP8_DTYPE if keep_fp8 else torch.bfloat16
    else:
        stored_dtype = _TORCH_DTYPES[ckpt.dtype(first.hub_name)]
    specs = []
    for out in job.outputs:
        shape = list(full_shape)
        if out.index is not None:
            shape[out.dim] = out.index.numel()
        specs.append((tuple(shape), stored_dtype))
    return specs


def _file_entries(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple]]:
    entries = [(name, dtype, shape)]
    if dtype == FP8_DTYPE:
        entries.append((name + SCALE_SUFFIX, torch.float32, scale_grid_shape(*shape)))
    return entries


def _read_source(ckpt: HubCheckpoint, job: _Job, config: MiMoV2Config, keep_fp8: bool) -> _Source:
    weights = [ckpt.tensor(read.hub_name) for read in job.reads]
    if job.reads[0].scale_name is None:
        return _Source(torch.cat(weights))
    scales = [ckpt.tensor(read.scale_name).float() for read in job.reads]
    if job.geometry is not None and len(job.reads) == 1:  # fused qkv_proj: one grid per interleaved shard
        ckpt_tp = config.fused_qkv_tp
        if not keep_fp8:
            return _Source(dequantize_interleaved(weights[0], scales[0], job.geometry, ckpt_tp, torch.bfloat16))
        return _Source(weights[0], scales[0], interleaved_scale_rows(job.geometry, ckpt_tp))
    if not keep_fp8:
        dequantized = [dequantize_blockwise(w, s, torch.bfloat16) for w, s in zip(weights, scales, strict=True)]
        return _Source(torch.cat(dequantized))
    # Plain grids (one tensor, or split q/k/v stacked): each weight row uses its own grid's row // 128.
    offsets = torch.tensor([0] + [s.shape[0] for s in scales[:-1]]).cumsum(0)
    scale_row_of = torch.cat([torch.arange(w.shape[0]) // 128 + o for w, o in zip(weights, offsets, strict=True)])
    return _Source(torch.cat(weights), torch.cat(scales), scale_row_of)


def _take(source: _Source, out: _RankTensor) -> list[tuple[str, torch.Tensor]]:
    if source.scale_inv is None:
        return [(out.name, source.data if out.index is None else source.data.index_select(out.dim, out.index))]
    weight, scale_inv, scale_row_of = source.data, source.scale_inv, source.scale_row_of
    if out.dim == 1:  # columns of a plain grid = rows of the transposed weight and grid
        weight, scale_inv, scale_row_of = weight.T, scale_inv.T, torch.arange(weight.shape[1]) // 128
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
