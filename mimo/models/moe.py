"""MiMo-V2 MLPs: the dense SwiGLU MLP and the routed-expert MLP (sigmoid `noaux_tc` router, no shared experts,
ref §4), both with fused gate_up GEMMs on this rank's slice (`mimo.models.linear`).

The routed experts run one of two implementations (`MiMoV2MoE.impl`, default from `MIMO_MOE_IMPL`):
* `reference`: a Python loop over the experts with tokens (reads the per-expert counts on the host); the CPU path.
* `fused`: `mimo.models.fused_moe`, no host synchronisation: the fused Triton kernels below
  `fused_moe.GROUPED_MM_MIN_TOKENS` tokens (and for FP8 weights), `torch._grouped_mm` from there on.
`auto` picks `fused` on CUDA (when triton is importable) and `reference` elsewhere.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mimo.models import fused_moe
from mimo.models.layers import silu_and_mul
from mimo.models.linear import ColumnParallelLinear, RowParallelLinear
from mimo.parallel.mapping import SINGLE_RANK, ParallelRank


IMPLS = ("auto", "reference", "fused")
DEFAULT_IMPL = os.environ.get("MIMO_MOE_IMPL", "auto")  # the one switch forcing either implementation
if DEFAULT_IMPL not in IMPLS:
    raise ValueError(f"MIMO_MOE_IMPL={DEFAULT_IMPL!r} is not one of {IMPLS}")


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto" -> "fused" on CUDA with triton importable, "reference" elsewhere; refuses a "fused" that cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"MoE impl {impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "fused" if device.type == "cuda" and fused_moe.available() else "reference"
    if impl == "fused" and not fused_moe.available():
        raise ValueError("MoE impl 'fused' needs the triton package, which is not importable here")
    if impl == "fused" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"MoE impl 'fused' on a {device.type} device runs only under Triton's interpreter "
                         "(TRITON_INTERPRET=1)")
    return impl


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); hub `gate_proj` + `up_proj` held as one column-parallel `gate_up_proj`."""

    def __init__(self, hidden_size: int, intermediate_size: int, parallel: ParallelRank = SINGLE_RANK):
        super().__init__()
        tp = {"tp_size": parallel.tp_size, "tp_rank": parallel.rank}
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, (intermediate_size, intermediate_size), ("gate_proj", "up_proj"), **tp
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, ("down_proj",), group=parallel.group, **tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class TopKRouter(nn.Module):
    """Sigmoid scores; `e_score_correction_bias` only steers selection; grouped top-k then top-k."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        n_group: int,
        topk_group: int,
        norm_topk_prob: bool,
        routed_scaling_factor: float,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # Pinned to fp32 (as sglang keeps it): it decides near-ties between experts' sigmoid scores.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.num_experts = num_experts
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (float32 weights [T, K], expert ids [T, K])."""
        # fp32 router: bf16 logits flip near-tied expert choices.
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            num_tokens = x.shape[0]
            grouped = choice.view(num_tokens, self.n_group, -1)  # [T, G, E / G]
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, G]
            kept_groups = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(num_tokens, -1)
        expert_ids = choice.topk(self.top_k, dim=-1).indices  # [T, K]
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, expert_ids


