"""End to end in one command: tiny checkpoint -> model repository -> tritonserver -> image + audio + text chat.

    python -m tools.demo [--workdir artifacts/demo] [--device cpu|gpu] [--max-tokens 48] [--epd]

Builds a random-weight tiny MiMo-V2.5 checkpoint, renders the Triton repository for it, starts `tritonserver`
through the project launcher on free ports, sends one request with a generated PNG and a generated WAV tone,
prints the reply as it streams in with its timings, and stops the server. The reply is gibberish: the weights are
random. Exits non-zero if any stage fails (the server log is printed then).

`--epd` runs the disaggregated layout instead: two encoder servers (`--role encoder`) and one language server
(`--role language`, listing them), the same request sent to the language server, then which encoder server encoded
which item (the line the language server logs per request, `mimo.serving.language.describe_origins`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builders.repository import RepositorySettings, render_repository
from builders.tiny import build_checkpoint
from client import GenerationSummary, MiMoClient
from client.sample_media import sample_image, sample_tone
from mimo.serving.language import ORIGINS_PREFIX
from tools.server_process import TritonServer, start_together

QUESTION = "Describe the picture, then the sound."
ENCODER_SERVERS = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--epd", action="store_true", help="two encoder servers and one language server instead of "
                                                           "the colocated one")  # fmt: skip
    args = parser.parse_args(argv)

    print(f"[1/4] tiny checkpoint -> {args.workdir / 'checkpoint'}", flush=True)
    checkpoint = build_checkpoint(args.workdir / "checkpoint")
    servers = epd_servers(args.workdir, checkpoint, args.device) if args.epd else colocated_server(
        args.workdir, checkpoint, args.device)  # fmt: skip
    *encoders, server = servers
    what = "tritonserver" if len(servers) == 1 else f"{len(servers)} tritonserver processes"
    print(f"[3/4] starting {what} (log: {', '.join(str(s.log_path) for s in servers)})", flush=True)
    try:
        start_together(encoders)  # the encoder servers load at once, then the language server that lists them
        server.start()
    except (RuntimeError, TimeoutError) as error:
        print(error, file=sys.stderr)
        for each in encoders:
            each.stop()
        return 1
    returncodes = []
    try:
        print(f"[4/4] gRPC {server.grpc_url}: image + audio + {QUESTION!r}\n", flush=True)
        with MiMoClient(server.grpc_url, "grpc") as client:
            for item in client.generate(QUESTION, images=[sample_image()], audios=[sample_tone()],
                                        max_tokens=args.max_tokens, temperature=0.0):  # fmt: skip
                if isinstance(item, GenerationSummary):
                    print(f"\n\n{item.summary_line()}")
                else:
                    print(item, end="", flush=True)
        if encoders:
            print_origins(server, encoders)
    finally:
        for each in reversed(servers):
            returncodes.append(each.stop())
    print(f"tritonserver stopped (exit status {', '.join(map(str, returncodes))})")
    return 0 if not any(returncodes) else 1


def colocated_server(workdir: Path, checkpoint: Path, device: str) -> list[TritonServer]:
    repository = workdir / "model_repository"
    command = render_repository(RepositorySettings(checkpoint=checkpoint, device=device), repository)
    print(f"[2/4] model repository -> {repository}", flush=True)
    return [TritonServer(repository, workdir / "tritonserver.log", extra_args=command[2:])]


def epd_servers(workdir: Path, checkpoint: Path, device: str) -> list[TritonServer]:
    """The encoder servers (one repository, one process each) and the language server that lists them, last."""
    repository = workdir / "encoder_repository"
    command = render_repository(RepositorySettings(checkpoint=checkpoint, device=device, role="encoder"), repository)
    encoders = [TritonServer(repository, workdir / f"encoder{index}.log", extra_args=command[2:])
                for index in range(ENCODER_SERVERS)]  # fmt: skip
    language_repository = workdir / "language_repository"
    urls = ",".join(encoder.grpc_url for encoder in encoders)
    command = render_repository(RepositorySettings(checkpoint=checkpoint, device=device, role="language",
                                                   encoder_urls=urls), language_repository)  # fmt: skip
    print(f"[2/4] model repositories -> {repository} ({ENCODER_SERVERS} encoder servers: {urls}), "
          f"{language_repository} (the language server)", flush=True)  # fmt: skip
    return [*encoders, TritonServer(language_repository, workdir / "language.log", extra_args=command[2:])]


def print_origins(language: TritonServer, encoders: list[TritonServer]) -> None:
    """Which encoder server encoded which item of the request, from the language server's log line."""
    names = {encoder.grpc_url: f"encoder server {index} ({encoder.grpc_url})" for index, encoder in enumerate(encoders)}
    lines = [line for line in language.log().splitlines() if ORIGINS_PREFIX in line]
    if not lines:
        print("the language server logged no item origins", file=sys.stderr)
        return
    print("encoded by:")
    for part in lines[-1].split(ORIGINS_PREFIX, 1)[1].rstrip().rstrip('"').split(";"):  # Triton quotes the message
        item, _, origin = part.strip().partition(" <- ")
        print(f"  item {item}: {names.get(origin, origin)}")


if __name__ == "__main__":
    sys.exit(main())
