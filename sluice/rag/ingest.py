"""Ingesting files into a RAG collection: find them, skip the unchanged, chunk and embed the rest, write.

A file's source is its path relative to the folder given (a file given by itself: its name). A file whose
sha256 is the one stored for its source is left alone; a changed file's chunks are replaced; with
`delete_missing`, sources no longer found are deleted. The collection's version is bumped once at the end
if anything changed, so cached answers grounded on the old corpus stop being served.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sluice.cache.embedders import BatchingEmbedder
from sluice.config import RagConfig
from sluice.rag.chroma import ChromaStore
from sluice.rag.chroma_writer import ChunkRecord, CollectionWriter
from sluice.rag.chunking import ApproximateCounter, TokenCounter, local_counter, split
from sluice.rag.loaders import UnreadableDocument, load, supported

FLUSH_CHUNKS = 256  # chunks embedded and written together (a few embedder calls, one upsert)


class IngestError(Exception):
    """The paths cannot be ingested as given (missing, or two files claiming one source)."""


class Reporter(Protocol):
    def warn(self, message: str) -> None: ...

    def progress(self, files_done: int, files_total: int, chunks: int) -> None: ...


class Silent:
    def warn(self, message: str) -> None:
        pass

    def progress(self, files_done: int, files_total: int, chunks: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class SourceFile:
    source: str
    path: Path


@dataclass(slots=True)
class IngestSummary:
    collection: str
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: int = 0  # file types no loader reads
    unreadable: int = 0  # unreadable or without text: skipped with a warning (stored chunks are kept)
    duplicates: int = 0  # same bytes as an earlier file of this run: stored once, under the first source
    chunks_written: int = 0
    seconds: float = 0.0
    warm_up_seconds: float = 0.0  # of `seconds`: loading the embedding model (or proving the server answers)
    version: int | None = None  # the new version if this run bumped it
    warnings: list[str] = field(default_factory=list)

    @property
    def chunks_per_second(self) -> float:
        working = self.seconds - self.warm_up_seconds
        return self.chunks_written / working if working > 0 else 0.0

    def document(self) -> dict[str, object]:
        return {
            "collection": self.collection,
            "files": {
                "added": self.added,
                "changed": self.changed,
                "unchanged": self.unchanged,
                "deleted": self.deleted,
                "skipped": self.skipped,
                "unreadable": self.unreadable,
                "duplicates": self.duplicates,
            },
            "chunks_written": self.chunks_written,
            "seconds": round(self.seconds, 3),
            "warm_up_seconds": round(self.warm_up_seconds, 3),
            "chunks_per_second": round(self.chunks_per_second, 1),
            "version": self.version,
            "warnings": self.warnings,
        }


def _walk(folder: Path) -> Iterator[Path]:
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            yield entry


def discover(paths: Sequence[Path]) -> tuple[list[SourceFile], int]:
    """The supported files under `paths` (sorted by source) and how many other files were skipped."""
    found: dict[str, SourceFile] = {}
    skipped = 0
    for root in paths:
        if root.is_dir():
            files = [(f.relative_to(root).as_posix(), f) for f in _walk(root)]
        elif root.is_file():
            files = [(root.name, root)]
        else:
            raise IngestError(f"{root}: no such file or folder")
        for source, path in files:
            if not supported(path):
                skipped += 1
                continue
            other = found.get(source)
            if other is not None and other.path != path:
                raise IngestError(
                    f"{other.path} and {path} would both be stored as source {source!r}: ingest their common "
                    "parent folder, or put them in different collections"
                )
            found[source] = SourceFile(source, path)
    return sorted(found.values(), key=lambda f: f.source), skipped


def token_counter(config: RagConfig) -> TokenCounter:
    return local_counter() if config.embedder.kind == "local" else ApproximateCounter()


@dataclass(slots=True)
class _Pending:
    """Changed files waiting to be embedded and written together."""

    sources: list[str] = field(default_factory=list)  # whose stored chunks are replaced
    chunks: list[tuple[SourceFile, str, str, int, str]] = field(default_factory=list)  # file, title, hash, i, text


async def ingest(
    config: RagConfig,
    collection: str,
    paths: Sequence[Path],
    store: ChromaStore,
    embedder: BatchingEmbedder,
    *,
    delete_missing: bool = False,
    reporter: Reporter | None = None,
    counter: TokenCounter | None = None,
) -> IngestSummary:
    """Bring `collection` in line with the files under `paths`. Raises IngestError, EmbedderMismatch,
    RetrievalUnavailable (Chroma failed) and EmbedderUnavailable."""
    started = time.monotonic()
    report = reporter or Silent()
    summary = IngestSummary(collection)

    def warn(message: str) -> None:
        summary.warnings.append(message)
        report.warn(message)

    files, summary.skipped = discover(paths)
    writer = CollectionWriter(store, collection, embedder.name)
    await writer.open()
    stored = await writer.source_hashes()
    warming = time.monotonic()
    await embedder.warm_up()
    summary.warm_up_seconds = time.monotonic() - warming
    count = counter or token_counter(config)
    pending = _Pending()
    first_source: dict[str, str] = {}  # content hash -> the source of this run stored with it

    async def flush() -> None:
        records: list[ChunkRecord] = []
        texts = [text for *_, text in pending.chunks]
        vectors = await embedder.embed(texts)
        for (file, title, digest, index, text), vector in zip(pending.chunks, vectors, strict=True):
            records.append(ChunkRecord(file.source, title, index, digest, text, vector))
        await writer.replace(pending.sources, records)
        summary.chunks_written += len(records)
        pending.sources.clear()
        pending.chunks.clear()

    report.progress(0, len(files), 0)
    for done, file in enumerate(files, start=1):
        try:
            data = file.path.read_bytes()
        except OSError as err:
            summary.unreadable += 1
            warn(f"{file.path}: cannot read ({err.strerror or err}); skipped")
            continue
        digest = hashlib.sha256(data).hexdigest()
        twin = first_source.setdefault(digest, file.source)
        if twin != file.source:
            summary.duplicates += 1
            warn(f"{file.path}: same content as {twin}; stored once, under {twin}")
            continue
        before = stored.get(file.source)
        if before == {digest}:
            summary.unchanged += 1
            report.progress(done, len(files), summary.chunks_written)
            continue
        try:
            document = load(file.path, data)
        except UnreadableDocument as err:
            summary.unreadable += 1
            warn(f"{file.path}: {err}; skipped")
            continue
        texts = split(document.text, config.chunk_tokens, config.overlap_tokens, count)
        if not texts:
            summary.unreadable += 1
            warn(f"{file.path}: no text in it; skipped")
            continue
        if before is None:
            summary.added += 1
        else:
            summary.changed += 1
            pending.sources.append(file.source)
        pending.chunks.extend((file, document.title, digest, i, text) for i, text in enumerate(texts))
        if len(pending.chunks) >= FLUSH_CHUNKS:
            await flush()
        report.progress(done, len(files), summary.chunks_written + len(pending.chunks))
    if pending.chunks or pending.sources:
        await flush()
    report.progress(len(files), len(files), summary.chunks_written)

    if delete_missing:
        seen = {f.source for f in files}
        missing = sorted(source for source in stored if source not in seen)
        if missing:
            await writer.replace(missing, [])
            summary.deleted = len(missing)
    if summary.added or summary.changed or summary.deleted:
        summary.version = await writer.bump_version()
    summary.seconds = time.monotonic() - started
    return summary
