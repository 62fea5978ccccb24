"""The fused MoE path on a CUDA device against the reference expert loop, at MiMo-V2.5 widths (256 experts of 2048,
hidden 4096, top-8), bf16 and FP8 e4m3 block-scaled weights, batch 1 / 8 / 64 / 4096, on fresh random inputs
routed by the layer's own router; and one decode-size forward captured in a CUDA graph (capture fails on any host
synchronisation).

Both paths run the same bf16 (or FP8) weights with float32 accumulation and differ in where they round to bf16:
each is measured against a float32 evaluation of the same weights, and the fused path must stay within a small
multiple of the reference path's own error (the errors are printed for the run's log: pytest -s).
"""


import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU kernel parity: needs a CUDA device (run on the GPU machine)"
)
pytest.importorskip("triton", reason="the fused MoE kernels need triton")

from mimo.models import fused_moe  # noqa: E402
from benchmarks import bench_moe  # noqa: E402

CUDA = torch.device("cuda")


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def moe(request):
    layer = bench_moe.random_moe(bench_moe.preset_config("v2.5"), CUDA, fp8=request.param == "fp8")
    yield layer
    del layer
    torch.cuda.empty_cache()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    error = float((out.double() - ref.double()).norm() / ref.double().norm())
    print(f"relative error {error:.2e}")
    return error


def float32_experts(moe, x, weights, expert_ids) -> torch.Tensor:
    """The weighted expert sum in float32 (weights widened / dequantised to float32), one expert at a time."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64, device=CUDA)
    experts = moe.experts
    for e in torch.unique(expert_ids).tolist():
        tokens, slots = (expert_ids == e).nonzero(as_tuple=True)
        gate_up = experts.gate_up_proj.dense_weight(torch.float32, e).float()
        down = experts.down_proj.dense_weight(torch.float32, e).float()
        h = x[tokens].float() @ gate_up.T
        gate, up = h.chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ down.T
        out.index_add_(0, tokens, (y * weights[tokens, slots, None]).double())
    return out


def check_against_float32(moe, x, weights, expert_ids, fused):
    truth = float32_experts(moe, x, weights, expert_ids)
    reference = moe.reference_expert_forward(x, weights, expert_ids)
    fused_error, reference_error = relative_error(fused, truth), relative_error(reference, truth)
    assert fused_error <= 1.5 * reference_error + 1e-3, (fused_error, reference_error)


def routed_input(moe, batch: int, seed: int):
    generator = torch.Generator(CUDA).manual_seed(seed)
    x = torch.randn(batch, moe.experts.gate_up_proj.in_features, generator=generator, device=CUDA)
    x = x.to(torch.bfloat16)
    weights, expert_ids = moe.gate(x)
    return x, weights, expert_ids


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 8, 64, 4096])
def test_fused_matches_reference_at_v25_widths(moe, batch):
    x, weights, expert_ids = routed_input(moe, batch, seed=batch)
    moe.impl = "fused"
    fused = moe.expert_forward(x, weights, expert_ids)
    check_against_float32(moe, x, weights, expert_ids, fused)


@torch.no_grad()
def test_large_batch_kernel_config_at_v25_widths(moe):
    # bf16 4096 tokens take torch._grouped_mm in the layer; the Triton kernel's large-batch tiles are checked here.
    x, weights, expert_ids = routed_input(moe, 1024, seed=7)
    gate_up, down = moe.experts.kernel_weights()
    pairs = fused_moe.fused_experts(x, gate_up, down, expert_ids.flatten(), weights.flatten().float(),
                                    expert_ids.shape[1], fused_moe.LARGE_BATCH, all_local=True)
    fused = pairs.view(*expert_ids.shape, -1).sum(1, dtype=torch.float32)
    check_against_float32(moe, x, weights, expert_ids, fused)


@torch.no_grad()
def test_decode_forward_captures_in_a_cuda_graph(moe):
    moe.impl = "fused"
    static_x, _, _ = routed_input(moe, 8, seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: kernels compiled, FP8 layout checked, before capture
            moe(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe(static_x)
    fresh, _, _ = routed_input(moe, 8, seed=2)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    moe.impl = "fused"
    torch.testing.assert_close(static_out, moe(fresh), atol=0, rtol=0)  # the replay computes what eager does


@torch.no_grad()
def test_expert_parallel_shards_sum_to_the_whole_at_v25_widths(moe):
    # Two EP ranks of 128 experts each, holding views of the whole layer's stacked weights (no second copy).
    from mimo.loading import build_module
    from mimo.models.moe import MiMoV2MoE
    from mimo.parallel.mapping import Mapping, ParallelRank
    from mimo.weights.fp8 import FP8Slice

    x, weights, expert_ids = routed_input(moe, 64, seed=11)
    moe.impl = "fused"
    whole = moe.expert_forward(x, weights, expert_ids).float()
    config = bench_moe.preset_config("v2.5")
    total = torch.zeros_like(whole)
    for rank in range(2):
        shard = build_module(lambda: MiMoV2MoE(
            hidden_size=config.hidden_size, moe_intermediate_size=config.moe_intermediate_size,
            num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok, n_group=config.n_group,
            topk_group=config.topk_group, norm_topk_prob=config.norm_topk_prob,
            routed_scaling_factor=config.routed_scaling_factor, parallel=ParallelRank(Mapping.create(2, 2), rank),
        ), torch.bfloat16)  # fmt: skip
        held = slice(shard.local_experts.start, shard.local_experts.stop)
        for name in ("gate_up_proj", "down_proj"):
            source = getattr(moe.experts, name)
            if source.is_fp8:
                part = FP8Slice(source.weight[held], source.weight_scale_inv[held], source.scale_rows,
                                source.scale_cols)
            else:
                part = source.weight[held]
            getattr(shard.experts, name).set_weight(part)
        shard.impl = "fused"
        partial = shard.expert_forward(x, weights, expert_ids)
        assert relative_error(partial, shard.reference_expert_forward(x, weights, expert_ids)) < 1e-2
        total += partial.float()
    assert relative_error(total, whole) < 1e-2
