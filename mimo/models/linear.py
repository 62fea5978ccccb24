"""Tensor-parallel linear layers that own the form of their weights (vLLM's parallel linears / `weight_loader`).

A layer holds this rank's part of a bias-free `[out, in]` weight, or one per expert (`[E, out, in]`), stacked
from checkpoint parts (`hub_parts`: gate + up, q + k + v). `shard_index(source_tp)` states its tensor-parallel rule
once: the positions along `split_dim` of the stacked parts that this rank holds. The loader (`mimo.loading`) and
the converter (`builders convert`) both slice by it, and the local shape follows from it.

Weights are floating, or FP8 e4m3 exactly as the checkpoint stores them: `weight_scale_inv` keeps the 128x128
scale blocks the slice uses and `scale_rows` / `scale_cols` name the block of each row / column, so any slice of any
layout (per-shard grids of a fused qkv_proj, stacked parts) is held without re-quantization. The forward
dequantizes per call (what CPU runs, and large batches on the GPU); on CUDA a decode-sized batch of a dense layer
reads the FP8 weight as stored through the block-scaled kernel of `mimo.models.fused_moe` (`fp8_linear`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mimo.models import fused_moe
from mimo.weights.fp8 import FP8_DTYPE, FP8Slice, dequantize_mapped
from mimo.weights.fused_qkv import QKVGeometry, interleaved_rows_for_rank


class ParallelLinear(nn.Module):
    split_dim: int = 0  # 0: output rows split (column parallel); 1: input columns split (row parallel)

    def __init__(
        self,
        in_features: int,
        part_sizes: tuple[int, ...],
        hub_parts: tuple[str, ...],
        *,
        tp_size: int = 1,
        tp_rank: int = 0,
        num_experts: int | None = None,
    ):
        """`part_sizes`: full output rows of each stacked part; `hub_parts`: their checkpoint names (siblings of
        this module, e.g. `gate_proj`); `num_experts`: one weight per local expert (`[E, out, in]`)."""
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is outside tp_size {tp_size}")
        self.in_features = in_features
        self.part_sizes = part_sizes
        self.hub_parts = hub_parts
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.num_experts = num_experts
        self.full_shape = (sum(part_sizes), in_features)
        local = list(self.full_shape)
        index = self.shard_index()
        if index is not None:
            local[self.split_dim] = index.numel()
        self.local_shape = tuple(local)
        leading = () if num_experts is None else (num_experts,)
        self.weight = nn.Parameter(torch.empty(*leading, *self.local_shape), requires_grad=False)
        self.register_parameter("weight_scale_inv", None)  # FP8: float32 [(E,) S, G]
        self.fp8_kernel = False  # set by set_weight
        self.register_buffer("scale_rows", None, persistent=False)  # FP8: int64 [R], block row of each weight row
        self.register_buffer("scale_cols", None, persistent=False)  # FP8: int64 [C]

    def shard_index(self, source_tp: int = 1) -> torch.Tensor | None:
        """int64 positions along `split_dim` of the stacked full parts that this rank holds (None: all of them).

        `source_tp` is the TP interleave of the stored tensor (a hub fused qkv_proj); 1 for stacked parts.
        """
        raise NotImplementedError

    def part_indices(self) -> list[torch.Tensor | None]:
        """`shard_index()` per stacked part: the positions of each part (gate, up / q, k, v) this rank holds."""
        index = self.shard_index()
        if index is None or self.split_dim == 1:
            return [index] * len(self.part_sizes)
        indices, offset = [], 0
        for size in self.part_sizes:
            inside = (index >= offset) & (index < offset + size)
            indices.append(index[inside] - offset)
            offset += size
        return indices

    def part_shapes(self, *, local: bool) -> list[tuple[int, int]]:
        """Stored shape of each part: whole (a hub checkpoint) or this rank's (`local`: a deployment rank file)."""
        shapes = []
        for size, index in zip(self.part_sizes, self.part_indices(), strict=True):
            rows, cols = size, self.in_features
            if local and index is not None:
                rows, cols = (index.numel(), cols) if self.split_dim == 0 else (rows, index.numel())
            shapes.append((rows, cols))
        return shapes

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale_inv is not None

    def set_weight(self, weight: torch.Tensor | FP8Slice) -> None:
        """Install this rank's weight (`[(E,) *local_shape]`): a floating tensor, or FP8 with its blocks."""
        data = weight.weight if isinstance(weight, FP8Slice) else weight
        if tuple(data.shape) != tuple(self.weight.shape):
            raise ValueError(f"weight of shape {tuple(data.shape)}, the layer holds {tuple(self.weight.shape)}")
        self.weight = nn.Parameter(data, requires_grad=False)
        if isinstance(weight, FP8Slice):
            self.weight_scale_inv = nn.Parameter(weight.scale_inv, requires_grad=False)
            self.scale_rows, self.scale_cols = weight.scale_rows, weight.scale_cols
        # FP8 dense layers on CUDA read their weight as stored for decode-sized batches (fused_moe.fp8_linear),
        # which needs each K tile of the kernel inside one scale block (checked once here: it reads the device)
        self.fp8_kernel = (isinstance(weight, FP8Slice) and self.num_experts is None and fused_moe.available()
                           and _columns_fit_kernel(weight.scale_cols))  # fmt: skip

    def dense_weight(self, dtype: torch.dtype, expert: int | None = None) -> torch.Tensor:
        """The (expert's) weight in `dtype` for a floating GEMM: `[out_local, in_local]`."""
        weight = self.weight if expert is None else self.weight[expert]
        if not self.is_fp8:
            return weight
        scale_inv = self.weight_scale_inv if expert is None else self.weight_scale_inv[expert]
        return dequantize_mapped(weight, scale_inv, self.scale_rows, self.scale_cols, dtype)

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        if (self.fp8_kernel and x.is_cuda and expert is None
                and x.numel() <= fused_moe.DENSE_FP8_MAX_TOKENS * x.shape[-1]):
            weight = fused_moe.ExpertWeights(self.weight[None], self.weight_scale_inv[None], self.scale_rows,
                                             self.scale_cols)  # fmt: skip
            return fused_moe.fp8_linear(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
        return F.linear(x, self.dense_weight(x.dtype, expert))

    def _apply(self, fn, recurse=True):
        # A dtype cast (`model.float()`) would turn FP8 bytes into numbers without their scales.
        if self.is_fp8 and fn(self.weight.new_empty(0)).dtype != FP8_DTYPE:
            raise TypeError(
                f"{type(self).__name__} holds FP8 weights, which cannot be cast to another dtype; load the model "
                "with dequantize_fp8=True for floating weights"
            )
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, parts={dict(zip(self.hub_parts, self.part_sizes))}, local={self.local_shape}, "
            f"tp={self.tp_rank}/{self.tp_size}" + ("" if self.num_experts is None else f", experts={self.num_experts}")
        )


