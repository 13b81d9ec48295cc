"""The response cache as the pipeline uses it: look a request up (exact, then by meaning), store an answer.

A hit needs the same scope (sluice/cache/keys.py) and the same tenant, checked again on the stored
entry itself; a semantic hit also needs cosine similarity at or above the threshold between the last
user messages and, with the guard on, the same numbers, negations and names (sluice/cache/guard.py).
Storage and embedding faults never fail a request: they are counted, and the request goes on as if the
cache were not there. Stores happen in the background, after the answer has reached the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sluice.cache.embedders import BatchingEmbedder
from sluice.cache.guard import compatible
from sluice.cache.keys import CacheKey, embedding_text
from sluice.cache.types import CacheEntry, CacheStore, CacheUnavailable, EmbedderUnavailable, Vector
from sluice.config import CacheConfig
from sluice.metrics import GatewayMetrics

log = logging.getLogger("sluice.cache")
CANDIDATES = 3  # semantic neighbours checked (scope, tenant, guard) before giving up
MAX_PENDING_STORES = 256  # answers waiting to be written; past this new ones are not stored


@dataclass(slots=True)
class Lookup:
    result: str  # hit_exact | hit_semantic | miss | bypass (the store failed)
    entry: CacheEntry | None = None
    vector: Vector | None = None  # the probe's embedding, reused when the answer is stored
    similarity: float | None = None


class ResponseCache:
    def __init__(
        self, config: CacheConfig, store: CacheStore, embedder: BatchingEmbedder | None, metrics: GatewayMetrics
    ) -> None:
        """`embedder` None: the semantic level is off."""
        self.config = config
        self.store = store
        self.embedder = embedder
        self._metrics = metrics
        self._threshold = config.semantic.threshold
        self._guard = config.semantic.guard
        self._pending: set[asyncio.Task[None]] = set()
        self._warming: asyncio.Task[None] | None = None
        self.store_up = True

    async def start(self) -> None:
        await self.store.start()
        if self.embedder is not None:
            # loading the local model takes seconds: meanwhile requests skip the semantic level, not wait
            self._warming = asyncio.get_running_loop().create_task(self._warm_up(self.embedder))

    async def _warm_up(self, embedder: BatchingEmbedder) -> None:
        try:
            await embedder.warm_up()
        except EmbedderUnavailable as exc:
            log.warning("cache: the embedder is not answering yet; the semantic level is skipped until it does",
                        extra={"error": str(exc)})  # fmt: skip

    async def close(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
            await asyncio.gather(self._warming, return_exceptions=True)
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.store.close()
        if self.embedder is not None:
            await self.embedder.close()

    async def lookup(self, key: CacheKey, semantic: bool) -> Lookup:
        metrics = self._metrics
        started = time.perf_counter()
        try:
            entry = await self.store.get(key.exact)
        except CacheUnavailable as exc:
            return self._store_failed(exc)
        self.store_up = True
        metrics.cache_lookup_duration.child("exact").observe(time.perf_counter() - started)
        if entry is not None and entry.scope == key.scope and entry.tenant == key.tenant:
            return Lookup("hit_exact", entry)
        embedder = self.embedder
        if not semantic or embedder is None or key.probe is None:
            return Lookup("miss")
        started = time.perf_counter()
        try:
            (vector,) = await embedder.embed([embedding_text(key.probe)])
        except EmbedderUnavailable as exc:
            metrics.cache_errors.child("embedder").inc()
            log.warning("cache: embedding failed, semantic level skipped", extra={"error": str(exc)})
            return Lookup("miss")
        searched = time.perf_counter()
        metrics.cache_embedding_duration.child().observe(searched - started)
        try:
            for entry_id, similarity in self.store.nearest(
                key.scope, embedder.name, vector, self._threshold, CANDIDATES
            ):
                entry = await self.store.get(entry_id)
                if entry is None or entry.scope != key.scope or entry.tenant != key.tenant:
                    continue
                if self._guard and not compatible(key.probe, entry.probe):
                    continue
                return Lookup("hit_semantic", entry, vector, similarity)
        except CacheUnavailable as exc:
            return self._store_failed(exc)
        finally:
            metrics.cache_lookup_duration.child("semantic").observe(time.perf_counter() - searched)
        return Lookup("miss", vector=vector)

    def _store_failed(self, exc: CacheUnavailable) -> Lookup:
        self._metrics.cache_errors.child("store").inc()
        if self.store_up:
            log.warning("cache: store unavailable, requests bypass the cache", extra={"error": str(exc)})
        self.store_up = False
        return Lookup("bypass")

    def save(self, key: CacheKey, body: bytes, vector: Vector | None, semantic: bool) -> None:
        """Store `body` (a complete non-streaming answer) under `key`, in the background; `semantic`: file
        it by meaning too (embedding the question now if the lookup did not)."""
        if len(body) > self.config.max_entry_bytes:
            self._metrics.cache_stores.child("too_large").inc()
            return
        if len(self._pending) >= MAX_PENDING_STORES:
            self._metrics.cache_stores.child("failed").inc()
            return
        task = asyncio.get_running_loop().create_task(self._save(key, body, vector, semantic))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _save(self, key: CacheKey, body: bytes, vector: Vector | None, semantic: bool) -> None:
        embedder = self.embedder if semantic else None
        if vector is None and key.probe is not None and embedder is not None:
            try:  # an exact-only lookup (Cache-Control: no-cache) still files the answer by meaning
                (vector,) = await embedder.embed([embedding_text(key.probe)])
            except EmbedderUnavailable:
                self._metrics.cache_errors.child("embedder").inc()
        entry = CacheEntry(
            id=key.exact,
            scope=key.scope,
            tenant=key.tenant,
            model=key.model,
            probe=key.probe or "",
            vector=vector if key.probe is not None else None,
            embedder=embedder.name if embedder is not None and vector is not None else "",
            body=body,
            created=time.time(),
        )
        try:
            await self.store.put(entry)
        except CacheUnavailable as exc:
            self._store_failed(exc)
            self._metrics.cache_stores.child("failed").inc()
            return
        self.store_up = True
        self._metrics.cache_stores.child("stored").inc()
