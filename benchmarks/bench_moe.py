"""The MoE layer alone at MiMo-V2.5 widths (256 experts of 2048, hidden 4096, top-8): each implementation's time per
forward (router + experts, CUDA events) against the limits measured in the same run.

* bytes: the weights of the experts the batch actually routed to (counted from its routing, with FP8 scales) plus
  the router, divided by the time, as a fraction of the device-to-device copy bandwidth (bytes read + written);
* FLOP/s: 2 * 3 * H * I per (token, expert) pair, as a fraction of a large bf16 GEMM's measured rate (the bound
  that matters from a few hundred tokens on).

    python -m benchmarks.bench_moe                       # bf16, batch 1,8,64,4096, fused and reference
    python -m benchmarks.bench_moe --fp8                 # FP8 e4m3 128x128 block-scaled experts, as shipped
    python -m benchmarks.bench_moe --impls fused --batch-sizes 1,2,4,8,16,32,64,128,256,512,1024,4096
    python -m benchmarks.bench_moe --impls fused --grouped-mm-min-tokens 100000   # the Triton kernel at 4096 too
    python -m benchmarks.bench_moe --impls fused --small-config 16,128,128,4,4    # try other decode tiles
    python -m benchmarks.bench_moe --fp8 --impls fused --batch-sizes 1,8,64 --graphs  # device time, no launches
    TRITON_INTERPRET=1 python -m benchmarks.bench_moe --preset tiny --device cpu --batch-sizes 1,8 --repeats 1 \
        --copy-bytes 1000000 --gemm-size 256
                                                         # a smoke run (CPU numbers mean nothing)

`--small-config` / `--large-config` (block_m,block_n,block_k,num_warps,num_stages) replace the kernel tiles of
`mimo.models.fused_moe` for this run (small: up to `SMALL_BATCH_MAX_TOKENS` tokens, `SMALL_BATCH_FP8` with `--fp8`),
to tune them on the device.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from builders.presets import PRESETS, hub_config
from mimo.config import MiMoV2Config
from mimo.models import fused_moe
from mimo.loading import build_module
from mimo.models.moe import MiMoV2MoE
from mimo.processing.tokenizer_files import write_tiny_tokenizer
from mimo.weights.fp8 import BLOCK, FP8Slice, quantize_blockwise

from benchmarks.limits import copy_bandwidth, gemm_rate


def preset_config(preset: str) -> MiMoV2Config:
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        token_ids = write_tiny_tokenizer(tokenizer_dir)
    hub = hub_config(PRESETS[preset], num_layers=2, token_ids=token_ids, fp8=False, fused_qkv=True)
    return MiMoV2Config.from_hf_config(hub)


@torch.no_grad()
def random_moe(config: MiMoV2Config, device: torch.device, fp8: bool, seed: int = 0) -> MiMoV2MoE:
    """One MoE layer of `config` with random weights made on `device`: bf16, or FP8 e4m3 quantized per 128x128
    block the way the hub checkpoints are (weights + `weight_scale_inv`, no floating copy kept)."""
    moe = build_module(lambda: MiMoV2MoE(
        hidden_size=config.hidden_size, moe_intermediate_size=config.moe_intermediate_size,
        num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok, n_group=config.n_group,
        topk_group=config.topk_group, norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.routed_scaling_factor,
    ), torch.bfloat16)  # fmt: skip  (meta: the experts' weights are installed below, one expert at a time)
    moe.gate.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=generator, device=device)
                          / config.hidden_size**0.5)
    moe.gate.e_score_correction_bias.copy_(0.1 * torch.randn(config.n_routed_experts, generator=generator,
                                                             device=device))
    for layer in (moe.experts.gate_up_proj, moe.experts.down_proj):
        num_experts, rows, cols = layer.weight.shape
        weight = torch.empty(num_experts, rows, cols, dtype=torch.bfloat16, device=device)
        for e in range(num_experts):  # one expert at a time: no float32 copy of all of them
            weight[e] = torch.randn(rows, cols, generator=generator, device=device) / cols**0.5
        if not fp8:
            layer.set_weight(weight)
            continue
        quantized = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=device)
        scales = torch.empty(num_experts, -(-rows // BLOCK), -(-cols // BLOCK), device=device)
        for e in range(num_experts):
            quantized[e], scales[e] = quantize_blockwise(weight[e])
        del weight
        rows_of = torch.arange(rows, device=device) // BLOCK
        cols_of = torch.arange(cols, device=device) // BLOCK
        layer.set_weight(FP8Slice(quantized, scales, rows_of, cols_of))
    return moe


def expert_bytes(moe: MiMoV2MoE) -> int:
    """Bytes of one expert's weights as stored (FP8: with its scales)."""
    total = 0
    for layer in (moe.experts.gate_up_proj, moe.experts.down_proj):
        total += layer.weight[0].numel() * layer.weight.element_size()
        if layer.is_fp8:
            total += layer.weight_scale_inv[0].numel() * layer.weight_scale_inv.element_size()
    return total


