"""handoff shm: the encoder writes an item's rows itself into the caller's landing slice, through a mapping of the
landing region it opens once per region and keeps (at most `max_regions`, the least recently used closed first).

The request names the slice with plain typed tensors (`SliceTarget`; never pickle): the region's name (system
shared memory: its POSIX key, which the encoder opens; CUDA: the region's unique name, the mapping cache's key),
for a CUDA region its cudaIpcMemHandle (64 bytes) and device, the region's byte size, the slice's offset, and the
slice's byte size (`output_byte_size`, which media_preprocessing checks against the planned rows before decoding).
Everything is checked before anything is encoded (`SliceTarget.from_inputs`, `SliceWriter.open`: the slice within
the region, the region's real size from fstat or cuMemGetAddressRange); the rows must be exactly the slice's bytes.
A CUDA write is one cudaMemcpyAsync on the current torch stream, synchronized before the encoder answers: the
response is the completion signal. Why not Triton's own output into a registered region: the Python backend opens
the response buffer's IPC mapping per response (392 us for a 16.7 MB table on an H200, 17x the copy).
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mimo.processing.errors import ProcessingError

OUTPUT_BYTE_SIZE = "output_byte_size"  # INT64 [1]: the landing slice's byte size (mimo.epd.item_encoding checks it)
LANDING_REGION = "landing_region"  # BYTES [1]: system shm: its key ("/<name>"); cuda: its name
LANDING_CUDA_HANDLE = "landing_cuda_handle"  # UINT8 [64]: cuda only: the region's cudaIpcMemHandle
LANDING_CUDA_DEVICE = "landing_cuda_device"  # INT64 [1]: cuda only: the GPU the region is on
LANDING_REGION_BYTE_SIZE = "landing_region_byte_size"  # INT64 [1]
LANDING_OFFSET = "landing_offset"  # INT64 [1]: the slice's first byte in the region
LANDING_INPUTS = (LANDING_REGION, LANDING_CUDA_HANDLE, LANDING_CUDA_DEVICE, LANDING_REGION_BYTE_SIZE, LANDING_OFFSET)
IPC_HANDLE_BYTES = 64  # CUDA_IPC_HANDLE_SIZE
DEFAULT_MAX_REGIONS = 8
SHM_DIR = Path("/dev/shm")  # where Linux's shm_open keeps "/<name>"


class SliceRefused(ProcessingError):
    """The request's landing slice is malformed, outside its region, of the wrong size, or cannot be mapped."""


def _int(inputs: Mapping[str, np.ndarray], name: str) -> int:
    array = inputs[name]
    if array.dtype != np.int64 or array.size != 1:
        raise SliceRefused(f"{name} must be one INT64 value")
    return int(array.reshape(-1)[0])


