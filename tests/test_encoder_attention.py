"""SegmentAttention on the CPU: the block masks the flex path builds, and flex (eager) against the reference."""

import itertools

import pytest
import torch

from mimo.models.encoder_attention import BLOCK_SIZE, SegmentAttention, block_visibility

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
CPU = torch.device("cpu")
LAYOUTS = [[300], [100, 28, 200, 1], [128, 256], [5], [130, 3, 400]]
SPECS = [(causal, window) for causal in (False, True) for window in (None, 3, 64, 200)]


def token_visibility(seq_lens, causal, window):
    """[T, T] bool from the definition: same segment, then attention_with_sinks' window / causal rule."""
    segment = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    idx = torch.arange(sum(seq_lens))
    distance = idx[:, None] - idx[None, :]  # q - k
    visible = segment[:, None] == segment[None, :]
    if causal:
        visible &= distance >= 0
    if window is not None:
        visible &= distance.abs() <= window
    return visible


@pytest.mark.parametrize("seq_lens, spec", list(itertools.product(LAYOUTS, SPECS)))
def test_block_visibility_covers_every_visible_pair_and_full_blocks_are_full(seq_lens, spec):
    partial, full = block_visibility(seq_lens, *spec)
    assert not (partial & full).any()
    total = sum(seq_lens)
    padded = -(-total // BLOCK_SIZE) * BLOCK_SIZE
    visible = torch.zeros(padded, padded, dtype=torch.bool)
    visible[:total, :total] = token_visibility(seq_lens, *spec)
    blocks = visible.view(padded // BLOCK_SIZE, BLOCK_SIZE, padded // BLOCK_SIZE, BLOCK_SIZE)
    any_visible, all_visible = blocks.any(dim=(1, 3)), blocks.all(dim=(1, 3))
    assert torch.equal(full, all_visible)  # exact: full blocks skip the mask inside the kernel
    assert not (any_visible & ~(partial | full)).any()  # no visible pair is dropped


def test_window_blocks_stay_sparse():
    # one long segment, window 64: each query block reads itself and its two neighbours only
    partial, full = block_visibility([64 * BLOCK_SIZE], causal=False, window=64)
    assert int((partial | full).sum(-1).max()) == 3
    partial, full = block_visibility([64 * BLOCK_SIZE], causal=True, window=128)
    assert int((partial | full).sum(-1).max()) == 2


@pytest.mark.parametrize("seq_lens, spec", list(itertools.product(LAYOUTS, SPECS)))
def test_flex_matches_reference(seq_lens, spec):
    causal, window = spec
    gen = torch.Generator().manual_seed(sum(seq_lens) + 7 * (window or 0) + causal)
    total = sum(seq_lens)
    q, k, v = (torch.randn(total, heads, 16, generator=gen) for heads in (8, 2, 2))
    sinks = torch.randn(8, generator=gen) if window is not None else None
    reference = SegmentAttention(seq_lens, CPU, [], impl="reference", query_chunk=50)
    flex = SegmentAttention(seq_lens, CPU, [spec], impl="flex")
    expected = reference(q, k, v, scale=0.25, causal=causal, window=window, sinks=sinks)
    out = flex(q, k, v, scale=0.25, causal=causal, window=window, sinks=sinks)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_reference_chunks_do_not_change_the_result():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(90, 4, 8, generator=gen) for _ in range(3))
    whole = SegmentAttention([60, 30], CPU, [], impl="reference")
    chunked = SegmentAttention([60, 30], CPU, [], impl="reference", query_chunk=7)
    for causal, window in SPECS:
        torch.testing.assert_close(
            chunked(q, k, v, scale=0.3, causal=causal, window=window, sinks=None),
            whole(q, k, v, scale=0.3, causal=causal, window=window, sinks=None),
        )


def test_auto_picks_reference_on_cpu():
    assert SegmentAttention([4], CPU, [(False, None)]).impl == "reference"


@pytest.mark.parametrize("seq_lens", [[], [3, 0], [2.0]])
def test_bad_segment_lengths_raise(seq_lens):
    with pytest.raises(ValueError, match="segment lengths"):
        SegmentAttention(seq_lens, CPU, [])


def test_bad_calls_raise():
    with pytest.raises(ValueError, match="attention impl 'cuda'"):
        SegmentAttention([4], CPU, [], impl="cuda")
    q = torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match="got 5 tokens but the segment lengths sum to 4"):
        SegmentAttention([4], CPU, [])(q, q, q, scale=1.0, causal=False, window=None, sinks=None)
    flex = SegmentAttention([5], CPU, [(False, None)], impl="flex")
    with pytest.raises(ValueError, match="no block mask for causal=True, window=8"):
        flex(q, q, q, scale=1.0, causal=True, window=8, sinks=None)
