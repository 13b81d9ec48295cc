"""Retrieval for RAG routes: embed the question and query the chunk store within `rag.timeout`, and
keep each collection's corpus version fresh in the background.

`retrieve` never raises for a dependency's failure: an embedder that fails or is slow
(`EmbedderUnavailable`), a chunk store that is down, slow or lacks the collection (`RetrievalUnavailable`)
and the overall timeout all come back as outcome `unavailable`, and the request is answered without
context. The versions are polled every `poll_interval` seconds by a task of their own, never on the
request path; a failed poll keeps the last version seen (the corpus did not change because Chroma
stopped answering) and marks `chroma_up` false until a call succeeds again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sluice.cache.embedders import BatchingEmbedder
from sluice.cache.types import EmbedderUnavailable
from sluice.rag.types import Chunk, ChunkStore, RetrievalUnavailable

log = logging.getLogger("sluice.rag")
POLL_INTERVAL = 5.0  # seconds between corpus version checks: how long a re-ingested corpus may share a scope


@dataclass(frozen=True, slots=True)
class Retrieval:
    """What one retrieval found: the chunks (best first), or why there are none."""

    chunks: tuple[Chunk, ...]
    seconds: float
    error: str = ""  # set when the store or the embedder failed: answer without context

    @property
    def available(self) -> bool:
        return not self.error


class Retriever:
    """Embeds questions with the collections' embedder and queries the chunk store; owns both."""

    def __init__(
        self, store: ChunkStore, embedder: BatchingEmbedder, timeout: float, poll_interval: float = POLL_INTERVAL
    ) -> None:
        self._store = store
        self._embedder = embedder
        self._timeout = timeout
        self._poll_interval = poll_interval
        self._collections: tuple[str, ...] = ()
        self._versions: dict[str, str] = {}
        self._failing: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.chroma_up = False  # the last call to the store succeeded (for sluice_dependency_up)

    def watch(self, collections: Iterable[str]) -> None:
        """The collections whose versions are polled (the configured routes'; replaced on reload)."""
        self._collections = tuple(sorted(set(collections)))

    def version(self, collection: str) -> str | None:
        """The collection's corpus version as last polled; None until a poll has succeeded."""
        return self._versions.get(collection)

    async def start(self) -> None:
        """Read the versions once (bounded by the timeout), then keep polling; warm the embedder up in the
        background (the local model loads for seconds: meanwhile retrievals time out, answered without context)."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._warm_up(), name="sluice-rag-warm-up"))
        await self.poll()
        self._tasks.append(loop.create_task(self._poll_forever(), name="sluice-rag-versions"))

    async def retrieve(self, collection: str, text: str, top_k: int) -> Retrieval:
        started = time.perf_counter()
        querying = False
        try:
            async with asyncio.timeout(self._timeout):
                [vector] = await self._embedder.embed([text])
                querying = True
                chunks = await self._store.query(collection, vector, top_k)
        except (EmbedderUnavailable, RetrievalUnavailable, TimeoutError) as exc:
            if querying:
                self.chroma_up = False
            error = str(exc) or f"no answer within {self._timeout} s"
            return Retrieval((), time.perf_counter() - started, f"{type(exc).__name__}: {error}")
        self.chroma_up = True
        return Retrieval(tuple(chunks), time.perf_counter() - started)

    async def poll(self) -> None:
        """Read every watched collection's version now (a failure is logged once, until a read succeeds)."""
        for collection in self._collections:
            try:
                async with asyncio.timeout(self._timeout):
                    version = await self._store.version(collection)
            except (RetrievalUnavailable, TimeoutError) as exc:
                if collection not in self._failing:
                    self._failing.add(collection)
                    log.warning("rag: cannot read a corpus version; retrievals may answer without context",
                                extra={"collection": collection, "error": str(exc) or "timeout"})  # fmt: skip
                self.chroma_up = False
                continue
            self._failing.discard(collection)
            self.chroma_up = True
            self._versions[collection] = version

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            await self.poll()

    async def _warm_up(self) -> None:
        try:
            await self._embedder.warm_up()
        except EmbedderUnavailable as exc:
            log.warning("rag: the embedder is not answering yet; RAG routes answer without context until it does",
                        extra={"error": str(exc)})  # fmt: skip

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._embedder.close()
        await self._store.close()
