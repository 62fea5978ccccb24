"""Build each component and load it from a hub checkpoint or a deployment artifact, reading only its own tensors.

Modules are built on the `meta` device in the target dtype and receive their tensors afterwards, so a large model is
allocated once, directly on `device`. The encoders are plain state_dicts under hub names
(`mimo.weights.checkpoint.read_state_dict`). The language model's layers own the form of their weights
(`mimo.models.linear`): `language_model_reads` walks a rank's model and says, for each of its tensors, which
checkpoint tensors give it and which slice of them this rank holds; the loaders here and `builders convert` both
follow that plan.
"""

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mimo.config import MiMoV2Config
from mimo.models.audio_tokenizer import AudioTokenizerConfig, MiMoAudioTokenizer
from mimo.models.audio_tower import AudioConfig, MiMoAudioEncoder
from mimo.models.language_model import MiMoV2ForCausalLM
from mimo.models.linear import ParallelLinear, QKVParallelLinear
from mimo.models.moe import RoutedExperts
from mimo.models.vision_tower import MiMoVisionTransformer, VisionConfig
from mimo.parallel.deploy import LLM_DIR, MTP_DIR, DeployArtifact, DeployError, rank_file_name
from mimo.parallel.mapping import ParallelRank
from mimo.weights.checkpoint import (
    AUDIO_MODULE_PREFIX,
    FUSED_QKV_SUFFIX,
    SCALE_SUFFIX,
    SPLIT_QKV_SUFFIXES,
    VISION_PREFIXES,
    CheckpointError,
    HubCheckpoint,
    Role,
    TensorCheckpoint,
    read_state_dict,
    tensors_and_scales,
)
from mimo.weights.fp8 import FP8Slice, StoredWeight, scale_grid_shape, stack_rows
from mimo.weights.fused_qkv import (
    QKVGeometry,
    fused_rows,
    fused_scale_grid_shape,
    interleaved_scale_rows,
)

CheckpointSource = str | Path | HubCheckpoint
AUDIO_TOKENIZER_DIR = "audio_tokenizer"


def load_language_model(
    checkpoint: CheckpointSource,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    with_mtp: bool = False,
    dequantize_fp8: bool = False,
) -> MiMoV2ForCausalLM:
    """The language model (`model.*`, `lm_head.*`), plus its MTP layers (`model.mtp.*`) if `with_mtp`.

    No vision or audio tensor is read. Without `with_mtp` the model is built without MTP layers. FP8 weights stay
    FP8 in the layers unless `dequantize_fp8` (then they are dequantized to `dtype` once, at load).
    """
    ckpt = _open(checkpoint)
    config = _with_mtp(MiMoV2Config.from_pretrained(ckpt.path), with_mtp, f"{ckpt.path}/config.json")
    model = build_module(lambda: MiMoV2ForCausalLM(config), dtype)
    roles = (Role.LANGUAGE, Role.MTP) if with_mtp else (Role.LANGUAGE,)
    reads = language_model_reads(model, fused_qkv_tp=config.fused_qkv_tp, rank_files=False)
    return _load_language_model(model, [ckpt], ckpt.names(*roles), reads, device, keep_fp8=not dequantize_fp8)


def load_rank_language_model(
    deploy: str | Path | DeployArtifact,
    rank: int,
    world_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    group: dist.ProcessGroup | None = None,
    with_mtp: bool = False,
) -> MiMoV2ForCausalLM:
    """Rank `rank`'s language model (+ MTP layers if `with_mtp`), reading only its `llm/` (and `mtp/`) rank files.

    Raises DeployError when the artifact was built for another world size or a rank file is truncated, and
    CheckpointError when a rank file does not hold exactly this rank's tensors in this rank's shapes.
    """
    artifact = deploy if isinstance(deploy, DeployArtifact) else DeployArtifact.open(deploy)
    artifact.check_layout(world_size)
    if with_mtp and artifact.config.num_nextn_predict_layers == 0:
        raise DeployError(f"with_mtp=True, but {artifact.path} has no MTP layers")
    config = _with_mtp(artifact.config, with_mtp, str(artifact.path))
    parallel = ParallelRank(artifact.mapping, rank, group)
    model = build_module(lambda: MiMoV2ForCausalLM(config, parallel), dtype)
    files = []
    for folder in (LLM_DIR, MTP_DIR) if with_mtp else (LLM_DIR,):
        rank_file = artifact.rank_file(folder, rank)
        files.append(HubCheckpoint(rank_file.parent, file=rank_file_name(rank)))
    reads = language_model_reads(model, fused_qkv_tp=None, rank_files=True)
    names = [name for ckpt in files for name in ckpt.names()]
    return _load_language_model(model, files, names, reads, device, keep_fp8=True)


