"""Prefill against transformers' eager `MiMoV2FlashForCausalLM` in the same run, at MiMo-V2.5 widths.

Our engine (random weights generated on the GPU, `bench_engine.random_model`) prefills one prompt in one chunk to
its first token; then transformers' model, holding exactly the same weights (`tests/hf_reference`: the mapping the
CPU parity tests use), runs the same prompt without a KV cache, logits for the last position only. Each is timed
`--repeats` times after one untimed run; the rows give tokens/s and the fraction of the bf16 GEMM rate measured in
the same run (`bench_engine.prefill_flops`: active-parameter FLOPs + attention).

    python -m benchmarks.bench_prefill_baseline --layers 4 --prompt-lens 4096

Run it without `.whl/device-env.sh` on the GPU machines: the numpy 1.26 it installs for Triton's stub breaks the
machine's scipy, which transformers imports.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_engine import prefill, prefill_flops, random_model
from benchmarks.limits import gemm_rate, synchronize
from mimo.engine import EngineConfig, LLMEngine
from mimo.loading import hub_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference mapping lives with the tests
from hf_reference import hf_config, hf_state_dict  # noqa: E402


def ours_seconds(model, prompt: list[int], repeats: int, device: torch.device) -> list[float]:
    times = []
    for i in range(repeats + 1):
        engine = LLMEngine(model, EngineConfig(max_num_seqs=1, max_num_batched_tokens=len(prompt),
                                               max_model_len=len(prompt) + 2, kv_cache_memory_bytes=4 << 30, seed=0,
                                               warm_up=0))  # fmt: skip
        seconds, _ = prefill(engine, {f"p{i}": prompt}, 1, device)
        times += [seconds] if i else []  # the first: kernels' first launches
        del engine
        gc.collect()
    return times


def transformers_model(model, device: torch.device):
    from transformers import MiMoV2FlashForCausalLM

    config = model.config
    state = hf_state_dict(config, hub_state_dict(model, torch.bfloat16))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            hf = MiMoV2FlashForCausalLM(hf_config(config)).eval()
    finally:
        torch.set_default_dtype(default)
    hf.load_state_dict(state, strict=True)
    return hf


@torch.inference_mode()
def transformers_seconds(hf, prompt: list[int], repeats: int, device: torch.device) -> list[float]:
    ids = torch.tensor([prompt], device=device)
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        hf(input_ids=ids, use_cache=False, logits_to_keep=1).logits.argmax(-1).item()
        times += [time.perf_counter() - t0] if i else []
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="v2.5")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-lens", type=lambda s: [int(x) for x in s.split(",")], default=[4096])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (tiny preset), not a measurement")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = random_model(args.preset, args.layers, device, with_mtp=False)
    rate = gemm_rate(device, n=8192 if device.type == "cuda" else 512)
    print(f"bf16 GEMM rate {rate / 1e12:.0f} TFLOP/s", flush=True)
    gen = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in args.prompt_lens}
    flops = {n: prefill_flops(model, n) for n in args.prompt_lens}
    timings = {n: {"ours": ours_seconds(model, prompts[n], args.repeats, device)} for n in args.prompt_lens}
    hf = transformers_model(model, device)
    del model
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    for n in args.prompt_lens:
        try:
            timings[n]["transformers"] = transformers_seconds(hf, prompts[n], args.repeats, device)
        except torch.OutOfMemoryError as error:
            timings[n]["transformers"] = f"out of memory: {str(error).splitlines()[0]}"
            torch.cuda.empty_cache()
    rows = []
    print("| prompt | implementation | seconds (each run) | prefill tok/s | fraction of the bf16 GEMM rate |\n"
          "|---|---|---|---|---|")
    for n in args.prompt_lens:
        for name, seconds in timings[n].items():
            if isinstance(seconds, str):
                print(f"| {n} | {name} | {seconds} | — | — |")
                rows.append({"prompt": n, "implementation": name, "error": seconds})
                continue
            best = min(seconds)
            rows.append({"prompt": n, "implementation": name, "seconds": seconds, "tok_s": n / best,
                         "gemm_fraction": flops[n] / best / rate})  # fmt: skip
            print(f"| {n} | {name} | {', '.join(f'{s:.4f}' for s in seconds)} | {n / best:,.0f} "
                  f"| {flops[n] / best / rate:.3f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"gemm_rate": rate, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
