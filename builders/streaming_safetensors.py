"""A safetensors writer that takes one tensor at a time, so a file larger than memory can be written.

The header (names, dtypes, shapes, offsets) is fixed up front from planned shapes; tensors are then appended
in that order. The result is an ordinary safetensors file (`safe_open` reads it).
"""

import json
import struct
from pathlib import Path

import torch

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