def load_language_weights(
    model: MiMoV2ForCausalLM, tensors: Mapping[str, torch.Tensor], device: torch.device | str
) -> MiMoV2ForCausalLM:
    """`model` (one rank, on meta) with its weights from split hub-named tensors in memory (`builders.tiny`'s
    `random_language_tensors`: a benchmark's random model without a checkpoint on disk)."""
    source = TensorCheckpoint(tensors)
    reads = language_model_reads(model, fused_qkv_tp=None, rank_files=False)
    return _load_language_model(model, [source], source.names(), reads, device, keep_fp8=True)


def _with_mtp(config: MiMoV2Config, with_mtp: bool, source: str) -> MiMoV2Config:
    if not with_mtp:
        return dataclasses.replace(config, num_nextn_predict_layers=0)
    if config.num_nextn_predict_layers == 0:
        raise CheckpointError(f"with_mtp=True, but {source} has num_nextn_predict_layers = 0")
    return config


@dataclass(frozen=True)
class WeightRead:
    """Checkpoint tensors, stacked along rows, that give one tensor of a rank's model (or one expert's slot of it)."""

    target: str  # the model's tensor, e.g. "model.layers.0.self_attn.qkv_proj.weight"
    hub_names: tuple[str, ...]  # e.g. its q_proj, k_proj, v_proj, or one fused qkv_proj
    shapes: tuple[tuple[int, ...], ...]  # the stored shape of each
    dim: int  # the dim this rank's slice is taken along
    index: torch.Tensor | None  # positions along `dim` of the stacked tensors this rank holds; None: all
    expert: int | None = None  # slot of a per-expert weight (`RoutedExperts`)
    layer: ParallelLinear | None = None  # the layer whose weight this is (FP8 stays FP8 there)
    fused_qkv: QKVGeometry | None = None  # set for a hub fused qkv_proj interleaved at `interleave`
    interleave: int = 1


def language_model_reads(model: nn.Module, *, fused_qkv_tp: int | None, rank_files: bool) -> list[WeightRead]:
    """What every tensor of `model` (a rank's `MiMoV2ForCausalLM`, typically on meta) is read from, in module order.

    Args:
        fused_qkv_tp: the checkpoint's `qkv_proj` TP interleave; None for split q/k/v.
        rank_files: the tensors are a deployment rank's (already sliced; qkv_proj fused as `[Q_r; K_r; V_r]`).
    """
    reads: list[WeightRead] = []

    def linear(layer: ParallelLinear, target: str, hub_prefix: str, expert: int | None) -> WeightRead:
        if isinstance(layer, QKVParallelLinear) and (rank_files or fused_qkv_tp is not None):
            name = f"{hub_prefix}{layer.fused_hub_part}.weight"
            if rank_files:
                return WeightRead(target, (name,), (layer.local_shape,), 0, None, expert, layer)
            shape = (fused_rows(layer.geometry, fused_qkv_tp), layer.in_features)
            index = layer.shard_index(fused_qkv_tp)
            return WeightRead(target, (name,), (shape,), 0, index, expert, layer, layer.geometry, fused_qkv_tp)
        names = tuple(f"{hub_prefix}{part}.weight" for part in layer.hub_parts)
        shapes = tuple(layer.part_shapes(local=rank_files))
        index = None if rank_files else layer.shard_index()
        return WeightRead(target, names, shapes, layer.split_dim, index, expert, layer)

    def visit(module: nn.Module, prefix: str) -> None:
        own = [*module._parameters.items(), *((n, b) for n, b in module._buffers.items()
                                              if n not in module._non_persistent_buffers_set)]  # fmt: skip
        for name, tensor in own:
            if tensor is None:
                continue
            shape, dim, index = tuple(tensor.shape), 0, None
            shard_of = getattr(module, "shard_of", None)
            if shard_of is not None and not rank_files:
                dim, full_size, index = shard_of(name)
                shape = tuple(full_size if d == dim else n for d, n in enumerate(shape))
            reads.append(WeightRead(prefix + name, (prefix + name,), (shape,), dim, index))
        for child_name, child in module.named_children():
            if isinstance(child, ParallelLinear):
                reads.append(linear(child, f"{prefix}{child_name}.weight", prefix, None))
            elif isinstance(child, RoutedExperts):
                for slot, expert_id in enumerate(child.expert_ids):
                    for layer_name, layer in child.named_children():
                        target = f"{prefix}{child_name}.{layer_name}.weight"
                        reads.append(linear(layer, target, f"{prefix}{child_name}.{expert_id}.", slot))
            else:
                visit(child, f"{prefix}{child_name}.")

    visit(model, "")
    return reads


