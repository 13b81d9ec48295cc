"""`sluice ingest` against real ChromaDB (embedded, and a `chroma run` server) with the local embedder:
counts, idempotency, versions, changed and deleted files, chunk metadata, and retrieval quality.

The tests are synchronous and share one event loop and one embedder per module (loading the model and
embedding the corpus once), driven through `Harness.run`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sluice.cache.embedders import BatchingEmbedder, make_embedder
from sluice.cli import main as cli_main
from sluice.config import ChromaConfig, EmbedderConfig, RagConfig
from sluice.rag.chroma import ChromaStore, make_chunk_store
from sluice.rag.chroma_writer import CollectionWriter, EmbedderMismatch
from sluice.rag.ingest import IngestSummary, ingest
from sluice.rag.types import CHUNK_INDEX, CONTENT_HASH, SOURCE, TITLE, RetrievalUnavailable
from tests.conftest import free_port
from tests.rag_corpus import write_corpus

T = TypeVar("T")
MIN_HIT_RATE = 0.9
CHROMA = Path(sys.executable).with_name("chroma")


class Harness:
    def __init__(self, folder: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.folder = folder
        self.corpus = folder / "corpus"
        self.questions = write_corpus(self.corpus)
        (self.corpus / "notes.csv").write_text("a,b\n")  # unsupported: skipped and counted
        (self.corpus / ".hidden.txt").write_text("hidden files are not ingested")
        self.embedder_config = EmbedderConfig(timeout=300)
        self.embedder: BatchingEmbedder = make_embedder(self.embedder_config)
        self.stores: list[ChromaStore] = []

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    def config(self, chroma: ChromaConfig) -> RagConfig:
        return RagConfig(chroma=chroma, embedder=self.embedder_config, chunk_tokens=128, overlap_tokens=16)

    def store(self, chroma: ChromaConfig, timeout: float = 30.0) -> ChromaStore:
        store = make_chunk_store(chroma, timeout)
        self.stores.append(store)
        return store

    def ingest(self, chroma: ChromaConfig, collection: str, paths: list[Path], **kwargs: Any) -> IngestSummary:
        store = self.store(chroma)
        return self.run(ingest(self.config(chroma), collection, paths, store, self.embedder, **kwargs))

    def hit_rate(self, store: ChromaStore, collection: str) -> float:
        async def rate() -> float:
            vectors = await self.embedder.embed([q for q, _ in self.questions])
            hits = 0
            for (_, source), vector in zip(self.questions, vectors, strict=True):
                found = await store.query(collection, vector, 5)
                hits += source in {chunk.source for chunk in found}
            return hits / len(self.questions)

        return self.run(rate())

    def close(self) -> None:
        for store in self.stores:
            self.run(store.close())
        self.run(self.embedder.close())
        self.loop.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("rag"))
    yield h
    h.close()


@pytest.fixture(scope="module")
def embedded(harness: Harness) -> tuple[ChromaConfig, IngestSummary]:
    chroma = ChromaConfig(path=str(harness.folder / "chroma"))
    return chroma, harness.ingest(chroma, "corpus", [harness.corpus])


def records(harness: Harness, chroma: ChromaConfig, collection: str) -> list[tuple[str, dict[str, Any], str]]:
    def work(client: Any) -> list[tuple[str, dict[str, Any], str]]:
        found = client.get_collection(collection, embedding_function=None).get(include=["metadatas", "documents"])
        return list(zip(found["ids"], found["metadatas"], found["documents"], strict=True))

    return harness.run(harness.store(chroma).run(work))


def test_first_ingest_counts(harness: Harness, embedded: tuple[ChromaConfig, IngestSummary]) -> None:
    chroma, summary = embedded
    assert (summary.added, summary.changed, summary.unchanged, summary.deleted) == (96, 0, 0, 0)
    assert (summary.skipped, summary.unreadable, summary.duplicates) == (1, 0, 0)
    assert summary.version == 1 and not summary.warnings
    assert summary.chunks_written == len(records(harness, chroma, "corpus")) > 96
    print(f"\ningest: {summary.chunks_written} chunks, {summary.chunks_per_second:.1f} chunks/s after warm-up")


def test_chunk_metadata_is_complete(harness: Harness, embedded: tuple[ChromaConfig, IngestSummary]) -> None:
    chroma, _ = embedded
    stored = records(harness, chroma, "corpus")
    sources = {meta[SOURCE] for _, meta, _ in stored}
    assert sources == {source for _, source in harness.questions}
    for chunk_id, meta, text in stored:
        assert set(meta) == {SOURCE, TITLE, CHUNK_INDEX, CONTENT_HASH}
        digest = hashlib.sha256((harness.corpus / meta[SOURCE]).read_bytes()).hexdigest()
        assert meta[CONTENT_HASH] == digest and chunk_id == f"{digest}:{meta[CHUNK_INDEX]}"
        assert text and "do not index me" not in text and "color: red" not in text
        if not meta[SOURCE].startswith("txt/"):
            assert meta[TITLE].startswith("The ")  # Markdown heading, HTML <title>, PDF Info title
        else:
            assert meta[TITLE] == Path(meta[SOURCE]).name
    for source in sources:  # indexes run 0..n-1 per source
        indexes = sorted(m[CHUNK_INDEX] for _, m, _ in stored if m[SOURCE] == source)
        assert indexes == list(range(len(indexes)))


def test_questions_find_their_document(harness: Harness, embedded: tuple[ChromaConfig, IngestSummary]) -> None:
    chroma, _ = embedded
    store = harness.store(chroma)
    rate = harness.hit_rate(store, "corpus")
    print(f"\nembedded hit rate (top 5): {rate:.1%} of {len(harness.questions)} questions")
    assert rate >= MIN_HIT_RATE
    vector = harness.run(harness.embedder.embed([harness.questions[0][0]]))[0]
    best = harness.run(store.query("corpus", vector, 3))
    assert len(best) == 3 and best[0].score >= best[1].score >= best[2].score and best[0].score > 0.3


def test_reingest_changes_nothing(harness: Harness, embedded: tuple[ChromaConfig, IngestSummary]) -> None:
    chroma, _ = embedded
    again = harness.ingest(chroma, "corpus", [harness.corpus])
    assert (again.added, again.changed, again.unchanged, again.deleted, again.chunks_written) == (0, 0, 96, 0, 0)
    assert again.version is None
    assert harness.run(harness.store(chroma).version("corpus")) == "1"


def test_changed_and_deleted_files(harness: Harness, embedded: tuple[ChromaConfig, IngestSummary]) -> None:
    chroma, _ = embedded
    folder = harness.folder / "small"
    shutil.copytree(harness.corpus / "md", folder)
    store = harness.store(chroma)
    first = harness.ingest(chroma, "small", [folder])
    assert first.added == 24 and harness.run(store.version("small")) == "1"
    before = records(harness, chroma, "small")
    target = sorted(p for p in folder.glob("*.md"))[0]
    source = target.name
    target.write_text(target.read_text() + "\n\nA new closing paragraph about the Plimbric harbour tax.\n")
    changed = harness.ingest(chroma, "small", [folder])
    assert (changed.added, changed.changed, changed.unchanged) == (0, 1, 23)
    assert harness.run(store.version("small")) == "2"
    after = records(harness, chroma, "small")
    untouched = {(i, m[SOURCE]) for i, m, _ in before if m[SOURCE] != source}
    assert untouched == {(i, m[SOURCE]) for i, m, _ in after if m[SOURCE] != source}
    new_hash = hashlib.sha256(target.read_bytes()).hexdigest()
    assert {m[CONTENT_HASH] for _, m, _ in after if m[SOURCE] == source} == {new_hash}
    assert any("Plimbric" in text for _, m, text in after if m[SOURCE] == source)

    target.unlink()
    kept = harness.ingest(chroma, "small", [folder])
    assert kept.deleted == 0 and kept.version is None
    deleted = harness.ingest(chroma, "small", [folder], delete_missing=True)
    assert (deleted.deleted, deleted.unchanged, deleted.version) == (1, 23, 3)
    assert source not in {m[SOURCE] for _, m, _ in records(harness, chroma, "small")}


def test_other_embedder_is_refused(harness: Harness, embedded: tuple[ChromaConfig, IngestSummary]) -> None:
    chroma, _ = embedded
    writer = CollectionWriter(harness.store(chroma), "corpus", "openai:BAAI/bge-m3")
    with pytest.raises(EmbedderMismatch, match="local:all-MiniLM-L6-v2"):
        harness.run(writer.open())
    with pytest.raises(RetrievalUnavailable, match="does not exist"):
        harness.run(harness.store(chroma).version("no-such-collection"))


def test_cli(harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text(
        f"backends: [{{name: a, url: 'http://127.0.0.1:9'}}]\nrag:\n  chroma: {{path: '{tmp_path / 'chroma'}'}}\n"
    )
    paths = [str(harness.corpus / "html"), str(harness.corpus / "pdf" / "nested")]
    assert cli_main(["ingest", "--config", str(config), "--collection", "cli", "--json", *paths]) == 0
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["files"]["added"] == 24 + len(list((harness.corpus / "pdf" / "nested").iterdir()))
    assert document["version"] == 1 and "files" in err  # progress on stderr
    assert cli_main(["ingest", "--config", str(config), "--collection", "cli", *paths]) == 0
    assert "version unchanged" in capsys.readouterr().out
    assert cli_main(["ingest", "--config", str(config), "--collection", "cli", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


# --- a real Chroma server -------------------------------------------------------------------------------


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[tuple[ChromaConfig, subprocess.Popen[bytes]]]:
    port = free_port()
    server = subprocess.Popen(
        [str(CHROMA), "run", "--path", str(tmp_path / "server"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.kill()
        pytest.fail("chroma run did not start within 30 s")
    yield ChromaConfig(mode="http", url=f"http://127.0.0.1:{port}"), server
    server.kill()
    server.wait()


def test_server_ingest_query_and_outage(
    harness: Harness, chroma_server: tuple[ChromaConfig, subprocess.Popen[bytes]]
) -> None:
    chroma, server = chroma_server
    summary = harness.ingest(chroma, "corpus", [harness.corpus])
    assert summary.added == 96 and summary.version == 1
    again = harness.ingest(chroma, "corpus", [harness.corpus])
    assert again.unchanged == 96 and again.version is None
    store = harness.store(chroma, timeout=5.0)
    rate = harness.hit_rate(store, "corpus")
    print(f"\nserver hit rate (top 5): {rate:.1%}")
    assert rate >= MIN_HIT_RATE
    assert harness.run(store.version("corpus")) == "1"

    server.terminate()
    server.wait(timeout=10)
    vector = harness.run(harness.embedder.embed(["anything"]))[0]
    started = time.monotonic()
    with pytest.raises(RetrievalUnavailable):
        harness.run(store.query("corpus", vector, 5))
    with pytest.raises(RetrievalUnavailable):
        harness.run(store.version("corpus"))
    assert time.monotonic() - started < 10.5  # two calls, each bounded by the store's 5 s
