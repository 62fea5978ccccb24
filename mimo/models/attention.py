"""Attention math (sliding window + learned sinks), the AttentionBackend protocol, and a no-cache backend.

`attention_with_sinks` is the single reference implementation of the sink softmax in the project: the LM
backends (this file's `NoCacheAttention`, the engine's paged backend) and the vision tower all call it.
"""

from __future__ import annotations

from typing import Protocol

import torch


def attention_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None,
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention with an optional window and per-head sink logits, computed in float32.

    Key j is visible to query i iff
      causal:     k_pos[j] <= q_pos[i] and (window is None or q_pos[i] - k_pos[j] <= window)
                  (a sliding layer sees the query plus `window` previous tokens: 129 keys for window 128);
      non-causal: window is None or |q_pos[i] - k_pos[j]| <= window.
    Sinks add one logit column per query head to the softmax denominator; the column is dropped afterwards.
    GQA: query head h reads kv head h // (Hq // Hk).

    Args:
        q: [Tq, Hq, D]; k: [Tk, Hk, D]; v: [Tk, Hk, Dv].
        q_pos: [Tq], k_pos: [Tk] token positions within the sequence.
        sinks: [Hq] or None.
    Returns:
        [Tq, Hq, Dv] in v's dtype. Every query must see at least one key or have a sink.
    """
    num_q, num_heads, head_dim = q.shape
    num_k, num_kv_heads, _ = k.shape
    if k.shape[-1] != head_dim or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if q_pos.shape != (num_q,) or k_pos.shape != (num_k,):
        raise ValueError(
            f"q_pos {tuple(q_pos.shape)} / k_pos {tuple(k_pos.shape)} must be [{num_q}] / [{num_k}]"
        )
    if sinks is not None and sinks.shape != (num_heads,):
        raise ValueError(f"sinks must be [{num_heads}], found {tuple(sinks.shape)}")
    group = num_heads // num_kv_heads

    q_grouped = q.float().view(num_q, num_kv_heads, group, head_dim)
    scores = torch.einsum("qhgd,khd->hgqk", q_grouped, k.float()) * scale  # [Hk, G, Tq, Tk]

    distance = q_pos[:, None] - k_pos[None, :]  # [Tq, Tk]
    if causal:
        visible = distance >= 0
        if sliding_window is not None:
            visible &= distance <= sliding_window
    elif sliding_window is not None:
        visible = distance.abs() <= sliding_window
    else:
        visible = torch.ones_like(distance, dtype=torch.bool)
    scores = scores.masked_fill(~visible, float("-inf"))

    if sinks is not None:
        sink_logits = sinks.float().view(num_kv_heads, group, 1, 1).expand(-1, -1, num_q, 1)
        probs = torch.cat([scores, sink_logits], dim=-1).softmax(dim=-1)[..., :-1]  # [Hk, G, Tq, Tk]
    else:
        probs = scores.softmax(dim=-1)

    out = torch.einsum("hgqk,khd->qhgd", probs, v.float())  # [Tq, Hk, G, Dv]
    return out.reshape(num_q, num_heads, v.shape[-1]).to(v.dtype)


class AttentionBackend(Protocol):
    """Per-step attention over the flattened tokens of one or more sequences.

    The backend owns the sequence segmentation and any KV cache; layers only hand it the step's new tokens.
    """

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        sliding_window: int | None,
        sinks: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] (already rotated, v already scaled) -> [T, Hq, Dv]."""
        ...


class NoCacheAttention(AttentionBackend):
    """Whole sequences from position 0, recomputed every call (reference / parity backend, no KV cache)."""

    def __init__(self, seq_lens: list[int]):
        if not seq_lens or any(n < 1 for n in seq_lens):
            raise ValueError(f"seq_lens must be a non-empty list of positive lengths, found {seq_lens}")
        self.seq_lens = list(seq_lens)

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        sliding_window: int | None,
        sinks: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        if q.shape[0] != sum(self.seq_lens):
            raise ValueError(
                f"layer {layer_idx}: got {q.shape[0]} tokens but seq_lens {self.seq_lens} sum to {sum(self.seq_lens)}"
            )
        outputs = []
        for q_seq, k_seq, v_seq in zip(q.split(self.seq_lens), k.split(self.seq_lens), v.split(self.seq_lens)):
            positions = torch.arange(q_seq.shape[0], device=q.device)
            outputs.append(
                attention_with_sinks(
                    q_seq, k_seq, v_seq, q_pos=positions, k_pos=positions,
                    scale=scale, sliding_window=sliding_window, sinks=sinks,
                )
            )
        return torch.cat(outputs)  # [T, Hq, Dv]
