"""The first requests of a fresh process, with and without `LLMEngine.warm_up`: time to first token and the
longest gap between tokens of each request, against a later request of the same shape in the same process.

Each configuration runs in a child process whose Triton and inductor cache directories are new, as in a fresh
container: every kernel variant compiles at its first launch there, during the warm-up or during a request.

    python -m benchmarks.bench_first_request --out results.json          # one GPU; random V2.5-width weights
    python -m benchmarks.bench_first_request --device cpu --preset tiny --layers 2 --prompt-len 40 --decode-len 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# (request, prompt salt, after): two requests alone in turn, then a pair whose second joins while the first decodes
REQUESTS = (("first", 0, None), ("second", 1, None), ("pair-a", 2, None), ("pair-b", 3, "pair-a"))


def child(args: argparse.Namespace) -> dict:
    import torch

    from benchmarks.bench_engine import random_model, synchronize
    from mimo.engine import EngineConfig, LLMEngine, SamplingParams

    device = torch.device(args.device)
    model = random_model(args.preset, args.layers, device, with_mtp=False)
    engine = LLMEngine(model, EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=args.max_num_batched_tokens, block_size=16,
        max_model_len=args.prompt_len + args.decode_len + 64, kv_cache_memory_bytes=args.kv_gib << 30, seed=0,
        warm_up=args.warm_up))  # fmt: skip
    result = {"warm_up": args.warm_up, "warm_up_s": None}
    if engine.warms_up_at_load:  # as mimo_llm decides
        result["warm_up_s"] = round(engine.warm_up(), 3)
    vocab = model.config.vocab_size
    greedy = SamplingParams(max_tokens=args.decode_len, temperature=0.0)
    times: dict[str, list[float]] = {}
    for group in (REQUESTS[:1], REQUESTS[1:2], REQUESTS[2:]):
        pending = list(group)
        while pending or engine.has_unfinished():
            # a request joins once the one it follows has its first few tokens (a mixed step then)
            for request in list(pending):
                request_id, salt, after = request
                if after is None or len(times.get(after, [])) > 3:
                    prompt = [(salt * 7919 + 31 * i) % vocab for i in range(args.prompt_len)]
                    engine.add_request(request_id, prompt, greedy)
                    times[request_id] = [time.perf_counter()]
                    pending.remove(request)
            for output in engine.step():
                times[output.request_id] += [time.perf_counter()] * len(output.new_token_ids)
        synchronize(device)
    for request_id, stamps in times.items():
        gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
        result[request_id] = {"ttft_ms": round(1e3 * (stamps[1] - stamps[0]), 2),
                              "max_gap_ms": round(1e3 * max(gaps), 2),
                              "median_gap_ms": round(1e3 * sorted(gaps)[len(gaps) // 2], 3)}
    return result


def run_child(args: argparse.Namespace, warm_up: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"TRITON_CACHE_DIR": os.path.join(cache, "triton"),
                            "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor")}
        command = [sys.executable, "-m", "benchmarks.bench_first_request", "--child", "--warm-up", str(warm_up),
                   "--device", args.device, "--preset", args.preset, "--layers", str(args.layers),
                   "--prompt-len", str(args.prompt_len), "--decode-len", str(args.decode_len),
                   "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--kv-gib", str(args.kv_gib)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    if done.returncode:
        raise RuntimeError(f"child with warm_up={warm_up} exited {done.returncode}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="v2.5")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--decode-len", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-gib", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="child processes per configuration")
    parser.add_argument("--child-timeout", type=int, default=300)
    parser.add_argument("--warm-ups", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
                        help="the configurations in each repeat, in order: 0 without the warm-up, 1 with it")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm-up", type=int, choices=(0, 1), default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return []
    rows = []
    for repeat in range(args.repeats):
        for warm_up in args.warm_ups:
            row = run_child(args, warm_up) | {"repeat": repeat}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
