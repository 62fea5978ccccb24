"""Which slice of the language model each rank holds: a TensorRT-LLM-style `mapping` plus the slicing rules.

Attention: query heads split evenly over `tp_size` ranks; KV heads split evenly, or replicated on
`tp_size / num_kv_heads` consecutive ranks when there are fewer KV heads than ranks (`QKVGeometry.rows_per_rank`);
sinks follow their query heads; `o_proj` is split along its input (row parallel). Dense MLPs: gate/up split
along the intermediate dim, down along its input. Routed experts: rank r holds experts of EP group
`r % moe_ep_size` (a contiguous id range) with their intermediate dim split over `moe_tp_size`
(`moe_tp_size * moe_ep_size == tp_size`, TensorRT-LLM's rank order). Everything else (embeddings, lm_head,
norms, router, MTP `eh_proj`) is replicated: the embedding and lm_head then need no collective, at the cost
of two vocab x hidden matrices on every rank (2.5 GB in bf16 for V2.5).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

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
        geometry = rank_geometry(QKVGeometry(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim), tp)
        local[field] = dataclasses.replace(spec, num_heads=geometry.num_heads, num_kv_heads=geometry.num_kv_heads)
    return dataclasses.replace(config, **local)


def rank_geometry(geometry: QKVGeometry, tp: int) -> QKVGeometry:
    """The attention geometry one of `tp` ranks holds (local heads; replicated KV heads count once)."""
    q_rows, _, _ = geometry.rows_per_rank(tp)  # validates tp against the head counts
    kv_heads = max(1, geometry.num_kv_heads // tp)
    return QKVGeometry(q_rows // geometry.head_dim, kv_heads, geometry.head_dim, geometry.v_head_dim)


@dataclass(frozen=True, slots=True)
class Split:
    """Part `part` of `parts` equal chunks along `dim` (`parts == 1`: the whole tensor)."""

    dim: int
    parts: int
    part: int

    def shape(self, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(n // self.parts if d == self.dim else n for d, n in enumerate(full_shape))

    def positions(self, full_size: int) -> torch.Tensor:
        """int64 indices along `dim` of this part."""
        size = full_size // self.parts
        return torch.arange(self.part * size, (self.part + 1) * size)


WHOLE = Split(0, 1, 0)
_EXPERT_RE = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_COLUMN_PARALLEL = (".mlp.gate_proj.weight", ".mlp.up_proj.weight")  # output rows split
_ROW_PARALLEL = (".mlp.down_proj.weight", ".self_attn.o_proj.weight")  # input columns split, outputs all-reduced


def rank_split(name: str, config: MiMoV2Config, mapping: Mapping, rank: int) -> Split | None:
    """How rank `rank` holds module tensor `name` (split q/k/v are handled by `fused_qkv`); None: not at all."""
    if name.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight")):
        raise ValueError(f"{name}: q/k/v projections are sharded through mimo.weights.fused_qkv, not rank_split")
    expert = _EXPERT_RE.search(name)
    if expert is not None:
        if int(expert.group(1)) not in mapping.local_experts(rank, config.n_routed_experts):
            return None
        return Split(1 if expert.group(2) == "down_proj" else 0, mapping.moe_tp_size, mapping.moe_tp_rank(rank))
    if name.endswith(_COLUMN_PARALLEL) or name.endswith(".self_attn.attention_sink_bias"):
        return Split(0, mapping.tp_size, rank)
    if name.endswith(_ROW_PARALLEL):
        return Split(1, mapping.tp_size, rank)
    return WHOLE
