import math

import pytest
import torch

from mimo.models.attention import NoCacheAttention, attention_with_sinks


def _qkv(num_q: int, num_k: int, heads: int, kv_heads: int, dim: int = 8, v_dim: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_q, heads, dim, generator=g),
        torch.randn(num_k, kv_heads, dim, generator=g),
        torch.randn(num_k, kv_heads, v_dim, generator=g),
    )


def _brute_force(q, k, v, q_pos, k_pos, scale, visible, sinks):
    """Per (query, head) loops: softmax over the visible keys plus exp(sink) in the denominator."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for i in range(q.shape[0]):
        for h in range(q.shape[1]):
            keys = [j for j in range(k.shape[0]) if visible(int(q_pos[i]), int(k_pos[j]))]
            logits = [float(q[i, h].double() @ k[j, h // group].double()) * scale for j in keys]
            sink = [float(sinks[h])] if sinks is not None else []
            top = max(logits + sink)
            denominator = sum(math.exp(x - top) for x in logits + sink)
            for j, logit in zip(keys, logits):
                out[i, h] += math.exp(logit - top) / denominator * v[j, h // group].double()
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_causal_matches_brute_force(window, with_sinks):
    q, k, v = _qkv(10, 10, heads=4, kv_heads=2)
    pos = torch.arange(10)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0]) if with_sinks else None

    def visible(i, j):
        return j <= i and (window is None or i - j <= window)

    out = attention_with_sinks(q, k, v, q_pos=pos, k_pos=pos, scale=0.3, sliding_window=window, sinks=sinks)
    expected = _brute_force(q, k, v, pos, pos, 0.3, visible, sinks)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 2])
def test_non_causal_matches_brute_force(window):
    q, k, v = _qkv(7, 7, heads=2, kv_heads=1)
    pos = torch.arange(7)
    sinks = torch.tensor([0.3, -0.2])

    def visible(i, j):
        return window is None or abs(i - j) <= window

    out = attention_with_sinks(
        q, k, v, q_pos=pos, k_pos=pos, scale=0.5, sliding_window=window, sinks=sinks, causal=False
    )
    torch.testing.assert_close(out.double(), _brute_force(q, k, v, pos, pos, 0.5, visible, sinks), atol=1e-5, rtol=1e-5)


def _visible_keys(query: int, window: int | None, causal: bool, length: int = 12) -> list[int]:
    # v = identity: each output row is the attention distribution over the keys.
    q = torch.zeros(length, 1, 4)
    k = torch.zeros(length, 1, 4)
    v = torch.eye(length)[:, None, :]
    pos = torch.arange(length)
    probs = attention_with_sinks(
        q, k, v, q_pos=pos, k_pos=pos, scale=1.0, sliding_window=window, sinks=None, causal=causal
    )[query, 0]
    return [j for j in range(length) if probs[j] > 0]


def test_window_boundary():
    # A sliding layer sees the query plus `window` previous tokens (129 keys for the released window 128).
    assert _visible_keys(6, window=3, causal=True) == [3, 4, 5, 6]
    assert _visible_keys(2, window=3, causal=True) == [0, 1, 2]
    assert _visible_keys(6, window=None, causal=True) == list(range(7))
    assert _visible_keys(6, window=3, causal=False) == [3, 4, 5, 6, 7, 8, 9]
    assert _visible_keys(10, window=3, causal=False) == [7, 8, 9, 10, 11]
    assert _visible_keys(6, window=None, causal=False) == list(range(12))


def test_gqa_equals_repeated_kv():
    q, k, v = _qkv(5, 5, heads=6, kv_heads=2)
    pos = torch.arange(5)
    sinks = torch.linspace(-1, 1, 6)
    grouped = attention_with_sinks(q, k, v, q_pos=pos, k_pos=pos, scale=0.4, sliding_window=None, sinks=sinks)
    repeated = attention_with_sinks(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1),
        q_pos=pos, k_pos=pos, scale=0.4, sliding_window=None, sinks=sinks,
    )
    torch.testing.assert_close(grouped, repeated)


def test_decode_query_matches_last_prefill_row():
    # A backend with a KV cache attends one new query at position 9 to cached keys 0..9.
    q, k, v = _qkv(10, 10, heads=4, kv_heads=2)
    pos = torch.arange(10)
    sinks = torch.randn(4)
    prefill = attention_with_sinks(q, k, v, q_pos=pos, k_pos=pos, scale=0.3, sliding_window=4, sinks=sinks)
    decode = attention_with_sinks(q[-1:], k, v, q_pos=pos[-1:], k_pos=pos, scale=0.3, sliding_window=4, sinks=sinks)
    torch.testing.assert_close(decode, prefill[-1:])


def test_output_dtype_follows_v():
    q, k, v = _qkv(4, 4, heads=2, kv_heads=1)
    pos = torch.arange(4)
    out = attention_with_sinks(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos=pos, k_pos=pos, scale=0.3, sliding_window=None, sinks=None
    )
    assert out.dtype == torch.bfloat16 and out.shape == (4, 2, 6)


def test_shape_errors_name_the_tensor():
    q, k, v = _qkv(4, 4, heads=3, kv_heads=2)
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention_with_sinks(q, k, v, q_pos=pos, k_pos=pos, scale=1.0, sliding_window=None, sinks=None)
    q, k, v = _qkv(4, 4, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="sinks must be"):
        attention_with_sinks(q, k, v, q_pos=pos, k_pos=pos, scale=1.0, sliding_window=None, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="k_pos"):
        attention_with_sinks(q, k, v, q_pos=pos, k_pos=pos[:3], scale=1.0, sliding_window=None, sinks=None)


def test_no_cache_backend_keeps_sequences_apart():
    q, k, v = _qkv(9, 9, heads=2, kv_heads=1)
    backend = NoCacheAttention([4, 5])
    out = backend.attend(0, q, k, v, sliding_window=2, sinks=None, scale=0.3)
    for start, length in ((0, 4), (4, 5)):
        pos = torch.arange(length)
        seq = slice(start, start + length)
        expected = attention_with_sinks(
            q[seq], k[seq], v[seq], q_pos=pos, k_pos=pos, scale=0.3, sliding_window=2, sinks=None
        )
        torch.testing.assert_close(out[seq], expected)
    with pytest.raises(ValueError, match="sum to 9"):
        backend.attend(3, q[:8], k[:8], v[:8], sliding_window=None, sinks=None, scale=0.3)
    with pytest.raises(ValueError, match="seq_lens"):
        NoCacheAttention([3, 0])
