"""What the RAG parts agree on: a retrieved chunk, the chunk store, the failure it raises, the metadata schema.

A collection in ChromaDB holds one record per chunk: id `<content hash of the file>:<chunk index>`, the
chunk's text as the document, its embedding (unit vector, cosine space), and the metadata below. The
collection's own metadata records the embedder that made its vectors (`sluice_embedder`: queries must
use the same one) and its version (`sluice_version`, a counter bumped by every ingest that changed
something: part of the response cache's scope, so answers grounded on an old corpus are not served).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sluice.cache.types import Vector

# Chunk metadata keys (every chunk carries all of them).
SOURCE = "source"  # the file's path as given to `sluice ingest`, relative to the folder it was found in
TITLE = "title"  # the document's title (Markdown/HTML heading or <title>, PDF metadata, else the file name)
CHUNK_INDEX = "chunk_index"  # position of the chunk in its file, from 0
CONTENT_HASH = "content_hash"  # sha256 of the file's bytes: unchanged files are skipped on re-ingest
# Collection metadata keys.
EMBEDDER = "sluice_embedder"
VERSION = "sluice_version"


class RetrievalUnavailable(Exception):
    """The chunk store failed, timed out or has no such collection: answer without context."""


@dataclass(frozen=True, slots=True)
class Chunk:
    id: str
    text: str
    source: str
    title: str
    index: int
    score: float  # cosine similarity to the query, 1 = same direction


class ChunkStore(Protocol):
    """ChromaDB, embedded or as a server (sluice/rag/chroma.py); every call runs off the event loop."""

    async def query(self, collection: str, vector: Vector, top_k: int) -> list[Chunk]:
        """The `top_k` nearest chunks, best first; raises RetrievalUnavailable."""
        ...

    async def version(self, collection: str) -> str:
        """The collection's version (changes with every ingest that changed it); raises RetrievalUnavailable."""
        ...

    async def close(self) -> None: ...
