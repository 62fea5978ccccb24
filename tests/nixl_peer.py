"""The landing side of tests/test_epd_nixl.py in a process of its own: `nixl_peer.py BYTES [DEVICE]`, a LocalRegion of
BYTES bytes on DEVICE (default cpu) filled with 0xAB,
registered by a LandingAgent. Prints one JSON line (agent name, metadata hex, the region's descriptor), then answers
commands on stdin, one a line: `read OFFSET SIZE` prints the bytes as hex; `close` deregisters and exits 0. Its
answers start with REPLY (NIXL logs to stdout too)."""

import json
import sys
import uuid

import torch

from mimo.epd.landing import LandingClosed
from mimo.epd.nixl_transfer import LandingAgent

REPLY = "REPLY "


class LocalRegion:
    """The tests' landing region for NIXL alone: this process's own memory on `device` (host memory, or a GPU's),
    registered with NIXL (DRAM or VRAM) and with no Triton server (the servers' region is mimo.epd.landing's)."""

    def __init__(self, byte_size: int, device: str | torch.device = "cpu"):
        if byte_size <= 0:
            raise ValueError(f"a landing region needs a positive size, got {byte_size} bytes")
        self.name = f"landing_{uuid.uuid4().hex}"
        self.byte_size = byte_size
        self._memory: torch.Tensor | None = torch.empty(byte_size, dtype=torch.uint8, device=device)

    def register(self, client):
        raise RuntimeError(f"{self.name} is process memory, not Triton shared memory: handoff shm needs its own region")

    unregister = register

    def view(self, offset: int, byte_size: int) -> torch.Tensor:
        if self._memory is None:
            raise LandingClosed(f"landing region {self.name} is closed")
        return self._memory[offset : offset + byte_size]

    def close(self) -> None:
        self._memory = None  # freed with its last view


def main(byte_size: int, device: str) -> None:
    region = LocalRegion(byte_size, device)
    region.view(0, byte_size).fill_(0xAB)
    agent = LandingAgent(region)
    whole = agent.descriptor(0, byte_size)
    print(REPLY + json.dumps({"name": agent.name, "metadata": agent.metadata.hex(), "descriptor": whole.to_array().tolist()}),
          flush=True)  # fmt: skip
    for line in sys.stdin:
        command, *args = line.split()
        if command == "read":
            offset, size = map(int, args)
            print(REPLY + bytes(region.view(offset, size).cpu().numpy()).hex(), flush=True)
        elif command == "close":
            agent.close()
            region.close()
            return
        else:
            raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
