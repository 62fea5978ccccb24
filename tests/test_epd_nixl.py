"""mimo.epd.nixl_transfer alone: a landing agent in another process (tests/nixl_peer.py), a RowWriter here, NIXL over
UCX TCP on loopback (UCX_TLS=tcp): WRITEs land byte for byte and nothing around them; a descriptor of the wrong size,
outside the registered region, or of an unknown agent is refused and writes nothing; the agent cache is bounded and
released. Also the handoff modes' refusals (an unknown mode; nixl when it cannot be imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mimo.epd import handoff
from mimo.epd.handoff import make_handoff
from mimo.epd.nixl_transfer import DRAM, VRAM, Descriptor, LandingAgent, NixlUnavailable, RowWriter, TransferError
from nixl_peer import LocalRegion

REGION_BYTES = 1 << 16
FILL = 0xAB
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


class Peer:
    """tests/nixl_peer.py: the landing side, in a process of its own."""

    def __init__(self, device: str = "cpu"):
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        command = [sys.executable, str(REPO / "tests" / "nixl_peer.py"), str(REGION_BYTES), device]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        info = json.loads(self._reply())
        self.name, self.metadata = info["name"], bytes.fromhex(info["metadata"])
        self.region = Descriptor.from_array(np.array(info["descriptor"], dtype=np.int64))

    def _reply(self) -> str:
        for line in self.process.stdout:
            if line.startswith("REPLY "):
                return line[len("REPLY "):].strip()
        raise AssertionError(f"the peer ended (rc {self.process.wait()})")

    def slice(self, offset: int, byte_size: int) -> Descriptor:
        return Descriptor(self.region.address + offset, byte_size, self.region.device_id, self.region.memory_kind)

    def read(self, offset: int, byte_size: int) -> bytes:
        self.process.stdin.write(f"read {offset} {byte_size}\n")
        self.process.stdin.flush()
        return bytes.fromhex(self._reply())

    def close(self) -> int:
        self.process.stdin.write("close\n")
        self.process.stdin.flush()
        return self.process.wait(30)


@pytest.fixture(scope="module")
def peer(ucx_tcp):
    peer = Peer()
    yield peer
    if peer.process.poll() is None:
        peer.process.kill()
        peer.process.wait()


@pytest.fixture(scope="module")
def writer(ucx_tcp):
    writer = RowWriter(timeout_s=30)
    yield writer
    writer.close()


def rows_of(values: int, seed: int) -> torch.Tensor:
    return torch.randn(1, values // 64, 64, generator=torch.Generator().manual_seed(seed))  # [1, rows, hidden]


def test_writes_land_in_the_other_process_and_nothing_around_them(peer, writer):
    writer.add_remote(peer.name, np.frombuffer(peer.metadata, dtype=np.uint8))
    first, second = rows_of(256, 0), rows_of(512, 1)
    elapsed = [writer.write(first, peer.name, peer.slice(1024, 1024), 1024),
               writer.write(second, peer.name, peer.slice(2048, 2048), 2048)]  # fmt: skip
    assert all(0 < s < 30 for s in elapsed)
    assert peer.read(1024, 1024) == first.numpy().tobytes()
    assert peer.read(2048, 2048) == second.numpy().tobytes()
    assert peer.read(0, 1024) == bytes([FILL]) * 1024 and peer.read(4096, 256) == bytes([FILL]) * 256
    assert writer.in_flight() == 0


def test_a_descriptor_that_is_not_the_declared_size_is_refused_and_writes_nothing(peer, writer):
    writer.add_remote(peer.name, peer.metadata)
    rows = rows_of(256, 2)  # 1024 bytes
    for target, declared, message in (
        (peer.slice(8192, 1024 + 256), 1024, "nixl_descriptor names 1280 bytes, but the item's rows are 1024 bytes "
                                             "and the request declared 1024"),
        (peer.slice(8192, 1024), 1024 - 256, "the request declared 768"),
    ):  # fmt: skip
        with pytest.raises(TransferError, match=message):
            writer.write(rows, peer.name, target, declared)
    outside = Descriptor(peer.region.address + REGION_BYTES - 512, 1024, 0, DRAM)  # runs past the registration
    with pytest.raises(TransferError, match="NIXL refused the WRITE of 1024 bytes to mimo-language-.*'s DRAM"):
        writer.write(rows, peer.name, outside, 1024)
    assert peer.read(8192, 2048) == bytes([FILL]) * 2048
    assert peer.read(REGION_BYTES - 512, 512) == bytes([FILL]) * 512


def test_agents_load_once_by_name_and_unknown_ones_are_refused(peer, writer):
    writer.add_remote(peer.name, peer.metadata)
    writer.add_remote(peer.name, None)  # known: the metadata is not needed again
    assert writer.remote_agents().count(peer.name) == 1
    with pytest.raises(TransferError, match="NIXL agent 'mimo-language-x' is unknown here and the request carries no"):
        writer.add_remote("mimo-language-x", None)
    other = RowWriter()
    with pytest.raises(TransferError, match=f"the metadata sent as NIXL agent 'someone-else' is agent '{peer.name}'"):
        other.add_remote("someone-else", peer.metadata)
    assert other.remote_agents() == []  # the agent it turned out to be was not kept either
    with pytest.raises(TransferError, match="the metadata of NIXL agent 'mimo-language-y' could not be loaded"):
        writer.add_remote("mimo-language-y", b"\x00not nixl metadata")
    with pytest.raises(TransferError, match="NIXL agent 'mimo-language-x' is unknown here"):
        writer.write(rows_of(64, 3), "mimo-language-x", peer.slice(0, 256), 256)


def test_the_agent_cache_is_bounded_and_released(peer, ucx_tcp):
    """max_remote_agents=1: a second agent evicts the first (its connection dropped); a later request of the first
    carries its metadata again and still writes. close() forgets them all."""
    local = LocalRegion(4096)
    second = LandingAgent(local)
    writer = RowWriter(max_remote_agents=1)
    try:
        writer.add_remote(peer.name, peer.metadata)
        writer.add_remote(second.name, second.metadata)
        assert writer.remote_agents() == [second.name]
        writer.write(rows_of(64, 4), second.name, second.descriptor(256, 256), 256)
        assert local.view(256, 256).numpy().tobytes() == rows_of(64, 4).numpy().tobytes()
        with pytest.raises(TransferError, match="is unknown here"):
            writer.write(rows_of(64, 5), peer.name, peer.slice(0, 256), 256)
        writer.add_remote(peer.name, peer.metadata)
        writer.write(rows_of(64, 5), peer.name, peer.slice(12288, 256), 256)
        assert peer.read(12288, 256) == rows_of(64, 5).numpy().tobytes()
    finally:
        writer.close()
        second.close()
    assert writer.remote_agents() == []


def test_a_write_that_times_out_in_flight_says_so_and_is_released_once_it_ends(ucx_tcp):
    """timeout_s=0: a 32 MiB WRITE is still in flight when it is checked. The error says the slice must stay
    quarantined (what the orchestrator looks for: NixlHandoff.may_still_write); its rows stay registered until NIXL
    says it ended, and the next write releases them."""
    big = 32 << 20
    region = LocalRegion(big + 4096)
    landing = LandingAgent(region)
    writer = RowWriter(timeout_s=0.0)
    try:
        writer.add_remote(landing.name, landing.metadata)
        rows = torch.ones(big, dtype=torch.uint8)
        with pytest.raises(TransferError, match="did not complete in 0.0 s") as error:
            writer.write(rows, landing.name, landing.descriptor(0, rows.numel()), rows.numel())
        assert error.value.in_flight and handoff.NixlHandoff.may_still_write(None, str(error.value))
        assert writer.in_flight() == 1
        writer.timeout_s = 30.0
        deadline = time.monotonic() + 30
        while True:  # the next write reaps it once it ended
            writer.write(torch.zeros(256, dtype=torch.uint8), landing.name, landing.descriptor(big, 256), 256)
            if writer.in_flight() == 0:
                break
            assert time.monotonic() < deadline, "the timed-out WRITE never ended"
            time.sleep(0.05)
        assert bool((region.view(0, big) == 1).all())  # it did land, in the end
    finally:
        writer.close()
        landing.close()
    assert not handoff.ShmHandoff.may_still_write(None, str(error.value))  # shm: Triton's own writes, no such case


def test_the_landing_agent_deregisters_and_the_peer_exits_cleanly(peer):
    assert peer.close() == 0


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CPU CI moves DRAM; the lead's GPU check runs this)")
def test_vram_to_vram_between_two_processes(ucx_tcp, writer):
    """A landing region in GPU memory of another process, rows in GPU memory here: VRAM descriptors, the bytes land
    (UCX's cuda_ipc on one host)."""
    peer = Peer("cuda:0")
    try:
        assert (peer.region.memory_kind, peer.region.device_id) == (VRAM, 0)
        writer.add_remote(peer.name, peer.metadata)
        rows = rows_of(4096, 6).to("cuda:0")
        writer.write(rows, peer.name, peer.slice(4096, 16384), 16384)
        assert peer.read(4096, 16384) == rows.cpu().numpy().tobytes()
        assert peer.read(0, 4096) == bytes([FILL]) * 4096
        assert peer.close() == 0
    finally:
        if peer.process.poll() is None:
            peer.process.kill()
            peer.process.wait()


def test_descriptors_travel_as_four_int64_values():
    descriptor = Descriptor.of(torch.zeros(16, dtype=torch.uint8)[4:12])
    assert (descriptor.byte_size, descriptor.device_id, descriptor.memory_kind) == (8, 0, DRAM)
    assert Descriptor.from_array(descriptor.to_array()) == descriptor
    for array, message in (
        (np.array([1, 2, 3], dtype=np.int64), "must be 4 INT64 values"),
        (descriptor.to_array().astype(np.int32), "must be 4 INT64 values"),
        (np.array([0, 8, 0, 0], dtype=np.int64), r"\[0, 8, 0, 0\] does not name a range of DRAM \(0\) or VRAM \(1\)"),
        (np.array([4096, 8, 0, 2], dtype=np.int64), "does not name a range"),
        (np.array([4096, 0, 0, 0], dtype=np.int64), "does not name a range"),
    ):  # fmt: skip
        with pytest.raises(TransferError, match=message):
            Descriptor.from_array(array)
    with pytest.raises(TransferError, match="must be 4 INT64"):
        Descriptor.from_array(None)


def test_handoff_modes_refuse_an_unknown_mode_and_name_why_nixl_cannot_start(monkeypatch):
    with pytest.raises(ValueError, match="handoff must be one of shm, nixl, grpc; got 'rdma'"):
        make_handoff("rdma", LocalRegion(4096))
    # nixl not importable (a Python or platform without its wheel): refused at load, naming the cause
    monkeypatch.setitem(sys.modules, "nixl", None)
    monkeypatch.setitem(sys.modules, "nixl._api", None)
    monkeypatch.setitem(sys.modules, "nixl_cu13", None)
    monkeypatch.setitem(sys.modules, "nixl_cu13._api", None)
    with pytest.raises(NixlUnavailable, match=r"handoff nixl was asked for, but NIXL cannot be imported \(.*\); "
                                              r"`pip install nixl-cu13` \(Linux\), or use handoff grpc"):
        make_handoff("nixl", LocalRegion(4096))
    grpc = make_handoff("grpc", LocalRegion(4096))  # needs nothing installed
    assert isinstance(grpc, handoff.GrpcHandoff)
