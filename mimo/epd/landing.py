"""The landing pool: one fixed region of the language server's memory that encoder servers write item rows into.

The region is created once (system shared memory on CPU: `SystemShmRegion`; on a GPU, a CUDA region of the LM's
device implements the same `Region` protocol: tritonclient.utils.cuda_shared_memory's region, exported by its
cudaIpcMemHandle, views through DLPack). It is registered as Triton shared memory with the language server only,
so that mimo_llm's table input names a slice of it (`Lease.output_region`: name, byte size, offset).

Each encode request names a slice of it (handoff shm: `mimo.epd.direct_write.SliceTarget`, the region's key or IPC
handle; nixl: a NIXL descriptor); the encoder writes the item's rows there itself, and the language side reads them
in place (`Lease.view`).

Slices are reserved by byte size (rounded up to `alignment`), first fit, and granted in arrival order: a request that
does not fit waits, at most until its deadline, then gets `LandingTimeout` (a full pool never fails a request that
fits in time and never hands out overlapping slices). A slice goes back when its lease is released (its `with`
block ends: completion, error, cancellation, timeout). A slice that was named in a request whose response never
came (`Lease.remote_write` left by an exception, e.g. a client-side timeout) may still be written by that encoder
server, so it is quarantined for `quarantine_s` before anyone else gets it. `close()` wakes every waiter with
`LandingClosed` and removes the region.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import contextlib
import mmap
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

ALIGNMENT = 256  # bytes: the start of every slice (CUDA's allocation alignment; any row dtype)
DEFAULT_QUARANTINE_S = 30.0


class LandingError(RuntimeError):
    """A slice could not be had."""


class LandingTimeout(LandingError):
    """No room for the slice before the request's deadline."""


class LandingClosed(LandingError):
    """The pool was closed (the server is shutting down)."""


class Region(Protocol):
    """A fixed region other processes can map (encoder servers write rows into it, Triton reads inputs from it)."""

    name: str  # unique; what the region is registered as with a Triton server (request tensors name it)
    byte_size: int
    kind: str  # "system" or "cuda": Triton's shared-memory extension it is registered through

    def register(self, client):
        """Registers the region with one Triton server (a tritonclient client; its return value, awaitable for the
        asyncio client): the language server, for mimo_llm's input by reference."""

    def unregister(self, client): ...

    def view(self, offset: int, byte_size: int) -> torch.Tensor:
        """uint8 [byte_size] over the region's bytes [offset, offset + byte_size), no copy."""

    def synchronize(self) -> None:
        """Waits until what this process wrote into the region is visible to a server reading it."""

    def close(self) -> None:
        """Removes the region (idempotent)."""


class SystemShmRegion:
    """A POSIX shared-memory object (/dev/shm/<name>, Triton key "/<name>"): what Triton's system shared memory maps.

    Mapped here with mmap rather than through tritonclient.utils.shared_memory, whose destroy unmaps the region even
    while numpy views of it (its get_contents_as_numpy) are alive, so a later read of such a view segfaults (seen
    here). Views hold the mapping (torch.frombuffer keeps a reference to it); `close` removes the name at once and
    the mapping goes with its last view. `key_prefix`: the launcher gives a server's models its own prefix
    (`mimo.serving.lifecycle.shm_prefix`) and removes every region under it if the server dies.
    """

    kind = "system"

    def __init__(self, byte_size: int, key_prefix: str = "mimo_", shm_dir: Path = Path("/dev/shm")):
        if byte_size <= 0:
            raise ValueError(f"a landing region needs a positive size, got {byte_size} bytes")
        self.name = f"{key_prefix}landing_{uuid.uuid4().hex}"
        self.key = "/" + self.name  # shm_open's name
        self.byte_size = byte_size
        self.path = Path(shm_dir) / self.name
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, byte_size)
            self._mapping: mmap.mmap | None = mmap.mmap(fd, byte_size)
        except OSError:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def register(self, client):
        return client.register_system_shared_memory(self.name, self.key, self.byte_size)

    def unregister(self, client):
        return client.unregister_system_shared_memory(self.name)

    def view(self, offset: int, byte_size: int) -> torch.Tensor:
        if self._mapping is None:
            raise LandingClosed(f"landing region {self.name} is closed")
        return torch.frombuffer(self._mapping, dtype=torch.uint8, count=byte_size, offset=offset)

    def synchronize(self) -> None:
        """Host writes are visible to the server at once."""

    def close(self) -> None:
        if self._mapping is not None:
            self._mapping = None  # never mmap.close(): a view still alive would point at unmapped memory
            self.path.unlink(missing_ok=True)


