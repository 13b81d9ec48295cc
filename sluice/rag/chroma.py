"""The ChromaDB chunk store: one client (embedded `PersistentClient` or a server's `HttpClient`), every call
run on a worker thread with a deadline, every Chroma failure turned into `RetrievalUnavailable`.

Reads (`query`, `version`) serve the gateway's retrieval stage; `run` is the seam the ingestion writer
(sluice/rag/chroma_writer.py) uses for its own calls, with the same threading and error mapping.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import chromadb
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.config import Settings
from chromadb.errors import ChromaError, NotFoundError

from sluice.cache.types import Vector
from sluice.config import ChromaConfig
from sluice.rag.types import CHUNK_INDEX, SOURCE, TITLE, VERSION, Chunk, RetrievalUnavailable

T = TypeVar("T")

# The embedded client reports failures as ChromaError subclasses (the Rust bindings' InternalError...),
# plus the file system's and SQLite's own errors.
EMBEDDED_ERRORS: tuple[type[Exception], ...] = (ChromaError, OSError, sqlite3.Error)
# The HTTP client raises ChromaError for errors the server names, httpx.HTTPError for transport failures,
# ValueError("Could not connect to a Chroma server") when connecting, and a bare `Exception(body)` for any
# other non-2xx answer (chromadb/api/base_http_client.py): only catching Exception covers the last one.
HTTP_ERRORS: tuple[type[Exception], ...] = (Exception,)


def _settings() -> Settings:
    return Settings(anonymized_telemetry=False)  # no phoning home from a gateway


class ChromaStore:
    """ChromaDB behind the ChunkStore protocol; the client is opened on first use (a server may start later)."""

    def __init__(
        self, connect: Callable[[], ClientAPI], where: str, errors: tuple[type[Exception], ...], timeout: float
    ) -> None:
        self._connect = connect
        self._where = where
        self._errors = errors
        self._timeout = timeout
        self._client: ClientAPI | None = None
        self._lock = threading.Lock()  # opening the client happens on a worker thread
        self._collections: dict[str, Collection] = {}

    @property
    def where(self) -> str:
        return self._where

    def _open(self) -> ClientAPI:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _guarded(self, work: Callable[[ClientAPI], T]) -> T:
        """Runs on a worker thread: `work` with the client, Chroma's errors mapped."""
        try:
            return work(self._open())
        except NotFoundError as err:
            raise RetrievalUnavailable(f"Chroma at {self._where}: {err}") from None
        except RetrievalUnavailable:
            raise
        except self._errors as err:
            raise RetrievalUnavailable(f"Chroma at {self._where} failed: {type(err).__name__}: {err}") from None

    async def run(self, work: Callable[[ClientAPI], T], timeout: float | None = None) -> T:
        """`work(client)` on a worker thread within `timeout` (the store's by default); raises RetrievalUnavailable.

        A call past its deadline is abandoned, not stopped: Chroma's client cannot be interrupted."""
        limit = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await asyncio.to_thread(self._guarded, work)
        except TimeoutError:
            raise RetrievalUnavailable(f"Chroma at {self._where}: no answer within {limit} s") from None

    def collection(self, client: ClientAPI, name: str) -> Collection:
        """The collection `name` (cached; call on a worker thread); raises NotFoundError."""
        found = self._collections.get(name)
        if found is None:
            found = self._collections[name] = client.get_collection(name, embedding_function=None)
        return found

    def forget(self, name: str) -> None:
        self._collections.pop(name, None)

    async def query(self, collection: str, vector: Vector, top_k: int) -> list[Chunk]:
        embeddings: Any = [vector]  # chromadb's annotation wants int32|float32 arrays; float32 is what it gets

        def work(client: ClientAPI) -> list[Chunk]:
            try:
                found = self.collection(client, collection).query(
                    query_embeddings=embeddings, n_results=top_k, include=["documents", "metadatas", "distances"]
                )
            except NotFoundError:
                self.forget(collection)  # deleted and perhaps re-created: look it up again next time
                raise
            return _chunks(found)

        return await self.run(work)

    async def version(self, collection: str) -> str:
        def work(client: ClientAPI) -> str:
            self.forget(collection)
            metadata = self.collection(client, collection).metadata or {}
            return str(metadata.get(VERSION, 0))

        return await self.run(work)

    async def close(self) -> None:
        client, self._client = self._client, None
        self._collections.clear()
        if client is not None:
            close = getattr(client, "close", None)  # HttpClient and PersistentClient (1.x) release their resources
            if close is not None:
                await asyncio.to_thread(close)


def _chunks(found: Any) -> list[Chunk]:
    ids: list[str] = found["ids"][0]
    documents: list[str | None] = (found.get("documents") or [[None] * len(ids)])[0]
    metadatas: list[dict[str, Any] | None] = (found.get("metadatas") or [[None] * len(ids)])[0]
    distances: list[float] = (found.get("distances") or [[1.0] * len(ids)])[0]
    chunks = []
    for chunk_id, text, metadata, distance in zip(ids, documents, metadatas, distances, strict=True):
        meta = metadata or {}
        chunks.append(
            Chunk(
                id=chunk_id,
                text=text or "",
                source=str(meta.get(SOURCE, "")),
                title=str(meta.get(TITLE, "")),
                index=int(cast(int, meta.get(CHUNK_INDEX, 0))),
                score=1.0 - float(distance),
            )
        )
    return chunks


def make_chunk_store(config: ChromaConfig, timeout: float = 30.0) -> ChromaStore:
    """The store `config` describes; `timeout` bounds every call (the retrieval stage adds its own, shorter)."""
    if config.mode == "http":
        assert config.url is not None  # ChromaConfig requires it for mode http
        parts = urlsplit(config.url)
        host = parts.hostname or "127.0.0.1"
        ssl = parts.scheme == "https"
        port = parts.port or (443 if ssl else 8000)

        def connect_http() -> ClientAPI:
            return chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=_settings())

        return ChromaStore(connect_http, config.url, HTTP_ERRORS, timeout)
    path = config.path

    def connect_embedded() -> ClientAPI:
        return chromadb.PersistentClient(path=path, settings=_settings())

    return ChromaStore(connect_embedded, path, EMBEDDED_ERRORS, timeout)
