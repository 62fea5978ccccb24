"""What a served token costs beyond the engine: the engine alone vs the streamed gRPC path, tiny checkpoint.

The tiny model's arithmetic is microseconds, so a served token's time beyond an engine step is the serving path:
mimo_llm's generation loop and response sends, the loopback gRPC stream to the entry, the entry's detokenization
and send, the client's stream. Measured in one run:

  engine  `LLMEngine` with the served EngineConfig, in this process before the server starts: decode ms/step with 1
          and with C sequences, and closed-loop tokens/s at C (finished requests replaced at once, prefills
          included), the same prompt and max_tokens as the served requests;
  served  a real tritonserver over the rendered repository, text requests streamed over gRPC (`MiMoClient`): the
          inter-token latency at concurrency 1 (median over requests), and at each concurrency the streamed
          tokens/s of a closed loop (tokens that arrived inside the measured window, after a warm-up).

Overhead per token: at concurrency 1 the served ITL minus the engine's 1-sequence step; at concurrency C, per
sequence, C / served tok/s minus C / engine tok/s (both closed loops).

    python -m benchmarks.bench_serving_overhead                                   # CPU
    python -m benchmarks.bench_serving_overhead --device gpu --out artifacts/serving_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from builders.repository import RepositorySettings, render_repository
from builders.tiny import build_checkpoint
from client import GenerationSummary, MiMoClient
from mimo.config import MiMoV2Config
from mimo.engine import EngineConfig, LLMEngine, SamplingParams
from mimo.loading import load_language_model
from mimo.processing.processor import MiMoProcessor
from mimo.serving.preprocess import preprocess_request
from mimo.serving.triton_config import torch_dtype
from tools.server_process import TritonServer

TEXT = "Tell me a story about a lighthouse keeper."


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def served_prompt(checkpoint: Path, max_tokens: int, max_model_len: int) -> list[int]:
    """The prompt ids the server's preprocessing makes of TEXT (chat template and all)."""
    inputs = {"text_input": np.array([[TEXT.encode()]], dtype=np.object_),
              "max_tokens": np.array([[max_tokens]], dtype=np.int64)}  # fmt: skip
    outputs = preprocess_request(MiMoProcessor.from_checkpoint(checkpoint), inputs, max_model_len)
    return outputs["input_ids"][0].tolist()


def engine_decode_step_ms(engine: LLMEngine, prompt: list[int], batch: int, max_tokens: int,
                          device: torch.device) -> float:  # fmt: skip
    """Mean decode step with `batch` sequences, from the step after every sequence has its first token."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)  # no end_id: every sequence runs its length
    started = {f"decode-{batch}-{i}" for i in range(batch)}
    for request_id in started:
        engine.add_request(request_id, prompt, sampling)
    while started:
        started -= {output.request_id for output in engine.step() if output.new_token_ids}
    synchronize(device)
    steps, t0 = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    synchronize(device)
    return 1e3 * (time.perf_counter() - t0) / max(1, steps)


def engine_closed_loop_tok_s(engine: LLMEngine, prompt: list[int], concurrency: int, max_tokens: int,
                             device: torch.device, steps: int) -> float:  # fmt: skip
    """Tokens/s with `concurrency` requests always in flight (a finished one replaced at once), over `steps` steps
    after one round of requests."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    count = 0

    def add() -> None:
        nonlocal count
        engine.add_request(f"loop-{concurrency}-{count}", prompt, sampling)
        count += 1

    for _ in range(concurrency):
        add()
    tokens = measured = 0
    t0 = None
    while measured < steps:
        if t0 is None and count >= 2 * concurrency:  # past the first round: the batch mixes prefills and decodes
            synchronize(device)
            t0 = time.perf_counter()
        for output in engine.step():
            if t0 is not None:
                tokens += len(output.new_token_ids)
            if output.finished:
                add()
        measured += t0 is not None
    synchronize(device)
    tok_s = tokens / (time.perf_counter() - t0)
    for request_id in [f"loop-{concurrency}-{i}" for i in range(count)]:
        engine.abort(request_id)
    engine.step()
    return tok_s