class CudaRegion:
    """Device memory of one GPU (cudaMalloc, through tritonclient.utils.cuda_shared_memory, i.e. cuda-python),
    exported by its IPC handle (`ipc_handle`, the 64 bytes of its cudaIpcMemHandle): an encoder on the same host maps
    it and writes rows into it, and Triton (registered with it) reads inputs from it, device to device, never through
    host memory.

    Views are torch tensors on `device` over the allocation (`__cuda_array_interface__`), each holding this region,
    so the memory goes only with the region's last view (`close` drops the region's own reference).
    """

    kind = "cuda"

    def __init__(self, byte_size: int, device_id: int, key_prefix: str = "mimo_"):
        if byte_size <= 0:
            raise ValueError(f"a landing region needs a positive size, got {byte_size} bytes")
        import tritonclient.utils.cuda_shared_memory as cudashm  # needs cuda-python and a GPU

        self.name = f"{key_prefix}landing_{uuid.uuid4().hex}"
        self.byte_size, self.device_id = byte_size, device_id
        self.device = torch.device("cuda", device_id)
        self._cudashm = cudashm
        self._handle = cudashm.create_shared_memory_region(self.name, byte_size, device_id)
        self._raw_handle = cudashm.get_raw_handle(self._handle)  # base64, as tritonclient's register calls take it
        self.ipc_handle: bytes = base64.b64decode(self._raw_handle)
        pointer = int(self._handle._base_addr)
        self.__cuda_array_interface__ = {"shape": (byte_size,), "typestr": "|u1", "data": (pointer, False),
                                         "version": 3}  # fmt: skip
        self._base: torch.Tensor | None = torch.as_tensor(self, device=self.device)

    def register(self, client):
        return client.register_cuda_shared_memory(self.name, self._raw_handle, self.device_id, self.byte_size)

    def unregister(self, client):
        return client.unregister_cuda_shared_memory(self.name)

    def view(self, offset: int, byte_size: int) -> torch.Tensor:
        if self._base is None:
            raise LandingClosed(f"landing region {self.name} is closed")
        return self._base[offset : offset + byte_size]

    def synchronize(self) -> None:
        """Before a server reads what this process wrote on its CUDA streams."""
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        if self._base is not None:
            self._base = None
            self._cudashm.destroy_shared_memory_region(self._handle)  # freed with the last view


def landing_region(byte_size: int, device: str, key_prefix: str) -> SystemShmRegion | CudaRegion:
    """The landing region for `device` ("cpu": system shared memory; "cuda:N": memory of GPU N)."""
    if device == "cpu":
        return SystemShmRegion(byte_size, key_prefix=key_prefix)
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index.isdigit():
        raise ValueError(f"a landing device is 'cpu' or 'cuda:N', got {device!r}")
    return CudaRegion(byte_size, int(index), key_prefix=key_prefix)


@dataclass(frozen=True, slots=True)
class PoolStats:
    capacity: int  # bytes
    slices_in_use: int
    bytes_in_use: int  # aligned bytes of the slices held
    peak_bytes_in_use: int
    quarantined_slices: int  # released slices a remote writer may still touch
    quarantined_bytes: int
    waiting: int  # reservations waiting for room now
    waits: int  # reservations that had to wait (since start)
    timeouts: int  # reservations that timed out waiting (since start)


