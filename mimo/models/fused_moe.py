"""Routed experts without host synchronisation: token-expert pairs sorted by expert on the device, then

* a fused Triton kernel pair (the vLLM / SGLang `fused_moe` pattern) for small batches: the pairs are padded per
  expert to the kernel's row block, a program per (row block, output tile) reads its expert's weight tile once for
  all of the block's rows; the first kernel computes the gate and up tiles together and writes silu(gate) * up, the
  second the down projection. FP8 e4m3 weights are read as stored (with their 128x128 block scales), so serving
  FP8 keeps no dequantised copy;
* `torch._grouped_mm` for large floating batches (at least `GROUPED_MM_MIN_TOKENS` tokens), where the per-expert
  GEMMs are compute bound and cuBLAS-class tiles win.

Both return the same per-pair outputs as the reference loop in `moe.MiMoV2MoE.expert_forward`; the weighted sum
over each token's experts is in float32, as there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo.models.layers import silu_and_mul

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton run the reference path only
    triton = None

GROUPED_MM_MIN_TOKENS = 512  # from here on (bf16 only) the grouped GEMM beats the kernel's fixed tiles


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # pair rows per program (each expert's pairs are padded to a multiple of it)
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Decode: few pairs per expert, so a small row block wastes little padding; wide enough K tiles to stream weights.
# Shared memory per stage of the gate_up kernel: an A tile and two weight tiles (gate and up), 36 KiB / 40 KiB here.
SMALL_BATCH = KernelConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
# FP8 weights (a weight tile half the bytes of bf16's): narrower tiles, twice the programs, one more stage. One MoE
# layer at 1 / 8 / 64 tokens, H200 (BENCHMARKS.md, "FP8 decode tiles"): 0.275 / 0.565 / 0.651 of the copy bandwidth
# against 0.248 / 0.539 / 0.631 with the bf16 tiles
SMALL_BATCH_FP8 = KernelConfig(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4)
LARGE_BATCH = KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
SMALL_BATCH_MAX_TOKENS = 64
CONFIG_NAMES = ("SMALL_BATCH", "SMALL_BATCH_FP8", "LARGE_BATCH")  # every tile set the kernels launch with


def uses_grouped_mm(num_tokens: int, dtype: torch.dtype, fp8: bool) -> bool:
    """The large-batch path: bf16 activations and floating weights only (grouped_mm has no block-scaled FP8)."""
    return num_tokens >= GROUPED_MM_MIN_TOKENS and dtype == torch.bfloat16 and not fp8


def config_for(num_tokens: int, fp8: bool) -> KernelConfig:
    if num_tokens > SMALL_BATCH_MAX_TOKENS:
        return LARGE_BATCH
    return SMALL_BATCH_FP8 if fp8 else SMALL_BATCH


def kernel_configs() -> list[KernelConfig]:
    """The tile sets of `CONFIG_NAMES` as they are now (a benchmark may replace one for its run)."""
    return [globals()[name] for name in CONFIG_NAMES]


def available() -> bool:
    return triton is not None


@dataclass(frozen=True)
class ExpertWeights:
    """One stacked expert weight as the kernels read it: `weight [E, N, K]` (floating or FP8 e4m3) and, for FP8,
    `scale_inv [E, S, G]` with `scale_rows [N]` / `scale_cols [K]` naming each row's / column's block."""

    weight: torch.Tensor
    scale_inv: torch.Tensor | None = None
    scale_rows: torch.Tensor | None = None
    scale_cols: torch.Tensor | None = None

    def __post_init__(self):
        # The kernels step along K (and along a scale row) by address: unit strides there.
        for name in ("weight", "scale_inv"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.stride(-1) != 1:
                raise ValueError(f"expert {name} of shape {tuple(tensor.shape)} needs a unit stride in its last dim, "
                                 f"has strides {tensor.stride()}")

    @property
    def is_fp8(self) -> bool:
        return self.scale_inv is not None


def check_fp8_columns(scale_cols: torch.Tensor, block_k: int) -> None:
    """The kernels read one scale column per K tile: every aligned `block_k` run of columns must share a block."""
    cols = scale_cols.numel()
    first_of_run = (torch.arange(cols, device=scale_cols.device) // block_k) * block_k
    if not bool((scale_cols == scale_cols[first_of_run]).all()):
        raise ValueError(
            f"FP8 expert weight with {cols} input columns: each aligned run of {block_k} columns must lie in one "
            "128-column scale block for the fused kernel (a MoE-TP slice of the intermediate dim must be a multiple "
            "of 128)"
        )


@dataclass(frozen=True)
class ExpertAlignment:
    """Pairs (flat index t * top_k + k) sorted by local expert and padded per expert to `block_m` rows.

    Sizes are bounds known from the shapes alone, so nothing is read back to the host: at most
    ceil(pairs / block_m) + min(experts, pairs) blocks hold pairs; the rest have expert -1 and exit at once.
    """

    sorted_pairs: torch.Tensor  # int32 [num_blocks * block_m]; padding = num_pairs
    block_expert: torch.Tensor  # int32 [num_blocks]; local expert of each block, -1 for an empty block
    num_blocks: int


def align_pairs(local_ids: torch.Tensor, num_local: int, block_m: int) -> ExpertAlignment:
    """`local_ids` int64 [P]: each pair's local expert, `num_local` for an expert this rank does not hold."""
    num_pairs = local_ids.numel()
    device = local_ids.device
    num_blocks = -(-num_pairs // block_m) + min(num_local, num_pairs)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, local_ids, torch.ones_like(local_ids))  # bincount without reading its size back
    counts = counts[:num_local]
    blocks = (counts + block_m - 1) // block_m  # [E]
    block_ends = blocks.cumsum(0)
    block_starts = block_ends - blocks
    pair_starts = counts.cumsum(0) - counts  # first sorted position of each expert's pairs

    order = local_ids.argsort(stable=True)  # pairs of expert 0, 1, ..., then those held elsewhere
    sorted_ids = local_ids[order]
    is_local = sorted_ids < num_local
    expert = sorted_ids.clamp(max=num_local - 1)
    rank_in_expert = torch.arange(num_pairs, device=device) - pair_starts[expert]
    destination = block_starts[expert] * block_m + rank_in_expert
    dump = num_blocks * block_m  # one extra slot takes the pairs held elsewhere
    destination = torch.where(is_local, destination, dump)
    sorted_pairs = torch.full((dump + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, destination, order.to(torch.int32))

    block_index = torch.arange(num_blocks, device=device)
    block_expert = torch.searchsorted(block_ends, block_index, right=True)  # num_local past the last block
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return ExpertAlignment(sorted_pairs[:dump], block_expert, num_blocks)


if triton is not None:

    @triton.jit
    def _gate_up_silu_kernel(
        x_ptr, w_ptr, s_ptr, srow_ptr, scol_ptr, out_ptr, sorted_ptr, block_expert_ptr,
        num_pairs, top_k, hidden, inter,
        stride_xt, stride_we, stride_wn, stride_se, stride_ss, stride_op,
        FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[pair, n] = silu(x[token] . gate[e, n]) * (x[token] . up[e, n]) for a block of one expert's pairs;
        w is [E, 2I, H] with the gate rows first."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ptr + offs_m)
        row_ok = pairs < num_pairs
        tokens = pairs // top_k
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        gate_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]
        up_ptrs = gate_ptrs + inter * stride_wn
        x_ptrs = x_ptr + tokens[:, None].to(tl.int64) * stride_xt + offs_k[None, :]  # [BM, BK]
        if FP8:
            s_base = s_ptr + expert.to(tl.int64) * stride_se
            gate_srow = tl.load(srow_ptr + offs_n, mask=n_ok, other=0)
            up_srow = tl.load(srow_ptr + inter + offs_n, mask=n_ok, other=0)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, hidden, BLOCK_K):
            k_ok = (k + offs_k) < hidden
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            wg = tl.load(gate_ptrs, mask=w_mask, other=0.0)
            wu = tl.load(up_ptrs, mask=w_mask, other=0.0)
            a = a.to(DOT_DTYPE)
            if FP8:
                scol = tl.load(scol_ptr + k)
                sg = tl.load(s_base + gate_srow * stride_ss + scol, mask=n_ok, other=0.0)
                su = tl.load(s_base + up_srow * stride_ss + scol, mask=n_ok, other=0.0)
                acc_gate += tl.dot(a, wg.to(DOT_DTYPE), input_precision=PRECISION) * sg[None, :]
                acc_up += tl.dot(a, wu.to(DOT_DTYPE), input_precision=PRECISION) * su[None, :]
            else:
                acc_gate += tl.dot(a, wg.to(DOT_DTYPE), input_precision=PRECISION)
                acc_up += tl.dot(a, wu.to(DOT_DTYPE), input_precision=PRECISION)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_op + offs_n[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _down_kernel(
        a_ptr, w_ptr, s_ptr, srow_ptr, scol_ptr, out_ptr, sorted_ptr, block_expert_ptr, pair_weight_ptr,
        num_pairs, hidden, inter,
        stride_ap, stride_we, stride_wn, stride_se, stride_ss, stride_op,
        FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[pair, n] = weight[pair] * (a[pair] . down[e, n]) for a block of one expert's pairs; w is [E, H, I]."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ptr + offs_m)
        row_ok = pairs < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        a_ptrs = a_ptr + pairs[:, None].to(tl.int64) * stride_ap + offs_k[None, :]
        if FP8:
            s_base = s_ptr + expert.to(tl.int64) * stride_se
            srow = tl.load(srow_ptr + offs_n, mask=n_ok, other=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, inter, BLOCK_K):
            k_ok = (k + offs_k) < inter
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a = a.to(DOT_DTYPE)
            if FP8:
                scol = tl.load(scol_ptr + k)
                s = tl.load(s_base + srow * stride_ss + scol, mask=n_ok, other=0.0)
                acc += tl.dot(a, w.to(DOT_DTYPE), input_precision=PRECISION) * s[None, :]
            else:
                acc += tl.dot(a, w.to(DOT_DTYPE), input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = acc * tl.load(pair_weight_ptr + pairs, mask=row_ok, other=0.0)[:, None]
        out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_op + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _scale_args(w: ExpertWeights) -> tuple:
    if not w.is_fp8:
        return w.weight, w.weight, w.weight, 0, 0  # unused pointers (FP8=False compiles them out)
    return w.scale_inv, w.scale_rows, w.scale_cols, w.scale_inv.stride(0), w.scale_inv.stride(1)


def _dot_dtype(x: torch.Tensor):
    """The GEMM operand type: the activations' (FP8 weights are widened to it in registers, exactly). CPU tensors run
    under the interpreter, whose dot (triton 3.6, 3.7) multiplies bf16 as raw 16-bit integers: float32 there."""
    if x.device.type == "cpu":
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[x.dtype]


def _launch_meta(x: torch.Tensor, config: KernelConfig) -> dict:
    """The kernels' compile-time arguments for activations `x` and tiles `config`."""
    dot_dtype = _dot_dtype(x)
    # float32 operands: exact products (the default, tf32, would change an fp32 model's numbers); others ignore it.
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"
    return {"DOT_DTYPE": dot_dtype, "PRECISION": precision, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
            "BLOCK_K": config.block_k, "num_warps": config.num_warps, "num_stages": config.num_stages}


def fused_experts(
    x: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights, local_ids: torch.Tensor,
    pair_weights: torch.Tensor, top_k: int, config: KernelConfig, all_local: bool,
) -> torch.Tensor:
    """Each pair's weighted expert output through the Triton kernels: x [T, H] -> [T * top_k, H] in x.dtype.

    `local_ids` int64 [T * top_k]: each pair's local expert (`num_local` = held elsewhere: its row is zero);
    `pair_weights` float32 [T * top_k], applied in float32 before the output is rounded to x.dtype;
    `all_local`: this rank holds every expert (known from the layer, so no pair can be held elsewhere).
    """
    if triton is None:
        raise RuntimeError("the fused MoE path needs triton (pip install triton), which is not importable here")
    num_tokens, hidden = x.shape
    num_local, two_inter, _ = gate_up.weight.shape
    inter = two_inter // 2
    num_pairs = num_tokens * top_k
    x = x.contiguous()
    align = align_pairs(local_ids, num_local, config.block_m)
    activation = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    # Pairs held elsewhere are never written; zeros keep their (zero-weighted) rows finite.
    alloc = torch.empty if all_local else torch.zeros
    out = alloc(num_pairs, hidden, dtype=x.dtype, device=x.device)
    meta = _launch_meta(x, config)
    s, srow, scol, stride_se, stride_ss = _scale_args(gate_up)
    grid = (align.num_blocks, triton.cdiv(inter, config.block_n))
    _gate_up_silu_kernel[grid](
        x, gate_up.weight, s, srow, scol, activation, align.sorted_pairs, align.block_expert,
        num_pairs, top_k, hidden, inter,
        x.stride(0), gate_up.weight.stride(0), gate_up.weight.stride(1), stride_se, stride_ss, activation.stride(0),
        FP8=gate_up.is_fp8, **meta,
    )
    s, srow, scol, stride_se, stride_ss = _scale_args(down)
    grid = (align.num_blocks, triton.cdiv(hidden, config.block_n))
    _down_kernel[grid](
        activation, down.weight, s, srow, scol, out, align.sorted_pairs, align.block_expert, pair_weights,
        num_pairs, hidden, inter,
        activation.stride(0), down.weight.stride(0), down.weight.stride(1), stride_se, stride_ss, out.stride(0),
        FP8=down.is_fp8, **meta,
    )
    return out


def grouped_mm_experts(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, local_ids: torch.Tensor,
    pair_weights: torch.Tensor, top_k: int,
) -> torch.Tensor:
    """Each pair's weighted expert output through `torch._grouped_mm`: x [T, H] -> [T * top_k, H].

    `gate_up [E, 2I, H]`, `down [E, H, I]` floating; the other arguments as in `fused_experts`.
    """
    num_local = gate_up.shape[0]
    num_pairs = local_ids.numel()
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=x.device)
    counts.index_add_(0, local_ids, torch.ones_like(local_ids))
    offs = counts[:num_local].cumsum(0).to(torch.int32)  # group ends; pairs held elsewhere sort past the last
    order = local_ids.argsort(stable=True)
    rows = x[order // top_k]  # [P, H] grouped by expert
    gate_up_out = torch._grouped_mm(rows, gate_up.transpose(-2, -1), offs=offs)  # [P, 2I]
    # The routing weight scales the down GEMM's input (the same product, and no float32 [P, H] temporary).
    activation = silu_and_mul(gate_up_out) * pair_weights[order, None].to(x.dtype)
    y = torch._grouped_mm(activation, down.transpose(-2, -1), offs=offs)  # [P, H]
    # Rows past the last group are not written by grouped_mm: zero them before they are un-permuted.
    y = torch.where((local_ids[order] < num_local)[:, None], y, 0)
    out = torch.empty_like(y)
    out[order] = y
    return out


DENSE_FP8_MAX_TOKENS = SMALL_BATCH_MAX_TOKENS  # past this, dequantising once per call and cuBLAS win


def fp8_linear(x: torch.Tensor, weight: ExpertWeights) -> torch.Tensor:
    """x `[T, K]` times one FP8 block-scaled weight `[N, K]` (`weight` with one expert), read as stored: the down
    kernel with every token a pair of that expert, weight 1 -> `[T, N]` in x.dtype. For decode-sized batches, where
    reading the weight bounds the GEMM and a dequantised copy would read and write it again in 16 bits."""
    if triton is None:
        raise RuntimeError("the FP8 linear kernel needs triton (pip install triton), which is not importable here")
    num_tokens, _ = x.shape
    _, out_features, in_features = weight.weight.shape
    config = config_for(num_tokens, weight.is_fp8)
    num_blocks = -(-num_tokens // config.block_m)
    rows = torch.arange(num_blocks * config.block_m, dtype=torch.int32, device=x.device)
    sorted_pairs = torch.where(rows < num_tokens, rows, num_tokens)  # padding rows = num_pairs: masked
    block_expert = torch.zeros(num_blocks, dtype=torch.int32, device=x.device)
    ones = torch.ones(num_tokens, dtype=torch.float32, device=x.device)
    x = x.contiguous()
    out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    s, srow, scol, stride_se, stride_ss = _scale_args(weight)
    _down_kernel[(num_blocks, triton.cdiv(out_features, config.block_n))](
        x, weight.weight, s, srow, scol, out, sorted_pairs, block_expert, ones,
        num_tokens, out_features, in_features,
        x.stride(0), weight.weight.stride(0), weight.weight.stride(1), stride_se, stride_ss, out.stride(0),
        FP8=weight.is_fp8, **_launch_meta(x, config),
    )  # fmt: skip
    return out
