"""Which slice of the language model each rank holds: a TensorRT-LLM-style `mapping` plus the slicing rules.

Attention: query heads split evenly over `tp_size` ranks; KV heads split evenly, or replicated on
`tp_size / num_kv_heads` consecutive ranks when there are fewer KV heads than ranks (`QKVGeometry.rows_per_rank`);
sinks follow their query heads; `o_proj` is split along its input (row parallel). Dense MLPs: gate/up split
along the intermediate dim, down along its input. Routed experts: rank r holds experts of EP group
`r % moe_ep_size` (a contiguous id range) with their intermediate dim split over `moe_tp_size`
(`moe_tp_size * moe_ep_size == tp_size`, TensorRT-LLM's rank order). Everything else (embeddings, lm_head,
norms, router, MTP `eh_proj`) is replicated: the embedding and lm_head then need no collective, at the cost
of two vocab x hidden matrices on every rank (2.5 GB in bf16 for V2.5).

The slicing itself is stated once, by the layers (`mimo.models.linear`: `shard_index`); a model built for a
`ParallelRank` holds that rank's shapes, and loading / converting slice by the same layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist

from mimo.config import MiMoV2Config
from mimo.weights.fused_qkv import QKVGeometry


class MappingError(ValueError):
    """A parallel layout the model or the deployment artifact does not allow; names the numbers involved."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """TensorRT-LLM `mapping` of a deployment (`pp_size` is always 1 here)."""

    world_size: int
    tp_size: int
    moe_tp_size: int
    moe_ep_size: int

    @classmethod
    def create(cls, tp_size: int, moe_ep_size: int = 1) -> Mapping:
        if tp_size < 1:
            raise MappingError(f"tp size must be >= 1, got {tp_size}")
        if moe_ep_size < 1 or tp_size % moe_ep_size:
            raise MappingError(f"expert parallel size {moe_ep_size} must be >= 1 and divide tp size {tp_size}")
        return cls(tp_size, tp_size, tp_size // moe_ep_size, moe_ep_size)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> Mapping:
        try:
            mapping = cls(*(int(d[k]) for k in ("world_size", "tp_size", "moe_tp_size", "moe_ep_size")))
        except (KeyError, TypeError, ValueError) as e:
            raise MappingError(
                f"{source}: 'mapping' needs integer world_size, tp_size, moe_tp_size, moe_ep_size ({e})"
            ) from e
        if mapping != cls.create(mapping.tp_size, mapping.moe_ep_size) or d.get("pp_size", 1) != 1:
            raise MappingError(
                f"{source}: inconsistent mapping {d}: expected world_size = tp_size = "
                f"moe_tp_size * moe_ep_size and pp_size 1"
            )
        return mapping

    def to_dict(self) -> dict[str, int]:
        return {
            "world_size": self.world_size,
            "tp_size": self.tp_size,
            "pp_size": 1,
            "moe_tp_size": self.moe_tp_size,
            "moe_ep_size": self.moe_ep_size,
        }

    def moe_tp_rank(self, rank: int) -> int:
        return rank // self.moe_ep_size

    def moe_ep_rank(self, rank: int) -> int:
        return rank % self.moe_ep_size

    def local_experts(self, rank: int, num_experts: int) -> range:
        per_rank = num_experts // self.moe_ep_size
        start = self.moe_ep_rank(rank) * per_rank
        return range(start, start + per_rank)

    def check_model(self, config: MiMoV2Config) -> None:
        """Raise MappingError unless every layer of `config` splits evenly under this mapping."""
        tp = self.tp_size
        for prefix, spec in (("", config.full_attention), ("swa_", config.sliding_attention)):
            if spec.num_heads % tp:
                raise MappingError(f"tp_size {tp} does not divide {prefix}num_attention_heads={spec.num_heads}")
            if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
                raise MappingError(
                    f"tp_size {tp} neither divides nor is a multiple of {prefix}num_key_value_heads="
                    f"{spec.num_kv_heads} (KV heads are split, or replicated when tp_size exceeds them)"
                )
        if not all(config.moe_layers) or config.num_nextn_predict_layers:
            if config.intermediate_size % tp:
                raise MappingError(f"tp_size {tp} does not divide intermediate_size={config.intermediate_size}")
        if any(config.moe_layers):
            if config.n_routed_experts % self.moe_ep_size:
                raise MappingError(
                    f"moe_ep_size {self.moe_ep_size} does not divide n_routed_experts={config.n_routed_experts}"
                )
            if config.moe_intermediate_size % self.moe_tp_size:
                raise MappingError(
                    f"moe_tp_size {self.moe_tp_size} does not divide "
                    f"moe_intermediate_size={config.moe_intermediate_size}"
                )


def rank_config(config: MiMoV2Config, tp: int) -> MiMoV2Config:
    """`config` with the head counts one of `tp` ranks holds: what a rank's module is, and what sizes its KV cache."""
    local = {}
    for field in ("full_attention", "sliding_attention"):
        spec = getattr(config, field)
        geometry = QKVGeometry(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim).local(tp)
        local[field] = dataclasses.replace(spec, num_heads=geometry.num_heads, num_kv_heads=geometry.num_kv_heads)
    return dataclasses.replace(config, **local)


@dataclass(frozen=True)
class ParallelRank:
    """Rank `rank` of `mapping`, and the process group its partial sums are all-reduced over (None: one rank)."""

    mapping: Mapping
    rank: int = 0
    group: dist.ProcessGroup | None = None

    @property
    def tp_size(self) -> int:
        return self.mapping.tp_size

    @property
    def moe_tp_size(self) -> int:
        return self.mapping.moe_tp_size

    @property
    def moe_tp_rank(self) -> int:
        return self.mapping.moe_tp_rank(self.rank)

    def local_experts(self, num_experts: int) -> range:
        return self.mapping.local_experts(self.rank, num_experts)


SINGLE_RANK = ParallelRank(Mapping.create(1))