class RoutedExperts(nn.Module):
    """The local experts' weights packed per expert: `gate_up_proj.weight [E_local, 2I_r, H]` (gate rows first),
    `down_proj.weight [E_local, H, I_r]`; hub names `experts.{e}.{gate,up,down}_proj.weight` (global ids `e`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, expert_ids: range, moe_tp_size: int, moe_tp_rank: int):
        super().__init__()
        self.expert_ids = expert_ids
        tp = {"tp_size": moe_tp_size, "tp_rank": moe_tp_rank, "num_experts": len(expert_ids)}
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, (intermediate_size, intermediate_size), ("gate_proj", "up_proj"), **tp
        )
        # The MoE sums all experts' partial outputs first and all-reduces once.
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, ("down_proj",), reduce_results=False, **tp)

    def forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """x [N, H] through local expert `slot` (position in `expert_ids`) -> [N, H]."""
        return self.down_proj(silu_and_mul(self.gate_up_proj(x, slot)), slot)

    def kernel_weights(self) -> tuple[fused_moe.ExpertWeights, fused_moe.ExpertWeights]:
        """The stacked weights as the fused kernels read them (FP8 as stored, with its block scales)."""
        views = []
        for layer in (self.gate_up_proj, self.down_proj):
            if not layer.is_fp8:
                views.append(fused_moe.ExpertWeights(layer.weight))
                continue
            # The column map is checked once per installed map (the check reads it on the host).
            checked = getattr(layer, "_fused_checked_cols", None)
            if checked is not layer.scale_cols:
                for config in fused_moe.kernel_configs():
                    fused_moe.check_fp8_columns(layer.scale_cols, config.block_k)
                layer._fused_checked_cols = layer.scale_cols
            views.append(fused_moe.ExpertWeights(
                layer.weight, layer.weight_scale_inv, layer.scale_rows, layer.scale_cols
            ))
        return views[0], views[1]

    def fused_forward(
        self, x: torch.Tensor, local_ids: torch.Tensor, pair_weights: torch.Tensor, top_k: int, all_local: bool
    ) -> torch.Tensor:
        """x [T, H] -> each (token, choice) pair's weighted expert output [T * top_k, H], without host sync.

        `local_ids` int64 [T * top_k]: the pair's slot in `expert_ids`, `len(expert_ids)` when held elsewhere.
        """
        gate_up, down = self.kernel_weights()
        num_tokens = x.shape[0]
        if fused_moe.uses_grouped_mm(num_tokens, x.dtype, gate_up.is_fp8):
            return fused_moe.grouped_mm_experts(x, gate_up.weight, down.weight, local_ids, pair_weights, top_k)
        config = fused_moe.config_for(num_tokens, gate_up.is_fp8)
        return fused_moe.fused_experts(x, gate_up, down, local_ids, pair_weights, top_k, config, all_local)


class MiMoV2MoE(nn.Module):
    """Router `gate` + routed `experts` (hub names `mlp.gate.*`, `mlp.experts.{e}.*`).

    Each rank holds the experts of its EP group (`parallel.local_experts`) on its MoE-TP slice of their
    intermediate dim; tokens routed elsewhere contribute nothing here and the partial outputs are all-reduced.
    """

    def __init__(
        self,
        hidden_size: int,
        moe_intermediate_size: int,
        num_experts: int,
        top_k: int,
        n_group: int,
        topk_group: int,
        norm_topk_prob: bool,
        routed_scaling_factor: float,
        parallel: ParallelRank = SINGLE_RANK,
    ):
        super().__init__()
        self.gate = TopKRouter(
            hidden_size, num_experts, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor
        )
        self.local_experts = parallel.local_experts(num_experts)
        self.experts = RoutedExperts(
            hidden_size, moe_intermediate_size, self.local_experts, parallel.moe_tp_size, parallel.moe_tp_rank
        )
        self.all_experts_local = len(self.local_experts) == num_experts
        self.reduce_results = parallel.mapping.world_size > 1
        self.group = parallel.group
        self.impl = DEFAULT_IMPL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)  # [T, K], [T, K]
        out = self.expert_forward(x, weights, expert_ids)
        if self.reduce_results:
            dist.all_reduce(out, group=self.group)  # partial sums of the expert / MoE-TP ranks
        return out

    def expert_forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the chosen local experts' outputs: x [T, H] -> [T, H] (this rank's partial sum)."""
        if resolve_impl(self.impl, x.device) == "reference":
            return self.reference_expert_forward(x, weights, expert_ids)
        num_tokens, top_k = expert_ids.shape
        num_local = len(self.local_experts)
        local_ids = expert_ids.flatten() - self.local_experts.start
        if not self.all_experts_local:
            local_ids = torch.where((local_ids >= 0) & (local_ids < num_local), local_ids, num_local)
        pairs = self.experts.fused_forward(x, local_ids, weights.flatten().float(), top_k, self.all_experts_local)
        # The K weighted outputs of a token are summed in fp32 so bf16 models do not round after every expert.
        return pairs.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)

    def reference_expert_forward(
        self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        """`expert_forward` by a loop over the experts; the definition the fused path is tested against.

        Token slots are sorted by expert (the permuted layout a grouped-GEMM kernel consumes) and each local
        expert with tokens runs one dense GEMM. The per-expert counts are read on the host, so this path is
        not CUDA-graph capturable.
        """
        num_tokens, top_k = expert_ids.shape
        flat_ids = expert_ids.flatten()  # [T * K]
        slot_order = flat_ids.argsort(stable=True)
        token_of_slot = slot_order // top_k  # [T * K], grouped by expert
        weight_of_slot = weights.flatten()[slot_order]
        counts = torch.bincount(flat_ids, minlength=self.gate.num_experts).tolist()

        # Accumulate the K expert outputs in fp32 so bf16 models do not round after every expert.
        out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)  # [T, H]
        start = 0
        for expert_id, count in enumerate(counts):
            if count and expert_id in self.local_experts:
                tokens = token_of_slot[start : start + count]
                y = self.experts(x[tokens], expert_id - self.local_experts.start)  # [count, H]
                out.index_add_(0, tokens, y.float() * weight_of_slot[start : start + count, None])
            start += count
        return out.to(x.dtype)
