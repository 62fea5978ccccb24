"""The paged-attention kernel alone at MiMo-V2.5 widths, against the bytes it must read and the copy bandwidth.

One row per (layer kind, batch, context, query tokens per sequence): the kernel's time per call from CUDA events
(the mean over `--iters` back-to-back calls after a warm-up), the bytes one call must read (every attended key's
K and V of its kv heads, plus q and the output written), and those bytes per second as a fraction of a
device-to-device copy's bandwidth measured in the same run (the practical HBM limit). Full layers: 64 query heads
over 4 kv heads and the whole context; sliding layers: 8 kv heads over the 128-token window, with sinks. With
`--reference` each row also times the reference path (gather + `attention_with_sinks` per sequence).

    python -m benchmarks.bench_attention                              # batch 1,8,64 x context 512,4096, decode
    python -m benchmarks.bench_attention --query-lens 1,4 --reference  # + MTP verify of 1 + 3 tokens, + reference
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from mimo.engine.attention_kernel import choose_num_splits, tile_shape
from mimo.engine.block_manager import sliding_ring_tokens
from mimo.engine.kv_cache import KVCache, KVLayerSpec, LayerKind
from mimo.engine.paged_attention import PagedAttention, PagedAttentionMetadata

from benchmarks.limits import copy_bandwidth

NUM_Q_HEADS, WINDOW, BLOCK_SIZE = 64, 128, 16
LAYERS = {"full": KVLayerSpec(LayerKind.FULL, 4, 192, 128), "sliding": KVLayerSpec(LayerKind.SLIDING, 8, 192, 128)}


def make_backend(spec: KVLayerSpec, batch: int, context: int, query_len: int, use_kernel: bool,
                 device: torch.device) -> tuple[PagedAttention, list[int]]:
    """`batch` sequences ending at `context` with `query_len` new tokens each, blocks scattered over the pool."""
    tokens = context if spec.kind is LayerKind.FULL else min(context, sliding_ring_tokens(WINDOW, query_len))
    length = math.ceil(tokens / BLOCK_SIZE)  # a sliding ring: positions wrap modulo the table's length
    num_blocks = batch * length
    kv_cache = KVCache([spec], {spec.kind: num_blocks}, BLOCK_SIZE, torch.bfloat16, device)
    kv_cache.k[0].normal_()
    kv_cache.v[0].normal_()
    table = torch.randperm(num_blocks, device=device).view(batch, length)
    lengths = torch.full((batch,), length, device=device)
    starts = [context - query_len] * batch
    metadata = PagedAttentionMetadata.build(starts, [query_len] * batch, {spec.kind: (table, lengths)}, BLOCK_SIZE,
                                            WINDOW, device, use_kernel)
    return PagedAttention(kv_cache, metadata), metadata.pools[spec.kind].key_counts


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda")
    peak = copy_bandwidth(device, nbytes=args.copy_bytes)
    rows = []
    for name in args.layers:
        spec = LAYERS[name]
        window = WINDOW if spec.kind is LayerKind.SLIDING else None
        sinks = torch.randn(NUM_Q_HEADS, device=device) if window is not None else None
        for batch in args.batch_sizes:
            for context in args.contexts:
                for query_len in args.query_lens:
                    backend, key_counts = make_backend(spec, batch, context, query_len, True, device)
                    num_tokens = batch * query_len
                    q = torch.randn(num_tokens, NUM_Q_HEADS, spec.head_dim, device=device, dtype=torch.bfloat16)
                    pool = backend.metadata.pools[spec.kind]

                    def kernel():
                        return backend._attend_cached(0, q, pool, sliding_window=window, sinks=sinks,
                                                      scale=spec.head_dim**-0.5)

                    kv_bytes = sum(key_counts) * spec.num_kv_heads * (spec.head_dim + spec.v_head_dim) * 2
                    io_bytes = num_tokens * NUM_Q_HEADS * (spec.head_dim + spec.v_head_dim) * 2
                    ms = time_ms(kernel, args.iters)
                    _, block_q = tile_shape(NUM_Q_HEADS, spec.num_kv_heads, query_len)
                    row = {
                        "layer": name, "batch": batch, "context": context, "query_len": query_len,
                        "num_splits": choose_num_splits(batch * math.ceil(query_len / block_q), spec.num_kv_heads,
                                                        max(key_counts), 64, device),
                        "kernel_us": round(ms * 1e3, 2),
                        "MB_read": round((kv_bytes + io_bytes) / 1e6, 3),
                        "achieved_GB_s": round((kv_bytes + io_bytes) / ms / 1e6, 1),
                        "copy_bandwidth_GB_s": round(peak / 1e9, 1),
                        "fraction_of_bandwidth_bound": round((kv_bytes + io_bytes) / (ms * 1e-3) / peak, 4),
                    }  # fmt: skip
                    if args.reference:
                        reference, _ = make_backend(spec, batch, context, query_len, False, device)
                        ref_pool = reference.metadata.pools[spec.kind]
                        row["reference_us"] = round(time_ms(
                            lambda: reference._attend_cached(0, q, ref_pool, sliding_window=window, sinks=sinks,
                                                             scale=spec.head_dim**-0.5), max(1, args.iters // 10)
                        ) * 1e3, 2)  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--layers", type=lambda text: text.split(","), default=["full", "sliding"])
    parser.add_argument("--batch-sizes", type=ints, default=[1, 8, 64])
    parser.add_argument("--contexts", type=ints, default=[512, 4096])
    parser.add_argument("--query-lens", type=ints, default=[1])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--copy-bytes", type=int, default=2 << 30, help="bytes of the bandwidth-probe copy")
    parser.add_argument("--reference", action="store_true", help="also time the reference path")
    args = parser.parse_args()
    unknown = set(args.layers) - set(LAYERS)
    if unknown:
        parser.error(f"--layers {sorted(unknown)}: choose from {', '.join(LAYERS)}")
    if not torch.cuda.is_available():
        parser.error("bench_attention times a CUDA kernel: run it on the GPU machine")
    run(args)


if __name__ == "__main__":
    main()
