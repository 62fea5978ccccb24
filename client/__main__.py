"""python -m client --url localhost:8001 --text "Describe it." --image cat.png [--audio a.wav] [--video v.mp4] ...

Prints the reply as it streams in, then a timing summary (time to first token, tokens/s).
"""

import argparse
import sys
from pathlib import Path

from client.mimo_client import GenerationError, GenerationSummary, MiMoClient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="host:port of the gRPC (or HTTP) endpoint")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--text", required=True, help="the user message")
    parser.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    parser.add_argument("--audio", type=Path, action="append", default=[], help="audio file (repeatable)")
    parser.add_argument("--video", type=Path, action="append", default=[], help="video file (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop word (repeatable)")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="one response at the end")
    parser.add_argument("--shared-memory", choices=("none", "system", "cuda"), default="none",
                        help="send media through a registered shared-memory region")
    return parser.parse_args(argv)


def read(paths: list[Path]) -> list[bytes]:
    return [path.read_bytes() for path in paths]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with MiMoClient(args.url, args.protocol, args.model, args.shared_memory) as client:
        try:
            for item in client.generate(
                args.text, images=read(args.image), audios=read(args.audio), videos=read(args.video),
                max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, stop_words=args.stop, stream=args.stream,
            ):  # fmt: skip
                if isinstance(item, GenerationSummary):
                    print(f"\n{item.summary_line()}")
                else:
                    print(item, end="", flush=True)
        except (GenerationError, ValueError) as error:
            print(f"\nerror: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
