"""Hub checkpoint directories: strict, lazy, role-routed reading and atomic sharded writing.

A checkpoint is `model.safetensors.index.json` + shards, or a single `model.safetensors`. Tensors are read
one at a time through `safe_open` (mmap), and only those of the requested roles (ref §2.3). `read_state_dict`
turns hub tensors into the canonical floating tensors a module holds: FP8 weights are dequantized and a fused
`qkv_proj` is split into q/k/v (docs/ARCHITECTURE.md, "Checkpoint format = module parameter names").
Every inconsistency raises `CheckpointError` naming the tensor and the expected and found values.
"""

import enum
import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mimo.weights.fp8 import dequantize_blockwise, scale_grid_shape
from mimo.weights.fused_qkv import (
    QKVGeometry,
    dequantize_interleaved,
    fused_rows,
    fused_scale_grid_shape,
    split_interleaved,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # `x.weight` -> `x.weight_scale_inv`
FUSED_QKV_SUFFIX = "self_attn.qkv_proj.weight"
SPLIT_QKV_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
# Derived tables some exporters save; never loaded, explicitly tolerated (sglang skips the same names).
TOLERATED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class CheckpointError(ValueError):
    """A checkpoint that does not match its index, its config or the module it is loaded into."""


class Role(enum.Enum):
    LANGUAGE = "language"  # model.*, lm_head.*
    MTP = "mtp"  # model.mtp.*
    VISION = "vision"  # visual.*, vision_model.*
    AUDIO = "audio"  # audio_* or *speech_embeddings*


VISION_PREFIX = "visual."  # what we write; sglang also accepts vision_model.
VISION_PREFIXES = (VISION_PREFIX, "vision_model.")
AUDIO_PREFIX = "audio_"
AUDIO_MODULE_PREFIX = "audio_encoder."  # stripped for MiMoAudioEncoder names; bare speech_embeddings.* stay as is
AUDIO_SUBSTRING = "speech_embeddings"
MTP_PREFIX = "model.mtp."
LANGUAGE_PREFIXES = ("model.", "lm_head.")


def tensor_role(name: str) -> Role:
    """The component a hub tensor belongs to (sglang's routing prefixes, ref §2.3)."""
    if name.startswith(VISION_PREFIXES):
        return Role.VISION
    if name.startswith(AUDIO_PREFIX) or AUDIO_SUBSTRING in name:
        return Role.AUDIO
    if name.startswith(MTP_PREFIX):
        return Role.MTP
    if name.startswith(LANGUAGE_PREFIXES):
        return Role.LANGUAGE
    raise CheckpointError(
        f"tensor {name!r} belongs to no role: expected a prefix in {LANGUAGE_PREFIXES + VISION_PREFIXES} "
        f"or an audio name ({AUDIO_PREFIX!r}... / ...{AUDIO_SUBSTRING}...)"
    )


class HubCheckpoint:
    """The tensors of one checkpoint directory, opened lazily; `accessed` records every tensor whose data was read."""

    def __init__(self, path: str | Path, *, file: str | None = None):
        """`path`: a checkpoint directory; `file`: read only this safetensors file of it (e.g. `rank0.safetensors`)."""
        self.path = Path(path)
        self.accessed: set[str] = set()
        self._handles: dict[Path, object] = {}
        index_path, single_path = self.path / INDEX_FILE, self.path / (file or SINGLE_FILE)
        if file is None and index_path.is_file():
            self._shard_of = self._read_index(index_path)
        elif single_path.is_file():
            self._shard_of = dict.fromkeys(self._open(single_path).keys(), single_path)
        elif file is not None:
            raise CheckpointError(f"{single_path} does not exist")
        else:
            raise CheckpointError(f"{self.path} has neither {INDEX_FILE} nor {SINGLE_FILE}")

    def _read_index(self, index_path: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' object ({e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
        shard_of = {name: self.path / file for name, file in weight_map.items()}
        for name, shard in shard_of.items():
            if not shard.is_file():
                raise CheckpointError(f"{index_path} maps {name!r} to shard {shard.name}, which does not exist")
        listed_in: dict[Path, set[str]] = defaultdict(set)
        for name, shard in shard_of.items():
            listed_in[shard].add(name)
        for shard, listed in sorted(listed_in.items()):
            stored = set(self._open(shard).keys())
            if listed != stored:
                raise CheckpointError(
                    f"shard {shard.name} does not match {INDEX_FILE}: listed but not stored "
                    f"{sorted(listed - stored)}, stored but not listed {sorted(stored - listed)}"
                )
        return shard_of

    def _open(self, shard: Path):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(shard, framework="pt")
            except SafetensorError as e:  # e.g. truncated: "incomplete metadata, file not fully covered"
                raise CheckpointError(f"shard {shard.name} is not a readable safetensors file: {e}") from e
        return self._handles[shard]

    def names(self, *roles: Role) -> list[str]:
        """All tensor names, or those of the given roles, in sorted order."""
        names = sorted(self._shard_of)
        return names if not roles else [n for n in names if tensor_role(n) in roles]

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def shard_of(self, name: str) -> Path:
        """The file that holds tensor `name`."""
        if name not in self._shard_of:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.path}")
        return self._shard_of[name]

    def release(self, shard: Path) -> None:
        """Unmap `shard` (a later read maps it again): a streaming reader keeps only its current shards resident."""
        self._handles.pop(shard, None)

    def _slice(self, name: str):
        if name not in self._shard_of:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.path}")
        return self._open(self._shard_of[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype of a tensor, from its header: "BF16", "F32", "F8_E4M3", ..."""
        return self._slice(name).get_dtype()

    def is_fp8(self, name: str) -> bool:
        return self._slice(name).get_dtype() == "F8_E4M3"

    def tensor(self, name: str) -> torch.Tensor:
        self._slice(name)  # raises for unknown names
        self.accessed.add(name)
        return self._open(self._shard_of[name]).get_tensor(name)


@dataclass(frozen=True, slots=True)
class FusedQKVLayout:
    """How a language checkpoint stores attention projections: `ckpt_tp` None = split q/k/v, else fused.

    `geometry_of(hub_name)` gives the geometry of the layer a `qkv_proj` tensor belongs to.
    """

    ckpt_tp: int | None
    geometry_of: Callable[[str], QKVGeometry]


@dataclass(frozen=True, slots=True)
class PlannedRead:
    """Hub tensors (weight, optional scale) that produce one or three canonical tensors of known shapes."""

    hub_name: str
    scale_name: str | None
    outputs: dict[str, tuple[int, ...]]
    geometry: QKVGeometry | None = None  # set for a fused qkv_proj


def read_state_dict(
    ckpt: HubCheckpoint,
    hub_names: Iterable[str],
    expected: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str,
    to_module_name: Callable[[str], str] = lambda name: name,
    qkv_layout: FusedQKVLayout | None = None,
) -> dict[str, torch.Tensor]:
    """Read `hub_names` into exactly the state `expected` (a module's state_dict, e.g. on the meta device).

    Every name, shape and scale grid is validated from the safetensors headers before any data is read.
    Tensors come back on `device` in the dtype of their `expected` counterpart.

    Args:
        hub_names: the checkpoint tensors to consume (one role); `weight_scale_inv` tensors included.
        to_module_name: hub name -> module state_dict name (e.g. strips `visual.`).
        qkv_layout: for language/MTP roles; None means no attention projection handling at all (encoders).
    """
    state = {}
    for entry in plan_state_dict(ckpt, hub_names, expected, to_module_name=to_module_name, qkv_layout=qkv_layout):
        for name, tensor in _read_entry(ckpt, entry, qkv_layout, device):
            state[name] = tensor.to(dtype=expected[name].dtype)
    return state


def plan_state_dict(
    ckpt: HubCheckpoint,
    hub_names: Iterable[str],
    expected: Mapping[str, torch.Tensor],
    *,
    to_module_name: Callable[[str], str] = lambda name: name,
    qkv_layout: FusedQKVLayout | None = None,
) -> list[PlannedRead]:
    """`read_state_dict`'s validation alone: which hub tensors produce which module tensors, from headers only.

    Raises CheckpointError for any name, shape, scale grid or fused-layout mismatch with `expected`.
    """
    entries = _plan(ckpt, list(hub_names), to_module_name, qkv_layout)
    produced: dict[str, tuple[int, ...]] = {}
    for entry in entries:
        for name, shape in entry.outputs.items():
            if name in produced:
                raise CheckpointError(f"two checkpoint tensors map to {name!r} (the second is {entry.hub_name!r})")
            produced[name] = shape
    missing = sorted(set(expected) - set(produced))
    unexpected = sorted(set(produced) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not match the module: missing tensors {missing}, unexpected tensors "
            f"{unexpected}"
        )
    for name, shape in produced.items():
        if shape != tuple(expected[name].shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {shape} in {ckpt.path}, the module expects {tuple(expected[name].shape)}"
            )
    return entries


def _plan(
    ckpt: HubCheckpoint, hub_names: list[str], to_module_name: Callable[[str], str], qkv_layout: FusedQKVLayout | None
) -> list[PlannedRead]:
    names = {n for n in hub_names if not n.endswith(TOLERATED_SUFFIXES)}
    scales = {n for n in names if n.endswith(SCALE_SUFFIX)}
    for scale in sorted(scales):
        weight = scale.removesuffix(SCALE_SUFFIX)
        if weight not in names:
            raise CheckpointError(f"{scale} has no weight {weight!r}")
        if not ckpt.is_fp8(weight):
            raise CheckpointError(f"{scale} belongs to {weight!r}, which is not FP8 (float8_e4m3fn)")
    entries = []
    for name in sorted(names - scales):
        scale_name = name + SCALE_SUFFIX if name + SCALE_SUFFIX in scales else None
        if ckpt.is_fp8(name) and scale_name is None:
            raise CheckpointError(f"FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")
        shape = ckpt.shape(name)
        if qkv_layout is not None and name.endswith(FUSED_QKV_SUFFIX):
            entries.append(_plan_fused_qkv(ckpt, name, scale_name, shape, to_module_name, qkv_layout))
            continue
        if qkv_layout is not None and qkv_layout.ckpt_tp is not None and name.endswith(SPLIT_QKV_SUFFIXES):
            raise CheckpointError(
                f"{name!r} is a split projection, but the config declares attention_projection_layout='fused_qkv' "
                f"(expected {name.rsplit('.', 2)[0]}.qkv_proj.weight)"
            )
        if scale_name is not None:
            if len(shape) != 2:
                raise CheckpointError(f"FP8 tensor {name!r} has shape {shape}; block-quantized weights are 2-D")
            found = ckpt.shape(scale_name)
            if found != scale_grid_shape(*shape):
                raise CheckpointError(
                    f"{scale_name} has shape {found}, expected {scale_grid_shape(*shape)} (128x128 blocks of {shape})"
                )
        entries.append(PlannedRead(name, scale_name, {to_module_name(name): shape}))
    return entries


def _plan_fused_qkv(
    ckpt: HubCheckpoint,
    name: str,
    scale_name: str | None,
    shape: tuple[int, ...],
    to_module_name: Callable[[str], str],
    layout: FusedQKVLayout,
) -> PlannedRead:
    if layout.ckpt_tp is None:
        raise CheckpointError(
            f"{name!r} is a fused qkv_proj, but the config has no attention_projection_layout='fused_qkv'"
        )
    try:
        geometry = layout.geometry_of(name)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    rows = fused_rows(geometry, layout.ckpt_tp)
    if len(shape) != 2 or shape[0] != rows:
        raise CheckpointError(
            f"{name} has shape {shape}, expected ({rows}, hidden): {layout.ckpt_tp} interleaved shards of "
            f"{geometry.rows_per_rank(layout.ckpt_tp)} (q, k, v) rows for {geometry}"
        )
    if scale_name is not None:
        found = ckpt.shape(scale_name)
        expected = fused_scale_grid_shape(geometry, layout.ckpt_tp, shape[1])
        if found != expected:
            raise CheckpointError(
                f"{scale_name} has shape {found}, expected {expected}: one 128x128 grid per each of the "
                f"{layout.ckpt_tp} interleaved shards"
            )
    prefix = name.removesuffix("qkv_proj.weight")
    outputs = {
        to_module_name(f"{prefix}{p}_proj.weight"): (r, shape[1]) for p, r in zip("qkv", geometry.canonical_rows())
    }
    return PlannedRead(name, scale_name, outputs, geometry)


def _read_entry(
    ckpt: HubCheckpoint, entry: PlannedRead, layout: FusedQKVLayout | None, device: torch.device | str
) -> Iterator[tuple[str, torch.Tensor]]:
    weight = ckpt.tensor(entry.hub_name).to(device)
    if entry.geometry is not None:
        if entry.scale_name is not None:
            scale = ckpt.tensor(entry.scale_name).to(device)
            weight = dequantize_interleaved(weight, scale, entry.geometry, layout.ckpt_tp, torch.float32)
        yield from zip(entry.outputs, split_interleaved(weight, entry.geometry, layout.ckpt_tp, name=entry.hub_name))
        return
    if entry.scale_name is not None:
        weight = dequantize_blockwise(weight, ckpt.tensor(entry.scale_name).to(device), torch.float32)
    (name,) = entry.outputs
    yield name, weight


@contextmanager
def atomic_directory(
    target: str | Path, *, marker_files: tuple[str, ...] = ("config.json", INDEX_FILE, SINGLE_FILE)
) -> Iterator[Path]:
    """Yield an empty temp directory next to `target`; on success it replaces `target` in one rename.

    An existing `target` is replaced only if it is empty or holds one of `marker_files` (by default: a
    checkpoint directory, with config.json or weights).
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        if not any((target / f).is_file() for f in marker_files):
            raise FileExistsError(
                f"{target} exists and is not a checkpoint directory (has none of {marker_files}); "
                "refusing to replace it"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        _make_world_readable(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _make_world_readable(root: Path) -> None:
    # mkdtemp creates 0700 and safetensors writes 0600; a server may run as another user.
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def write_shards(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
    *,
    metadata: Mapping[str, str] | None = None,
) -> dict:
    """Write `model-0000i-of-0000n.safetensors` shards (in `tensors` order) + `model.safetensors.index.json`.

    `tensors` may be a lazy stream of (name, tensor): each shard is written as soon as it is full, so memory
    stays at one shard however large the checkpoint. A shard is closed before it would exceed
    `max_shard_bytes`; a larger tensor gets a shard of its own. `metadata` goes into every shard header and
    the index's "metadata". Returns the index.
    """
    out_dir = Path(out_dir)
    header = {"format": "pt", **(metadata or {})}
    written: list[tuple[Path, list[str]]] = []  # numbered once the shard count is known
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0

    def flush() -> None:
        path = out_dir / f".shard-{len(written) + 1:05d}.safetensors"
        save_file(shard, path, metadata=header)
        written.append((path, list(shard)))
        shard.clear()

    seen: set[str] = set()
    for name, tensor in tensors.items() if isinstance(tensors, Mapping) else tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} is given twice")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
            shard_bytes = 0
        # safetensors refuses views that share storage; copy only those.
        if tensor.untyped_storage().nbytes() != nbytes or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        shard[name] = tensor.cpu()
        shard_bytes += nbytes
        total_bytes += nbytes
    if shard or not written:
        flush()
    weight_map = {}
    for i, (path, names) in enumerate(written, start=1):
        file = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(path, out_dir / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total_bytes, **(metadata or {})}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_sharded(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
    *,
    metadata: Mapping[str, str] | None = None,
) -> dict:
    """`write_shards` into a fresh `out_dir`, atomically (temp directory next to it, then rename)."""
    with atomic_directory(out_dir) as tmp:
        index = write_shards(tmp, tensors, max_shard_bytes, metadata=metadata)
    return index
