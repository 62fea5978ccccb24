"""perf_analyzer against the streaming ensemble: text + image requests vs text-only requests, same server, same run.

    python -m benchmarks.perf_analyzer_run --device gpu --out artifacts/perf [--concurrency 1,4,16]

Builds the tiny checkpoint, renders the repository, starts `tritonserver` through the project launcher, writes both
`--input-data` files (benchmarks/perf_analyzer_inputs.py), runs perf_analyzer (`$PERF_ANALYZER` or `perf_analyzer`
on PATH; it needs glibc >= 2.38) with `--async --streaming -i grpc` at each concurrency, prints one summary line per
run and keeps the CSVs. Over gRPC streaming perf_analyzer times the FIRST response of each request, i.e. time to
first token; the text-only run is the baseline that isolates what image decode + patchify + the vision tower add.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from perf_analyzer_inputs import ensemble_inputs  # benchmarks/, beside this script

from builders.repository import RepositorySettings, render_repository
from builders.tiny import build_checkpoint
from tools.server_process import TritonServer


def perf_analyzer_binary() -> str:
    binary = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not binary:
        raise SystemExit("perf_analyzer not found: set PERF_ANALYZER or put it on PATH (it needs glibc >= 2.38)")
    return binary


def run_perf_analyzer(binary: str, grpc_url: str, inputs: Path, concurrency: int, csv_path: Path) -> dict:
    command = [
        binary, "-m", "ensemble", "-i", "grpc", "-u", grpc_url, "--async", "--streaming",
        "--input-data", str(inputs), "--concurrency-range", str(concurrency),
        "--measurement-mode", "count_windows", "--measurement-request-count", str(max(16, 4 * concurrency)),
        "--stability-percentage", "25", "--max-trials", "6", "-f", str(csv_path),
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    csv_path.unlink(missing_ok=True)
    run = subprocess.run(command, capture_output=True, text=True)
    print(run.stdout, end="", flush=True)
    if run.returncode != 0 or not csv_path.exists():
        # e.g. "Failed to obtain stable measurement within 6 measurement windows": recorded, not raised
        lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "stable" in line.lower()), lines[-1] if lines else "")
        return {"concurrency": concurrency, "error": f"perf_analyzer exited {run.returncode}: {reason}"}
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    return {
        "concurrency": concurrency,
        "inferences_per_s": float(row["Inferences/Second"]),
        "ttft_p50_ms": int(row["p50 latency"]) / 1e3,
        "ttft_p90_ms": int(row["p90 latency"]) / 1e3,
        "ttft_p99_ms": int(row["p99 latency"]) / 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    parser.add_argument("--out", type=Path, default=Path("artifacts/perf"))
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    binary = perf_analyzer_binary()
    args.out.mkdir(parents=True, exist_ok=True)

    checkpoint = build_checkpoint(args.out / "checkpoint")
    command = render_repository(RepositorySettings(checkpoint=checkpoint, device=args.device), args.out / "repository")
    inputs = {"text+image": args.out / "inputs_image.json", "text-only": args.out / "inputs_text.json"}
    for kind, path in inputs.items():
        requests = ensemble_inputs(8, args.max_tokens, with_image=kind == "text+image")
        path.write_text(json.dumps(requests))

    server = TritonServer(args.out / "repository", args.out / "tritonserver.log", extra_args=command[2:]).start()
    results = []
    try:
        for concurrency in args.concurrency:
            for kind, path in inputs.items():
                result = run_perf_analyzer(binary, server.grpc_url, path, concurrency,
                                           args.out / f"perf_{kind.replace('+', '_')}_c{concurrency}.csv")
                results.append({"requests": kind, **result})
                print(results[-1], flush=True)
    finally:
        returncode = server.stop()
    print(f"tritonserver stopped (exit status {returncode})")
    print("\n| requests | concurrency | inferences/s | TTFT p50 ms | p90 ms | p99 ms |\n|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['requests']} | {r['concurrency']} | — | — | — | {r['error']} |")
            continue
        print(f"| {r['requests']} | {r['concurrency']} | {r['inferences_per_s']:.1f} | {r['ttft_p50_ms']:.1f} "
              f"| {r['ttft_p90_ms']:.1f} | {r['ttft_p99_ms']:.1f} |")
    return 1 if all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
