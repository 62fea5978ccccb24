"""Repeated start / image request / stop cycles of a GPU deployment: does every shutdown finish cleanly?

    python scripts/shutdown_probe.py CYCLES WORKDIR     # e.g. 6 /tmp/probe, on a GPU machine

Python-backend stubs that ran CUDA work could hang in their own teardown until Triton's 30 s exit timeout (the
server then exits with status 1); mimo.serving.triton_config.exit_stub_process is the fix this checks.
"""

import sys
import time
from pathlib import Path

from builders.repository import RepositorySettings, render_repository
from builders.tiny import build_checkpoint
from client import MiMoClient
from client.sample_media import sample_image
from tools.server_process import TritonServer


def main() -> int:
    cycles, out = int(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    command = render_repository(RepositorySettings(checkpoint=build_checkpoint(out / "tiny"), device="gpu"),
                                out / "repo")  # fmt: skip
    failures = 0
    for i in range(cycles):
        server = TritonServer(out / "repo", out / f"tritonserver_{i}.log", extra_args=command[2:]).start()
        with MiMoClient(server.grpc_url, "grpc") as client:
            list(client.generate("What do you see?", images=[sample_image((200, 40, 40))], max_tokens=2,
                                 temperature=0.0))  # fmt: skip
        start = time.monotonic()
        returncode = server.stop()
        failures += returncode != 0
        print(f"cycle {i}: exit status {returncode}, stopped in {time.monotonic() - start:.1f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