def _columns_fit_kernel(scale_cols: torch.Tensor) -> bool:
    try:
        for config in fused_moe.kernel_configs():
            fused_moe.check_fp8_columns(scale_cols, config.block_k)
    except ValueError:
        return False
    return True


class ColumnParallelLinear(ParallelLinear):
    """Output rows split: each rank holds rows `[r*n/tp, (r+1)*n/tp)` of every part (merged gate_up: both halves)."""

    split_dim = 0

    def shard_index(self, source_tp: int = 1) -> torch.Tensor | None:
        if self.tp_size == 1:
            return None
        index, offset = [], 0
        for size in self.part_sizes:
            if size % self.tp_size:
                raise ValueError(f"{size} output rows cannot be split over tp={self.tp_size}")
            local = size // self.tp_size
            index.append(torch.arange(offset + self.tp_rank * local, offset + (self.tp_rank + 1) * local))
            offset += size
        return torch.cat(index)


class RowParallelLinear(ParallelLinear):
    """Input columns split; each rank's output is a partial sum, all-reduced over `group` when `reduce_results`."""

    split_dim = 1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hub_parts: tuple[str, ...],
        *,
        tp_size: int = 1,
        tp_rank: int = 0,
        num_experts: int | None = None,
        reduce_results: bool = True,
        group: dist.ProcessGroup | None = None,
    ):
        super().__init__(
            in_features, (out_features,), hub_parts, tp_size=tp_size, tp_rank=tp_rank, num_experts=num_experts
        )
        self.reduce_results = reduce_results
        self.group = group

    def shard_index(self, source_tp: int = 1) -> torch.Tensor | None:
        if self.tp_size == 1:
            return None
        if self.in_features % self.tp_size:
            raise ValueError(f"{self.in_features} input columns cannot be split over tp={self.tp_size}")
        local = self.in_features // self.tp_size
        return torch.arange(self.tp_rank * local, (self.tp_rank + 1) * local)

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        out = super().forward(x, expert)
        if self.reduce_results and self.tp_size > 1:
            dist.all_reduce(out, group=self.group)  # partial sums of the row-parallel ranks
        return out


class QKVParallelLinear(ParallelLinear):
    """The fused `[Q_r; K_r; V_r]` projection of rank r: one GEMM (hub `qkv_proj`, or `q_proj` + `k_proj` + `v_proj`).

    Query heads split over tp; KV heads split, or each replicated on `tp / num_kv_heads` consecutive ranks when
    tp exceeds them (`QKVGeometry.rows_per_rank`). A hub fused qkv_proj interleaved at `source_tp` is re-sharded
    by one row gather (`fused_qkv.interleaved_rows_for_rank`).
    """

    split_dim = 0
    fused_hub_part = "qkv_proj"

    def __init__(self, hidden_size: int, geometry: QKVGeometry, *, tp_size: int = 1, tp_rank: int = 0):
        self.geometry = geometry
        super().__init__(
            hidden_size, geometry.canonical_rows(), ("q_proj", "k_proj", "v_proj"), tp_size=tp_size, tp_rank=tp_rank
        )
        self.local_geometry = geometry.local(tp_size)

    def shard_index(self, source_tp: int = 1) -> torch.Tensor | None:
        if self.tp_size == 1 and source_tp == 1:
            return None
        return interleaved_rows_for_rank(self.geometry, source_tp, self.tp_size, self.tp_rank)

    def query_head_index(self) -> torch.Tensor | None:
        """The query heads this rank holds (what per-head tensors such as sinks are sliced by); None: all."""
        if self.tp_size == 1:
            return None
        local = self.local_geometry.num_heads
        return torch.arange(self.tp_rank * local, (self.tp_rank + 1) * local)

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] (local heads) from one GEMM."""
        g = self.local_geometry
        q, k, v = self(x).split(g.canonical_rows(), dim=-1)
        num_tokens = x.shape[0]
        return (
            q.view(num_tokens, g.num_heads, g.head_dim),
            k.view(num_tokens, g.num_kv_heads, g.head_dim),
            v.view(num_tokens, g.num_kv_heads, g.v_head_dim),
        )
