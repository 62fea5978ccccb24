"""Attention inside the segments of one packed token axis: the encoders' attention (vision tower, audio tokenizer).

The tokens of several images / temporal slices / audio segments are concatenated on one axis; a token attends
only to tokens of its own segment, optionally within a window and causally, with optional per-head sinks.
`SegmentAttention` is built once per forward from the segment lengths (host ints) and then called by every layer:

* `reference`: per segment through `attention_with_sinks` (float32 score blocks, queries in chunks); the CPU path.
* `flex`: one compiled FlexAttention call over the whole axis, the segment / window / causal structure in a
  block mask computed from the lengths before the layers (no host sync in the layers), sinks applied afterwards
  from the log-sum-exp: softmax with a sink column = softmax without it times sigmoid(lse - sink).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from mimo.models.attention import attention_with_sinks

IMPLS = ("auto", "reference", "flex")
BLOCK_SIZE = 128  # FlexAttention's sparse block: the block mask's granularity

MaskSpec = tuple[bool, int | None]  # (causal, window): see attention_with_sinks for the visibility rule

_compiled_flex = None


def _flex(device: torch.device):
    """FlexAttention compiled once per process on CUDA (dynamic shapes, so new sizes rarely recompile);
    eager elsewhere (the unfused math, which tests use to check the block masks on the CPU)."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto" -> "flex" on CUDA, "reference" elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "flex" if device.type == "cuda" else "reference"
    return impl


class SegmentAttention:
    """Attention over the segments of a packed token axis.

    Args:
        seq_lens: segment lengths in token order (host ints, each >= 1).
        device: where the tokens live.
        specs: the (causal, window) combinations the layers will ask for (flex builds one block mask each).
        impl: "auto", "reference" or "flex".
        query_chunk: reference path only: queries per float32 score block (None = whole segments).
    """

    def __init__(
        self,
        seq_lens: list[int],
        device: torch.device,
        specs: Iterable[MaskSpec],
        impl: str = "auto",
        query_chunk: int | None = None,
    ):
        if not seq_lens or any(not isinstance(n, int) or n < 1 for n in seq_lens):
            raise ValueError(f"segment lengths must be a non-empty list of positive ints, found {seq_lens}")
        self.seq_lens = list(seq_lens)
        self.num_tokens = sum(seq_lens)  # an int, not the list: compiled callers then guard on no list length
        self.impl = resolve_impl(impl, torch.device(device))
        self.query_chunk = query_chunk
        self.block_masks: dict[MaskSpec, BlockMask] = {}
        if self.impl == "flex":
            segment_ids = _segment_ids(self.seq_lens, torch.device(device))
            for spec in set(specs):
                self.block_masks[spec] = segment_block_mask(self.seq_lens, segment_ids, *spec)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        causal: bool,
        window: int | None,
        sinks: torch.Tensor | None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] -> [T, Hq, Dv] in v's dtype."""
        if q.shape[0] != self.num_tokens:
            raise ValueError(f"got {q.shape[0]} tokens but the segment lengths sum to {self.num_tokens}")
        if self.impl == "reference":
            return self._reference(q, k, v, scale=scale, causal=causal, window=window, sinks=sinks)
        block_mask = self.block_masks.get((causal, window))
        if block_mask is None:
            raise ValueError(f"no block mask for causal={causal}, window={window}; prepared: {list(self.block_masks)}")
        return flex_segment_attention(q, k, v, block_mask, scale=scale, sinks=sinks)

    def _reference(self, q, k, v, *, scale, causal, window, sinks) -> torch.Tensor:
        outputs = []
        start = 0
        for length in self.seq_lens:
            seg = slice(start, start + length)
            outputs.extend(_reference_segment(
                q[seg], k[seg], v[seg], scale=scale, causal=causal, window=window, sinks=sinks,
                query_chunk=self.query_chunk or length,
            ))
            start += length
        return torch.cat(outputs)


def _reference_segment(q, k, v, *, scale, causal, window, sinks, query_chunk) -> list[torch.Tensor]:
    """One segment, queries in chunks; a chunk reads only the keys its window (and causality) can reach."""
    length = q.shape[0]
    positions = torch.arange(length, device=q.device)
    outputs = []
    for start in range(0, length, query_chunk):
        end = min(start + query_chunk, length)
        k_start = 0 if window is None else max(0, start - window)
        k_end = end if causal else (length if window is None else min(length, end + window))
        outputs.append(attention_with_sinks(
            q[start:end], k[k_start:k_end], v[k_start:k_end],
            q_pos=positions[start:end], k_pos=positions[k_start:k_end],
            scale=scale, sliding_window=window, sinks=sinks, causal=causal,
        ))
    return outputs


