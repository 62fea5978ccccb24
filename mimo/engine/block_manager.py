"""KV block accounting: one free list per layer kind, block tables on the sequences."""

from __future__ import annotations

from collections import deque

from mimo.engine.kv_cache import LayerKind, blocks_for
from mimo.engine.sequence import Sequence


class BlockPool:
    """Free list of the block ids of one layer kind."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"allocating {n} KV blocks with {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


def sliding_ring_tokens(sliding_window: int, max_rows: int) -> int:
    """Tokens a sequence's sliding ring holds, where one forward writes at most `max_rows` tokens of a sequence.

    A forward writes its new tokens before attending, so the ring must keep the `window` keys before its first
    token plus all it writes. `max_rows` is the prefill chunk, plus `num_speculative_tokens - 1` with MTP (an MTP
    layer recomputes the rows it drafted from). Token at position p lives in ring block
    `(p // block_size) % ring_blocks`.
    """
    return sliding_window + max_rows


def blocks_per_sequence(kind: LayerKind, num_tokens: int, max_num_tokens: int, block_size: int,
                        ring_tokens: int | None) -> int:
    """Blocks of `kind` a sequence of at most `max_num_tokens` tokens holds while KV exists for `num_tokens`."""
    if kind is LayerKind.FULL:
        return blocks_for(num_tokens, block_size)
    return blocks_for(min(ring_tokens, max_num_tokens), block_size)


class BlockManager:
    """Gives each sequence the blocks its KV needs in every pool, never more than the pools hold.

    Full-attention pool: `ceil(tokens / block_size)` blocks, growing with the sequence.
    Sliding pool: a fixed ring per sequence of `ring_tokens` tokens, or the whole sequence if that is shorter.
    """

    def __init__(self, block_size: int, num_blocks: dict[LayerKind, int], ring_tokens: int | None):
        self.block_size = block_size
        self.pools = {kind: BlockPool(n) for kind, n in num_blocks.items()}
        self.ring_tokens = ring_tokens

    def blocks_needed(self, kind: LayerKind, seq: Sequence, num_tokens: int) -> int:
        """Blocks of `kind` that `seq` must hold to store KV for its first `num_tokens` tokens."""
        return blocks_per_sequence(kind, num_tokens, seq.max_num_tokens, self.block_size, self.ring_tokens)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return all(self.blocks_needed(kind, seq, num_tokens) - len(seq.block_tables[kind]) <= pool.num_free
                   for kind, pool in self.pools.items())

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows `seq`'s block tables to cover its first `num_tokens` tokens (check `can_allocate` first)."""
        for kind, pool in self.pools.items():
            table = seq.block_tables[kind]
            table += pool.allocate(max(0, self.blocks_needed(kind, seq, num_tokens) - len(table)))

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Gives back the full-attention blocks past `seq`'s first `num_tokens` tokens (rejected draft tokens);
        a sliding ring stays whole. A trimmed table is a new list, as after `free`: the device copy is redone."""
        pool = self.pools.get(LayerKind.FULL)
        if pool is None:
            return
        table = seq.block_tables[LayerKind.FULL]
        keep = self.blocks_needed(LayerKind.FULL, seq, num_tokens)
        if keep < len(table):
            pool.free(table[keep:])
            seq.block_tables[LayerKind.FULL] = table[:keep]

    def free(self, seq: Sequence) -> None:
        for kind, pool in self.pools.items():
            pool.free(seq.block_tables[kind])
            seq.block_tables[kind] = []

    def stats(self) -> dict[str, dict[str, int]]:
        return {kind.value: {"free_blocks": pool.num_free, "total_blocks": pool.num_blocks}
                for kind, pool in self.pools.items()}