@dataclass(frozen=True, slots=True)
class SliceTarget:
    region: str
    region_byte_size: int
    offset: int
    byte_size: int
    cuda_handle: bytes | None = None  # None: system shared memory
    cuda_device: int = -1

    @property
    def kind(self) -> str:
        return "system" if self.cuda_handle is None else "cuda"

    @classmethod
    def of(cls, region, offset: int, byte_size: int) -> SliceTarget:
        """A slice of a landing region (mimo.epd.landing: SystemShmRegion or CudaRegion)."""
        if region.kind == "system":
            return cls(region.key, region.byte_size, offset, byte_size)
        return cls(region.name, region.byte_size, offset, byte_size, region.ipc_handle, region.device_id)

    def arrays(self) -> dict[str, np.ndarray]:
        """The request's tensors (with their batch dimension of 1), output_byte_size included."""
        arrays = {LANDING_REGION: np.array([[self.region.encode()]], dtype=np.object_),
                  LANDING_REGION_BYTE_SIZE: np.array([[self.region_byte_size]], dtype=np.int64),
                  LANDING_OFFSET: np.array([[self.offset]], dtype=np.int64),
                  OUTPUT_BYTE_SIZE: np.array([[self.byte_size]], dtype=np.int64)}  # fmt: skip
        if self.cuda_handle is not None:
            arrays[LANDING_CUDA_HANDLE] = np.frombuffer(self.cuda_handle, dtype=np.uint8)[np.newaxis]
            arrays[LANDING_CUDA_DEVICE] = np.array([[self.cuda_device]], dtype=np.int64)
        return arrays

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, np.ndarray]) -> SliceTarget | None:
        """The slice a request names (None: it names none, the rows go in the response); SliceRefused names the
        field that is missing, malformed or inconsistent."""
        given = [name for name in LANDING_INPUTS if name in inputs]
        if not given:
            return None
        cuda = LANDING_CUDA_HANDLE in inputs or LANDING_CUDA_DEVICE in inputs
        needed = [LANDING_REGION, LANDING_REGION_BYTE_SIZE, LANDING_OFFSET, OUTPUT_BYTE_SIZE]
        needed += [LANDING_CUDA_HANDLE, LANDING_CUDA_DEVICE] if cuda else []
        missing = [name for name in needed if name not in inputs]
        if missing:
            raise SliceRefused(f"a landing slice needs {', '.join(missing)} (given: {', '.join(given)})")
        name = inputs[LANDING_REGION].reshape(-1)
        if name.size != 1 or not isinstance(name[0], bytes) or not name[0]:
            raise SliceRefused(f"{LANDING_REGION} must hold one name")
        region = name[0].decode(errors="replace")
        region_byte_size, offset = _int(inputs, LANDING_REGION_BYTE_SIZE), _int(inputs, LANDING_OFFSET)
        byte_size = _int(inputs, OUTPUT_BYTE_SIZE)
        if region_byte_size <= 0:
            raise SliceRefused(f"{LANDING_REGION_BYTE_SIZE} is {region_byte_size}, not a region's size")
        if byte_size <= 0:
            raise SliceRefused(f"{OUTPUT_BYTE_SIZE} is {byte_size}, not a slice's size")
        if offset < 0 or offset + byte_size > region_byte_size:
            raise SliceRefused(f"{LANDING_OFFSET} {offset} + {OUTPUT_BYTE_SIZE} {byte_size} is outside the "
                               f"{region_byte_size}-byte region ({LANDING_REGION_BYTE_SIZE})")  # fmt: skip
        if not cuda:
            if not region.startswith("/") or "/" in region[1:] or region in ("/", "/.", "/..") or len(region) > 255:
                raise SliceRefused(f"{LANDING_REGION} {region!r} is not a POSIX shared-memory key (/<name>)")
            return cls(region, region_byte_size, offset, byte_size)
        handle = inputs[LANDING_CUDA_HANDLE]
        if handle.dtype != np.uint8 or handle.size != IPC_HANDLE_BYTES:
            raise SliceRefused(f"{LANDING_CUDA_HANDLE} must be {IPC_HANDLE_BYTES} UINT8 values (a cudaIpcMemHandle)")
        device = _int(inputs, LANDING_CUDA_DEVICE)
        if device < 0:
            raise SliceRefused(f"{LANDING_CUDA_DEVICE} is {device}, not a GPU")
        return cls(region, region_byte_size, offset, byte_size, handle.tobytes(), device)


