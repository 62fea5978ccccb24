"""Hub checkpoint directories: strict, lazy, role-routed reading, and the atomic directory writes go through.

A checkpoint is `model.safetensors.index.json` + shards, or a single `model.safetensors`. Tensors are read
one at a time through `safe_open` (mmap), and only those of the requested roles (ref §2.3). `read_state_dict`
loads modules whose parameters are the hub tensors one to one (the encoders); the language model's layers own
the form of their weights (`mimo.loading`). Writing: `mimo.weights.safetensors_writer`.
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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mimo.weights.fp8 import dequantize_blockwise, scale_grid_shape

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


def tensors_and_scales(names: Iterable[str], is_fp8: Callable[[str], bool]) -> tuple[set[str], set[str]]:
    """(all tensors, the `weight_scale_inv` grids among them) of `names`, tolerated extras dropped.

    Raises CheckpointError for a scale grid whose weight is missing or not FP8.
    """
    names = {n for n in names if not n.endswith(TOLERATED_SUFFIXES)}
    scales = {n for n in names if n.endswith(SCALE_SUFFIX)}
    for scale in sorted(scales):
        weight = scale.removesuffix(SCALE_SUFFIX)
        if weight not in names:
            raise CheckpointError(f"{scale} has no weight {weight!r}")
        if not is_fp8(weight):
            raise CheckpointError(f"{scale} belongs to {weight!r}, which is not FP8 (float8_e4m3fn)")
    return names, scales


def read_state_dict(
    ckpt: HubCheckpoint,
    hub_names: Iterable[str],
    expected: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str,
    to_module_name: Callable[[str], str] = lambda name: name,
) -> dict[str, torch.Tensor]:
    """Read `hub_names` into exactly the state `expected` (a module's state_dict, e.g. on the meta device).

    For modules whose parameters are the hub tensors one to one (the encoders): every name, shape and scale grid is
    validated from the safetensors headers before any data is read; FP8 weights are dequantized. Tensors come back
    on `device` in the dtype of their `expected` counterpart. (The language model's layers own the form of their
    weights: `mimo.loading.language_model_reads`.)

    Args:
        hub_names: the checkpoint tensors to consume (one role); `weight_scale_inv` tensors included.
        to_module_name: hub name -> module state_dict name (e.g. strips `visual.`).
    """
    names, scales = tensors_and_scales(hub_names, ckpt.is_fp8)
    module_names = {to_module_name(n): n for n in sorted(names - scales)}
    missing = sorted(set(expected) - set(module_names))
    unexpected = sorted(set(module_names) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not match the module: missing tensors {missing}, unexpected tensors "
            f"{unexpected}"
        )
    for module_name, name in module_names.items():
        shape = ckpt.shape(name)
        if shape != tuple(expected[module_name].shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {shape} in {ckpt.path}, the module expects "
                f"{tuple(expected[module_name].shape)}"
            )
        if ckpt.is_fp8(name):
            if name + SCALE_SUFFIX not in scales:
                raise CheckpointError(f"FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")
            if len(shape) != 2 or ckpt.shape(name + SCALE_SUFFIX) != scale_grid_shape(*shape):
                raise CheckpointError(
                    f"{name}{SCALE_SUFFIX} has shape {ckpt.shape(name + SCALE_SUFFIX)}, expected 128x128 blocks of "
                    f"the 2-D weight {shape}"
                )
    state = {}
    for module_name, name in module_names.items():
        tensor = ckpt.tensor(name).to(device)
        if ckpt.is_fp8(name):
            tensor = dequantize_blockwise(tensor, ckpt.tensor(name + SCALE_SUFFIX).to(device), torch.float32)
        state[module_name] = tensor.to(dtype=expected[module_name].dtype)
    return state


class TensorCheckpoint:
    """Hub-named tensors held in memory, read like a `HubCheckpoint` (random weights for benchmarks)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.path = Path("<memory>")
        self.accessed: set[str] = set()
        self._tensors = dict(tensors)

    def names(self, *roles: Role) -> list[str]:
        names = sorted(self._tensors)
        return names if not roles else [n for n in names if tensor_role(n) in roles]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def is_fp8(self, name: str) -> bool:
        return self._tensors[name].dtype == torch.float8_e4m3fn

    def tensor(self, name: str) -> torch.Tensor:
        self.accessed.add(name)
        return self._tensors[name]


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
