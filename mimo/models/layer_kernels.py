"""The layers' small ops in one Triton kernel each: RMSNorm (optionally with the residual add before it, vLLM's
`fused_add_rms_norm`) and rotate-half RoPE.

Plain PyTorch spends seven elementwise and reduction kernels on a norm (upcast, square, mean, rsqrt, scale, downcast,
weight) plus one for the residual add, and about nine on rotating q or k (casts, four products, a sum, a difference,
the concatenation); at decode batch sizes each reads almost nothing and costs its launch, and every decoder layer
has two norms and two rotations. These kernels read each row once and round where `layers.RMSNorm.reference` and
`layers.rotary_reference` do (each bf16 op of theirs is a float32 op rounded to the dtype), so RoPE gives the same
bits and the norm differs only by the order of its float32 sum of squares.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton run the reference path only
    triton = None


def available() -> bool:
    return triton is not None


def takes(x: torch.Tensor) -> bool:
    """Whether the layers run their op on `x` through these kernels: CUDA tensors outside torch.compile (the encoder
    towers compile their blocks, and inductor fuses the reference ops into kernels of its own)."""
    return x.is_cuda and available() and not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """norm(x) `[..., H]`; with `residual`: (norm(x + residual), x + residual), the sum in x's dtype."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)  # a view where x is contiguous in its last dims
    out = torch.empty(rows.shape, device=x.device, dtype=torch.result_type(weight, x))
    stream = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} must match x {x.dtype} "
                             f"{tuple(x.shape)}")  # fmt: skip
        residual = residual.reshape(-1, hidden)
        stream = torch.empty_like(rows)
    block = triton.next_power_of_2(hidden)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, rows if residual is None else residual, weight, out, out if stream is None else stream,
            rows.stride(0), rows.stride(1), 0 if residual is None else residual.stride(0),
            0 if residual is None else residual.stride(1), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    if stream is None:
        return out.view(x.shape)
    return out.view(x.shape), stream.view(x.shape)


def rotary_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `apply_rotary` takes these operands (the layouts the layers pass; anything else has the reference)."""
    return (x.dim() == 3 and cos.dim() == 2 and cos.shape == sin.shape and cos.shape[0] == x.shape[0]
            and 2 * cos.shape[1] <= x.shape[2] and x.stride(-1) == 1 and cos.stride(-1) == 1
            and sin.stride() == cos.stride())  # fmt: skip


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`layers.apply_rotary` in one kernel: x `[T, heads, head_dim]` (any strides but the last), cos / sin
    `[T, rotary_dim // 2]` float32 -> a new contiguous `[T, heads, head_dim]`."""
    if not rotary_fits(x, cos, sin):
        raise ValueError(f"x {tuple(x.shape)} strides {x.stride()}, cos {tuple(cos.shape)} strides {cos.stride()}, "
                         f"sin {tuple(sin.shape)} strides {sin.stride()}: the kernel takes x [T, heads, head_dim] "
                         "and cos / sin [T, half] (2 * half <= head_dim, the same strides), unit last strides")
    tokens, heads, head_dim = x.shape
    half = cos.shape[-1]
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if tokens and heads:
        _rotary_kernel[(tokens, heads)](
            x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), heads, half, head_dim,
            HALF_BLOCK=triton.next_power_of_2(max(half, 1)),
            PASS_BLOCK=triton.next_power_of_2(max(head_dim - 2 * half, 1)), num_warps=1,
            enable_fp_fusion=False,  # a contracted x1 * cos - x2 * sin would skip the product's rounding
        )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stream_ptr, x_row_stride, x_col_stride,
                         residual_row_stride, residual_col_stride, hidden, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        # one program per row; out and stream are contiguous [rows, hidden]
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * x_row_stride + cols * x_col_stride, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * residual_row_stride + cols * residual_col_stride, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(stream_ptr + row * hidden + cols, x, mask=mask)
        xf = x.to(tl.float32)
        mean_square = tl.sum(xf * xf, axis=0) / hidden
        normed = (xf * tl.rsqrt(mean_square + eps)).to(x_ptr.dtype.element_ty)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        out = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, x_token_stride, x_head_stride, cos_token_stride, heads,
                       half, head_dim, HALF_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr):  # fmt: skip
        # one program per (token, head); out is contiguous [T, heads, head_dim]
        token, head = tl.program_id(0), tl.program_id(1)
        dtype = x_ptr.dtype.element_ty
        x_row = x_ptr + token * x_token_stride + head * x_head_stride
        out_row = out_ptr + (token * heads + head) * head_dim
        i = tl.arange(0, HALF_BLOCK)
        rotated = i < half
        x1 = tl.load(x_row + i, mask=rotated, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + half + i, mask=rotated, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + token * cos_token_stride + i, mask=rotated, other=0.0).to(dtype).to(tl.float32)
        sin = tl.load(sin_ptr + token * cos_token_stride + i, mask=rotated, other=0.0).to(dtype).to(tl.float32)
        # x1 * cos - x2 * sin and x2 * cos + x1 * sin, each product and the sum rounded to the dtype as torch does
        out1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
        out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
        tl.store(out_row + i, out1.to(dtype), mask=rotated)
        tl.store(out_row + half + i, out2.to(dtype), mask=rotated)
        j = tl.arange(0, PASS_BLOCK)
        passed = j < head_dim - 2 * half
        tl.store(out_row + 2 * half + j, tl.load(x_row + 2 * half + j, mask=passed), mask=passed)
