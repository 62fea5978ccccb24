"""The language server's embedding cache (mimo.epd.cache): LRU by content hash, bounded in bytes, copies kept."""

import pytest
import torch

from mimo.epd.cache import EmbeddingCache


def rows(n: int, value: int) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.uint8)


def test_hits_misses_and_least_recently_used_eviction_by_bytes():
    cache = EmbeddingCache(100)
    assert cache.get("a") is None
    source = rows(40, 1)
    assert cache.put("a", source)
    source.fill_(9)  # the cache holds a copy: the landing slice it came from is reused by later requests
    assert torch.equal(cache.get("a"), rows(40, 1))
    assert cache.put("b", rows(40, 2)) and cache.bytes == 80
    assert cache.get("a") is not None  # a is now the most recently used
    assert cache.put("c", rows(30, 3))  # 110 bytes > 100: b (least recently used) goes
    assert "b" not in cache and "a" in cache and "c" in cache
    assert (cache.bytes, cache.evictions, len(cache)) == (70, 1, 2)
    assert not cache.put("huge", rows(101, 4))  # larger than the whole cache: not kept, nothing evicted
    assert (cache.bytes, len(cache)) == (70, 2)
    assert cache.put("a", rows(40, 5)) and torch.equal(cache.get("a"), rows(40, 1))  # same key: same rows, kept
    assert cache.put("d", rows(100, 6)) and list(cache._entries) == ["d"] and cache.bytes == 100


def test_a_cache_needs_room():
    with pytest.raises(ValueError, match="positive byte size"):
        EmbeddingCache(0)
