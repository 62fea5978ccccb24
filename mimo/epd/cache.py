"""The language server's embedding cache: encoded items' rows by content hash, least recently used first out.

The key is the item's `ItemMetadata.content_hash` (the bytes with the processor settings and the protocol version:
the key dedup uses), so a hit is the rows an encoder server would write for those bytes. The rows are copies of
checked rows from the landing region, on the region's device (host memory for system shared memory, the LM GPU
for a CUDA region), so a hit is one device-local copy into the request's slice. Bounded in bytes: an insert evicts
the least recently used entries until the new one fits; an entry larger than the whole cache is not kept. Used
from the orchestrator's event-loop thread only (no lock).
"""

from __future__ import annotations

import collections

import torch


class EmbeddingCache:
    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"an embedding cache needs a positive byte size, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        """The rows stored under `key` (uint8, as put), now the most recently used; None if absent."""
        rows = self._entries.get(key)
        if rows is not None:
            self._entries.move_to_end(key)
        return rows

    def put(self, key: str, rows: torch.Tensor) -> bool:
        """Stores a copy of `rows` (bytes of one item's rows, any device) under `key`; False if it is larger than
        the cache. A key already present is only marked recently used (its rows are the same)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        size = rows.numel() * rows.element_size()
        if size > self.capacity_bytes:
            return False
        while self.bytes + size > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
            self.evictions += 1
        self._entries[key] = rows.clone()
        self.bytes += size
        return True
