"""Paged KV storage: one pool of blocks per attention layer kind, one K and one V tensor per layer."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from mimo.config import MiMoV2Config


class LayerKind(enum.Enum):
    """Attention layer kinds; each kind has its own block pool and its own KV geometry."""

    # values are the config's layer_types
    FULL = "full"  # keeps the whole context: a sequence's blocks grow with it
    SLIDING = "sliding"  # keeps only the window: a sequence owns a fixed ring of blocks


@dataclass(frozen=True, slots=True)
class KVLayerSpec:
    """KV geometry of one decoder layer (per tensor-parallel rank)."""

    kind: LayerKind
    num_kv_heads: int
    head_dim: int
    v_head_dim: int


def kv_layer_specs(config: MiMoV2Config, num_mtp_layers: int = 0) -> list[KVLayerSpec]:
    """Per-layer KV geometry of the decoder layers, then of the first `num_mtp_layers` MTP layers (sliding layers
    numbered `num_hidden_layers + k`, as `MiMoV2MTPLayer` calls the attention backend)."""
    specs = []
    for layer_type in [*config.layer_types, *["sliding"] * num_mtp_layers]:
        attention = config.attention_spec(layer_type)
        specs.append(KVLayerSpec(LayerKind(layer_type), attention.num_kv_heads, attention.head_dim,
                                 attention.v_head_dim))
    return specs


def layer_kinds(specs: list[KVLayerSpec]) -> list[LayerKind]:
    """The kinds that have at least one layer (each gets a block pool)."""
    return [kind for kind in LayerKind if any(s.kind is kind for s in specs)]


def block_bytes(specs: list[KVLayerSpec], kind: LayerKind, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block of `kind` takes across all layers of that kind (K and V)."""
    return sum(block_size * s.num_kv_heads * (s.head_dim + s.v_head_dim) * dtype.itemsize
               for s in specs if s.kind is kind)


class KVCache:
    """K/V tensors of every layer; layers of one kind share block ids (one block id = the same slot in each layer).

    Per layer: k `[num_blocks, block_size, Hk, D]`, v `[num_blocks, block_size, Hk, Dv]` with that layer's geometry.
    """

    def __init__(self, specs: list[KVLayerSpec], num_blocks: dict[LayerKind, int], block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.specs = specs
        self.block_size = block_size
        self.kinds = layer_kinds(specs)
        self.num_blocks = {kind: num_blocks[kind] for kind in self.kinds}
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for spec in specs:
            n = num_blocks[spec.kind]
            self.k.append(torch.zeros(n, block_size, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=device))
            self.v.append(torch.zeros(n, block_size, spec.num_kv_heads, spec.v_head_dim, dtype=dtype, device=device))

    def kind(self, layer_idx: int) -> LayerKind:
        return self.specs[layer_idx].kind

    def write(self, layer_idx: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k `[T, Hk, D]` / v `[T, Hk, Dv]` at flat slots `[T]` (slot = block * block_size + offset)."""
        self.k[layer_idx].flatten(0, 1).index_copy_(0, slot_mapping, k)
        self.v[layer_idx].flatten(0, 1).index_copy_(0, slot_mapping, v)

    def gather(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reads k `[K, Hk, D]` and v `[K, Hk, Dv]` at flat slots `[K]`."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        return k.flatten(0, 1).index_select(0, slots), v.flatten(0, 1).index_select(0, slots)


def blocks_for(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