def measure_engine(checkpoint: Path, knobs: dict, dtype: torch.dtype, device: torch.device, prompt: list[int],
                   args: argparse.Namespace) -> dict:  # fmt: skip
    model = load_language_model(checkpoint, dtype, device)
    engine = LLMEngine(model, EngineConfig(**knobs, device=device, dtype=dtype))
    engine_decode_step_ms(engine, prompt, 1, 8, device)  # warm-up: first calls stay out of the rows
    rows = {"decode_step_ms": {}, "closed_loop_tok_s": {}}
    for batch in sorted({1, *args.concurrency}):
        rows["decode_step_ms"][batch] = round(engine_decode_step_ms(engine, prompt, batch, args.max_tokens, device), 3)
        print(f"engine: {batch} sequences decode {rows['decode_step_ms'][batch]} ms/step", flush=True)
    for concurrency in args.concurrency:
        steps = max(args.engine_steps, 2 * args.max_tokens)
        tok_s = engine_closed_loop_tok_s(engine, prompt, concurrency, args.max_tokens, device, steps)
        rows["closed_loop_tok_s"][concurrency] = round(tok_s, 1)
        print(f"engine: closed loop of {concurrency} requests {tok_s:.1f} tok/s", flush=True)
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def inter_token_ms(summary: GenerationSummary) -> float | None:
    """Mean gap between tokens after the first, from the arrival times of the responses that carried them."""
    carrying = [(at, n) for at, n in summary.arrivals if n]
    tokens = sum(n for _, n in carrying)
    if tokens < 2:
        return None
    return 1e3 * (carrying[-1][0] - carrying[0][0]) / (tokens - 1)


def served_itl(url: str, requests: int, max_tokens: int) -> dict:
    """Concurrency 1: one request after the other; the median ITL, TTFT, and tokens per response."""
    itl, ttft, tokens, responses = [], [], 0, 0
    with MiMoClient(url, "grpc") as client:
        for _ in range(requests):
            *_, summary = client.generate(TEXT, max_tokens=max_tokens, temperature=0.0)
            ttft.append(1e3 * summary.ttft_s)
            tokens += len(summary.token_ids)
            responses += sum(1 for _, n in summary.arrivals if n)
            if (gap := inter_token_ms(summary)) is not None:
                itl.append(gap)
    return {"itl_median_ms": round(statistics.median(itl), 3), "itl_min_ms": round(min(itl), 3),
            "ttft_median_ms": round(statistics.median(ttft), 2), "tokens_per_response": round(tokens / responses, 2),
            "requests": requests}  # fmt: skip


