"""The write side of a RAG collection, for `sluice ingest`: open (or create) it for one embedder, list what
it holds per source, replace and delete a source's chunks, and bump its version.

Every call goes through `ChromaStore.run` (a worker thread, a deadline, errors as RetrievalUnavailable).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.errors import NotFoundError, UniqueConstraintError

from sluice.cache.types import Vector
from sluice.rag.chroma import ChromaStore
from sluice.rag.types import CHUNK_INDEX, CONTENT_HASH, EMBEDDER, SOURCE, TITLE, VERSION

PAGE = 1000  # records per `get` when listing a collection
WRITE_TIMEOUT = 300.0  # a large upsert on a busy server is slow, and nobody waits on it interactively


class EmbedderMismatch(Exception):
    """The collection was made with another embedder: its vectors cannot be compared with this one's."""


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    source: str
    title: str
    index: int
    content_hash: str
    text: str
    vector: Vector

    @property
    def id(self) -> str:
        return f"{self.content_hash}:{self.index}"

    def metadata(self) -> dict[str, str | int]:
        return {SOURCE: self.source, TITLE: self.title, CHUNK_INDEX: self.index, CONTENT_HASH: self.content_hash}


class CollectionWriter:
    """One collection, opened for writing with the embedder named `embedder`."""

    def __init__(self, store: ChromaStore, name: str, embedder: str) -> None:
        self._store = store
        self._name = name
        self._embedder = embedder

    def _collection(self, client: ClientAPI) -> Collection:
        return self._store.collection(client, self._name)

    async def open(self) -> bool:
        """Get or create the collection; True if it was created. Raises EmbedderMismatch, RetrievalUnavailable."""

        def work(client: ClientAPI) -> tuple[bool, dict[str, Any], str]:
            created = False
            self._store.forget(self._name)
            try:
                collection = self._collection(client)
            except NotFoundError:
                try:
                    client.create_collection(
                        self._name,
                        metadata={EMBEDDER: self._embedder, VERSION: 0},
                        configuration={"hnsw": {"space": "cosine"}},
                        embedding_function=None,
                    )
                    created = True
                except UniqueConstraintError:  # another ingest created it meanwhile
                    pass
                collection = self._collection(client)
            space = str((collection.configuration_json or {}).get("hnsw", {}).get("space", "l2"))
            return created, dict(collection.metadata or {}), space

        created, metadata, space = await self._store.run(work)
        made_with = metadata.get(EMBEDDER)
        if made_with != self._embedder:
            raise EmbedderMismatch(
                f"collection {self._name!r} was ingested with embedder {made_with!r}, but rag.embedder is "
                f"{self._embedder!r}: set rag.embedder back, or ingest into a new collection"
            )
        if space != "cosine":
            raise EmbedderMismatch(
                f"collection {self._name!r} uses {space} distance, not cosine: ingest into a new one"
            )
        return created

    async def source_hashes(self) -> dict[str, set[str]]:
        """The content hashes stored for each source (one, unless an ingest was interrupted)."""

        def work(client: ClientAPI) -> dict[str, set[str]]:
            collection = self._collection(client)
            hashes: dict[str, set[str]] = defaultdict(set)
            offset = 0
            while True:
                page = collection.get(include=["metadatas"], limit=PAGE, offset=offset)
                metadatas = page.get("metadatas") or []
                for metadata in metadatas:
                    hashes[str(metadata.get(SOURCE, ""))].add(str(metadata.get(CONTENT_HASH, "")))
                if len(page["ids"]) < PAGE:
                    return dict(hashes)
                offset += PAGE

        return await self._store.run(work, WRITE_TIMEOUT)

    async def replace(self, sources: Sequence[str], records: Sequence[ChunkRecord]) -> None:
        """Delete every chunk of `sources`, then upsert `records` (the new chunks of some of them)."""

        def work(client: ClientAPI) -> None:
            collection = self._collection(client)
            if sources:
                where: Any = {SOURCE: {"$in": list(sources)}}  # chromadb's annotation rejects list[str] for $in
                collection.delete(where=where)
            batch = client.get_max_batch_size()
            for start in range(0, len(records), batch):
                part = records[start : start + batch]
                embeddings: Any = [r.vector for r in part]  # unit float32 arrays
                collection.upsert(
                    ids=[r.id for r in part],
                    embeddings=embeddings,
                    documents=[r.text for r in part],
                    metadatas=[r.metadata() for r in part],
                )

        await self._store.run(work, WRITE_TIMEOUT)

    async def count(self) -> int:
        return await self._store.run(lambda client: self._collection(client).count())

    async def bump_version(self) -> int:
        """Add one to the collection's version (after a change: cached answers over the old corpus expire)."""

        def work(client: ClientAPI) -> int:
            self._store.forget(self._name)
            collection = self._collection(client)
            metadata = {k: v for k, v in (collection.metadata or {}).items() if not k.startswith("hnsw:")}
            version = int(metadata.get(VERSION, 0) or 0) + 1
            metadata[VERSION] = version
            collection.modify(metadata=metadata)
            return version

        return await self._store.run(work, WRITE_TIMEOUT)