class Lease:
    """One reserved slice: bytes [offset, offset + reserved) of the region, `byte_size` of them asked for."""

    def __init__(self, pool: LandingPool, offset: int, byte_size: int, reserved: int):
        self.pool, self.offset, self.byte_size, self.reserved = pool, offset, byte_size, reserved
        self.writing = False  # a request naming this slice as its output has not had its response
        self.released = False

    @property
    def output_region(self) -> tuple[str, int, int]:
        """(region name, byte size, offset): `InferInput.set_shared_memory(*lease.output_region)` (mimo_llm's
        table input on the server the region is registered with)."""
        return self.pool.region.name, self.byte_size, self.offset

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The slice as a `dtype` tensor of `shape` (exactly `byte_size` bytes), no copy."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if int(np.prod(shape)) * itemsize != self.byte_size:
            raise ValueError(f"a {list(shape)} {dtype} view is {int(np.prod(shape)) * itemsize} bytes, the slice "
                             f"{self.byte_size}")  # fmt: skip
        return self.pool.region.view(self.offset, self.byte_size).view(dtype).reshape(shape)

    @contextlib.contextmanager
    def remote_write(self) -> Iterator[Lease]:
        """Around the one request that names this slice as its output. Once its response came (the block ended
        without an exception, or `settle()` was called in it: an error response), nothing writes the slice any more.
        Left by an exception before that (a client-side timeout, a cancelled task), its server may still write it:
        the slice is quarantined when released, and a retry must take a slice of its own."""
        if self.writing:
            raise LandingError(f"landing slice at {self.offset} may still be written by an earlier request; "
                               "a retry needs a slice of its own")  # fmt: skip
        self.writing = True
        yield self
        self.settle()

    def settle(self) -> None:
        """The request's response arrived (an error response too): its server writes the slice no more."""
        self.writing = False

    def release(self) -> None:
        """Returns the slice (idempotent); quarantined while a request naming it may still write it."""
        if not self.released:
            self.released = True
            self.pool._release(self, quarantine=self.writing)
            if self.pool.on_release is not None:
                self.pool.on_release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Waiter:
    def __init__(self, reserved: int, byte_size: int, wake: Callable[[], None]):
        self.reserved, self.byte_size, self.wake = reserved, byte_size, wake
        self.lease: Lease | None = None
        self.error: Exception | None = None


