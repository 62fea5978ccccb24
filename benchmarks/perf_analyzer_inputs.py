"""Write perf_analyzer `--input-data` JSON for the streaming ensemble: text plus one image per request.

    python -m benchmarks.perf_analyzer_inputs --out artifacts/ensemble_inputs.json [--requests 8] [--max-tokens 64]

Then, against a running server (gRPC; a decoupled ensemble needs --async --streaming, and perf_analyzer then
measures latency to the first response, i.e. time to first token):

    perf_analyzer -m ensemble -i grpc -u localhost:8001 --async --streaming \\
        --input-data artifacts/ensemble_inputs.json --concurrency-range 1:16:2 \\
        --measurement-mode count_windows --measurement-request-count 32 --collect-metrics --verbose-csv \\
        -f artifacts/ensemble_perf.csv

perf_analyzer converts each `content` to the dtype the model declares (INT64 `max_tokens`). Requests cycle through
the entries round robin. Each entry has a different image size (so the encoder sees
different token counts) and a different prompt length. BYTES tensors given as `b64` are sent as-is, so the image
is stored in Triton's serialized form (a 4-byte little-endian length before each element).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np
from tritonclient.utils import serialize_byte_tensor

from client.sample_media import sample_image

IMAGE_SIZES = [(224, 224), (320, 240), (448, 448), (640, 480)]


def ensemble_inputs(requests: int, max_tokens: int, with_image: bool = True) -> dict:
    entries = []
    for i in range(requests):
        size = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        image = sample_image(((40 * i) % 256, 120, 200), size)
        text = "Describe this image in detail." + " Mention every colour you see." * (i % 3)
        entry = {
            "text_input": {"content": [text], "shape": [1]},
            "max_tokens": {"content": [max_tokens], "shape": [1]},
            "temperature": {"content": [0.0], "shape": [1]},
            "stream": {"content": [True], "shape": [1]},
        }
        if with_image:
            entry["image_bytes_input"] = {
                "b64": base64.b64encode(serialize_byte_tensor(np.array([image], dtype=np.object_)).item()).decode(),
                "shape": [1],
            }
        entries.append(entry)
    return {"data": entries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=8, help="distinct requests (used round robin)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--text-only", action="store_true", help="no image (the baseline for the encoder's cost)")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(ensemble_inputs(args.requests, args.max_tokens, with_image=not args.text_only)))
    print(f"wrote {args.requests} requests to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
