"""The landing side of tests/test_epd_nixl.py in a process of its own: `nixl_peer.py BYTES [DEVICE]`, a LocalRegion of
BYTES bytes on DEVICE (default cpu) filled with 0xAB,
registered by a LandingAgent. Prints one JSON line (agent name, metadata hex, the region's descriptor), then answers
commands on stdin, one a line: `read OFFSET SIZE` prints the bytes as hex; `close` deregisters and exits 0. Its
answers start with REPLY (NIXL logs to stdout too)."""

import json
import sys

import torch

from mimo.epd.handoff import LocalRegion
from mimo.epd.nixl_transfer import LandingAgent

REPLY = "REPLY "


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