class LandingPool:
    """Slices of one `Region`, reserved by byte size; safe from any thread and from asyncio tasks."""

    def __init__(self, region: Region, *, alignment: int = ALIGNMENT, quarantine_s: float = DEFAULT_QUARANTINE_S,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        capacity = region.byte_size // alignment * alignment
        if capacity == 0:
            raise ValueError(f"a {region.byte_size}-byte region holds no {alignment}-byte aligned slice")
        self.region, self.alignment, self.quarantine_s, self._clock = region, alignment, quarantine_s, clock
        self.capacity = capacity
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (offset, size), sorted by offset, never adjacent
        self._held: dict[int, Lease] = {}  # offset -> lease
        self._quarantine: collections.deque[tuple[float, int, int]] = collections.deque()  # (until, offset, size)
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._closed = False
        self._peak = self._waits = self._timeouts = 0
        self.on_release: Callable[[], None] | None = None  # called after each release (outside the lock): metrics

    def __enter__(self) -> LandingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reserve(self, byte_size: int, timeout_s: float) -> Lease:
        """A slice of `byte_size` bytes, waiting at most `timeout_s` for room (LandingTimeout after that)."""
        event = threading.Event()
        waiter, deadline = self._enqueue(byte_size, timeout_s, event.set)
        while True:
            granted, wait_s = self._poll(waiter, deadline, event.clear)
            if granted is not None:
                return granted
            event.wait(wait_s)

    async def reserve_async(self, byte_size: int, timeout_s: float) -> Lease:
        """`reserve` for asyncio: the task waits, not the thread; a task cancelled while waiting takes nothing."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        waiter, deadline = self._enqueue(byte_size, timeout_s, lambda: loop.call_soon_threadsafe(event.set))
        try:
            while True:
                granted, wait_s = self._poll(waiter, deadline, event.clear)
                if granted is not None:
                    return granted
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), wait_s)
        except asyncio.CancelledError:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    self._grant()
                lease = waiter.lease
            if lease is not None:
                lease.release()
            raise

    def stats(self) -> PoolStats:
        with self._lock:
            self._reap()
            return PoolStats(
                capacity=self.capacity, slices_in_use=len(self._held),
                bytes_in_use=sum(lease.reserved for lease in self._held.values()), peak_bytes_in_use=self._peak,
                quarantined_slices=len(self._quarantine),
                quarantined_bytes=sum(size for _, _, size in self._quarantine),
                waiting=len(self._waiters), waits=self._waits, timeouts=self._timeouts,
            )  # fmt: skip

    def close(self) -> None:
        """Refuses new reservations, ends every wait with LandingClosed and removes the region (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiters, self._waiters = list(self._waiters), collections.deque()
        for waiter in waiters:
            waiter.error = LandingClosed("the landing pool was closed (the server is shutting down)")
            waiter.wake()
        self.region.close()

    # --- internals: everything below runs under self._lock unless it says otherwise

    def _enqueue(self, byte_size: int, timeout_s: float, wake: Callable[[], None]) -> tuple[_Waiter, float]:
        """A waiter holding its lease already, or queued, and its deadline (takes the lock)."""
        if not isinstance(byte_size, int) or byte_size <= 0:
            raise ValueError(f"a landing slice needs a positive integer byte size, got {byte_size!r}")
        reserved = -(-byte_size // self.alignment) * self.alignment
        if reserved > self.capacity:
            raise LandingError(f"a {byte_size}-byte slice can never fit the {self.capacity}-byte landing pool")
        waiter = _Waiter(reserved, byte_size, wake)
        with self._lock:
            if self._closed:
                raise LandingClosed("the landing pool was closed (the server is shutting down)")
            self._reap()
            if not self._waiters:  # first come, first served: nobody overtakes a waiting reservation
                waiter.lease = self._allocate(reserved, byte_size)
            if waiter.lease is None:
                self._waiters.append(waiter)
                self._waits += 1
        return waiter, self._clock() + timeout_s

    def _poll(self, waiter: _Waiter, deadline: float, clear: Callable[[], None]) -> tuple[Lease | None, float]:
        """(its lease, or None and how long to wait before asking again; `clear` re-arms its wake-up) (takes the
        lock; raises LandingTimeout past the deadline, LandingClosed once closed)."""
        with self._lock:
            granted = self._settle_wait(waiter, deadline)
            if granted is None:
                clear()  # under the lock: a grant after this sets it again
            return granted, self._wait_s(deadline)

    def _settle_wait(self, waiter: _Waiter, deadline: float) -> Lease | None:
        self._reap()
        if waiter.error is not None:
            raise waiter.error
        if waiter.lease is not None:
            return waiter.lease
        if self._clock() >= deadline:
            self._waiters.remove(waiter)
            self._timeouts += 1
            self._grant()  # the one behind it may fit
            stats = f"{len(self._held)} slices, {sum(x.reserved for x in self._held.values())} of {self.capacity} bytes"
            raise LandingTimeout(f"no room for a {waiter.byte_size}-byte landing slice before the deadline "
                                 f"(in use: {stats}; {len(self._quarantine)} quarantined)")  # fmt: skip
        return None

    def _wait_s(self, deadline: float) -> float:
        """Until the deadline, or until the next quarantined slice comes back, whichever is first."""
        until = deadline if not self._quarantine else min(deadline, self._quarantine[0][0])
        return max(0.0, until - self._clock())

    def _allocate(self, reserved: int, byte_size: int) -> Lease | None:
        for index, (offset, size) in enumerate(self._free):
            if size >= reserved:
                if size == reserved:
                    del self._free[index]
                else:
                    self._free[index] = (offset + reserved, size - reserved)
                lease = Lease(self, offset, byte_size, reserved)
                self._held[offset] = lease
                self._peak = max(self._peak, sum(x.reserved for x in self._held.values()))
                return lease
        return None

    def _release(self, lease: Lease, quarantine: bool) -> None:
        """Takes the lock (Lease.release)."""
        with self._lock:
            if self._closed or self._held.get(lease.offset) is not lease:
                return
            del self._held[lease.offset]
            if quarantine:
                self._quarantine.append((self._clock() + self.quarantine_s, lease.offset, lease.reserved))
                return
            self._free_range(lease.offset, lease.reserved)
            self._grant()

    def _free_range(self, offset: int, size: int) -> None:
        index = bisect.bisect(self._free, (offset, size))
        if index < len(self._free) and offset + size == self._free[index][0]:  # merge with the next range
            size += self._free.pop(index)[1]
        if index > 0 and self._free[index - 1][0] + self._free[index - 1][1] == offset:  # and with the previous
            offset, size = self._free[index - 1][0], self._free[index - 1][1] + size
            self._free[index - 1] = (offset, size)
        else:
            self._free.insert(index, (offset, size))

    def _reap(self) -> None:
        now, freed = self._clock(), False
        while self._quarantine and self._quarantine[0][0] <= now:
            _, offset, size = self._quarantine.popleft()
            self._free_range(offset, size)
            freed = True
        if freed:
            self._grant()

    def _grant(self) -> None:
        """Hands free room to the waiters in arrival order, stopping at the first that does not fit."""
        while self._waiters:
            head = self._waiters[0]
            lease = self._allocate(head.reserved, head.byte_size)
            if lease is None:
                return
            self._waiters.popleft()
            head.lease = lease
            try:
                head.wake()
            except RuntimeError:  # its event loop is gone: nobody will take the slice
                head.lease = None
                del self._held[lease.offset]
                self._free_range(lease.offset, lease.reserved)