def check_reads(sources: list[HubCheckpoint], names: list[str], reads: list[WeightRead]) -> dict[str, HubCheckpoint]:
    """Validate `reads` against the checkpoint headers before any data is read; returns where each name is.

    `names`: the checkpoint tensors to consume (one role, or a rank's files); each must be read exactly once.
    Raises CheckpointError naming the tensor and the expected and found values.
    """
    where = {name: ckpt for ckpt in sources for name in ckpt.names()}
    available, scales = tensors_and_scales(names, lambda name: where[name].is_fp8(name))
    wanted = [name for read in reads for name in read.hub_names]
    _check_qkv_layout(wanted, available)
    missing = sorted(set(wanted) - available)
    unexpected = sorted(available - scales - set(wanted))
    if missing or unexpected:
        path = sources[0].path if len(sources) == 1 else [str(s.path) for s in sources]
        raise CheckpointError(
            f"checkpoint {path} does not match the module: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    for read in reads:
        fp8 = [where[name].is_fp8(name) for name in read.hub_names]
        if any(fp8) and not all(fp8):
            raise CheckpointError(f"{list(read.hub_names)} form one weight, but only some of them are FP8")
        for name, shape in zip(read.hub_names, read.shapes, strict=True):
            _check_stored(where[name], name, shape, read, scales)
    return where


def _check_qkv_layout(wanted: list[str], available: set[str]) -> None:
    for name in wanted:
        if name.endswith(FUSED_QKV_SUFFIX) and name not in available:
            split = name.removesuffix("qkv_proj.weight") + "q_proj.weight"
            if split in available:
                raise CheckpointError(
                    f"{split!r} is a split projection, but the config declares attention_projection_layout="
                    f"'fused_qkv' (expected {name})"
                )
        if name.endswith(SPLIT_QKV_SUFFIXES[0]) and name not in available:
            fused = name.removesuffix("q_proj.weight") + "qkv_proj.weight"
            if fused in available:
                raise CheckpointError(
                    f"{fused!r} is a fused qkv_proj, but the config has no attention_projection_layout='fused_qkv'"
                )


def _check_stored(ckpt: HubCheckpoint, name: str, shape: tuple[int, ...], read: WeightRead, scales: set[str]) -> None:
    found = ckpt.shape(name)
    if found != tuple(shape):
        if read.fused_qkv is not None:
            geometry, tp = read.fused_qkv, read.interleave
            raise CheckpointError(
                f"{name} has shape {found}, expected {tuple(shape)}: {tp} interleaved shards of "
                f"{geometry.rows_per_rank(tp)} (q, k, v) rows for {geometry}"
            )
        raise CheckpointError(f"tensor {name!r} has shape {found} in {ckpt.path}, the module expects {tuple(shape)}")
    scale = name + SCALE_SUFFIX
    if not ckpt.is_fp8(name):
        return
    if scale not in scales:
        raise CheckpointError(f"FP8 tensor {name!r} has no {scale!r}")
    if len(found) != 2:
        raise CheckpointError(f"FP8 tensor {name!r} has shape {found}; block-quantized weights are 2-D")
    grid = ckpt.shape(scale)
    if read.fused_qkv is not None:
        expected = fused_scale_grid_shape(read.fused_qkv, read.interleave, found[1])
        if grid != expected:
            raise CheckpointError(
                f"{scale} has shape {grid}, expected {expected}: one 128x128 grid per each of the "
                f"{read.interleave} interleaved shards"
            )
    elif grid != scale_grid_shape(*found):
        expected = scale_grid_shape(*found)
        raise CheckpointError(f"{scale} has shape {grid}, expected {expected} (128x128 blocks of {found})")


def read_stored(where: dict[str, HubCheckpoint], read: WeightRead, device: torch.device | str) -> StoredWeight:
    """The tensors of `read` as one stacked stored weight on `device` (FP8 ones with their grids)."""
    parts = []
    for name in read.hub_names:
        ckpt = where[name]
        data = ckpt.tensor(name).to(device)
        if not ckpt.is_fp8(name):
            parts.append(StoredWeight(data))
            continue
        scale_inv = ckpt.tensor(name + SCALE_SUFFIX).to(device).float()
        if read.fused_qkv is not None:  # one grid per interleaved shard
            scale_rows = interleaved_scale_rows(read.fused_qkv, read.interleave).to(device)
            parts.append(StoredWeight(data, scale_inv, scale_rows))
        else:
            parts.append(StoredWeight.plain(data, scale_inv))
    return stack_rows(parts)


def _load_language_model(
    model: MiMoV2ForCausalLM,
    sources: list[HubCheckpoint],
    names: list[str],
    reads: list[WeightRead],
    device: torch.device | str,
    *,
    keep_fp8: bool,
) -> MiMoV2ForCausalLM:
    where = check_reads(sources, names, reads)
    expert_slots: dict[str, list] = {}
    for read in reads:
        stored = read_stored(where, read, device)
        module_name, _, tensor_name = read.target.rpartition(".")
        module = model.get_submodule(module_name)
        if read.layer is not None and stored.is_fp8 and keep_fp8:
            value = stored.select(read.dim, read.index)
        else:
            floating = StoredWeight(stored.dequantized(torch.float32)) if stored.is_fp8 else stored
            value = floating.select(read.dim, read.index).to(getattr(module, tensor_name).dtype)
        if read.expert is not None:
            expert_slots.setdefault(read.target, []).append(value)
            if len(expert_slots[read.target]) == read.layer.num_experts:
                read.layer.set_weight(_stack_experts(expert_slots.pop(read.target)))
        elif read.layer is not None:
            read.layer.set_weight(value)
        elif tensor_name in module._parameters:
            module._parameters[tensor_name] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[tensor_name] = value
    _check_no_meta(model)
    return model.eval()


def _stack_experts(slots: list) -> torch.Tensor | FP8Slice:
    if not isinstance(slots[0], FP8Slice):
        return torch.stack(slots)
    first = slots[0]
    for other in slots[1:]:  # same slice of same-shaped experts: the same blocks
        if not (torch.equal(other.scale_rows, first.scale_rows) and torch.equal(other.scale_cols, first.scale_cols)):
            raise CheckpointError("experts of one layer have differently blocked FP8 weights")
    return FP8Slice(
        torch.stack([s.weight for s in slots]), torch.stack([s.scale_inv for s in slots]), first.scale_rows,
        first.scale_cols,
    )  # fmt: skip


def hub_state_dict(model: MiMoV2ForCausalLM, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A one-rank model's weights under split hub names (q/k/v, gate/up, per expert), FP8 dequantized to `dtype`.

    The inverse of loading a split checkpoint: what a reference implementation (transformers) is built from.
    """
    if model.parallel.mapping.world_size != 1:
        raise ValueError("hub_state_dict takes a one-rank model")
    state = {}
    for read in language_model_reads(model, fused_qkv_tp=None, rank_files=False):
        module_name, _, tensor_name = read.target.rpartition(".")
        if read.layer is None:
            state[read.hub_names[0]] = getattr(model.get_submodule(module_name), tensor_name)
            continue
        weight = read.layer.dense_weight(dtype, read.expert).to(dtype)
        state.update(zip(read.hub_names, weight.split([shape[0] for shape in read.shapes]), strict=True))
    return state


def load_vision_tower(
    checkpoint: CheckpointSource, dtype: torch.dtype, device: torch.device | str
) -> MiMoVisionTransformer:
    """The vision tower (`visual.*` or `vision_model.*`); no language or audio tensor is read."""
    ckpt = _open(checkpoint)
    config = VisionConfig.from_dict(_sub_config(ckpt, "vision_config"))
    model = build_module(lambda: MiMoVisionTransformer(config), dtype)
    return _load(model, ckpt, ckpt.names(Role.VISION), device, to_module_name=_strip_vision_prefix)


def load_audio_encoder(
    checkpoint: CheckpointSource, dtype: torch.dtype, device: torch.device | str
) -> MiMoAudioEncoder:
    """The audio tower of the main checkpoint (`audio_encoder.*` / `*speech_embeddings*`); reads no other role."""
    ckpt = _open(checkpoint)
    config = AudioConfig.from_dict(_sub_config(ckpt, "audio_config"))
    model = build_module(lambda: MiMoAudioEncoder(config), dtype)
    return _load(
        model, ckpt, ckpt.names(Role.AUDIO), device, to_module_name=lambda n: n.removeprefix(AUDIO_MODULE_PREFIX)
    )


def load_audio_tokenizer(
    checkpoint_dir: str | Path, dtype: torch.dtype, device: torch.device | str, *, ckpt: HubCheckpoint | None = None
) -> MiMoAudioTokenizer:
    """The audio tokenizer from its own folder `audio_tokenizer/{config.json,model.safetensors}` (ref §2.5);
    `ckpt`: that folder opened by the caller (whose `accessed` then records the reads)."""
    folder = Path(checkpoint_dir) / AUDIO_TOKENIZER_DIR
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist")
    config = AudioTokenizerConfig.from_dict(json.loads(config_path.read_text()))
    model = build_module(lambda: MiMoAudioTokenizer(config), dtype)
    ckpt = ckpt or HubCheckpoint(folder)
    return _load(model, ckpt, ckpt.names(), device)


def _strip_vision_prefix(name: str) -> str:
    prefix = next(p for p in VISION_PREFIXES if name.startswith(p))
    return name.removeprefix(prefix)


def _open(checkpoint: CheckpointSource) -> HubCheckpoint:
    return checkpoint if isinstance(checkpoint, HubCheckpoint) else HubCheckpoint(checkpoint)


def _sub_config(ckpt: HubCheckpoint, key: str) -> dict:
    config = MiMoV2Config.from_pretrained(ckpt.path)
    sub = getattr(config, key)
    if sub is None:
        raise CheckpointError(f"{ckpt.path}/config.json has no {key!r}")
    return sub


def build_module(build: Callable[[], nn.Module], dtype: torch.dtype, device: torch.device | str = "meta") -> nn.Module:
    """Run `build()` with `device` and `dtype` as defaults (tensors a module pins to a dtype keep it).

    The default dtype is process-wide: build modules from one thread at a time.
    """
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(default_dtype)


def _load(
    model: nn.Module, ckpt: HubCheckpoint, hub_names: list[str], device: torch.device | str, **read_kwargs
) -> nn.Module:
    state = read_state_dict(ckpt, hub_names, model.state_dict(), device=device, **read_kwargs)
    model.load_state_dict(state, strict=True, assign=True)
    _check_no_meta(model)
    return model.eval()


def _check_no_meta(model: nn.Module) -> None:
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(f"{type(model).__name__}: tensors left uninitialised after loading: {on_meta}")
