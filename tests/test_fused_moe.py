"""The fused MoE path (`mimo.models.fused_moe`) against the reference expert loop, at small shapes.

Without CUDA the Triton kernels run under the interpreter (`TRITON_INTERPRET=1`, which conftest sets); on a CUDA
machine the same tests run compiled on the GPU (inputs are made on the CPU and moved there). Fresh random inputs:
routing with several tokens per expert (more pairs than one row block), experts nobody chose, batch 1,
expert-parallel and MoE-TP slices, FP8 block-scaled weights against their dequantised reference, and
`torch._grouped_mm` (large batches), which runs on the CPU too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the fused MoE kernels need triton (pip install triton==3.6.0)")

from mimo.models import fused_moe  # noqa: E402
from mimo.models.moe import MiMoV2MoE, resolve_impl  # noqa: E402
from mimo.parallel.mapping import Mapping, ParallelRank  # noqa: E402
from mimo.weights.fp8 import FP8Slice, StoredWeight, quantize_blockwise, stack_rows  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
        reason="without CUDA the kernels need TRITON_INTERPRET=1 (conftest sets it unless it was set otherwise)",
    ),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # the interpreter's
]


def make_moe(hidden, inter, num_experts, top_k, dtype, parallel=None, seed=0):
    kwargs = dict(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts, top_k=top_k, n_group=1,
                  topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)
    moe = MiMoV2MoE(**kwargs) if parallel is None else MiMoV2MoE(**kwargs, parallel=parallel)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (moe.experts.gate_up_proj, moe.experts.down_proj):
            shape = layer.weight.shape
            layer.set_weight((torch.randn(shape, generator=generator) / shape[-1] ** 0.5).to(dtype))
        moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=generator) / hidden**0.5)
    return moe


def routing(num_tokens, top_k, num_experts, generator, crowd=None):
    """Random distinct experts per token; `crowd`: every token also picks that expert (one heavily used expert)."""
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)])
    if crowd is not None:
        has = (ids == crowd).any(dim=1)
        ids[~has, 0] = crowd
    weights = torch.rand(num_tokens, top_k, generator=generator) + 0.1
    return weights, ids


def both_paths(moe, x, weights, ids):
    moe.to(DEVICE)
    x, weights, ids = on_device(x, weights, ids)
    with torch.no_grad():
        reference = moe.reference_expert_forward(x, weights, ids)
        moe.impl = "fused"
        fused = moe.expert_forward(x, weights, ids)
    assert fused.dtype == x.dtype and fused.shape == reference.shape
    return fused.float().cpu(), reference.float().cpu()


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


# bf16: the interpreter's float32 -> bf16 casts truncate (triton 3.6, 3.7) where the GPU rounds: twice the error.
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens, crowd", [(1, None), (5, None), (40, 3)])
def test_fused_matches_reference_loop(dtype, num_tokens, crowd):
    # 40 tokens all routed to expert 3: 40 pairs, more than the 16-row block; of 16 experts some get no token.
    generator = torch.Generator().manual_seed(num_tokens)
    moe = make_moe(hidden=96, inter=48, num_experts=16, top_k=4, dtype=dtype, seed=num_tokens)
    x = torch.randn(num_tokens, 96, generator=generator).to(dtype)
    weights, ids = routing(num_tokens, 4, 16, generator, crowd)
    if num_tokens > 1:
        assert len(torch.unique(ids)) < 16 or num_tokens * 4 >= 16
    fused, reference = both_paths(moe, x, weights, ids)
    torch.testing.assert_close(fused, reference, **TOLERANCE[dtype])


def test_unused_experts_and_repeated_choice():
    # Only experts 2 and 5 chosen, one token picks expert 5 twice (the kernel does not rely on distinct choices).
    generator = torch.Generator().manual_seed(1)
    moe = make_moe(hidden=64, inter=32, num_experts=8, top_k=2, dtype=torch.float32, seed=1)
    x = torch.randn(3, 64, generator=generator)
    ids = torch.tensor([[2, 5], [5, 5], [5, 2]])
    weights = torch.rand(3, 2, generator=generator)
    fused, reference = both_paths(moe, x, weights, ids)
    torch.testing.assert_close(fused, reference, **TOLERANCE[torch.float32])


def test_large_batch_kernel_config_matches_reference():
    generator = torch.Generator().manual_seed(2)
    moe = make_moe(hidden=128, inter=64, num_experts=4, top_k=2, dtype=torch.float32, seed=2)
    x = torch.randn(70, 128, generator=generator)
    weights, ids = routing(70, 2, 4, generator)
    moe.to(DEVICE)
    x, weights, ids = on_device(x, weights, ids)
    with torch.no_grad():
        reference = moe.reference_expert_forward(x, weights, ids)
        gate_up, down = moe.experts.kernel_weights()
        pairs = fused_moe.fused_experts(x, gate_up, down, ids.flatten(), weights.flatten(), 2,
                                        fused_moe.LARGE_BATCH, all_local=True)
    torch.testing.assert_close(pairs.view(70, 2, -1).sum(1), reference, **TOLERANCE[torch.float32])


def test_grouped_mm_path_for_large_bf16_batches():
    num_tokens = fused_moe.GROUPED_MM_MIN_TOKENS
    generator = torch.Generator().manual_seed(3)
    moe = make_moe(hidden=64, inter=32, num_experts=8, top_k=2, dtype=torch.bfloat16, seed=3)
    x = torch.randn(num_tokens, 64, generator=generator).to(torch.bfloat16)
    weights, ids = routing(num_tokens, 2, 8, generator, crowd=0)
    fused, reference = both_paths(moe, x, weights, ids)
    torch.testing.assert_close(fused, reference, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("grouped", [False, True])
def test_expert_parallel_ranks_sum_to_the_whole(grouped):
    num_tokens = fused_moe.GROUPED_MM_MIN_TOKENS if grouped else 9
    dtype = torch.bfloat16 if grouped else torch.float32
    full = make_moe(hidden=64, inter=32, num_experts=8, top_k=3, dtype=dtype, seed=4)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(num_tokens, 64, generator=generator).to(dtype)
    weights, ids = routing(num_tokens, 3, 8, generator)
    mapping = Mapping.create(2, 2)  # two EP groups of 4 experts
    total = torch.zeros(num_tokens, 64)
    for rank in range(2):
        shard = MiMoV2MoE(hidden_size=64, moe_intermediate_size=32, num_experts=8, top_k=3, n_group=1,
                          topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                          parallel=ParallelRank(mapping, rank))
        experts = shard.local_experts
        assert not shard.all_experts_local
        shard.experts.gate_up_proj.set_weight(full.experts.gate_up_proj.weight[experts.start : experts.stop])
        shard.experts.down_proj.set_weight(full.experts.down_proj.weight[experts.start : experts.stop])
        fused, reference = both_paths(shard, x, weights, ids)
        torch.testing.assert_close(fused, reference, **TOLERANCE[dtype])
        total += fused
    with torch.no_grad():
        whole = full.reference_expert_forward(x, weights, ids).float()
    torch.testing.assert_close(total, whole, **TOLERANCE[dtype])


def fp8_experts(moe, num_experts, hidden, inter, generator):
    """Install FP8 e4m3 block-quantized experts, sliced for a MoE-TP rank the way the loader slices them."""
    reads = {"gate_up": [], "down": []}
    for _ in range(num_experts):
        gate, up = (quantize_blockwise(torch.randn(inter, hidden, generator=generator) / hidden**0.5) for _ in "gu")
        down = quantize_blockwise(torch.randn(hidden, inter, generator=generator) / inter**0.5)
        gate_up = stack_rows([StoredWeight.plain(*gate), StoredWeight.plain(*up)])
        reads["gate_up"].append(gate_up.select(0, moe.experts.gate_up_proj.shard_index()))
        reads["down"].append(StoredWeight.plain(*down).select(1, moe.experts.down_proj.shard_index()))
    for name, layer in (("gate_up", moe.experts.gate_up_proj), ("down", moe.experts.down_proj)):
        slices = reads[name]
        first = slices[0]
        stacked = (torch.stack([s.weight for s in slices]), torch.stack([s.scale_inv for s in slices]))
        layer.set_weight(FP8Slice(*stacked, first.scale_rows, first.scale_cols))
        assert layer.is_fp8


@pytest.mark.parametrize("num_tokens", [1, 24])
@pytest.mark.parametrize("moe_tp_size", [1, 2, 4])
def test_fp8_experts_match_dequantized_reference(num_tokens, moe_tp_size):
    # hidden 256 / inter 256: two 128-blocks each way; MoE-TP 2 gives rank 1 the second 128-column block of
    # down_proj, MoE-TP 4 gives it columns 64..127, half of the first block.
    generator = torch.Generator().manual_seed(10 + num_tokens)
    parallel = ParallelRank(Mapping.create(moe_tp_size), 1 if moe_tp_size > 1 else 0)
    moe = MiMoV2MoE(hidden_size=256, moe_intermediate_size=256, num_experts=4, top_k=2, n_group=1, topk_group=1,
                    norm_topk_prob=True, routed_scaling_factor=1.0, parallel=parallel)
    fp8_experts(moe, 4, 256, 256, generator)
    x = torch.randn(num_tokens, 256, generator=generator).to(torch.bfloat16)
    weights, ids = routing(num_tokens, 2, 4, generator, crowd=1 if num_tokens > 1 else None)
    fused, reference = both_paths(moe, x, weights, ids)
    torch.testing.assert_close(fused, reference, **TOLERANCE[torch.bfloat16])
    assert moe.experts.gate_up_proj.weight.dtype == torch.float8_e4m3fn  # served as stored: no dequantised copy


def test_fp8_slice_across_a_scale_block_is_refused():
    # MoE-TP 2 of an intermediate of 384: rank 1 holds down_proj columns 192..383, whose first 128 span two blocks.
    generator = torch.Generator().manual_seed(5)
    moe = MiMoV2MoE(hidden_size=128, moe_intermediate_size=384, num_experts=2, top_k=1, n_group=1, topk_group=1,
                    norm_topk_prob=True, routed_scaling_factor=1.0, parallel=ParallelRank(Mapping.create(2), 1))
    fp8_experts(moe, 2, 128, 384, generator)
    moe.to(DEVICE)
    x, weights, ids = on_device(torch.randn(2, 128).to(torch.bfloat16), torch.ones(2, 1),
                                torch.zeros(2, 1, dtype=torch.int64))
    moe.impl = "fused"
    with pytest.raises(ValueError, match="128-column scale block"):
        moe.expert_forward(x, weights, ids)


def test_alignment_places_every_local_pair_once_in_its_experts_blocks():
    generator = torch.Generator().manual_seed(6)
    num_local, block_m = 5, 4
    local_ids = torch.randint(0, num_local + 1, (37,), generator=generator).to(DEVICE)  # num_local: elsewhere
    align = fused_moe.align_pairs(local_ids, num_local, block_m)
    assert align.num_blocks == -(-37 // block_m) + num_local
    pairs = align.sorted_pairs.view(align.num_blocks, block_m)
    seen = []
    for block, expert in enumerate(align.block_expert.tolist()):
        rows = [p for p in pairs[block].tolist() if p < 37]
        if expert < 0:
            assert not rows
            continue
        assert rows and all(local_ids[p] == expert for p in rows)
        seen += rows
    expected = [p for p in range(37) if local_ids[p] < num_local]
    assert sorted(seen) == expected


def test_impl_switch(monkeypatch):
    assert resolve_impl("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("fused", torch.device("cpu")) == "fused"  # under the interpreter
    with pytest.raises(ValueError, match="not one of"):
        resolve_impl("loop", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="only under Triton's interpreter"):
        resolve_impl("fused", torch.device("cpu"))



@pytest.mark.parametrize("config", fused_moe.CONFIG_NAMES)
def test_kernels_compile_for_hopper_pipelined_within_shared_memory(config, tmp_path):
    # What the interpreter cannot show: the kernels lower for the GPU, their loads are software-pipelined (cp.async)
    # and each block's shared memory fits an H100 / H200 SM (227 KiB). Compiled in a process of its own: triton
    # imported under TRITON_INTERPRET=1 (this one) does not generate code.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    script = Path(__file__).with_name("fused_moe_hopper_compile.py")
    done = subprocess.run([sys.executable, str(script), config], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {(r["kernel"], r["fp8"]) for r in rows} == {
        (k, fp8) for k in ("_gate_up_silu_kernel", "_down_kernel") for fp8 in (False, True)
    }
    for row in rows:
        assert row["shared_bytes"] <= 227 * 1024, row
        assert row["pipelined"], row


def fp8_dense(layer, generator):
    """Quantize a random weight of the layer's full shape per 128x128 block and install this rank's slice."""
    out_features, in_features = layer.full_shape
    stored = StoredWeight.plain(*quantize_blockwise(torch.randn(out_features, in_features, generator=generator)
                                                    / in_features**0.5))  # fmt: skip
    layer.set_weight(stored.select(layer.split_dim, layer.shard_index()))
    assert layer.is_fp8


@pytest.mark.parametrize("num_tokens", [1, 7, 70])  # 70: past the small-batch tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kind", "tp"), [("column", 1), ("row", 2)])
def test_fp8_dense_kernel_matches_the_dequantized_gemm(num_tokens, dtype, kind, tp):
    """fp8_linear (the down kernel with one expert) reads the FP8 weight as stored and gives the dequantized
    weight's GEMM: a column-parallel layer of 3 x 2 scale blocks, and rank 1 of a row-parallel pair (its columns
    are the second 128-column block of 256)."""
    from mimo.models.linear import ColumnParallelLinear, RowParallelLinear

    generator = torch.Generator().manual_seed(num_tokens + tp)
    layer = ColumnParallelLinear(256, (384,), ("proj",)) if kind == "column" else \
        RowParallelLinear(256, 384, ("proj",), tp_size=tp, tp_rank=1, reduce_results=False)
    fp8_dense(layer, generator)
    assert layer.fp8_kernel
    layer.to(DEVICE)
    (x,) = on_device(torch.randn(3, num_tokens, layer.local_shape[1], generator=generator).to(dtype))
    weight = fused_moe.ExpertWeights(layer.weight[None], layer.weight_scale_inv[None], layer.scale_rows,
                                     layer.scale_cols)  # fmt: skip
    kernel = fused_moe.fp8_linear(x.reshape(-1, x.shape[-1]), weight)
    reference = torch.nn.functional.linear(x.float(), layer.dense_weight(torch.float32)).reshape(-1, 384)
    assert kernel.dtype == dtype and kernel.shape == (3 * num_tokens, 384)
    torch.testing.assert_close(kernel.float(), reference, **TOLERANCE[dtype])
    with torch.no_grad():  # the layer's own forward: the kernel on CUDA (up to 64 tokens), the dequantized GEMM else
        torch.testing.assert_close(layer(x).float().reshape(-1, 384), reference, **TOLERANCE[dtype])


def test_fp8_dense_slices_across_scale_blocks_keep_the_dequantized_gemm():
    # row-parallel tp 4 of 384 input columns: rank 1 holds columns 96..191, whose first 128 span two blocks
    from mimo.models.linear import RowParallelLinear

    layer = RowParallelLinear(384, 128, ("proj",), tp_size=4, tp_rank=1, reduce_results=False)
    fp8_dense(layer, torch.Generator().manual_seed(3))
    assert not layer.fp8_kernel