def flex_segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, *, scale: float,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hk, D] through one FlexAttention call -> [T, Hq, D]."""
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D] views
    gqa = q.shape[1] != k.shape[1]
    flex = _flex(q.device)
    if sinks is None:
        out = flex(q4, k4, v4, block_mask=block_mask, scale=scale, enable_gqa=gqa)  # [1, Hq, T, D]
    else:
        out, aux = flex(
            q4, k4, v4, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True)
        )
        # sink column in the denominator: sum / (sum + e^sink) = sigmoid(lse - sink), lse [1, Hq, T] float32
        out = (out.float() * torch.sigmoid(aux.lse - sinks.float()[None, :, None])[..., None]).to(v.dtype)
    return out[0].transpose(0, 1)  # [T, Hq, D]


def _segment_ids(seq_lens: list[int], device: torch.device) -> torch.Tensor:
    """[T rounded up to BLOCK_SIZE] int32 segment index per token; padding tokens get len(seq_lens)."""
    total = sum(seq_lens)
    padded = -(-total // BLOCK_SIZE) * BLOCK_SIZE
    ids = torch.repeat_interleave(torch.arange(len(seq_lens) + 1, dtype=torch.int32),
                                  torch.tensor(seq_lens + [padded - total]))
    return _to_device(ids, device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host metadata to the device without waiting for the queued work (pinned, non-blocking)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def block_visibility(seq_lens: list[int], causal: bool, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query block, key block) pairs hold visible pairs: (partial, full) bool [nb, nb], on the host.

    `full` blocks have every query-key pair visible (no mask evaluated in the kernel); `partial` blocks have
    some (a superset is fine: the mask decides inside them). Blocks holding padding are never full.
    """
    total = sum(seq_lens)
    num_blocks = -(-total // BLOCK_SIZE)
    first = torch.arange(num_blocks) * BLOCK_SIZE  # first token of each block
    last = torch.clamp(first + BLOCK_SIZE, max=total) - 1  # last real token
    bounds = torch.tensor(seq_lens).cumsum(0)
    seg_first, seg_last = torch.bucketize(first, bounds, right=True), torch.bucketize(last, bounds, right=True)
    whole = (seg_first == seg_last) & (first + BLOCK_SIZE <= total)  # one segment, no padding

    # query blocks on rows, key blocks on columns; q - k over a block pair spans [lo, hi]
    lo = first[:, None] - last[None, :]
    hi = last[:, None] - first[None, :]
    share = (seg_first[:, None] <= seg_last[None, :]) & (seg_first[None, :] <= seg_last[:, None])
    any_visible = share.clone()
    all_visible = whole[:, None] & whole[None, :] & (seg_first[:, None] == seg_first[None, :])
    if causal:
        any_visible &= hi >= 0
        all_visible &= lo >= 0
        if window is not None:
            any_visible &= lo <= window
            all_visible &= hi <= window
    elif window is not None:
        any_visible &= (lo <= window) & (hi >= -window)
        all_visible &= (lo >= -window) & (hi <= window)
    return any_visible & ~all_visible, all_visible


def segment_block_mask(
    seq_lens: list[int], segment_ids: torch.Tensor, causal: bool, window: int | None
) -> BlockMask:
    """FlexAttention block mask for segments of `seq_lens` (segment_ids from `_segment_ids`, on the device)."""
    partial, full = block_visibility(seq_lens, causal, window)
    device = segment_ids.device
    total = sum(seq_lens)

    def mask_mod(b, h, q_idx, kv_idx):
        visible = segment_ids[q_idx] == segment_ids[kv_idx]
        if causal:
            visible = visible & (q_idx >= kv_idx)
        if window is not None:
            visible = visible & (q_idx - kv_idx <= window)
            if not causal:  # (not `>= -window`: inductor cannot lower a negated dynamic int here)
                visible = visible & (kv_idx - q_idx <= window)
        return visible

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = blocks.sum(-1, dtype=torch.int32)  # [nb]
        indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # visible first
        return _to_device(counts[None, None], device), _to_device(indices[None, None], device)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod,
        seq_lengths=(total, total), compute_q_blocks=False,
    )
