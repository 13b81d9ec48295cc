"""The `rag` part of `make bench`: what ingesting costs, what a retrieval adds to a request, and how often it
finds the right document.

The issue's benchmark: ingestion throughput (chunks per second, local embedder on CPU), retrieval latency
p50/p99 at 10,000 chunks, and the hit rate at k=5 on the test corpus. Everything runs in this process on
uvloop with every thread pinned to the proxy's CPU (`bench.cache._pinned`, as the gateway runs under
`taskset`), against ChromaDB embedded (`PersistentClient` in a temporary folder) and, when it starts, a
`chroma run` server on loopback pinned to the load generator's CPU:

1. Ingestion. `sluice.rag.ingest.ingest` (the code `sluice ingest` runs) with the gateway's default embedder
   (`make_embedder`: all-MiniLM-L6-v2 in process, one torch thread, behind `BatchingEmbedder`, loaded
   beforehand) on the 96-document corpus of tests/rag_corpus.py (text, Markdown, HTML and PDF), each round
   into a new collection: files, chunks, seconds, chunks/s. Then a re-ingest with nothing changed.
2. Latency at 10,000 chunks. A collection filled through `CollectionWriter.replace` (the ingest writer)
   with 10,000 records of the real schema (sluice/rag/types.py: id, ~1 KB document, source, title,
   chunk_index, content_hash) and random 384-dimension unit vectors: the HNSW search's cost depends on the
   index's size and dimension, not on what the vectors mean. Then, one call at a time after a warm-up,
   `ChromaStore.query(collection, vector, top_k=5)`; the embedding of a question alone; and
   `Retriever.retrieve` (the gateway's retrieval stage: embedding + query under `rag.timeout`).
3. Quality. On the ingested corpus, each of the 96 questions through `Retriever.retrieve` with top_k=5:
   the share whose expected source is among the chunks returned (hit rate at k=5), and first (k=1).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.cache import Timing, _pinned, _timing, _units
from bench.env import BenchError
from bench.procs import LOCALHOST, REPO_ROOT, Service, free_port, start, wait_http
from bench.progress import Progress
from bench.targets import Lab
from sluice.cache.embedders import LOCAL_DIMENSIONS, BatchingEmbedder, make_embedder
from sluice.config import ChromaConfig, RagConfig
from sluice.rag.chroma import ChromaStore, make_chunk_store
from sluice.rag.chroma_writer import ChunkRecord, CollectionWriter
from sluice.rag.ingest import ingest
from sluice.rag.retrieval import Retriever
from tests.rag_corpus import FILLER, SUBJECTS, write_corpus

CHUNKS = 10_000
CHUNKS_PER_SOURCE = 10  # 1,000 sources of 10 chunks each
FILL_BATCH = 1_000  # records per `CollectionWriter.replace` call while filling
SAMPLES = 1_000  # queries timed one at a time (--quick: QUICK_SAMPLES)
QUICK_SAMPLES = 200
EMBED_SAMPLES = 300  # questions embedded / retrieved one at a time (--quick: QUICK_EMBED_SAMPLES)
QUICK_EMBED_SAMPLES = 100
WARMUP = 50
INGEST_ROUNDS = 3  # fresh collections (--quick: 1)
TOP_K = 5
EMBED_TIMEOUT = 300.0  # as `sluice ingest` sets it: throughput matters when ingesting, not latency
SERVER_START_S = 30.0
EMBEDDED = "embedded (PersistentClient, in process)"


@dataclass(frozen=True, slots=True)
class IngestRun:
    store: str
    files: int
    chunks: int
    seconds: list[float]  # one per round, each into a new collection
    chunks_per_s: list[float]
    reingest_s: float
    reingest_unchanged: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_rate(self) -> float:
        return statistics.median(self.chunks_per_s)


@dataclass(frozen=True, slots=True)
class LatencyRun:
    store: str
    fill_s: float
    query: Timing
    retrieve: Timing


@dataclass(frozen=True, slots=True)
class Quality:
    questions: int
    hits_at_1: int
    hits_at_k: int
    misses: list[tuple[str, str, list[str]]]  # question, expected source, the sources returned


@dataclass(slots=True)
class RagReport:
    model_load_s: float = 0.0
    torch_threads: int = 0
    chunk_tokens: int = 0
    ingests: list[IngestRun] = field(default_factory=list)
    latency: list[LatencyRun] = field(default_factory=list)
    embedding: Timing | None = None
    quality: Quality | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rows(self) -> list[object]:
        return [*self.ingests, *self.latency]


def plan(quick: bool) -> tuple[int, float]:
    """Steps and seconds: the model, then per chunk store ingest, fill, queries, retrievals; quality and embedding."""
    if quick:
        return 11, 5 + 2 * (8 + 11 + 1 + 3) + 2 + 2
    return 11, 5 + 2 * (22 + 11 + 3 + 6) + 2 + 5


def run(lab: Lab, progress: Progress, *, quick: bool) -> RagReport:
    report = RagReport(chunk_tokens=RagConfig().chunk_tokens)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sluice-bench-rag-")))
        corpus = scratch / "corpus"
        questions = write_corpus(corpus)
        stores = [(EMBEDDED, ChromaConfig(path=str(scratch / "chroma")))]
        server = _server(lab, scratch / "chroma-server", progress)
        if isinstance(server, str):
            report.skipped.append(("chroma run", server))
            progress.skip(4, 42)
        else:
            stack.callback(server[0].stop)
            stores.append((server[1], ChromaConfig(mode="http", url=server[2])))
        measure = _Measure(
            progress,
            corpus,
            questions,
            samples=QUICK_SAMPLES if quick else SAMPLES,
            embed_samples=QUICK_EMBED_SAMPLES if quick else EMBED_SAMPLES,
            rounds=1 if quick else INGEST_ROUNDS,
        )
        _pinned(lab.cpus, lambda: measure.all(report, stores))  # one event loop: the embedder is bound to it
    return report


def _server(lab: Lab, folder: Path, progress: Progress) -> tuple[Service, str, str] | str:
    """A `chroma run` server pinned to the load generator's CPU: (service, description, url), or why not."""
    binary = REPO_ROOT / ".venv" / "bin" / "chroma"
    if not binary.exists():
        found = shutil.which("chroma")
        if found is None:
            return "the `chroma` command is not installed (pip install chromadb)"
        binary = Path(found)
    progress.note(f"rag: starting `chroma run` on CPU {lab.cpus.rest}")
    port = free_port()
    argv = [str(binary), "run", "--path", str(folder), "--host", LOCALHOST, "--port", str(port)]
    service = start(f"chroma-{port}", argv, cpu=lab.cpus.rest, taskset=lab.tools.taskset, logdir=lab.workdir)
    try:
        wait_http(service, f"http://{LOCALHOST}:{port}/api/v2/heartbeat", timeout=SERVER_START_S)
    except BenchError as exc:
        service.stop()
        progress.note(f"chroma run not measured: {exc}")
        return f"did not start: {exc}".splitlines()[0]
    return service, f"`chroma run` server (loopback, CPU {lab.cpus.rest})", f"http://{LOCALHOST}:{port}"