def event_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Mean ms per call of `fn` on the current stream, by CUDA events around `repeats` back-to-back calls (on the
    CPU, a smoke run whose numbers mean nothing, by the wall clock)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def graphed(fn):
    """`fn` captured once in a CUDA graph: its replay, the device time of decode steps (which replay graphs) without
    the launches of an eager call."""
    fn()  # Triton's compiles and the allocator's first blocks, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def path_name(impl: str, batch: int, fp8: bool) -> str:
    if impl == "reference":
        return "expert loop"
    if fused_moe.uses_grouped_mm(batch, torch.bfloat16, fp8):
        return "torch._grouped_mm"
    config = fused_moe.config_for(batch, fp8)
    return f"triton {config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages}"


@torch.no_grad()
def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if args.small_config:
        setattr(fused_moe, "SMALL_BATCH_FP8" if args.fp8 else "SMALL_BATCH", args.small_config)
    if args.large_config:
        fused_moe.LARGE_BATCH = args.large_config
    if args.grouped_mm_min_tokens is not None:
        fused_moe.GROUPED_MM_MIN_TOKENS = args.grouped_mm_min_tokens
    config = preset_config(args.preset)
    moe = random_moe(config, device, args.fp8)
    peak_bytes = copy_bandwidth(device, args.copy_bytes)
    peak_flops = gemm_rate(device, args.gemm_size)
    per_expert = expert_bytes(moe)
    router = moe.gate.weight.numel() * moe.gate.weight.element_size()
    pair_flops = 2 * 3 * config.hidden_size * config.moe_intermediate_size
    results = []
    for batch in args.batch_sizes:
        generator = torch.Generator(device).manual_seed(batch)
        x = torch.randn(batch, config.hidden_size, generator=generator, device=device).to(torch.bfloat16)
        _, expert_ids = moe.gate(x)
        distinct = int(torch.unique(expert_ids).numel())  # outside the timed calls
        nbytes = distinct * per_expert + router
        flops = batch * config.num_experts_per_tok * pair_flops
        outputs = {}
        for impl in args.impls:
            moe.impl = impl
            repeats = args.repeats if impl == "fused" or batch <= 64 else max(2, args.repeats // 5)
            in_graph = args.graphs and impl == "fused"
            timed = graphed(lambda: moe(x)) if in_graph else (lambda: moe(x))
            ms = event_ms(timed, repeats)
            outputs[impl] = moe(x).float()
            row = {
                "batch": batch, "impl": impl, "weights": "fp8" if args.fp8 else "bf16",
                "path": path_name(impl, batch, args.fp8) + (" (CUDA graph)" if in_graph else ""),
                "distinct_experts": distinct, "ms": round(ms, 4),
                "GB_read": round(nbytes / 1e9, 4), "achieved_GB_s": round(nbytes / ms / 1e6, 1),
                "copy_bandwidth_GB_s": round(peak_bytes / 1e9, 1),
                "fraction_of_bandwidth_bound": round(nbytes * 1e3 / ms / peak_bytes, 4),
                "TFLOP_s": round(flops / ms / 1e9, 2), "bf16_gemm_TFLOP_s": round(peak_flops / 1e12, 1),
                "fraction_of_gemm_rate": round(flops * 1e3 / ms / peak_flops, 4),
            }
            if impl != args.impls[0]:
                ref = outputs[args.impls[0]]
                row[f"relative_error_vs_{args.impls[0]}"] = float((outputs[impl] - ref).norm() / ref.norm())
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="v2.5")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 4096])
    parser.add_argument("--impls", type=lambda s: s.split(","), default=["fused", "reference"])
    parser.add_argument("--fp8", action="store_true", help="FP8 e4m3 block-scaled experts (default bf16)")
    parser.add_argument("--repeats", type=int, default=20)
    tiles = lambda s: fused_moe.KernelConfig(*(int(v) for v in s.split(",")))  # noqa: E731
    parser.add_argument("--small-config", type=tiles, help="decode tiles: block_m,block_n,block_k,warps,stages")
    parser.add_argument("--large-config", type=tiles, help="large-batch tiles, as --small-config")
    parser.add_argument("--grouped-mm-min-tokens", type=int, help="tokens from which bf16 takes torch._grouped_mm")
    parser.add_argument("--graphs", action="store_true", help="time the fused path's replays of a CUDA graph of "
                        "the layer (as decode steps run it) instead of eager calls")
    parser.add_argument("--copy-bytes", type=int, default=2 << 30, help="bytes of the bandwidth probe's copy")
    parser.add_argument("--gemm-size", type=int, default=8192, help="n of the n x n x n bf16 GEMM rate probe")
    parser.add_argument("--device", default="cuda")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
