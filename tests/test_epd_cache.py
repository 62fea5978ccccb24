"""The language server's embedding cache (mimo.epd.cache, `builders repository --role language --embedding-cache-mb`):
LRU by content hash, bounded in bytes, copies kept; on a real language server, repeats are served without the
encoder server with the colocated ensemble's tokens, hits and misses counted on the metrics port."""

import pytest
import torch

from conftest import serving_settings
from epd_layout import (assert_no_slice_in_use, colocated_tokens, encoded_items, metric, start_server, stop_servers,
                        tokens)  # fmt: skip
from mimo.epd.cache import EmbeddingCache
from mimo.serving.triton_config import torch_dtype
from test_epd_language import IMAGES, TONE


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


# -- with real tritonserver processes: one encoder server (of the session's pair), one language server with the
# cache on


@pytest.fixture(scope="module")
def layout(shared_encoders, tiny_checkpoint, tmp_path_factory):
    encoder = shared_encoders[0]
    language = start_server(serving_settings(tiny_checkpoint), tmp_path_factory.mktemp("epd_cache") / "language",
                            role="language", encoder_urls=encoder.grpc_url, embedding_cache_mb=1)  # fmt: skip
    yield encoder, language
    stop_servers([language])


def test_repeats_are_served_from_the_cache_with_the_same_tokens(layout, triton_server):
    encoder, language = layout
    kwargs = {"images": IMAGES[:2], "audios": [TONE], "max_tokens": 6, "temperature": 0.0}
    expected = colocated_tokens(triton_server, **kwargs)
    hits, misses = metric(language, "mimo_epd_cache_hits_total"), metric(language, "mimo_epd_cache_misses_total")
    assert tokens(language, **kwargs) == expected
    encoded = encoded_items(encoder)
    assert metric(language, "mimo_epd_cache_misses_total") - misses == 3
    for _ in range(2):
        assert tokens(language, **kwargs) == expected
    assert encoded_items(encoder) == encoded, "a repeat called the encoder server"
    assert metric(language, "mimo_epd_cache_hits_total") - hits == 6
    (line,) = [line for line in language.log().splitlines() if "mimo_epd items:" in line][-1:]
    assert line.count("<- cache") == 3, line
    # a new item beside cached ones: only it is encoded
    assert tokens(language, images=IMAGES[1:], max_tokens=4, temperature=0.0) == colocated_tokens(
        triton_server, images=IMAGES[1:], max_tokens=4, temperature=0.0)  # fmt: skip
    assert encoded_items(encoder) == encoded + 1
    assert_no_slice_in_use(language)


class Counted:
    """mimo.epd.orchestrate.Metrics that keeps the counters."""

    def __init__(self):
        self.counts = {}

    def outstanding_tokens(self, url, tokens):
        pass

    def count(self, name, value=1, labels=None):
        self.counts[name] = self.counts.get(name, 0) + value

    def slices_in_use(self, slices):
        pass


def test_the_cache_evicts_the_least_recently_used_by_bytes(layout, tiny_checkpoint):
    """The orchestrator in-process over the encoder server, with a cache that holds two of the three images."""
    from mimo.config import MiMoV2Config
    from mimo.epd.landing import LandingPool, SystemShmRegion
    from mimo.epd.orchestrate import Orchestrator
    from mimo.epd.plan import plan_request
    from mimo.processing.processor import MiMoProcessor

    encoder, _ = layout
    processor = MiMoProcessor.from_checkpoint(tiny_checkpoint)
    hidden = MiMoV2Config.from_pretrained(tiny_checkpoint).hidden_size
    dtype = torch_dtype(serving_settings(tiny_checkpoint).resolved_dtype)  # the encoder server's

    def plan(image):
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}]}]
        return plan_request(processor, messages)

    plans = [plan(image) for image in IMAGES]
    sizes = [p.total_rows * hidden * dtype.itemsize for p in plans]
    cache = EmbeddingCache(sizes[0] + max(sizes[1], sizes[2]))  # 0 beside 1 or 2, not all three
    metrics = Counted()
    pool = LandingPool(SystemShmRegion(1 << 20, key_prefix="mimo_test_"))
    orchestrator = Orchestrator(pool, [encoder.grpc_url], None, processor.config, hidden, dtype, timeout_s=30,
                                metrics=metrics, cache=cache)  # fmt: skip

    def encode(index):
        origins = []
        lease = orchestrator.encode(plans[index], origins)
        table = orchestrator.table(lease, plans[index]).clone()
        lease.release()
        return table, origins

    try:
        first, origins = encode(0)
        # the encoder wrote the rows into the slice itself (handoff shm), and timed it
        assert metrics.counts.pop("shm_writes") == 1 and metrics.counts.pop("shm_write_microseconds") >= 0
        assert origins == [encoder.grpc_url] and metrics.counts == {"cache_hits": 0, "cache_misses": 1,
                                                                     "handoff_bytes": sizes[0]}  # fmt: skip
        again, origins = encode(0)
        assert origins == ["cache"] and torch.equal(again, first) and metrics.counts["cache_hits"] == 1
        encode(1)
        encode(0)  # 0 is now more recently used than 1
        assert (len(cache), cache.bytes, cache.evictions) == (2, sizes[0] + sizes[1], 0)
        encode(2)  # does not fit beside both: 1 goes
        assert cache.evictions == 1
        keys = [p.items[0].metadata.content_hash for p in plans]
        assert keys[0] in cache and keys[2] in cache and keys[1] not in cache
        _, origins = encode(1)
        assert origins == [encoder.grpc_url]
        assert metrics.counts["cache_hits"] == 2 and metrics.counts["cache_misses"] == 4
        assert pool.stats().slices_in_use == 0
    finally:
        orchestrator.close()
        pool.close()