class _ShmMapping:
    """A system shared-memory region, opened by its key and mapped whole."""

    def __init__(self, target: SliceTarget, shm_dir: Path):
        try:
            fd = os.open(Path(shm_dir) / target.region[1:], os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise SliceRefused(f"{LANDING_REGION} {target.region!r}: no such shared-memory region") from None
        except OSError as error:
            raise SliceRefused(f"{LANDING_REGION} {target.region!r} cannot be opened: {error.strerror}") from None
        try:
            self.byte_size = os.fstat(fd).st_size
            if self.byte_size < target.region_byte_size:
                raise SliceRefused(f"{LANDING_REGION_BYTE_SIZE} is {target.region_byte_size}, but region "
                                   f"{target.region!r} is {self.byte_size} bytes")  # fmt: skip
            self._mapping = mmap.mmap(fd, self.byte_size)
        finally:
            os.close(fd)

    def write(self, rows: torch.Tensor, offset: int) -> float:
        start = time.perf_counter()
        view = torch.frombuffer(self._mapping, dtype=torch.uint8, count=rows.numel() * rows.element_size(),
                                offset=offset)  # fmt: skip
        view.copy_(rows.reshape(-1).view(torch.uint8))
        del view  # before close(): an exported buffer cannot be unmapped
        return time.perf_counter() - start

    def close(self) -> None:
        self._mapping.close()


def _cuda_call(result, what: str):
    """The value of a cuda.bindings call `(error, *values)`; SliceRefused naming `what` on an error."""
    error, *values = result
    if int(error) != 0:
        raise SliceRefused(f"{what} failed: {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else values


class _CudaMapping:
    """Another process's cudaMalloc'd region, opened from its IPC handle (cuda.bindings, as tritonclient does)."""

    def __init__(self, target: SliceTarget):
        from cuda.bindings import driver, runtime

        self._runtime = runtime
        if not torch.cuda.is_available() or target.cuda_device >= torch.cuda.device_count():
            raise SliceRefused(f"{LANDING_CUDA_DEVICE} is {target.cuda_device}, but this encoder sees "
                               f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s)")  # fmt: skip
        self.device = torch.device("cuda", target.cuda_device)
        handle = runtime.cudaIpcMemHandle_t()
        ctypes.memmove(handle.getPtr(), target.cuda_handle, IPC_HANDLE_BYTES)
        with torch.cuda.device(self.device):
            _cuda_call(runtime.cudaSetDevice(target.cuda_device), f"cudaSetDevice({target.cuda_device})")
            pointer = _cuda_call(runtime.cudaIpcOpenMemHandle(handle, runtime.cudaIpcMemLazyEnablePeerAccess),
                                 f"opening {LANDING_CUDA_HANDLE} of region {target.region!r}")  # fmt: skip
            self.pointer = int(pointer)
            try:
                base, size = _cuda_call(driver.cuMemGetAddressRange(driver.CUdeviceptr(self.pointer)),
                                        f"cuMemGetAddressRange of region {target.region!r}")  # fmt: skip
                self.byte_size = int(size)
                if int(base) != self.pointer or self.byte_size < target.region_byte_size:
                    raise SliceRefused(f"{LANDING_REGION_BYTE_SIZE} is {target.region_byte_size}, but the allocation "
                                       f"{LANDING_CUDA_HANDLE} names is {self.byte_size} bytes")  # fmt: skip
            except SliceRefused:
                self.close()
                raise

    def write(self, rows: torch.Tensor, offset: int) -> float:
        if not rows.is_cuda:
            rows = rows.to(self.device)
        rows = rows.contiguous()
        stream = torch.cuda.current_stream(rows.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(rows.device):
            _cuda_call(self._runtime.cudaSetDevice(rows.device.index), f"cudaSetDevice({rows.device.index})")
            start.record(stream)
            _cuda_call(self._runtime.cudaMemcpyAsync(self.pointer + offset, rows.data_ptr(),
                                                     rows.numel() * rows.element_size(),
                                                     self._runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                                     stream.cuda_stream), "cudaMemcpyAsync into the landing slice")
            end.record(stream)
        end.synchronize()  # the response is the completion signal
        return start.elapsed_time(end) / 1000

    def close(self) -> None:
        if self.pointer:
            with torch.cuda.device(self.device):
                self._runtime.cudaIpcCloseMemHandle(self.pointer)
            self.pointer = 0


class SliceWriter:
    """The encoder's side: writes rows into named slices, each region mapped once and kept (bounded LRU); safe from
    several threads. `opens` counts the mappings opened."""

    def __init__(self, max_regions: int = DEFAULT_MAX_REGIONS, shm_dir: Path = SHM_DIR):
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        self.max_regions, self.shm_dir = max_regions, shm_dir
        self._mapped: collections.OrderedDict[tuple[str, str], _ShmMapping | _CudaMapping] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.opens = 0

    def mapped(self) -> list[str]:
        with self._lock:
            return [name for _, name in self._mapped]

    def open(self, target: SliceTarget) -> bool:
        """Maps the target's region unless it is mapped already (True: opened now); SliceRefused when it cannot be
        opened or is smaller than the request says. Called before encoding, so a bad region costs no encoder work."""
        with self._lock:
            return self._mapping(target)[1]

    def write(self, rows: torch.Tensor, target: SliceTarget) -> float:
        """`rows` into the slice, complete when this returns; the seconds the copy took. SliceRefused when the rows
        are not exactly the slice's bytes (nothing written)."""
        rows = rows.contiguous()
        found = rows.numel() * rows.element_size()
        if found != target.byte_size:
            raise SliceRefused(f"the item's rows {list(rows.shape)} are {found} bytes, {OUTPUT_BYTE_SIZE} is "
                               f"{target.byte_size}: nothing written")  # fmt: skip
        with self._lock:  # held through the copy: eviction never unmaps a region being written
            return self._mapping(target)[0].write(rows, target.offset)

    def _mapping(self, target: SliceTarget) -> tuple[_ShmMapping | _CudaMapping, bool]:
        """Under the lock: the region's mapping, and whether it was opened now."""
        key = (target.kind, target.region)
        mapping, fresh = self._mapped.get(key), False
        if mapping is None:
            mapping = _ShmMapping(target, self.shm_dir) if target.cuda_handle is None else _CudaMapping(target)
            self._mapped[key], fresh = mapping, True
            self.opens += 1
            while len(self._mapped) > self.max_regions:
                self._mapped.popitem(last=False)[1].close()
        self._mapped.move_to_end(key)
        if mapping.byte_size < target.region_byte_size:  # the same name asked again with a larger size
            raise SliceRefused(f"{LANDING_REGION_BYTE_SIZE} is {target.region_byte_size}, but region "
                               f"{target.region!r} is {mapping.byte_size} bytes")  # fmt: skip
        return mapping, fresh

    def close(self) -> None:
        with self._lock:
            for mapping in self._mapped.values():
                mapping.close()
            self._mapped.clear()