@dataclass(slots=True)
class _Measure:
    """The measurements, run in one event loop: per chunk store, ingest the corpus, fill 10,000 chunks, time."""

    progress: Progress
    corpus: Path
    questions: list[tuple[str, str]]
    samples: int
    embed_samples: int
    rounds: int

    async def all(self, report: RagReport, stores: list[tuple[str, ChromaConfig]]) -> None:
        self.progress.step("rag: loading the local embedder (all-MiniLM-L6-v2, CPU)", 5)
        # What `make_embedder` builds by default, with the long timeout `sluice ingest` gives it.
        embedder = make_embedder(RagConfig().embedder.model_copy(update={"timeout": EMBED_TIMEOUT}))
        try:
            started = time.perf_counter()
            await embedder.warm_up()
            report.model_load_s = time.perf_counter() - started
            import torch  # loaded by now

            report.torch_threads = int(torch.get_num_threads())
            self.progress.note(f"model loaded in {report.model_load_s:.1f} s, {report.torch_threads} torch thread(s)")
            for where, chroma in stores:
                short = "embedded" if where == EMBEDDED else "server"
                store = make_chunk_store(chroma)
                try:
                    report.ingests.append(await self.ingest(store, embedder, where, short))
                    if where == EMBEDDED:
                        report.quality = await self.quality(store, embedder)
                        report.embedding = await self.embedding(embedder)
                    report.latency.append(await self.latency(store, embedder, where, short))
                finally:
                    await store.close()
        finally:
            await embedder.close()

    async def ingest(self, store: ChromaStore, embedder: BatchingEmbedder, where: str, short: str) -> IngestRun:
        self.progress.step(f"rag ({short}): ingesting the test corpus, {self.rounds} round(s) and a re-ingest", 22)
        config = RagConfig()
        firsts = [await ingest(config, f"bench-corpus-{n}", [self.corpus], store, embedder) for n in range(self.rounds)]
        again = await ingest(config, "bench-corpus-0", [self.corpus], store, embedder)
        first = firsts[0]
        if first.warnings or not first.chunks_written:
            raise BenchError(f"rag: ingesting the corpus went wrong: {first.document()}")
        if again.chunks_written or again.unchanged != first.added:
            raise BenchError(f"rag: the re-ingest changed something: {again.document()}")
        run = IngestRun(
            where,
            first.added,
            first.chunks_written,
            [s.seconds for s in firsts],
            [s.chunks_per_second for s in firsts],
            again.seconds,
            again.unchanged,
        )
        self.progress.note(
            f"{run.files} files, {run.chunks} chunks in {run.median_s:.2f} s ({run.median_rate:,.1f} chunks/s); "
            f"re-ingest {run.reingest_s:.3f} s"
        )
        return run

    async def quality(self, store: ChromaStore, embedder: BatchingEmbedder) -> Quality:
        self.progress.step(f"rag: hit rate at k={TOP_K} on {len(self.questions)} questions", 2)
        retriever = Retriever(store, embedder, timeout=EMBED_TIMEOUT)  # not closed: it would close both
        at_1 = at_k = 0
        misses = []
        for question, expected in self.questions:
            found = await retriever.retrieve("bench-corpus-0", question, TOP_K)
            if not found.available:
                raise BenchError(f"rag: retrieval failed: {found.error}")
            sources = [chunk.source for chunk in found.chunks]
            at_1 += bool(sources) and sources[0] == expected
            if expected in sources:
                at_k += 1
            else:
                misses.append((question, expected, sources))
        quality = Quality(len(self.questions), at_1, at_k, misses)
        self.progress.note(
            f"hit rate at k={TOP_K}: {quality.hits_at_k}/{quality.questions}; at k=1: "
            f"{quality.hits_at_1}/{quality.questions}"
        )
        return quality

    async def embedding(self, embedder: BatchingEmbedder) -> Timing:
        self.progress.step(f"rag: embedding {self.embed_samples} questions one at a time", 5)
        texts = [question for question, _ in self.questions]
        times = []
        for position in range(-WARMUP, self.embed_samples):
            text = texts[position % len(texts)]
            began = time.perf_counter()
            await embedder.embed([text])
            if position >= 0:
                times.append((time.perf_counter() - began) * 1000)
        timing = _timing("embedding a question", times)
        self.progress.note(f"embedding: p50 {timing.p50_ms:.2f} ms, p99 {timing.p99_ms:.2f} ms")
        return timing

    async def latency(self, store: ChromaStore, embedder: BatchingEmbedder, where: str, short: str) -> LatencyRun:
        self.progress.step(f"rag ({short}): filling a collection with {CHUNKS:,} chunks", 11)
        name = "bench-10k"
        writer = CollectionWriter(store, name, embedder.name)
        await writer.open()
        rng = np.random.default_rng(10)
        records = _records(_units(rng.standard_normal((CHUNKS, LOCAL_DIMENSIONS))))
        started = time.perf_counter()
        for first in range(0, CHUNKS, FILL_BATCH):
            await writer.replace([], records[first : first + FILL_BATCH])
            if (first + FILL_BATCH) % (CHUNKS // 4) == 0:
                self.progress.note(f"{first + FILL_BATCH:,}/{CHUNKS:,} stored")
        if await writer.count() != CHUNKS:
            raise BenchError(f"rag: the collection holds {await writer.count():,} chunks, not {CHUNKS:,}")
        fill_s = time.perf_counter() - started
        self.progress.note(f"{CHUNKS:,} chunks stored in {fill_s:.1f} s ({CHUNKS / fill_s:,.0f} chunks/s)")

        self.progress.step(f"rag ({short}): {self.samples:,} queries at top_k={TOP_K}, one at a time", 3)
        probes = _units(rng.standard_normal((self.samples + WARMUP, LOCAL_DIMENSIONS)))
        times = []
        for position in range(-WARMUP, self.samples):
            began = time.perf_counter()
            found = await store.query(name, probes[position + WARMUP], TOP_K)
            elapsed = time.perf_counter() - began
            if len(found) != TOP_K or not found[0].text:
                raise BenchError(f"rag: a query returned {len(found)} chunks")
            if position >= 0:
                times.append(elapsed * 1000)
        query = _timing(f"`ChromaStore.query`, top_k={TOP_K}", times)
        self.progress.note(f"query: p50 {query.p50_ms:.2f} ms, p99 {query.p99_ms:.2f} ms")

        self.progress.step(f"rag ({short}): {self.embed_samples} retrievals (embed + query), one at a time", 6)
        retriever = Retriever(store, embedder, timeout=RagConfig().timeout)  # not closed: it would close both
        texts = [question for question, _ in self.questions]
        times = []
        for position in range(-WARMUP, self.embed_samples):
            retrieval = await retriever.retrieve(name, texts[position % len(texts)], TOP_K)
            if not retrieval.available:
                raise BenchError(f"rag: retrieval failed: {retrieval.error}")
            if position >= 0:
                times.append(retrieval.seconds * 1000)
        retrieve = _timing("`Retriever.retrieve` (embedding + query)", times)
        self.progress.note(f"retrieve: p50 {retrieve.p50_ms:.2f} ms, p99 {retrieve.p99_ms:.2f} ms")
        return LatencyRun(where, fill_s, query, retrieve)


def _records(vectors: np.ndarray) -> list[ChunkRecord]:
    """CHUNKS records of the real schema: 1,000 made-up sources of CHUNKS_PER_SOURCE ~1 KB chunks each."""
    rng = random.Random(10)
    records = []
    for source_number in range(CHUNKS // CHUNKS_PER_SOURCE):
        subject = SUBJECTS[source_number % len(SUBJECTS)][0]
        title = f"Notes on the {subject}, part {source_number}"
        source = f"handbook/section-{source_number // 100:02d}/{subject.replace(' ', '-')}-{source_number}.md"
        digest = hashlib.sha256(source.encode()).hexdigest()
        for index in range(CHUNKS_PER_SOURCE):
            words: list[str] = []
            while sum(len(w) + 1 for w in words) < 1000:
                words.append(rng.choice(FILLER))
            text = f"{title}. " + " ".join(words)
            vector = vectors[source_number * CHUNKS_PER_SOURCE + index]
            records.append(ChunkRecord(source, title, index, digest, text[:1024], vector))
    return records


def markdown(report: RagReport, preamble: str) -> str:
    lines = [
        preamble,
        "Every measurement runs in one process on uvloop with all its threads pinned to the proxy's CPU (as the "
        "gateway runs under `taskset`), through the gateway's own code, against ChromaDB embedded "
        "(`PersistentClient` in a temporary folder) and a `chroma run` server on loopback pinned to the other "
        f"CPU. Embedder: what `make_embedder` builds by default (all-MiniLM-L6-v2 in process, CPU, "
        f"{report.torch_threads} torch thread(s), behind `BatchingEmbedder`); loading it (torch import "
        f"included) took {report.model_load_s:.1f} s, not counted below.",
        "",
        f"**Ingestion**: `sluice.rag.ingest.ingest` (what `sluice ingest` runs; chunk_tokens "
        f"{report.chunk_tokens}) on the test corpus of tests/rag_corpus.py (96 short documents, 24 each of .txt, "
        ".md, .html and .pdf, about 100 words each: one chunk per file), each round into a new collection; "
        "seconds are the whole call (discover, read, parse, chunk, embed, write, bump the version). Then the "
        "same folder again into the first collection: every file unchanged (sha256), nothing embedded.",
        "",
        "| chunk store | files | chunks | seconds (median) | chunks/s (median) | rounds: chunks/s | "
        "re-ingest, nothing changed: seconds |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for run in report.ingests:
        each = ", ".join(f"{rate:,.1f}" for rate in run.chunks_per_s)
        lines.append(
            f"| {run.store} | {run.files} | {run.chunks} | {run.median_s:.2f} | {run.median_rate:,.1f} | {each} | "
            f"{run.reingest_s:.3f} ({run.reingest_unchanged} unchanged) |"
        )
    if report.latency:
        lines += [
            "",
            f"**Retrieval at {CHUNKS:,} chunks**: a collection filled through `CollectionWriter.replace` (the "
            f"ingest writer; {FILL_BATCH:,} records a call) with {CHUNKS:,} records of the real schema (~1 KB "
            f"documents; source, title, chunk_index, content_hash; {CHUNKS // CHUNKS_PER_SOURCE:,} sources) and "
            "**random 384-dimension unit vectors**: the HNSW search's cost depends on the index's size and "
            "dimension, not on what the vectors mean. Timed one call at a time after "
            f"{WARMUP} warm-up calls: `ChromaStore.query(collection, vector, top_k={TOP_K})` with a random unit "
            "vector (documents and metadata included, as the gateway asks), the embedding of a test-corpus "
            "question alone, and `Retriever.retrieve` (the gateway's retrieval stage: the embedding, then the "
            "query, under `rag.timeout`).",
            "",
            "| chunk store | what | samples | p50 ms | p99 ms | mean ms |",
            "|---|---|---:|---:|---:|---:|",
        ]
        rows: list[tuple[str, Timing]] = []
        for timed in report.latency:
            rows.append((timed.store, timed.query))
        if report.embedding is not None:
            rows.append(("—", report.embedding))
        for timed in report.latency:
            rows.append((timed.store, timed.retrieve))
        for store, row in rows:
            lines.append(
                f"| {store} | {row.kind} | {row.samples:,} | {row.p50_ms:.2f} | {row.p99_ms:.2f} | {row.mean_ms:.2f} |"
            )
        fills = "; ".join(
            f"{run.store}: {run.fill_s:.1f} s ({CHUNKS / run.fill_s:,.0f} chunks/s)" for run in report.latency
        )
        lines.append(f"\nFilling {CHUNKS:,} chunks (vectors given, nothing embedded): {fills}.")
        if report.embedding is not None:
            sums = "; ".join(
                f"{run.store}: {report.embedding.p50_ms + run.query.p50_ms:.1f} ms at p50 "
                f"({report.embedding.p50_ms:.1f} embedding + {run.query.p50_ms:.1f} query; measured together "
                f"{run.retrieve.p50_ms:.1f}), {report.embedding.p99_ms + run.query.p99_ms:.1f} ms summed at p99"
                for run in report.latency
            )
            lines.append(f"\nWhat a RAG request adds before the model, one at a time: {sums}.")
    if report.quality is not None:
        q = report.quality
        lines += [
            "",
            f"**Retrieval quality** on the test corpus (embedded store, the collection ingested above): each of the "
            f"{q.questions} questions of tests/rag_corpus.py through `Retriever.retrieve` with top_k={TOP_K}; a "
            "hit when the question's source file is among the chunks returned.",
            "",
            "| questions | hit rate at k=1 | hit rate at k=5 |",
            "|---:|---:|---:|",
            f"| {q.questions} | {q.hits_at_1 / q.questions:.1%} ({q.hits_at_1}) | "
            f"{q.hits_at_k / q.questions:.1%} ({q.hits_at_k}) |",
        ]
        for question, expected, sources in q.misses[:5]:
            lines.append(f"\n- missed: “{question}” (expected {expected}; got {', '.join(sources)})")
    if report.skipped:
        lines.append("")
        lines += [f"- **{name}** not measured: {reason}" for name, reason in report.skipped]
    return "\n".join(lines) + "\n"


def chroma_version() -> str:
    import chromadb

    return str(chromadb.__version__)
