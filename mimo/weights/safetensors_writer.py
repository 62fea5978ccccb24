"""The one safetensors writer: one tensor at a time, so a file larger than memory can be written.

The header (names, dtypes, shapes, offsets) is fixed up front from planned shapes; tensors are then appended
in that order. The result is an ordinary safetensors file (`safe_open` reads it). `write_shards` streams a whole
checkpoint (`model-0000i-of-0000n.safetensors` + index) through it.
"""

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from mimo.weights.checkpoint import INDEX_FILE, atomic_directory

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class StreamingSafetensorsWriter:
    """`write(name, tensor)` in the order of `planned`, then `finish()`; a context manager closes the file."""

    def __init__(
        self,
        path: str | Path,
        planned: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self._planned = planned
        self._next = 0
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, dtype, shape in planned:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._planned):
            raise ValueError(f"{self.path.name}: {name!r} was not planned (all planned tensors are written)")
        planned_name, dtype, shape = self._planned[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (planned_name, dtype, shape):
            raise ValueError(
                f"{self.path.name}: got {name!r} {tensor.dtype} {tuple(tensor.shape)}, planned next "
                f"{planned_name!r} {dtype} {shape}"
            )
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def finish(self) -> None:
        """Close the file; raises unless every planned tensor was written."""
        self._file.close()
        if self._next != len(self._planned):
            missing = [name for name, _, _ in self._planned[self._next :]]
            raise ValueError(f"{self.path.name}: {len(missing)} planned tensors were never written, e.g. {missing[:3]}")

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.close()


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
    written: list[tuple[Path, list[str]]] = []  # numbered once the shard count is known
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0

    def flush() -> None:
        path = out_dir / f".shard-{len(written) + 1:05d}.safetensors"
        planned = [(name, t.dtype, tuple(t.shape)) for name, t in shard.items()]
        with StreamingSafetensorsWriter(path, planned, dict(metadata or {})) as writer:
            for name, tensor in shard.items():
                writer.write(name, tensor)
            writer.finish()
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
        shard[name] = tensor.detach().cpu()
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
