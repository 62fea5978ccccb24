"""128x128 block-wise FP8 e4m3 weights, as in the MiMo / DeepSeek-V3 hub checkpoints (ref §1.2, §2.1).

A weight `[rows, cols]` is stored as `float8_e4m3fn` plus `weight_scale_inv` of shape
`[ceil(rows/128), ceil(cols/128)]`; the real weight is `w_fp8 * scale_inv` blockwise (the name says "inv"
because the quantizer divided by it). Both functions accept leading batch dimensions, so a stack of
independently blocked matrices (the per-shard grids of a fused qkv_proj, ref §3) is one call.
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
BLOCK = 128
_AMAX_FLOOR = 1e-12  # an all-zero block would otherwise get scale 0 and divide by zero


def scale_grid_shape(rows: int, cols: int) -> tuple[int, int]:
    return (-(-rows // BLOCK), -(-cols // BLOCK))


def _padded_blocks(w: torch.Tensor) -> torch.Tensor:
    """[..., R, C] -> zero-padded [..., R/128, 128, C/128, 128] view in float32."""
    rows, cols = w.shape[-2:]
    grid_rows, grid_cols = scale_grid_shape(rows, cols)
    w = torch.nn.functional.pad(w.float(), (0, grid_cols * BLOCK - cols, 0, grid_rows * BLOCK - rows))
    return w.reshape(*w.shape[:-2], grid_rows, BLOCK, grid_cols, BLOCK)


def quantize_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w [..., R, C]` to FP8 e4m3 with one scale per 128x128 block.

    Returns:
        w_fp8: float8_e4m3fn `[..., R, C]`
        scale_inv: float32 `[..., ceil(R/128), ceil(C/128)]`, `amax / 448` per block
    """
    if w.dim() < 2:
        raise ValueError(f"quantize_blockwise needs a [..., rows, cols] tensor, got shape {tuple(w.shape)}")
    rows, cols = w.shape[-2:]
    blocks = _padded_blocks(w)  # [..., gR, 128, gC, 128]
    amax = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=_AMAX_FLOOR)
    # A tensor divisor keeps this a true division on every device (CUDA multiplies by the reciprocal of a Python
    # scalar, 1 ulp off), so CPU and GPU produce bit-identical checkpoints.
    scale = amax / amax.new_tensor(FP8_MAX)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*q.shape[:-4], q.shape[-4] * BLOCK, q.shape[-2] * BLOCK)[..., :rows, :cols]
    return q.contiguous(), scale.squeeze(-1).squeeze(-2)


def dequantize_blockwise(w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: `w_fp8 [..., R, C]` x per-block `scale_inv` -> `dtype [..., R, C]`.

    Raises ValueError when the scale grid does not have the 128x128 block shape of the weight.
    """
    rows, cols = w_fp8.shape[-2:]
    expected = (*w_fp8.shape[:-2], *scale_grid_shape(rows, cols))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
            f"for a 128x128-blocked FP8 weight of shape {tuple(w_fp8.shape)}"
        )
    blocks = _padded_blocks(w_fp8)  # [..., gR, 128, gC, 128]
    w = blocks * scale_inv.float()[..., :, None, :, None]
    w = w.reshape(*w.shape[:-4], w.shape[-4] * BLOCK, w.shape[-2] * BLOCK)[..., :rows, :cols]
    return w.to(dtype).contiguous()


def gather_rows_blockwise(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, scale_row_of: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `rows` of a block-FP8 weight as a weight of their own, with a fresh 128x128 grid.

    A new 128-row block whose rows all used one source scale row keeps their FP8 bytes and that scale
    (bit-exact); any other block is dequantized and re-quantized with its own amax (one e4m3 rounding).

    Args:
        w_fp8: float8_e4m3fn `[R, C]`.
        scale_inv: the source grid `[S, ceil(C/128)]`.
        scale_row_of: int64 `[R]`, the `scale_inv` row each weight row uses (`arange(R) // 128` for a plain
            grid; the per-shard grids of a fused qkv_proj differ, `fused_qkv.interleaved_scale_rows`).
        rows: int64 `[N]` source rows, in output order.
    Returns:
        float8_e4m3fn `[N, C]` and float32 `[ceil(N/128), ceil(C/128)]`.
    """
    cols = w_fp8.shape[1]
    out = w_fp8[rows]  # [N, C]
    source_scale_rows = scale_row_of[rows]  # [N]
    block_scales = []
    for start in range(0, rows.numel(), BLOCK):
        block = slice(start, start + BLOCK)
        used = source_scale_rows[block]
        if bool((used == used[0]).all()):
            block_scales.append(scale_inv[used[0]].float())
            continue
        row_scales = scale_inv[used].float().repeat_interleave(BLOCK, dim=1)[:, :cols]  # [<=128, C]
        out[block], new_scale = quantize_blockwise(out[block].float() * row_scales)
        block_scales.append(new_scale[0])
    return out, torch.stack(block_scales)
