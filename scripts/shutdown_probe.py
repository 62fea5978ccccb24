"""Repeated start / image request / stop-with-streams-open cycles of a GPU deployment: does every shutdown drain?

    python scripts/shutdown_probe.py CYCLES WORKDIR [STREAMS]     # e.g. 6 /tmp/probe 8, on a GPU machine
    MIMO_SERVING_DEVICE=cpu python scripts/shutdown_probe.py 1 /tmp/probe       # the same on CPU

Each cycle answers one image request, opens STREAMS (default 8) long streaming requests, then SIGTERMs the
launcher. A cycle passes when the launcher exits 0 and every stream ended with the server's SHUTTING_DOWN error.
These clients close their streams on the error; whether the server then exited by itself or the launcher had to
end it is reported (docs/ARCHITECTURE.md, "Lifecycle": today's ensemble can leak an in-flight count on such a
stream). Python-backend stubs that ran CUDA work could hang in their own teardown until Triton's 30 s exit timeout;
mimo.serving.triton_config.exit_stub_process is the fix this also checks.
"""

import os
import sys
import threading
import time
from pathlib import Path

from builders.repository import RepositorySettings, render_repository
from builders.tiny import build_checkpoint
from client import GenerationError, MiMoClient
from client.sample_media import sample_image
from mimo.serving.lifecycle import SHUTTING_DOWN
from tools.server_process import TritonServer


def open_stream(url: str, started: threading.Semaphore, endings: list[str]) -> None:
    """One streaming request that generates until the server ends it; records how it ended."""
    with MiMoClient(url, "grpc") as client:
        try:
            for i, _ in enumerate(client.generate("Tell me a long story", max_tokens=900, temperature=0.0)):
                if i == 0:
                    started.release()
            endings.append("finished")
        except GenerationError as error:
            endings.append(str(error))


def cycle(out: Path, i: int, command: list[str], streams: int) -> bool:
    server = TritonServer(out / "repo", out / f"tritonserver_{i}.log", extra_args=command[2:]).start()
    with MiMoClient(server.grpc_url, "grpc") as client:
        list(client.generate("What do you see?", images=[sample_image((200, 40, 40))], max_tokens=2,
                             temperature=0.0))  # fmt: skip
    started, endings = threading.Semaphore(0), []
    threads = [threading.Thread(target=open_stream, args=(server.grpc_url, started, endings)) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for _ in threads:
        started.acquire(timeout=120)
    start = time.monotonic()
    returncode = server.stop()
    for thread in threads:
        thread.join(30)
    drained = sum(SHUTTING_DOWN in ending for ending in endings)
    by_itself = "still running" not in server.log()
    print(f"cycle {i}: exit status {returncode}, stopped in {time.monotonic() - start:.1f} s, {drained}/{streams} "
          f"streams ended with '{SHUTTING_DOWN}', server exited {'by itself' if by_itself else 'when killed'}",
          flush=True)  # fmt: skip
    return returncode == 0 and drained == streams


def main() -> int:
    cycles, out = int(sys.argv[1]), Path(sys.argv[2])
    streams = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    out.mkdir(parents=True, exist_ok=True)
    device = os.environ.get("MIMO_SERVING_DEVICE", "gpu")
    command = render_repository(RepositorySettings(checkpoint=build_checkpoint(out / "tiny"), device=device),
                                out / "repo")  # fmt: skip
    failures = sum(not cycle(out, i, command, streams) for i in range(cycles))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
