"""What a served token costs beyond the engine: the engine alone vs the streamed gRPC path, tiny checkpoint.

The tiny model's arithmetic is microseconds, so a served token's time beyond an engine step is the serving path:
mimo_llm's generation loop and response sends, the loopback gRPC stream to the entry, the entry's detokenization
and send, the client's stream. Measured in one run:

  engine  `LLMEngine` with the served EngineConfig, in this process before the server starts: decode ms/step with 1
          and with C sequences, and closed-loop tokens/s and CPU ms/token at C (finished requests replaced at once,
          prefills included), the same prompt and max_tokens as the served requests;
  served  a real tritonserver over the rendered repository, text requests streamed over gRPC (`MiMoClient`): the
          inter-token latency at concurrency 1 (median over requests), and at each concurrency the streamed
          tokens/s of a closed loop (tokens that arrived inside the measured window, after a warm-up), the tokens
          per response, and the CPU ms per token of every server process (tritonserver, each model's stubs) and of
          the clients over the window (`--client-processes`: a Python gRPC client handles a few thousand
          responses/s).

Overhead per token: at concurrency 1 the served ITL minus the engine's 1-sequence step; at concurrency C, per
sequence, C / served tok/s minus C / engine tok/s (both closed loops); and in CPU, the server's processes per
token minus the engine's own. Wall-clock rows of the engine and the server are minutes apart: on a loaded machine
compare the CPU table.

    python -m benchmarks.bench_serving_overhead                                   # CPU
    python -m benchmarks.bench_serving_overhead --device gpu --out artifacts/serving_overhead.json
    python -m benchmarks.bench_serving_overhead --device gpu --skip-engine --concurrency 64 --py-spy artifacts/spy

`--py-spy DIR`: py-spy (on PATH) samples the stubs of the entry and mimo_llm over the last concurrency's window,
only while a thread holds the GIL (`--gil`): DIR gets each stub's folded stacks, and the summary what held it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_ttft import engine_knob
from builders.repository import RepositorySettings, render_repository
from builders.tiny import build_checkpoint
from client import GenerationSummary, MiMoClient
from mimo.config import MiMoV2Config
from mimo.engine import EngineConfig, LLMEngine, SamplingParams
from mimo.loading import load_language_model
from mimo.processing.processor import MiMoProcessor
from mimo.serving.preprocess import preprocess_request
from mimo.serving.triton_config import torch_dtype
from tools.server_process import TritonServer, descendants

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


def engine_closed_loop(engine: LLMEngine, prompt: list[int], concurrency: int, max_tokens: int,
                       device: torch.device, steps: int) -> tuple[float, float]:  # fmt: skip
    """(tokens/s, CPU ms per token) with `concurrency` requests always in flight (a finished one replaced at once),
    over `steps` steps after one round of requests."""
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
            t0, cpu0 = time.perf_counter(), time.process_time()
        for output in engine.step():
            if t0 is not None:
                tokens += len(output.new_token_ids)
            if output.finished:
                add()
        measured += t0 is not None
    synchronize(device)
    tok_s, cpu_ms = tokens / (time.perf_counter() - t0), 1e3 * (time.process_time() - cpu0) / tokens
    for request_id in [f"loop-{concurrency}-{i}" for i in range(count)]:
        engine.abort(request_id)
    engine.step()
    return tok_s, cpu_ms


def measure_engine(checkpoint: Path, knobs: dict, dtype: torch.dtype, device: torch.device, prompt: list[int],
                   args: argparse.Namespace) -> dict:  # fmt: skip
    model = load_language_model(checkpoint, dtype, device)
    engine = LLMEngine(model, EngineConfig(**knobs, device=device, dtype=dtype))
    engine_decode_step_ms(engine, prompt, 1, 8, device)  # warm-up: first calls stay out of the rows
    rows = {"decode_step_ms": {}, "closed_loop_tok_s": {}, "closed_loop_cpu_ms_per_token": {}}
    for batch in sorted({1, *args.concurrency}):
        rows["decode_step_ms"][batch] = round(engine_decode_step_ms(engine, prompt, batch, args.max_tokens, device), 3)
        print(f"engine: {batch} sequences decode {rows['decode_step_ms'][batch]} ms/step", flush=True)
    for concurrency in args.concurrency:
        steps = max(args.engine_steps, 2 * args.max_tokens)
        tok_s, cpu_ms = engine_closed_loop(engine, prompt, concurrency, args.max_tokens, device, steps)
        rows["closed_loop_tok_s"][concurrency] = round(tok_s, 1)
        rows["closed_loop_cpu_ms_per_token"][concurrency] = round(cpu_ms, 3)
        print(f"engine: closed loop of {concurrency} requests {tok_s:.1f} tok/s, {cpu_ms:.3f} CPU ms/token", flush=True)
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


class ProcessCPU:
    """CPU seconds used by the server's processes, by name (the tritonserver binary; each model's stubs): what each
    costs per token, independent of what else the machine runs."""

    def __init__(self, server: TritonServer):
        self.pids: dict[str, list[int]] = {}
        for pid in descendants(server.process.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if command[0].endswith(b"triton_python_backend_stub"):
                name = Path(command[1].decode()).parts[-3]  # <repository>/<model>/1/model.py
            elif command[0].endswith(b"tritonserver"):
                name = "tritonserver"
            else:
                continue
            self.pids.setdefault(name, []).append(pid)

    def sample(self) -> dict[str, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        seconds = {}
        for name, pids in self.pids.items():
            seconds[name] = 0.0
            for pid in pids:
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                seconds[name] += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        return seconds


class StubSampler:
    """py-spy over the entry's and mimo_llm's stubs (`ProcessCPU.pids`), GIL-holding samples only."""

    MODELS = ("ensemble", "mimo_llm")

    def __init__(self, cpu: ProcessCPU, out_dir: Path, rate: int = 200):
        self.out_dir, self.rate = out_dir, rate
        self.targets = [(name, pid) for name in self.MODELS for pid in cpu.pids.get(name, [])]
        self.runs: list[tuple[str, int, Path, subprocess.Popen]] = []

    def start(self, duration_s: float) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.targets:
            path = self.out_dir / f"{name}-{pid}.txt"
            command = ["py-spy", "record", "--gil", "--nonblocking", "--format", "raw", "--rate", str(self.rate),
                       "--duration", str(max(1, int(duration_s))), "--pid", str(pid), "--output", str(path)]
            self.runs.append((name, pid, path, subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                                                stderr=subprocess.PIPE, text=True)))

    def report(self, top: int = 20) -> dict:
        """Per stub: samples, and the functions that held the GIL, by own samples and by inclusive samples."""
        report = {}
        for name, pid, path, run in self.runs:
            _, err = run.communicate(timeout=120)
            failed = run.returncode or not path.exists()
            report[f"{name}-{pid}"] = ({"error": f"py-spy exit {run.returncode}: {err.strip()[-400:]}"} if failed
                                       else folded_summary(path.read_text(), top))  # fmt: skip
        return report


def folded_summary(folded: str, top: int) -> dict:
    """py-spy's raw (folded) stacks `frame;frame;... count`, root first -> the leaf frames with the most samples
    and the frames on the most stacks."""
    own, inclusive, total = Counter(), Counter(), 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)

    def share(counter: Counter) -> list[str]:
        return [f"{100 * n / max(1, total):5.1f}% {frame[:150]}" for frame, n in counter.most_common(top)]

    return {"samples": total, "own": share(own), "inclusive": share(inclusive)}


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


def client_process(url: str, clients: int, max_tokens: int, window: tuple[float, float]) -> dict:
    """`clients` closed-loop clients (threads of this process) until the window ends: every token-carrying
    response's arrival (`time.time()`, shared by processes) and token count, the errors, this process's CPU
    seconds inside the window."""
    arrivals: list[tuple[float, int]] = []
    errors: list[str] = []
    cpu: list[float] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with MiMoClient(url, "grpc") as client:
            while time.time() < window[1]:
                sent = time.time()
                try:
                    *_, summary = client.generate(TEXT, max_tokens=max_tokens, temperature=0.0)
                except Exception as error:  # noqa: BLE001 - counted, reported
                    with lock:
                        errors.append(f"{type(error).__name__}: {error}")
                    return
                with lock:
                    arrivals.extend((sent + at, n) for at, n in summary.arrivals if n)

    def sample_window() -> None:
        for at in window:
            time.sleep(max(0.0, at - time.time()))
            cpu.append(time.process_time())

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    threads.append(threading.Thread(target=sample_window, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"arrivals": arrivals, "errors": errors, "cpu_s": cpu[1] - cpu[0]}


def served_throughput(url: str, concurrency: int, max_tokens: int, warmup_s: float, duration_s: float,
                      cpu: ProcessCPU, pool: ProcessPoolExecutor | None, processes: int,
                      on_window=None) -> dict:  # fmt: skip
    """A closed loop of `concurrency` clients, spread over the `pool`'s `processes` (or all in this one): tokens/s of
    the tokens that arrived inside the measured window, and each process's CPU ms per token over it.
    `on_window(duration_s)` is called as the window opens."""
    start = time.time()
    window = (start + warmup_s, start + warmup_s + duration_s)
    samples = []

    def sample_window() -> None:
        for at in window:
            time.sleep(max(0.0, at - time.time()))
            samples.append(cpu.sample())
            if at == window[0] and on_window is not None:
                on_window(duration_s)

    sampler = threading.Thread(target=sample_window, daemon=True)
    sampler.start()
    if pool is None:
        parts = [client_process(url, concurrency, max_tokens, window)]
    else:
        shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
        futures = [pool.submit(client_process, url, share, max_tokens, window) for share in shares if share]
        parts = [future.result() for future in futures]
    sampler.join()
    arrivals = [arrival for part in parts for arrival in part["arrivals"]]
    errors = [error for part in parts for error in part["errors"]]
    tokens = sum(n for at, n in arrivals if window[0] <= at < window[1])
    responses = sum(1 for at, n in arrivals if window[0] <= at < window[1])
    before, after = samples
    seconds = {name: after[name] - before[name] for name in after if name != "client"}
    seconds["client"] = sum(part["cpu_s"] for part in parts)
    cpu_ms = {name: round(1e3 * value / max(1, tokens), 3) for name, value in sorted(seconds.items())}
    return {"concurrency": concurrency, "tok_s": round(tokens / duration_s, 1),
            "tokens_per_response": round(tokens / max(1, responses), 2), "cpu_ms_per_token": cpu_ms,
            "errors": len(errors), "first_errors": errors[:3]}  # fmt: skip


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
    parser.add_argument("--client-processes", type=int, default=None,
                        help="processes the closed loops' clients are spread over (a Python gRPC client handles a "
                             "few thousand responses/s); default 1 (in this process) on cpu, 4 on gpu")
    parser.add_argument("--engine", type=engine_knob, action="append", default=[], metavar="KNOB=VALUE",
                        help="a served EngineConfig knob, e.g. admission_interval=4 (repeatable; the engine rows "
                             "use it too)")
    parser.add_argument("--entry-instances", type=int, default=1,
                        help="instances of the entry model (RepositorySettings.entry_instances)")
    parser.add_argument("--skip-engine", action="store_true", help="served rows only")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="sample the entry's and mimo_llm's stubs with py-spy over the last concurrency's window")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/serving_overhead"))
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the server's stubs inherit it

    checkpoint = build_checkpoint(args.workdir / "checkpoint")
    settings = RepositorySettings(checkpoint=checkpoint, device=args.device, entry_instances=args.entry_instances,
                                  engine={"max_num_seqs": max(args.concurrency), **dict(args.engine)})  # fmt: skip
    knobs = settings.engine_knobs(MiMoV2Config.from_pretrained(checkpoint))
    device = torch.device("cuda", settings.llm_gpus[0]) if args.device == "gpu" else torch.device("cpu")
    dtype = torch_dtype(settings.resolved_dtype)
    prompt = served_prompt(checkpoint, args.max_tokens, knobs["max_model_len"])
    report = {"device": args.device, "prompt_tokens": len(prompt), "max_tokens": args.max_tokens,
              "entry_instances": args.entry_instances, "engine_knobs": dict(args.engine),
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
        cpu = ProcessCPU(server)
        processes = args.client_processes or (1 if args.device == "cpu" else 4)
        pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn")) if processes > 1 else None
        try:
            if pool is not None:  # the workers start (and import) before any window opens
                list(pool.map(time.sleep, [0.5] * processes))
            sampler = StubSampler(cpu, args.py_spy) if args.py_spy else None
            for i, concurrency in enumerate(args.concurrency):
                last = i == len(args.concurrency) - 1
                row = served_throughput(server.grpc_url, concurrency, args.max_tokens, args.warmup_s,
                                        args.duration_s, cpu, pool, processes,
                                        sampler.start if sampler and last else None)  # fmt: skip
                report["served"].append(row)
                print(f"served: {json.dumps(row)}", flush=True)
            if sampler:
                report["py_spy"] = sampler.report()
                for stub, summary in report["py_spy"].items():
                    print(f"py-spy {stub} (GIL held, concurrency {args.concurrency[-1]}): "
                          f"{json.dumps(summary, indent=1)}", flush=True)
        finally:
            if pool is not None:
                pool.shutdown()
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
    names = [name for name in report["served"][0]["cpu_ms_per_token"]]
    print(f"\nCPU ms per token, by process (the server's: all but client; beyond the engine: the server's minus the "
          f"engine's own closed loop)\n| concurrency | {' | '.join(names)} | server | beyond the engine |\n"
          f"|---|{'---|' * (len(names) + 2)}")
    for row in report["served"]:
        cpu = row["cpu_ms_per_token"]
        server = sum(value for name, value in cpu.items() if name != "client")
        beyond = f"{server - engine['closed_loop_cpu_ms_per_token'][row['concurrency']]:.3f}" if engine else "—"
        print(f"| {row['concurrency']} | {' | '.join(str(cpu[n]) for n in names)} | {server:.3f} | {beyond} |")


if __name__ == "__main__":
    sys.exit(main())
