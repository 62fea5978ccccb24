"""MiMo-V2 MLPs: the dense SwiGLU MLP and the routed-expert MLP (sigmoid `noaux_tc` router, no shared experts,
ref §4), both with fused gate_up GEMMs on this rank's slice (`mimo.models.linear`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mimo.models.layers import silu_and_mul
from mimo.models.linear import ColumnParallelLinear, RowParallelLinear
from mimo.parallel.mapping import SINGLE_RANK, ParallelRank


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
        self.reduce_results = parallel.mapping.world_size > 1
        self.group = parallel.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)  # [T, K], [T, K]
        out = self.expert_forward(x, weights, expert_ids)
        if self.reduce_results:
            dist.all_reduce(out, group=self.group)  # partial sums of the expert / MoE-TP ranks
        return out

    def expert_forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the chosen local experts' outputs: x [T, H] -> [T, H] (this rank's partial sum).

        Token slots are sorted by expert (the permuted layout a grouped-GEMM kernel consumes) and each local
        expert with tokens runs one dense GEMM. The per-expert counts are read on the host, so this path is
        not CUDA-graph capturable; a grouped-GEMM kernel replaces this method.
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
