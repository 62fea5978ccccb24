"""The TP-interleaved fused `self_attn.qkv_proj.weight` of MiMo-V2.5 checkpoints (ref §3).

The fused weight is `ckpt_tp` contiguous row shards, shard r = `[Q_r; K_r; V_r]`: exactly what rank r of a
tensor-parallel QKV linear holds. Query heads are split evenly; KV heads are split evenly when
`num_kv_heads >= tp`, else each KV head is replicated on `tp / num_kv_heads` consecutive ranks (the
vLLM / SGLang QKVParallelLinear rule, hence `k_per = max(1, n_kv / tp) * head_dim`). In FP8 checkpoints
every shard carries its own 128x128 scale grid, so the fused grid has `tp * ceil(rows_per_shard / 128)` rows.

Everything here is a pure function of canonical `q [n_heads*D, H]`, `k [n_kv*D, H]`, `v [n_kv*Dv, H]`;
`shard_qkv_for_rank` also serves re-sharding to any serving TP (smaller, equal or larger than `ckpt_tp`).
Shape problems raise ValueError naming the tensor, expected and found shapes.
"""

import re
from dataclasses import dataclass

import torch

from mimo.config import MiMoV2Config
from mimo.weights.fp8 import BLOCK, quantize_blockwise, scale_grid_shape


@dataclass(frozen=True, slots=True)
class QKVGeometry:
    """Attention projection geometry of one layer (full-attention or sliding-window numbers)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int

    def rows_per_rank(self, tp: int) -> tuple[int, int, int]:
        """(q, k, v) rows that one of `tp` ranks holds."""
        if tp < 1 or self.num_heads % tp:
            raise ValueError(f"{self.num_heads} attention heads cannot be split over tp={tp}")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ValueError(f"{self.num_kv_heads} kv heads can be neither split nor replicated over tp={tp}")
        kv_heads_per_rank = max(1, self.num_kv_heads // tp)
        return (
            self.num_heads // tp * self.head_dim,
            kv_heads_per_rank * self.head_dim,
            kv_heads_per_rank * self.v_head_dim,
        )

    def canonical_rows(self) -> tuple[int, int, int]:
        return self.rows_per_rank(1)

    def local(self, tp: int) -> "QKVGeometry":
        """The geometry one of `tp` ranks holds (local heads; replicated KV heads count once)."""
        q_rows, _, _ = self.rows_per_rank(tp)  # validates tp against the head counts
        return QKVGeometry(q_rows // self.head_dim, max(1, self.num_kv_heads // tp), self.head_dim, self.v_head_dim)


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def layer_qkv_geometry(config: MiMoV2Config, hub_name: str) -> QKVGeometry:
    """Geometry of the layer a hub attention tensor belongs to: its layer type, sliding for MTP layers (ref §3)."""
    match = _LAYER_RE.match(hub_name)
    if match is None:
        if not hub_name.startswith("model.mtp.layers."):
            raise ValueError(f"{hub_name!r} is neither in model.layers.N nor in model.mtp.layers.N")
        spec = config.sliding_attention
    else:
        layer = int(match.group(1))
        if layer >= config.num_hidden_layers:
            raise ValueError(f"{hub_name!r}: layer {layer} >= num_hidden_layers {config.num_hidden_layers}")
        spec = config.attention_spec(config.layer_types[layer])
    return QKVGeometry(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim)


def _check_canonical(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: QKVGeometry) -> None:
    expected = geometry.canonical_rows()
    for name, t, rows in zip("qkv", (q, k, v), expected):
        if t.dim() != 2 or t.shape[0] != rows or t.shape[1] != q.shape[1]:
            raise ValueError(
                f"{name}_proj.weight has shape {tuple(t.shape)}, expected {(rows, q.shape[1])} for {geometry}"
            )


def shard_qkv_for_rank(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: QKVGeometry, tp: int, rank: int
) -> torch.Tensor:
    """Rank `rank`'s fused `[Q_r; K_r; V_r]` rows (`[sum(rows_per_rank(tp)), H]`) for serving TP `tp`."""
    _check_canonical(q, k, v, geometry)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside tp={tp}")
    q_rows, k_rows, v_rows = geometry.rows_per_rank(tp)
    # kv_rank: which slice of the KV heads this rank holds; with replication, ranks r..r+tp/n_kv-1 share one head.
    kv_rank = rank if geometry.num_kv_heads >= tp else rank * geometry.num_kv_heads // tp
    return torch.cat(
        [
            q[rank * q_rows : (rank + 1) * q_rows],
            k[kv_rank * k_rows : (kv_rank + 1) * k_rows],
            v[kv_rank * v_rows : (kv_rank + 1) * v_rows],
        ]
    )


