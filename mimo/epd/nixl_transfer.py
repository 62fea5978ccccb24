"""NIXL WRITEs of an item's rows into the language server's landing pool: the handoff across hosts.

The language server's `LandingAgent` registers the landing region once. Each encode request carries what the
encoder server needs to write one slice, as plain typed tensors (never NIXL's `get_serialized_descs`, which is
pickle): the agent's name (BYTES), its metadata (UINT8: NIXL's own binary encoding of the agent's connection info
and registered memory, loaded with `add_remote_agent`) and the slice's `Descriptor` (INT64 [address, byte size,
device id, memory kind]). The encoder server's `RowWriter` loads an agent's metadata once (a bounded cache by agent
name), registers the rows it computed for the one WRITE, waits until NIXL reports the WRITE done and deregisters
them: nothing of a request outlives it (a WRITE that times out in flight keeps its rows registered until NIXL says
it ended). The UCX backend reports a WRITE done once its endpoint is flushed, i.e. the bytes are in the target's
memory, so the encoder server's response is the language side's completion signal.

The same code moves DRAM to DRAM (a CPU region; UCX over TCP or shared memory) and VRAM to VRAM (a CUDA region:
the descriptor names its device pointer, device id and VRAM; UCX's cuda_ipc on one host, RDMA with GPUDirect
across hosts). UCX picks the transport; `UCX_TLS` / `UCX_NET_DEVICES` in the servers' environment narrow it.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

DRAM, VRAM = 0, 1  # Descriptor.memory_kind
MEMORY_TYPES = {DRAM: "DRAM", VRAM: "VRAM"}
DEFAULT_MAX_REMOTE_AGENTS = 64
# ends the message of a WRITE that timed out in flight: the caller's sign to keep the slice quarantined (the Python
# backend answers INTERNAL whatever error code a model gives, so the code cannot carry it)
MAY_STILL_LAND = "(the WRITE may still land: keep the slice quarantined)"


class NixlUnavailable(RuntimeError):
    """NIXL cannot be used here (not installed, or no UCX backend): the message names the cause."""


class TransferError(RuntimeError):
    """A descriptor was refused or a WRITE failed: the message names the cause. `in_flight`: the WRITE may still
    land (it timed out), so the target slice must not be reused yet."""

    def __init__(self, message: str, in_flight: bool = False):
        super().__init__(message)
        self.in_flight = in_flight


def load_nixl():
    """`(nixl_agent, nixl_agent_config)`, or NixlUnavailable naming why not."""
    try:  # the nixl meta package picks the wheel of torch's CUDA; the project depends on nixl-cu13 alone
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:
        try:
            from nixl_cu13._api import nixl_agent, nixl_agent_config
        except ImportError as error:  # the package, or a library of its wheel (libnixl, UCX)
            raise NixlUnavailable(f"NIXL cannot be imported ({error}); `pip install nixl-cu13` (Linux), or use "
                                  "handoff grpc") from None  # fmt: skip
    return nixl_agent, nixl_agent_config


def make_agent(role: str):
    """A NIXL agent with the UCX backend and a progress thread (UCX's TCP transport needs the target to progress);
    no listener: metadata travels in Triton requests."""
    nixl_agent, nixl_agent_config = load_nixl()
    name = f"mimo-{role}-{uuid.uuid4().hex}"
    try:
        agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False,
                                                   backends=["UCX"]))  # fmt: skip
    except Exception as error:  # noqa: BLE001 - nixl raises RuntimeError / its bindings' own errors
        raise NixlUnavailable(f"the NIXL agent could not start: {error}") from None
    if "UCX" not in agent.backends:
        raise NixlUnavailable(f"NIXL has no UCX backend here (plugins found: {agent.get_plugin_list()})")
    return agent


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One contiguous range of registered memory: what a WRITE targets."""

    address: int
    byte_size: int
    device_id: int  # 0 for DRAM
    memory_kind: int  # DRAM or VRAM

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Descriptor:
        """The bytes of a contiguous tensor (a view of the landing region, or the rows to send)."""
        if not tensor.is_contiguous():
            raise ValueError("a NIXL descriptor needs a contiguous tensor")
        cuda = tensor.device.type == "cuda"
        device_id = (tensor.device.index or 0) if cuda else 0
        return cls(tensor.data_ptr(), tensor.numel() * tensor.element_size(), device_id, VRAM if cuda else DRAM)

    def to_array(self) -> np.ndarray:
        """INT64 [4]."""
        return np.array([self.address, self.byte_size, self.device_id, self.memory_kind], dtype=np.int64)

    @classmethod
    def from_array(cls, array: np.ndarray | None, what: str = "nixl_descriptor") -> Descriptor:
        """Refuses anything but 4 INT64 values naming a non-empty range of DRAM or VRAM (TransferError)."""
        if array is None or array.dtype != np.int64 or array.size != 4:
            raise TransferError(f"{what} must be 4 INT64 values (address, byte size, device id, memory kind)")
        address, byte_size, device_id, memory_kind = (int(v) for v in array.reshape(-1))
        if address <= 0 or byte_size <= 0 or device_id < 0 or memory_kind not in MEMORY_TYPES:
            raise TransferError(f"{what} [{address}, {byte_size}, {device_id}, {memory_kind}] does not name a range "
                                "of DRAM (0) or VRAM (1)")  # fmt: skip
        return cls(address, byte_size, device_id, memory_kind)

    @property
    def memory_type(self) -> str:
        return MEMORY_TYPES[self.memory_kind]

    def triple(self) -> tuple[int, int, int]:
        """(address, byte size, device id): a transfer descriptor."""
        return self.address, self.byte_size, self.device_id

    def registration(self) -> tuple[int, int, int, str]:
        """(address, byte size, device id, ""): a registration descriptor."""
        return self.address, self.byte_size, self.device_id, ""


class LandingAgent:
    """The language server's agent: registers the landing region once (DRAM or VRAM, as the region's memory is)
    and names slices of it."""

    def __init__(self, region, agent=None):
        self.agent = agent or make_agent("language")
        self.name: str = self.agent.name
        whole = Descriptor.of(region.view(0, region.byte_size))
        self._registered = self.agent.register_memory([whole.registration()], whole.memory_type)
        self._view = region.view
        # taken after the registration: the metadata carries the region's keys the encoder's WRITE needs
        self.metadata: bytes = self.agent.get_agent_metadata()
        self.metadata_array = np.frombuffer(self.metadata, dtype=np.uint8)

    def descriptor(self, offset: int, byte_size: int) -> Descriptor:
        return Descriptor.of(self._view(offset, byte_size))

    def close(self) -> None:
        if self._registered is not None:
            self.agent.deregister_memory(self._registered)
            self._registered = None


class RowWriter:
    """The encoder server's side: WRITEs rows to a remote agent's descriptor (safe from several threads)."""

    def __init__(self, agent=None, max_remote_agents: int = DEFAULT_MAX_REMOTE_AGENTS, timeout_s: float = 30.0):
        self.agent = agent or make_agent("encoder")
        self.max_remote_agents, self.timeout_s = max_remote_agents, timeout_s
        self._remote: collections.OrderedDict[str, None] = collections.OrderedDict()  # agent names, oldest first
        # WRITEs that timed out in flight: their rows stay registered and alive until NIXL says they ended
        self._stuck: list[tuple[object, object, torch.Tensor]] = []
        self._lock = threading.Lock()

    def remote_agents(self) -> list[str]:
        with self._lock:
            return list(self._remote)

    def in_flight(self) -> int:
        """Timed-out WRITEs not yet ended."""
        with self._lock:
            return len(self._stuck)

    def add_remote(self, name: str, metadata: np.ndarray | bytes | None) -> None:
        """Loads `name`'s metadata unless it is loaded already; the oldest agent is dropped past
        `max_remote_agents`. TransferError when unknown without metadata, or metadata of another agent."""
        with self._lock:
            if name in self._remote:
                self._remote.move_to_end(name)
                return
            if metadata is None or len(metadata) == 0:
                raise TransferError(f"NIXL agent {name!r} is unknown here and the request carries no metadata")
            data = metadata.tobytes() if isinstance(metadata, np.ndarray) else bytes(metadata)
            try:
                loaded = self.agent.add_remote_agent(data)
            except Exception as error:  # noqa: BLE001 - the bindings raise their own errors for bad metadata
                raise TransferError(f"the metadata of NIXL agent {name!r} could not be loaded: {error}") from None
            loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
            if loaded != name:
                self.agent.remove_remote_agent(loaded)
                raise TransferError(f"the metadata sent as NIXL agent {name!r} is agent {loaded!r}'s")
            self._remote[name] = None
            while len(self._remote) > self.max_remote_agents:
                old, _ = self._remote.popitem(last=False)
                self.agent.remove_remote_agent(old)

    def write(self, rows: torch.Tensor, remote: str, target: Descriptor, expected_bytes: int) -> float:
        """WRITEs `rows` into `target` of agent `remote` and waits for completion; returns the seconds from post to
        done. Refuses (TransferError) a target whose size is not `expected_bytes` (the item's declared rows) or
        not the rows' size, and one NIXL finds outside the remote agent's registered memory."""
        rows = rows.contiguous()
        source = Descriptor.of(rows)
        if target.byte_size != expected_bytes or source.byte_size != expected_bytes:
            raise TransferError(f"nixl_descriptor names {target.byte_size} bytes, but the item's rows are "
                                f"{source.byte_size} bytes and the request declared {expected_bytes}")  # fmt: skip
        with self._lock:
            if remote not in self._remote:
                raise TransferError(f"NIXL agent {remote!r} is unknown here")
        self._reap_stuck()
        if rows.is_cuda:  # UCX's CUDA transports work in the current device's context
            torch.cuda.set_device(rows.device)
        registered = self.agent.register_memory([source.registration()], source.memory_type)
        handle = None
        try:
            local = self.agent.get_xfer_descs([source.triple()], source.memory_type)
            remote_descs = self.agent.get_xfer_descs([target.triple()], target.memory_type)
            try:
                handle = self.agent.initialize_xfer("WRITE", local, remote_descs, remote)
            except Exception as error:  # noqa: BLE001 - e.g. the target is not in the remote's registered memory
                raise TransferError(f"NIXL refused the WRITE of {target.byte_size} bytes to {remote}'s "
                                    f"{target.memory_type}: {error}") from None  # fmt: skip
            start = time.perf_counter()
            state = self.agent.transfer(handle)
            while state == "PROC":
                if time.perf_counter() - start > self.timeout_s:
                    with self._lock:
                        self._stuck.append((handle, registered, rows))
                    handle = registered = None
                    raise TransferError(f"the NIXL WRITE to {remote} did not complete in {self.timeout_s} s "
                                        f"{MAY_STILL_LAND}", in_flight=True)  # fmt: skip
                time.sleep(0)  # the progress thread completes it
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"the NIXL WRITE to {remote} failed (state {state})")
            return time.perf_counter() - start
        finally:
            if handle is not None:
                self.agent.release_xfer_handle(handle)
            if registered is not None:
                self.agent.deregister_memory(registered)

    def _reap_stuck(self) -> None:
        with self._lock:
            stuck, self._stuck = self._stuck, []
        for entry in stuck:
            handle, registered, _ = entry
            if self.agent.check_xfer_state(handle) == "PROC":
                with self._lock:
                    self._stuck.append(entry)
                continue
            self.agent.release_xfer_handle(handle)
            self.agent.deregister_memory(registered)

    def close(self) -> None:
        with self._lock:
            for name in self._remote:
                self.agent.remove_remote_agent(name)
            self._remote.clear()
