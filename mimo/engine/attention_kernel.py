"""Paged attention with sinks and sliding windows in Triton: the CUDA path of `PagedAttention`.

Same math as `attention_with_sinks` (causal; a sliding layer sees keys with `0 <= q_pos - k_pos <= window`; per-head
sinks only enlarge the softmax denominator), over the varlen step of `PagedAttentionMetadata`: sequence i computes
the `counts[i]` tokens ending at position `seq_ends[i]`, whose k/v are already in the cache, and reads every key
straight from the paged pool through its block table (`table[(pos // block_size) % length]`: the ring on sliding
layers).

One program attends one tile of query rows of one sequence against one kv head: the tile's BLOCK_M rows are BLOCK_Q
query tokens times the G = Hq / Hk query heads that read that kv head, so a single decode token already fills a
16-row dot at G = 16 and each key is read once for the whole group. The grid is a bound that depends on shapes only
(T // BLOCK_Q + B query tiles): each program finds its sequence by binary search over the device `cu_q`, and the
tiles past a sequence's end return at once. Nothing reads a device value on the host, so a step can be captured in
a CUDA graph.

Flash decoding: with `num_splits` > 1 each program covers one share of its tile's key blocks and stores its
unnormalised output with its running max and sum; `_combine_kernel` then merges the shares through their
log-sum-exp and adds the sink there. That is what fills the GPU at batch 1, where there are only Hk programs.
The split count and tile shape come from host lists (rows and keys per sequence); the shares themselves from the
device lengths, so a graph captured with one split count stays exact for any lengths at the same T and B.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


# the split count follows the context, the sequence count the batch: neither multiplies the compiled variants
@triton.jit(do_not_specialize=["num_splits", "num_seqs"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    block_table_ptr, table_lens_ptr, cu_q_ptr, seq_ends_ptr, sinks_ptr,
    num_seqs, num_q_heads, scale_log2, window, num_splits,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_table,
    KV_BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr,
    V_HEAD_DIM: tl.constexpr, DV_PAD: tl.constexpr, SLIDING: tl.constexpr, HAS_SINKS: tl.constexpr,
    SPLIT_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # sequence i owns query tiles [cu_q[i] // BLOCK_Q + i, ...): find the last start <= q_tile
    left: tl.int32 = 0
    right: tl.int32 = num_seqs
    while left < right:
        mid = (left + right) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= q_tile:
            left = mid + 1
        else:
            right = mid
    seq = left - 1
    q_begin = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_begin
    tile = q_tile - (q_begin // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:
        return
    seq_end = tl.load(seq_ends_ptr + seq)
    first_pos = seq_end - q_len  # position of the sequence's first query token this step

    offs_m = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + offs_m // GROUP  # [M] query token within the sequence's step
    head = kv_head * GROUP + offs_m % GROUP  # [M] query head
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = first_pos + tok
    q_rows = q_ptr + (q_begin + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    # the head dim in a power-of-two part and a (masked) rest: 192 = 128 + 64 computes no padding
    d_a = tl.arange(0, D_A)
    a_ok = d_a < HEAD_DIM  # all true unless the head dim is below a dot's 16
    q_a = tl.load(q_rows + d_a[None, :], mask=row_ok[:, None] & a_ok[None, :], other=0.0)  # [M, D_A]
    if D_B > 0:
        d_b = D_A + tl.arange(0, D_B)
        q_b = tl.load(q_rows + d_b[None, :], mask=row_ok[:, None] & (d_b[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        q_a = q_a.to(tl.float32)
        if D_B > 0:
            q_b = q_b.to(tl.float32)
    dv = tl.arange(0, DV_PAD)
    dv_ok = dv < V_HEAD_DIM

    key_hi = first_pos + tl.minimum(q_len, (tile + 1) * BLOCK_Q)  # one past the tile's last query position
    if SLIDING:
        key_lo = tl.maximum(first_pos + tile * BLOCK_Q - window, 0)
    else:
        key_lo = first_pos * 0
    num_key_tiles = tl.cdiv(key_hi - key_lo, BLOCK_N)
    per_split = tl.cdiv(num_key_tiles, num_splits)
    tile_begin = split * per_split
    tile_end = tl.minimum(tile_begin + per_split, num_key_tiles)
    table_row = block_table_ptr + seq.to(tl.int64) * stride_table
    table_len = tl.load(table_lens_ptr + seq)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for key_tile in range(tile_begin, tile_end):
        k_pos = key_lo + key_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [N]
        k_ok = k_pos < key_hi
        block = tl.load(table_row + (k_pos // KV_BLOCK_SIZE) % table_len, mask=k_ok, other=0).to(tl.int64)
        offset = k_pos % KV_BLOCK_SIZE
        k_cols = k_ptr + block * stride_kb + offset * stride_kt + kv_head * stride_kh  # [N]
        k_a = tl.load(k_cols[None, :] + d_a[:, None], mask=k_ok[None, :] & a_ok[:, None], other=0.0)  # [D_A, N]
        if DOT_FP32:
            k_a = k_a.to(tl.float32)
        scores = tl.dot(q_a, k_a, input_precision=DOT_PRECISION)
        if D_B > 0:
            k_b = tl.load(k_cols[None, :] + d_b[:, None], mask=k_ok[None, :] & (d_b[:, None] < HEAD_DIM), other=0.0)
            if DOT_FP32:
                k_b = k_b.to(tl.float32)
            scores += tl.dot(q_b, k_b, input_precision=DOT_PRECISION)
        scores *= scale_log2  # [M, N], log2 units
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if SLIDING:
            visible &= q_pos[:, None] - k_pos[None, :] <= window
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays all zero
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = v_ptr + block * stride_vb + offset * stride_vt + kv_head * stride_vh  # [N]
        v = tl.load(v_rows[:, None] + dv[None, :], mask=k_ok[:, None] & dv_ok[None, :], other=0.0)  # [N, DV]
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    token = (q_begin + tok).to(tl.int64)
    if not SPLIT_KEYS:
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            m_all = tl.maximum(m_i, sink)
            l_i = l_i * tl.exp2(m_i - m_all) + tl.exp2(sink - m_all)
            acc *= tl.exp2(m_i - m_all)[:, None]
        out = acc / l_i[:, None]
        out_rows = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(out_rows + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    else:
        part = (token * num_q_heads + head) * num_splits + split  # [M] row of the [T, Hq, S] partials
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_out_ptr + part[:, None] * DV_PAD + dv[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, sinks_ptr, num_q_heads, num_splits, stride_ot, stride_oh,
    V_HEAD_DIM: tl.constexpr, DV_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < num_splits
    part = (token * num_q_heads + head) * num_splits + s  # [S]
    m = tl.load(part_m_ptr + part, mask=s_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=s_ok, other=0.0)
    m_all = tl.max(m, 0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_all, sink)
    weight = tl.exp2(m - m_all)  # [S]; 0 for a share that saw no key
    denominator = tl.sum(weight * l, 0)
    if HAS_SINKS:
        denominator += tl.exp2(sink - m_all)
    dv = tl.arange(0, DV_PAD)
    acc = tl.load(part_out_ptr + part[:, None] * DV_PAD + dv[None, :], mask=s_ok[:, None], other=0.0)  # [S, DV]
    out = tl.sum(acc * weight[:, None], 0) / denominator
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dv, out.to(out_ptr.dtype.element_ty),
             mask=dv < V_HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter (CPU tests): a small machine, so that splits get exercised there too
    return torch.cuda.get_device_properties(device).multi_processor_count


def tile_shape(num_q_heads: int, num_kv_heads: int, max_query_count: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): rows of a program's query tile and the query tokens they hold (GQA group packed)."""
    group = num_q_heads // num_kv_heads
    rows = triton.next_power_of_2(group)
    if max_query_count * group > 16:  # several tokens per sequence (verify, prefill chunks): taller tiles
        rows = max(rows, 64 if max_query_count * group <= 64 else 128)
    return max(rows, 16), max(1, max(rows, 16) // group)


def tile_query_counts(num_q_heads: int, num_kv_heads: int, limit: int) -> list[int]:
    """The fewest query tokens per sequence that select each tile shape (one compiled variant each), up to `limit`:
    a launch's tile follows the most query tokens of any of its sequences."""
    counts, shapes = [], set()
    for count in range(1, limit + 1):
        shape = tile_shape(num_q_heads, num_kv_heads, count)
        if shape not in shapes:
            shapes.add(shape)
            counts.append(count)
    return counts


def choose_num_splits(num_query_tiles: int, num_kv_heads: int, max_key_count: int, block_n: int,
                      device: torch.device) -> int:
    """Key-block shares per query tile: enough programs for about two waves, each share at least 2 key tiles."""
    programs = num_query_tiles * num_kv_heads
    target = 2 * _num_sms(device)
    if programs >= target:
        return 1
    max_splits = max(1, triton.cdiv(max_key_count, block_n) // 2)
    return min(triton.cdiv(target, programs), max_splits)


def kernel_config(num_q_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int, kv_block_size: int,
                  max_query_count: int, *, block_n: int, num_splits: int, sliding: bool, has_sinks: bool,
                  dtype: torch.dtype, on_gpu: bool) -> dict:
    """The attention kernel's constexprs and launch options (num_warps, num_stages on the GPU) for one call."""
    block_m, block_q = tile_shape(num_q_heads, num_kv_heads, max_query_count)
    d_a = max(16, 1 << (head_dim.bit_length() - 1))
    config = dict(
        KV_BLOCK_SIZE=kv_block_size, GROUP=num_q_heads // num_kv_heads, BLOCK_M=block_m, BLOCK_Q=block_q,
        BLOCK_N=block_n, HEAD_DIM=head_dim, D_A=d_a,
        D_B=0 if d_a >= head_dim else max(16, triton.next_power_of_2(head_dim - d_a)),
        V_HEAD_DIM=v_head_dim, DV_PAD=max(16, triton.next_power_of_2(v_head_dim)),
        SLIDING=sliding, HAS_SINKS=has_sinks, SPLIT_KEYS=num_splits > 1,
        # the interpreter (CPU) multiplies bfloat16 operands wrongly (its dot reads their bits): it gets float32 ones
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", DOT_FP32=not on_gpu,
    )  # fmt: skip
    if on_gpu:
        config.update(num_warps=8 if block_m >= 128 else 4, num_stages=2)
    return config


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    block_table: torch.Tensor,
    table_lens: torch.Tensor,
    cu_q: torch.Tensor,
    seq_ends: torch.Tensor,
    query_counts: list[int],
    key_counts: list[int],
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of the step's queries over the paged KV (the new tokens' k/v already written).

    Args:
        q: [T, Hq, D], sequences concatenated. k_cache: [num_blocks, block_size, Hk, D]; v_cache: the same with Dv.
        block_table: [B, W] physical block of each logical block (mod `table_lens` [B]).
        cu_q: [B + 1] int32, first flat query row of each sequence; seq_ends: [B] int32, one past its last position.
        query_counts / key_counts: host copies of the rows and attended keys per sequence (tile and split choice).
        sinks: [Hq] or None. num_splits, block_n: override the heuristics (tests).
    Returns:
        [T, Hq, Dv] in v_cache's dtype.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, kv_block_size, num_kv_heads, v_head_dim = v_cache.shape
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != head_dim:
        raise ValueError(f"paged_attention: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} disagree")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"paged_attention: query heads ({num_q_heads}) must be a multiple of kv heads "
                         f"({num_kv_heads})")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_attention: the KV pools must be contiguous in their last dim")
    num_seqs = len(query_counts)
    on_gpu = q.device.type == "cuda"
    if block_n is None:
        block_n = 64 if on_gpu else 16
    block_m, block_q = tile_shape(num_q_heads, num_kv_heads, max(query_counts))
    if num_splits is None:
        num_query_tiles = sum(triton.cdiv(n, block_q) for n in query_counts)
        num_splits = choose_num_splits(num_query_tiles, num_kv_heads, max(key_counts), block_n, q.device)
    config = kernel_config(num_q_heads, num_kv_heads, head_dim, v_head_dim, kv_block_size, max(query_counts),
                           block_n=block_n, num_splits=num_splits, sliding=sliding_window is not None,
                           has_sinks=sinks is not None, dtype=q.dtype, on_gpu=on_gpu)
    dv_pad = config["DV_PAD"]

    out = torch.empty(num_tokens, num_q_heads, v_head_dim, dtype=v_cache.dtype, device=q.device)
    if num_splits > 1:
        part_m = torch.empty(num_tokens, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_out = torch.empty(num_tokens, num_q_heads, num_splits, dv_pad, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_out = out  # not read
    sinks_arg = sinks if sinks is not None else out
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    _attention_kernel[grid](
        q, k_cache, v_cache, out, part_out, part_m, part_l,
        block_table, table_lens, cu_q, seq_ends, sinks_arg,
        num_seqs, num_q_heads, scale * LOG2E, sliding_window or 0, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), block_table.stride(0),
        **config,
    )  # fmt: skip
    if num_splits > 1:
        _combine_kernel[(num_tokens, num_q_heads)](
            out, part_out, part_m, part_l, sinks_arg, num_q_heads, num_splits, out.stride(0), out.stride(1),
            V_HEAD_DIM=v_head_dim, DV_PAD=dv_pad,
            SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), HAS_SINKS=sinks is not None,
        )  # fmt: skip
    return out
