"""128x128 block-wise FP8 e4m3 weights, as in the MiMo / DeepSeek-V3 hub checkpoints (ref §1.2, §2.1).

A weight `[rows, cols]` is stored as `float8_e4m3fn` plus `weight_scale_inv` of shape
`[ceil(rows/128), ceil(cols/128)]`; the real weight is `w_fp8 * scale_inv` blockwise (the name says "inv"
because the quantizer divided by it). Both functions accept leading batch dimensions, so a stack of
independently blocked matrices (the per-shard grids of a fused qkv_proj, ref §3) is one call.
"""

from dataclasses import dataclass

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


def dequantize_mapped(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, scale_rows: torch.Tensor, scale_cols: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`w_fp8 [..., R, C]` x `scale_inv[..., scale_rows[i], scale_cols[j]]` -> `dtype [..., R, C]`.

    The general form of `dequantize_blockwise` for any row / column selection of blocked weights (a rank's slice,
    stacked parts with grids of their own): the same float32 products, so the same values.
    """
    scales = scale_inv.float()[..., scale_rows, :][..., scale_cols]  # [..., R, C]
    return (w_fp8.float() * scales).to(dtype)


@dataclass(frozen=True)
class StoredWeight:
    """A checkpoint matrix (or vector) as stored: floating, or FP8 with its scale grid.

    `scale_rows [R]` is the grid row each weight row uses: `arange(R) // 128` for a plain grid; the per-shard grids
    of a fused qkv_proj (`fused_qkv.interleaved_scale_rows`) and stacked parts (`stack_rows`) differ.
    """

    data: torch.Tensor  # [R, C] or [R]
    scale_inv: torch.Tensor | None = None  # float32 [S, ceil(C/128)]
    scale_rows: torch.Tensor | None = None  # int64 [R]

    @classmethod
    def plain(cls, data: torch.Tensor, scale_inv: torch.Tensor | None = None) -> "StoredWeight":
        if scale_inv is None:
            return cls(data)
        return cls(data, scale_inv.float(), torch.arange(data.shape[0], device=data.device) // BLOCK)

    @property
    def is_fp8(self) -> bool:
        return self.scale_inv is not None

    def scale_cols(self) -> torch.Tensor:
        return torch.arange(self.data.shape[1], device=self.data.device) // BLOCK

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scale_inv is None:
            return self.data.to(dtype)
        return dequantize_mapped(self.data, self.scale_inv, self.scale_rows, self.scale_cols(), dtype)

    def select(self, dim: int, index: torch.Tensor | None) -> "FP8Slice | torch.Tensor":
        """Positions `index` along `dim` (None: all), exactly: FP8 bytes and scales are kept, never re-quantized.

        Returns the floating tensor, or an `FP8Slice` holding only the grid blocks the slice uses.
        """
        data = self.data if index is None else self.data.index_select(dim, index.to(self.data.device))
        if self.scale_inv is None:
            return data
        rows, cols = self.scale_rows, self.scale_cols()
        if index is not None:
            index = index.to(rows.device)
            rows, cols = (rows[index], cols) if dim == 0 else (rows, cols[index])
        used_rows, rows = torch.unique(rows, return_inverse=True)
        used_cols, cols = torch.unique(cols, return_inverse=True)
        return FP8Slice(data, self.scale_inv[used_rows][:, used_cols], rows, cols)


@dataclass(frozen=True)
class FP8Slice:
    """FP8 weight `[R, C]` + the grid blocks it uses (`scale_inv [S, G]`) and the block of each row / column."""

    weight: torch.Tensor  # float8_e4m3fn [R, C]
    scale_inv: torch.Tensor  # float32 [S, G]
    scale_rows: torch.Tensor  # int64 [R] into scale_inv's rows
    scale_cols: torch.Tensor  # int64 [C] into scale_inv's columns


def stack_rows(parts: list[StoredWeight]) -> StoredWeight:
    """Parts stacked along rows (gate; up / q; k; v), each FP8 part keeping its own grid: grids stack too."""
    if len(parts) == 1:
        return parts[0]
    data = torch.cat([p.data for p in parts])
    if not parts[0].is_fp8:
        return StoredWeight(data)
    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + p.scale_inv.shape[0])
    scale_rows = torch.cat([p.scale_rows + offset for p, offset in zip(parts, offsets, strict=True)])
    return StoredWeight(data, torch.cat([p.scale_inv for p in parts]), scale_rows)
