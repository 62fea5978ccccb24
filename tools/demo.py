"""End to end in one command: tiny checkpoint -> model repository -> tritonserver -> image + audio + text chat.

    python -m tools.demo [--workdir artifacts/demo] [--device cpu|gpu] [--max-tokens 48]

Builds a random-weight tiny MiMo-V2.5 checkpoint, renders the Triton repository for it, starts `tritonserver`
through the project launcher on free ports, sends one request with a generated PNG and a generated WAV tone,
prints the reply as it streams in with its timings, and stops the server. The reply is gibberish: the weights are
random. Exits non-zero if any stage fails (the server log is printed then).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builders.repository import RepositorySettings, render_repository
from builders.tiny import build_checkpoint
from client import GenerationSummary, MiMoClient
from client.sample_media import sample_image, sample_tone
from tools.server_process import TritonServer

QUESTION = "Describe the picture, then the sound."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    print(f"[1/4] tiny checkpoint -> {args.workdir / 'checkpoint'}", flush=True)
    checkpoint = build_checkpoint(args.workdir / "checkpoint")
    repository = args.workdir / "model_repository"
    command = render_repository(RepositorySettings(checkpoint=checkpoint, device=args.device), repository)
    print(f"[2/4] model repository -> {repository}", flush=True)
    server = TritonServer(repository, args.workdir / "tritonserver.log", extra_args=command[2:])
    print(f"[3/4] starting tritonserver (log: {server.log_path})", flush=True)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as error:
        print(error, file=sys.stderr)
        return 1
    try:
        print(f"[4/4] gRPC {server.grpc_url}: image + audio + {QUESTION!r}\n", flush=True)
        with MiMoClient(server.grpc_url, "grpc") as client:
            for item in client.generate(QUESTION, images=[sample_image()], audios=[sample_tone()],
                                        max_tokens=args.max_tokens, temperature=0.0):  # fmt: skip
                if isinstance(item, GenerationSummary):
                    print(f"\n\n{item.summary_line()}")
                else:
                    print(item, end="", flush=True)
    finally:
        returncode = server.stop()
    print(f"tritonserver stopped (exit status {returncode})")
    return 0 if returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
