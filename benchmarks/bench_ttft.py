"""Time to first token under open-loop multimodal load: Poisson arrivals of requests with a random number of images.

The seeds' EPD table (`../shared/seeds/003_*`): requests of 1-8 images of 1920x1080, a short text, 16 output
tokens, Poisson arrivals at fixed rates, the same request stream (same seed) for every configuration; mean, median
and P99 TTFT, images/s and requests/s per configuration and rate. The stream depends only on --seed, --images and
--image-size, so two configurations given the same flags get the same requests in the same order at the same times.

    # against a running server (any layout: colocated ensemble, or a language server with encoder servers)
    python -m benchmarks.bench_ttft --url localhost:8001 --rates 0.5,1,2 --requests 64
    # the colocated layout started here (random weights, real encoder widths on a GPU machine)
    python -m benchmarks.bench_ttft --launch colocated --device gpu --preset v2.5 --layers 2 --rates 1,2,4
    python -m benchmarks.bench_ttft --launch epd --encoders 3 --device gpu --preset v2.5 --layers 2 --rates 1,2,4
    # one GPU: the encoder server beside the language model; sequential requests of 1, 2, 4, 8 images
    python -m benchmarks.bench_ttft --launch epd --encoders 1 --encoder-gpus 0 --device gpu --preset v2.5 \
        --layers 2 --sequential 1,2,4,8
    # the same launch, then a burst: 16 requests of 1-8 images arriving at once
    python -m benchmarks.bench_ttft --launch colocated --device gpu --checkpoint ... --sequential 1,8 \
        --rates 1000 --requests 16 --images 1-8
    # image-light traffic (0-1 small images): where disaggregation stops paying
    python -m benchmarks.bench_ttft --url ... --images 0-1 --image-size 448x448

Each request's images are distinct (no cache or dedup can serve one request from another's), drawn from a pool of
seeded noise-and-gradient JPEGs. A request that fails counts as an error, not as a latency.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from client import GenerationSummary, MiMoClient

TEXT = "Describe these images in one sentence."


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
    at_s: float  # arrival time after the start of its rate's run
    images: tuple[int, ...]  # indices into the image pool


@dataclasses.dataclass
class RateResult:
    rate: float
    requests: int
    errors: list[str]
    ttft_s: list[float]
    images: int  # images of the requests that completed
    wall_s: float  # first arrival -> last completion

    def summary(self) -> dict:
        done = len(self.ttft_s)
        ttft = sorted(self.ttft_s)
        return {
            "rate_rps": self.rate, "requests": self.requests, "completed": done, "errors": len(self.errors),
            "ttft_mean_ms": 1000 * statistics.fmean(ttft) if ttft else None,
            "ttft_median_ms": 1000 * statistics.median(ttft) if ttft else None,
            "ttft_p99_ms": 1000 * percentile(ttft, 0.99) if ttft else None,
            "requests_per_s": done / self.wall_s if self.wall_s > 0 else None,
            "images_per_s": self.images / self.wall_s if self.wall_s > 0 else None,
            "first_errors": self.errors[:3],
        }  # fmt: skip


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(0, min(len(sorted_values) - 1, int(np.ceil(q * len(sorted_values))) - 1))
    return sorted_values[rank]


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    low, high = int(low), int(high or low)
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH with 0 <= LOW <= HIGH, got {text!r}")
    return low, high


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def image_pool(count: int, size: tuple[int, int], seed: int) -> list[bytes]:
    """`count` distinct JPEGs: a gradient (so resizing has structure to keep) plus seeded noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pool = []
    for _ in range(count):
        noise = rng.integers(0, 64, (height, width, 3), dtype=np.uint8)
        pixels = np.clip(ramp * rng.uniform(0.3, 1.0, 3) + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        pool.append(buffer.getvalue())
    return pool


def plan(rate: float, requests: int, images: tuple[int, int], pool_size: int, seed: int) -> list[PlannedRequest]:
    """The request stream of one rate: exponential gaps, uniform image counts, images not repeated in a request."""
    rng = random.Random(f"{seed}-{rate}")
    at, planned = 0.0, []
    for _ in range(requests):
        count = rng.randint(*images)
        planned.append(PlannedRequest(at, tuple(rng.sample(range(pool_size), count))))
        at += rng.expovariate(rate)
    return planned


def run_rate(url: str, rate: float, planned: list[PlannedRequest], pool: list[bytes], max_tokens: int,
             timeout_s: float) -> RateResult:  # fmt: skip
    """Sends the planned stream open-loop (each request on its own thread at its arrival time)."""
    result = RateResult(rate, len(planned), [], [], 0, 0.0)
    lock = threading.Lock()
    ends: list[float] = []

    def send(request: PlannedRequest) -> None:
        try:
            with MiMoClient(url, "grpc", response_timeout_s=timeout_s) as client:
                *_, summary = client.generate(TEXT, images=[pool[i] for i in request.images], max_tokens=max_tokens,
                                              temperature=0.0)  # fmt: skip
            assert isinstance(summary, GenerationSummary)
            with lock:
                result.ttft_s.append(summary.ttft_s)
                result.images += len(request.images)
        except Exception as error:  # noqa: BLE001 - refusals, timeouts (queue.Empty), lost connections alike
            with lock:
                result.errors.append(f"{type(error).__name__}: {error}")
        finally:
            with lock:
                ends.append(time.monotonic())

    threads = []
    start = time.monotonic()
    for request in planned:
        delay = start + request.at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=send, args=(request,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    result.wall_s = (max(ends) if ends else start) - start
    return result


STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def model_statistics(urls: list[str]) -> dict[str, dict[str, int]]:
    """'server/model' -> executions and the summed ns of each of Triton's stages, from every server's statistics."""
    import tritonclient.grpc as grpcclient

    totals = {}
    for index, url in enumerate(urls):
        with grpcclient.InferenceServerClient(url) as client:
            for model in client.get_inference_statistics(as_json=True).get("model_stats", []):
                stats = model.get("inference_stats", {})
                entry = {"count": int(stats.get("success", {}).get("count", 0))}
                entry.update({stage: int(stats.get(stage, {}).get("ns", 0)) for stage in STAGES})
                totals[f"{index}/{model['name']}"] = entry
    return totals


def stage_split(before: dict, after: dict, requests: int) -> dict[str, dict[str, float]]:
    """Per model that ran between two `model_statistics`: its executions and ms per client request per stage."""
    split = {}
    for name, stats in after.items():
        old = before.get(name, {})
        count = stats["count"] - old.get("count", 0)
        if count:
            split[name] = {"executions": count, **{f"{stage}_ms": round((stats[stage] - old.get(stage, 0)) / 1e6 /
                                                                        requests, 3) for stage in STAGES}}  # fmt: skip
    return split


def run_sequential(url: str, counts: list[int], repeats: int, pool: list[bytes], max_tokens: int,
                   timeout_s: float, stats_urls: list[str]) -> list[dict]:  # fmt: skip
    """Closed loop, one request at a time: for each image count, one untimed request (a new total patch count may
    compile new kernels), then `repeats` timed ones, each with images no other request of the count used. Each row
    splits the timed requests' server time by model and Triton stage (`stats_urls`: every server of the layout)."""
    rows = []
    with MiMoClient(url, "grpc", response_timeout_s=timeout_s) as client:
        for count in counts:
            ttft = []
            for attempt in range(repeats + 1):
                if attempt == 1:
                    before = model_statistics(stats_urls)
                images = [pool[(attempt * count + i) % len(pool)] for i in range(count)]
                *_, summary = client.generate(TEXT, images=images, max_tokens=max_tokens, temperature=0.0)
                if attempt:
                    ttft.append(summary.ttft_s)
            rows.append({"images": count, "requests": repeats, "ttft_median_ms": 1000 * statistics.median(ttft),
                         "ttft_mean_ms": 1000 * statistics.fmean(ttft), "ttft_min_ms": 1000 * min(ttft),
                         "ttft_max_ms": 1000 * max(ttft),
                         "server_ms_per_request": stage_split(before, model_statistics(stats_urls), repeats)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


class GpuUtilization:
    """Mean utilization per GPU over a run, from `nvidia-smi` sampled every 200 ms (absent without nvidia-smi)."""

    def __init__(self):
        self.samples: dict[int, list[float]] = {}
        self._process = None
        self._reader = None

    def __enter__(self) -> GpuUtilization:
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, text=True)  # fmt: skip
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            index, _, value = line.partition(",")
            if value.strip():
                self.samples.setdefault(int(index), []).append(float(value))

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()

    def means(self) -> dict[str, float]:
        return {f"gpu{index}": statistics.fmean(values) for index, values in sorted(self.samples.items()) if values}


def engine_knob(text: str) -> tuple[str, int]:
    """`--engine NAME=VALUE`: a served EngineConfig knob (`python -m builders repository --help` lists them)."""
    from mimo.engine import engine_knobs

    name, _, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if name not in engine_knobs():
        raise argparse.ArgumentTypeError(f"{name!r} is not an EngineConfig knob ({', '.join(engine_knobs())})")
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--engine {text!r}: the value must be an int") from None


def served_engine(args, checkpoint) -> dict[str, int]:
    from mimo.config import MiMoV2Config

    knobs = {"max_model_len": min(args.max_model_len, MiMoV2Config.from_pretrained(checkpoint).max_position_embeddings)}
    return knobs | dict(args.engine)


def launch_colocated(args, workdir: Path):
    from builders.repository import RepositorySettings, render_repository
    from builders.tiny import build_checkpoint
    from tools.server_process import TritonServer

    checkpoint = args.checkpoint or build_checkpoint(workdir / "checkpoint", preset=args.preset, num_layers=args.layers)
    settings = RepositorySettings(checkpoint=checkpoint, device=args.device, engine=served_engine(args, checkpoint))
    command = render_repository(settings, workdir / "model_repository")
    return TritonServer(workdir / "model_repository", workdir / "tritonserver.log", extra_args=command[2:]).start()


class Layout:
    """Servers started together, stopped in reverse order; clients call the last one (the language server)."""

    def __init__(self, servers):
        self.servers = servers
        self.grpc_url = servers[-1].grpc_url

    def stop(self) -> int:
        return max(server.stop() for server in reversed(self.servers))


def launch_epd(args, workdir: Path):
    """`--encoders N` encoder servers (with --device gpu on GPUs 1..N, or round robin over --encoder-gpus; the
    language model on GPU 0) and one language server listing them."""
    from builders.repository import RepositorySettings, render_repository
    from builders.tiny import build_checkpoint
    from tools.server_process import TritonServer, start_together

    checkpoint = args.checkpoint or build_checkpoint(workdir / "checkpoint", preset=args.preset, num_layers=args.layers)
    servers = []
    try:
        for index in range(args.encoders):
            root = workdir / f"encoder{index}"
            encoder_gpus = args.encoder_gpus or tuple(range(1, args.encoders + 1))
            gpus = {"encoder_gpus": (encoder_gpus[index % len(encoder_gpus)],)} if args.device == "gpu" else {}
            command = render_repository(RepositorySettings(checkpoint=checkpoint, device=args.device, role="encoder",
                                                           **gpus), root / "model_repository")  # fmt: skip
            servers.append(TritonServer(root / "model_repository", root / "tritonserver.log", extra_args=command[2:]))
        start_together(servers)  # the encoder servers load at once
        root = workdir / "language"
        settings = RepositorySettings(checkpoint=checkpoint, device=args.device, role="language",
                                      encoder_urls=",".join(server.grpc_url for server in servers),
                                      engine=served_engine(args, checkpoint))  # fmt: skip
        command = render_repository(settings, root / "model_repository")
        servers.append(TritonServer(root / "model_repository", root / "tritonserver.log",
                                    extra_args=command[2:]).start())  # fmt: skip
    except BaseException:
        for server in reversed(servers):
            server.stop()
        raise
    return Layout(servers)


LAUNCHERS = {"colocated": launch_colocated, "epd": launch_epd}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="gRPC address of a running server's entry model")
    target.add_argument("--launch", choices=sorted(LAUNCHERS), help="start this layout here first")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=None,
                        help="request rates (requests/s), comma-separated (default 1, or none with --sequential)")
    parser.add_argument("--requests", type=int, default=64, help="requests per rate")
    parser.add_argument("--images", type=parse_range, default=(1, 8), help="images per request, LOW-HIGH")
    parser.add_argument("--image-size", type=parse_size, default=(1920, 1080), help="WIDTHxHEIGHT")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for one response")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="with --launch")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="with --launch: serve this checkpoint instead of building one (--preset, --layers)")
    parser.add_argument("--preset", default="tiny", help="with --launch: builders tiny --preset (tiny | v2.5)")
    parser.add_argument("--layers", type=int, default=None, help="with --launch: builders tiny --layers")
    parser.add_argument("--engine", type=engine_knob, action="append", default=[], metavar="KNOB=VALUE",
                        help="with --launch: a served EngineConfig knob, e.g. max_num_batched_tokens=8192 (repeatable)")
    parser.add_argument("--max-model-len", type=int, default=32768,
                        help="with --launch: the language model's context, at most the checkpoint's (8 images of "
                             "1920x1080 are 16,320 tokens)")
    parser.add_argument("--encoders", type=int, default=2, help="with --launch epd: encoder servers")
    parser.add_argument("--encoder-gpus", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                        help="with --launch epd --device gpu: GPU ids the encoder servers take in turn (default "
                             "1..N; 0 puts them beside the language model on a one-GPU machine)")
    parser.add_argument("--sequential", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="one request at a time with each of these image counts, e.g. 1,2,4,8 (before --rates)")
    parser.add_argument("--repeats", type=int, default=5, help="with --sequential: timed requests per image count")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench_ttft"))
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)

    pool_size = max(args.images[1], *(args.sequential or [1])) * 4
    pool = image_pool(pool_size, args.image_size, args.seed)
    server = LAUNCHERS[args.launch](args, args.workdir) if args.launch else None
    url = server.grpc_url if server else args.url
    try:
        with MiMoClient(url, "grpc") as client:  # one warm-up request: first-call compilation is not the load
            list(client.generate(TEXT, images=pool[:1], max_tokens=2, temperature=0.0))
        rows = []
        if args.sequential:
            stats_urls = [s.grpc_url for s in getattr(server, "servers", [server])] if server else [url]
            rows = run_sequential(url, args.sequential, args.repeats, pool, args.max_tokens, args.timeout_s, stats_urls)
        for rate in args.rates or ([] if args.sequential else [1.0]):
            planned = plan(rate, args.requests, args.images, pool_size, args.seed)
            with GpuUtilization() as gpus:
                result = run_rate(url, rate, planned, pool, args.max_tokens, args.timeout_s)
            rows.append({**result.summary(), "gpu_utilization_pct": gpus.means()})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            server.stop()
    servers = f"{args.encoders} encoder server{'s' if args.encoders != 1 else ''}"
    layout = f"epd ({servers})" if args.launch == "epd" else args.launch
    report = {"layout": layout or args.url, "images": args.images, "image_size": args.image_size,
              "max_tokens": args.max_tokens, "seed": args.seed, "rows": rows}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 1 if any(row.get("errors") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