def served_throughput(url: str, concurrency: int, max_tokens: int, warmup_s: float, duration_s: float) -> dict:
    """A closed loop of `concurrency` clients: tokens/s of the tokens that arrived inside the measured window."""
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + duration_s)
    arrivals: list[tuple[float, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with MiMoClient(url, "grpc") as client:
            while time.perf_counter() < window[1]:
                sent = time.perf_counter()
                try:
                    *_, summary = client.generate(TEXT, max_tokens=max_tokens, temperature=0.0)
                except Exception as error:  # noqa: BLE001 - counted, reported
                    with lock:
                        errors.append(f"{type(error).__name__}: {error}")
                    return
                with lock:
                    arrivals.extend((sent + at, n) for at, n in summary.arrivals if n)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tokens = sum(n for at, n in arrivals if window[0] <= at < window[1])
    responses = sum(1 for at, n in arrivals if window[0] <= at < window[1])
    return {"concurrency": concurrency, "tok_s": round(tokens / duration_s, 1),
            "tokens_per_response": round(tokens / max(1, responses), 2), "errors": len(errors),
            "first_errors": errors[:3]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 64])
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--itl-requests", type=int, default=16, help="sequential requests for the concurrency-1 ITL")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="closed loops: seconds before the window")
    parser.add_argument("--duration-s", type=float, default=10.0, help="closed loops: the measured window")
    parser.add_argument("--engine-steps", type=int, default=64, help="engine closed loops: measured steps at least")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of this process and the server's stubs (OMP_NUM_THREADS); "
                             "default: 1 with --device cpu (the tiny model's ops are microseconds: more threads only "
                             "synchronise), torch's own on gpu")
    parser.add_argument("--skip-engine", action="store_true", help="served rows only")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/serving_overhead"))
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the server's stubs inherit it

    checkpoint = build_checkpoint(args.workdir / "checkpoint")
    settings = RepositorySettings(checkpoint=checkpoint, device=args.device,
                                  engine={"max_num_seqs": max(args.concurrency)})  # fmt: skip
    knobs = settings.engine_knobs(MiMoV2Config.from_pretrained(checkpoint))
    device = torch.device("cuda", settings.llm_gpus[0]) if args.device == "gpu" else torch.device("cpu")
    dtype = torch_dtype(settings.resolved_dtype)
    prompt = served_prompt(checkpoint, args.max_tokens, knobs["max_model_len"])
    report = {"device": args.device, "prompt_tokens": len(prompt), "max_tokens": args.max_tokens,
              "torch_threads": torch.get_num_threads()}  # fmt: skip
    if not args.skip_engine:
        report["engine"] = measure_engine(checkpoint, knobs, dtype, device, prompt, args)

    command = render_repository(settings, args.workdir / "model_repository")
    server = TritonServer(args.workdir / "model_repository", args.workdir / "tritonserver.log",
                          extra_args=command[2:]).start()  # fmt: skip
    try:
        with MiMoClient(server.grpc_url, "grpc") as client:  # warm-up: first calls are not the load
            list(client.generate(TEXT, max_tokens=4, temperature=0.0))
        report["served_c1"] = served_itl(server.grpc_url, args.itl_requests, args.max_tokens)
        print(f"served: concurrency 1 {json.dumps(report['served_c1'])}", flush=True)
        report["served"] = []
        for concurrency in args.concurrency:
            row = served_throughput(server.grpc_url, concurrency, args.max_tokens, args.warmup_s, args.duration_s)
            report["served"].append(row)
            print(f"served: {json.dumps(row)}", flush=True)
    finally:
        returncode = server.stop()
    print_summary(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 1 if returncode or any(row["errors"] for row in report["served"]) else 0


def print_summary(report: dict) -> None:
    engine = report.get("engine")
    c1 = report["served_c1"]
    print(f"\n{report['device']}: prompt {report['prompt_tokens']} tokens, {report['max_tokens']} tokens per request")
    line = f"concurrency 1: served ITL {c1['itl_median_ms']} ms"
    if engine:
        step = engine["decode_step_ms"][1]
        line += f", engine step {step} ms, overhead {c1['itl_median_ms'] - step:.3f} ms/token"
    print(line)
    print("| concurrency | served tok/s | tokens/response | engine tok/s (closed loop) | engine decode ms/step "
          "| overhead ms/token per sequence |\n|---|---|---|---|---|---|")
    for row in report["served"]:
        c = row["concurrency"]
        if engine:
            engine_tok_s = engine["closed_loop_tok_s"][c]
            overhead = 1e3 * c * (1 / row["tok_s"] - 1 / engine_tok_s) if row["tok_s"] else float("nan")
            print(f"| {c} | {row['tok_s']} | {row['tokens_per_response']} | {engine_tok_s} "
                  f"| {engine['decode_step_ms'][c]} | {overhead:.3f} |")
        else:
            print(f"| {c} | {row['tok_s']} | {row['tokens_per_response']} | — | — | — |")


if __name__ == "__main__":
    sys.exit(main())
