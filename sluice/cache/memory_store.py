"""The cache store of embedded mode (one process, no Redis): entries in a bounded LRU dict, plus the vector index.

Same semantics as the Redis store (docs/cache-store.md): an entry is servable until `created + ttl`,
a `get` marks it recently used, a `put` past `max_entries` evicts the least recently used. Expiry is
checked on read; a `put` also sweeps entries not used for a whole TTL (which must have expired), so
memory stays bounded by `max_entries` without a timer task.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from sluice.cache.index import VectorIndex
from sluice.cache.types import CacheEntry, Vector


class MemoryCacheStore:
    def __init__(self, *, ttl: float, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl must be positive and max_entries at least 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self.index = VectorIndex()
        self._clock = clock
        self._entries: OrderedDict[str, tuple[CacheEntry, float]] = OrderedDict()  # id → (entry, last use)

    @property
    def healthy(self) -> bool:
        return True

    @property
    def errors(self) -> int:
        return 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._entries.clear()
        self.index = VectorIndex()

    async def get(self, entry_id: str) -> CacheEntry | None:
        found = self._entries.get(entry_id)
        if found is None:
            return None
        now = self._clock()
        entry = found[0]
        if entry.created + self.ttl <= now:
            self._drop(entry_id)
            return None
        self._entries[entry_id] = (entry, now)
        self._entries.move_to_end(entry_id)
        return entry

    async def put(self, entry: CacheEntry) -> None:
        now = self._clock()
        expires = entry.created + self.ttl
        self._drop(entry_id=entry.id)
        if expires <= now:
            return
        self._entries[entry.id] = (entry, now)
        if entry.vector is not None:
            self.index.add(entry.id, entry.scope, entry.embedder, entry.tenant, entry.model, entry.vector, expires)
        entries = self._entries
        while entries:
            oldest_id, (_, last_use) = next(iter(entries.items()))
            if len(entries) <= self.max_entries and last_use + self.ttl > now:
                break
            self._drop(oldest_id)

    def nearest(
        self, scope: str, embedder: str, vector: Vector, threshold: float, limit: int = 3
    ) -> list[tuple[str, float]]:
        return self.index.nearest(scope, embedder, vector, threshold, limit, self._clock())

    def forget(self, entry_id: str) -> None:
        """Drop an id from the index (kept for parity with the Redis store; here entries and index never disagree)."""
        self.index.remove(entry_id)

    async def purge(self, tenant: str | None = None, model: str | None = None) -> int:
        doomed = [
            entry_id
            for entry_id, (entry, _) in self._entries.items()
            if (tenant is None or entry.tenant == tenant) and (model is None or entry.model == model)
        ]
        for entry_id in doomed:
            self._drop(entry_id)
        return len(doomed)

    async def size(self) -> int:
        return len(self._entries)

    def _drop(self, entry_id: str) -> None:
        if self._entries.pop(entry_id, None) is not None:
            self.index.remove(entry_id)