def fuse_interleaved(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: QKVGeometry, ckpt_tp: int
) -> torch.Tensor:
    """Canonical q/k/v -> hub fused `qkv_proj.weight` `[ckpt_tp * rows_per_shard, H]`."""
    return torch.cat([shard_qkv_for_rank(q, k, v, geometry, ckpt_tp, r) for r in range(ckpt_tp)])


def fused_rows(geometry: QKVGeometry, ckpt_tp: int) -> int:
    return ckpt_tp * sum(geometry.rows_per_rank(ckpt_tp))


def _check_fused_rows(qkv: torch.Tensor, geometry: QKVGeometry, ckpt_tp: int, name: str) -> None:
    expected_rows = fused_rows(geometry, ckpt_tp)
    if qkv.dim() != 2 or qkv.shape[0] != expected_rows:
        raise ValueError(
            f"{name}: fused qkv_proj has shape {tuple(qkv.shape)}, expected ({expected_rows}, hidden) "
            f"= {ckpt_tp} shards of {geometry.rows_per_rank(ckpt_tp)} (q, k, v) rows for {geometry}"
        )


def split_interleaved(
    qkv: torch.Tensor, geometry: QKVGeometry, ckpt_tp: int, *, name: str = "qkv_proj.weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hub fused `qkv_proj.weight` -> canonical (q, k, v); replicated KV heads are taken from their first shard."""
    _check_fused_rows(qkv, geometry, ckpt_tp, name)
    q_rows, k_rows, v_rows = geometry.rows_per_rank(ckpt_tp)
    shards = qkv.reshape(ckpt_tp, q_rows + k_rows + v_rows, qkv.shape[1])  # [tp, rows_per_shard, H]
    replicas = max(1, ckpt_tp // geometry.num_kv_heads)
    kv_shards = shards[::replicas]  # [min(tp, n_kv), rows_per_shard, H]
    hidden = qkv.shape[1]
    q = shards[:, :q_rows].reshape(-1, hidden)
    k = kv_shards[:, q_rows : q_rows + k_rows].reshape(-1, hidden)
    v = kv_shards[:, q_rows + k_rows :].reshape(-1, hidden)
    return q, k, v


def fused_scale_grid_shape(geometry: QKVGeometry, ckpt_tp: int, hidden: int) -> tuple[int, int]:
    """Shape of a fused qkv_proj `weight_scale_inv`: one 128x128 grid per shard, stacked (ref §3)."""
    grid_rows, grid_cols = scale_grid_shape(sum(geometry.rows_per_rank(ckpt_tp)), hidden)
    return (ckpt_tp * grid_rows, grid_cols)


def quantize_interleaved(
    qkv: torch.Tensor, geometry: QKVGeometry, ckpt_tp: int, *, name: str = "qkv_proj.weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused floating `qkv_proj.weight` -> (FP8 weight `[rows, H]`, per-shard `weight_scale_inv`)."""
    _check_fused_rows(qkv, geometry, ckpt_tp, name)
    w_fp8, scale_inv = quantize_blockwise(qkv.reshape(ckpt_tp, -1, qkv.shape[1]))  # [tp, rps, H], [tp, gR, gC]
    return w_fp8.view(qkv.shape), scale_inv.reshape(-1, scale_inv.shape[-1])


def interleaved_rows_for_rank(geometry: QKVGeometry, ckpt_tp: int, tp: int, rank: int) -> torch.Tensor:
    """Rows of a `ckpt_tp`-interleaved fused qkv_proj that form rank `rank`'s `[Q_r; K_r; V_r]` at serving TP `tp`.

    Re-sharding to any TP is then one row gather (`fused[rows]`), for floating and FP8 weights alike. The index
    is the layout itself run on row numbers: split the fused rows into canonical q/k/v, then shard for `rank`.
    """
    row_ids = torch.arange(fused_rows(geometry, ckpt_tp))[:, None]  # [rows, 1]
    q, k, v = split_interleaved(row_ids, geometry, ckpt_tp, name="row index")
    return shard_qkv_for_rank(q, k, v, geometry, tp, rank)[:, 0]  # [sum(rows_per_rank(tp))]


def interleaved_scale_rows(geometry: QKVGeometry, ckpt_tp: int) -> torch.Tensor:
    """int64 `[rows]`: the `weight_scale_inv` row each row of a fused FP8 qkv_proj uses (per-shard grids, ref §3)."""
    rows_per_shard = sum(geometry.rows_per_rank(ckpt_tp))
    grid_rows_per_shard = -(-rows_per_shard // BLOCK)
    row = torch.arange(fused_rows(geometry, ckpt_tp))
    return row // rows_per_shard * grid_rows_per_shard + row % rows_per_shard // BLOCK
