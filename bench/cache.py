"""The `cache` part of `make bench`: what a response-cache lookup costs, and what the embedding costs.

The issue's target: lookup latency p50/p99 at 10,000 entries, exact ≤ 1 ms, semantic ≤ 10 ms excluding the
embedding call, with the embedding time reported apart (the local model on CPU). So:

1. Lookups. A `RedisCacheStore` with the gateway's defaults (ttl 3600 s, max_entries 10,000) on the lab's
   throwaway redis-server (pinned to the load generator's CPU) is filled with 10,000 entries: keys from
   `cache_key` on real chat request bodies, ~1.5 KB chat completion bodies, random 384-dimension unit
   vectors (the index's cost is a matrix-vector product over the scope's rows and does not depend on
   what the vectors hold). First all in one scope (the worst case for the semantic search: every lookup
   scans 10,000 rows), then spread over 100 scopes (100 tenants, 100 rows each). Then
   `ResponseCache.lookup`, the code the gateway runs, is timed one call at a time with this process pinned
   to the proxy's CPU: exact hit; exact miss with the semantic level off; semantic hit (exact miss, index
   search, entry fetch, tenant and guard checks); semantic miss (exact miss, a search finding nothing at
   the threshold). The embedding call is excluded by giving the cache an embedder that returns
   precomputed vectors, wrapped in the gateway's `BatchingEmbedder` (so the batcher's hop is included).
2. Embedding. The gateway's default embedder (`make_embedder`: all-MiniLM-L6-v2 in process on CPU, one
   torch thread, behind `BatchingEmbedder`), pinned the same way: one text at a time, and 16 callers at once.
3. End to end. The gateway under wrk at c=100 against the canned upstream: cache off (without and with the
   `redis:` section, which also moves the rate limiter to Redis), every request an exact hit, and the cache
   on but the request not cacheable (a bypass); throughput, latency and the gateway's CPU per request.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson

from bench.cache_gateway import E2E_CONCURRENCY, end_to_end, load_lines
from bench.env import BenchError, CpuPlan
from bench.progress import Progress
from bench.scenarios import LoadReport, load_plan
from bench.targets import Lab
from sluice.cache.embedders import LOCAL_DIMENSIONS, BatchingEmbedder, make_embedder
from sluice.cache.guard import compatible
from sluice.cache.keys import CacheKey, cache_key
from sluice.cache.redis_store import RedisCacheStore
from sluice.cache.service import ResponseCache
from sluice.cache.types import CacheEntry, Vector
from sluice.config import CacheConfig
from sluice.metrics import GatewayMetrics

ENTRIES = 10_000
SPREAD_SCOPES = 100
SAMPLES = 2_000  # per lookup kind (--quick: QUICK_SAMPLES)
QUICK_SAMPLES = 200
WARMUP_ROUNDS = 50
FILL_BATCH = 100  # puts in flight at once while filling
EMBED_SAMPLES = 100
CONCURRENT = 16
CONCURRENT_EACH = 20  # texts each concurrent caller embeds, one after the other
KINDS = {  # kind -> (what the gateway does, target ms for p50 and p99)
    "exact hit": ("one EVALSHA GET + decode", 1.0),
    "exact miss": ("one EVALSHA GET, semantic level off", 1.0),
    "semantic hit": ("exact miss + batcher hop + index search + GET of the neighbour + guard", 10.0),
    "semantic miss": ("exact miss + batcher hop + index search finding nothing", 10.0),
}
T = TypeVar("T")
SYSTEM = "You are a concise assistant for a river conservation charity."
TEMPLATES = (
    "What is {}?", "Explain {} in simple terms.", "How does {} work?", "Why is {} important?",
    "Give me three facts about {}.", "What are the main risks of {}?", "Summarise the history of {}.",
    "How would you teach {} to a child?", "What is a common misconception about {}?",
    "Compare {} with its closest alternative.",
)  # fmt: skip
TOPICS = (
    "photosynthesis", "compound interest", "the water cycle", "TCP congestion control", "the French Revolution",
    "black holes", "vaccines", "inflation", "machine learning", "plate tectonics", "river meanders",
    "the Krebs cycle", "public key cryptography", "supply and demand", "the Roman Republic", "climate feedback",
    "garbage collection", "the immune system", "sourdough fermentation", "wetland restoration", "tidal energy",
    "the printing press", "quantum tunnelling", "soil erosion", "the Silk Road", "antibiotic resistance",
    "the stock market", "coral bleaching", "DNS resolution", "the Renaissance", "groundwater recharge",
    "beaver dams", "floodplain management", "the carbon cycle", "index funds", "the Magna Carta",
    "neural networks", "ocean acidification", "blood pressure", "the Industrial Revolution", "salmon migration",
    "hash tables", "the greenhouse effect", "interest rate policy", "the Great Barrier Reef", "sleep cycles",
    "database indexes", "the Nile delta", "composting", "electric grids",
)  # fmt: skip
SUFFIXES = (
    "", " Answer in one sentence.", " Keep it short.", " Use an example.", " Be precise.", " Avoid jargon.",
    " Explain it to a beginner.", " Mention one source.", " Focus on the basics.", " Give the key idea first.",
    " Use plain English.", " Add a short analogy.", " End with a summary.", " Skip the history.",
    " Note any caveats.", " Keep it friendly.", " Think step by step.", " Be neutral.", " Stay factual.",
    " Write for a newsletter.",
)  # fmt: skip
ANSWER = (
    "Rivers meander across flat valleys because any small bend concentrates the fastest water against the "
    "outer bank, which erodes, while slower water on the inner bank drops its sediment and builds a point "
    "bar. Over years the bend grows, migrates downstream and can be cut off as an oxbow lake. "
)


@dataclass(frozen=True, slots=True)
class Timing:
    kind: str
    samples: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    texts_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class LookupRun:
    layout: str
    fill_s: float
    rows: list[Timing]


@dataclass(slots=True)
class CacheReport:
    redis: str
    lookups: list[LookupRun] = field(default_factory=list)
    embedding: list[Timing] = field(default_factory=list)
    model_load_s: float = 0.0
    load: LoadReport | None = None
    cache_results: dict[str, dict[str, int]] = field(default_factory=dict)  # e2e target -> result -> lookups
    cpu_us: dict[str, float] = field(default_factory=dict)  # e2e target -> gateway CPU per request over its runs

    @property
    def rows(self) -> list[Timing]:
        return [row for run in self.lookups for row in run.rows] + self.embedding


def plan(duration_s: float, rounds: int) -> tuple[int, float]:
    steps, seconds = load_plan(4, E2E_CONCURRENCY, duration_s, rounds)
    return steps + 6, seconds + 2 * (10 + 15) + 15 + 10


def run(lab: Lab, progress: Progress, *, samples: int, duration_s: float, rounds: int) -> CacheReport:
    redis = lab.redis()
    report = CacheReport(re.sub(r":\d+,", ",", redis.description))  # the port changes every run
    for scopes in (1, SPREAD_SCOPES):
        run_lookups = functools.partial(_lookups, redis.url, f"bench-cache-{scopes}:", scopes, samples, progress)
        report.lookups.append(_pinned(lab.cpus, run_lookups))
    progress.step("cache: loading the local embedder (all-MiniLM-L6-v2, CPU)", 15)
    report.model_load_s, report.embedding = _pinned(lab.cpus, lambda: _embedding(progress))
    for row in report.embedding:
        progress.note(f"{row.kind}: p50 {row.p50_ms:.2f} ms, p99 {row.p99_ms:.2f} ms, {row.texts_per_s:,.0f} texts/s")
    end_to_end(lab, report, redis.url, progress, duration_s=duration_s, rounds=rounds)
    return report


def _pinned(cpus: CpuPlan, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop (as the gateway does) with every thread of this process on the proxy's CPU,
    then put them back.

    Every thread, as `taskset` does for the gateway, and OpenBLAS limited to one thread, as it is in the
    gateway: OpenBLAS sizes its pool from the CPUs the process may use when numpy is imported, one under
    `taskset`, two here. Its two threads on one core made the 10,000-row search several times slower (p50
    8 ms against 1.7 ms in one run); spread over both cores, one shared with Redis, its p99 was 13 ms.
    """
    import uvloop
    from threadpoolctl import threadpool_limits  # comes with sentence-transformers (scikit-learn)

    main = os.sched_getaffinity(0)
    previous = _set_affinity({cpus.proxy}, {})
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            return uvloop.run(work())
    finally:
        _set_affinity(main, previous)


def _set_affinity(cpus: set[int], each: dict[int, set[int]]) -> dict[int, set[int]]:
    """Pin every thread of this process to `cpus` (or to its entry in `each`); the affinities before."""
    before: dict[int, set[int]] = {}
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, each.get(tid, cpus))
        except ProcessLookupError:  # the thread ended meanwhile
            continue
    return before


class FixedVectors:
    """An embedder answering from a table of precomputed vectors (any other text: a fixed random one).

    Texts are looked up without their closing punctuation: the cache may strip it before embedding.
    """

    def __init__(self, vectors: dict[str, Vector], fallback: Vector) -> None:
        self.vectors = vectors
        self._fallback = fallback

    @property
    def name(self) -> str:
        return "local:all-MiniLM-L6-v2"

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        return [self.vectors.get(_bare(text), self._fallback) for text in texts]

    async def close(self) -> None:
        return None


def _bare(text: str) -> str:
    return text.rstrip(" ?!.")


def _question(i: int) -> str:
    suffix, rest = divmod(i, len(TEMPLATES) * len(TOPICS))
    template, topic = divmod(rest, len(TOPICS))
    return TEMPLATES[template].format(TOPICS[topic]) + SUFFIXES[suffix]


def _key(question: str, tenant: str) -> CacheKey:
    body = {
        "model": "bench-model",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": 256,
        "temperature": 0,
    }
    return cache_key("chat", body, tenant)


def _answer(i: int, question: str) -> bytes:
    content = f"{question} " + ANSWER * 5
    return orjson.dumps(
        {
            "id": f"chatcmpl-{i:024x}",
            "object": "chat.completion",
            "created": 1767225600,
            "model": "bench-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 38, "completion_tokens": 270, "total_tokens": 308},
        }
    )


def _units(matrix: np.ndarray) -> np.ndarray:
    scaled: np.ndarray = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return scaled.astype(np.float32)


async def _lookups(url: str, prefix: str, scopes: int, samples: int, progress: Progress) -> LookupRun:
    layout = f"{ENTRIES:,} entries in one scope" if scopes == 1 else f"{ENTRIES:,} entries over {scopes} scopes"
    progress.step(f"cache: filling Redis with {layout}", 10)
    rng = np.random.default_rng(scopes)
    vectors = _units(rng.standard_normal((ENTRIES, LOCAL_DIMENSIONS)))
    config = CacheConfig(enabled=True)  # the defaults: ttl 3600 s, max_entries 10,000, threshold 0.98, guard on
    store = RedisCacheStore(url, ttl=config.ttl, max_entries=config.max_entries, key_prefix=prefix)
    table: dict[str, Vector] = {}
    embedder = FixedVectors(table, _units(rng.standard_normal((1, LOCAL_DIMENSIONS)))[0])
    cache = ResponseCache(
        config, store, BatchingEmbedder(embedder, config.embedder.max_batch, config.embedder.timeout), GatewayMetrics()
    )
    await cache.start()
    try:
        questions = [_question(i) for i in range(ENTRIES)]
        keys = [_key(q, f"tenant-{i % scopes:03d}") for i, q in enumerate(questions)]
        started = time.perf_counter()
        for first in range(0, ENTRIES, FILL_BATCH):
            now = time.time()
            await asyncio.gather(
                *(
                    store.put(
                        CacheEntry(
                            key.exact,
                            key.scope,
                            key.tenant,
                            key.model,
                            key.probe or "",
                            vectors[i],
                            embedder.name,
                            _answer(i, questions[i]),
                            now,
                        )
                    )
                    for i, key in enumerate(keys[first : first + FILL_BATCH], start=first)
                )
            )
            _bar(first + FILL_BATCH, ENTRIES)
        if not await store.wait_synced(timeout=60) or await store.size() != ENTRIES:
            raise BenchError(
                f"cache: the store holds {await store.size():,} entries, not {ENTRIES:,}, or its index lags"
            )
        fill_s = time.perf_counter() - started
        progress.note(f"{ENTRIES:,} entries stored and indexed in {fill_s:.1f} s ({ENTRIES / fill_s:,.0f} puts/s)")
        progress.step(f"cache: {samples:,} lookups of each kind, {layout}", 15)
        picks = [int(i) for i in rng.choice(ENTRIES, size=samples, replace=False)]
        probes: dict[str, list[tuple[CacheKey, bool, str]]] = {kind: [] for kind in KINDS}
        for i in picks:
            asked = questions[i].lower()  # an exact miss (case is kept in the exact key), guard-compatible
            if not compatible(asked, questions[i]):
                raise BenchError(f"cache: the guard refuses {asked!r} for {questions[i]!r}")
            noise = rng.standard_normal(LOCAL_DIMENSIONS).astype(np.float32) * (0.1 / np.sqrt(LOCAL_DIMENSIONS))
            table[_bare(asked)] = _units((vectors[i] + noise)[None, :])[0]
            elsewhere = asked + " in other words"
            table[_bare(elsewhere)] = _units(rng.standard_normal((1, LOCAL_DIMENSIONS)))[0]
            tenant = keys[i].tenant
            probes["exact hit"].append((keys[i], True, "hit_exact"))
            probes["exact miss"].append((_key(asked, tenant), False, "miss"))
            probes["semantic hit"].append((_key(asked, tenant), True, "hit_semantic"))
            probes["semantic miss"].append((_key(elsewhere, tenant), True, "miss"))
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for position in range(-WARMUP_ROUNDS, samples):
            for kind, keyed in probes.items():  # interleaved, so drift on the machine hits every kind alike
                key, semantic, expected = keyed[position % samples]
                began = time.perf_counter()
                found = await cache.lookup(key, semantic)
                elapsed = time.perf_counter() - began
                if found.result != expected:
                    raise BenchError(f"cache: a {kind} lookup answered {found.result} (is the store healthy?)")
                if position >= 0:
                    times[kind].append(elapsed * 1000)
        rows = [_timing(kind, values) for kind, values in times.items()]
        for row in rows:
            progress.note(f"{row.kind}: p50 {row.p50_ms:.3f} ms, p99 {row.p99_ms:.3f} ms, mean {row.mean_ms:.3f} ms")
        return LookupRun(layout, fill_s, rows)
    finally:
        await cache.close()


def _bar(done: int, total: int) -> None:
    """A progress bar on stderr (in place on a terminal, every quarter otherwise)."""
    done = min(done, total)
    if sys.stderr.isatty():
        filled = 30 * done // total
        end = "\n" if done == total else ""
        print(
            f"\r    [{'#' * filled}{'.' * (30 - filled)}] {done:,}/{total:,}{end}", end="", file=sys.stderr, flush=True
        )
    elif done % (total // 4) < FILL_BATCH:
        print(f"    {done:,}/{total:,} stored", file=sys.stderr, flush=True)


def _timing(kind: str, values: list[float], texts_per_s: float = 0.0) -> Timing:
    ordered = sorted(values)
    return Timing(
        kind,
        len(ordered),
        ordered[len(ordered) // 2],
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        statistics.fmean(ordered),
        texts_per_s,
    )


async def _embedding(progress: Progress) -> tuple[float, list[Timing]]:
    embedder = make_embedder(CacheConfig().embedder)  # what the gateway builds: local model behind the batcher
    try:
        started = time.perf_counter()
        await embedder.warm_up()  # imports torch and loads the model, as at gateway start
        load_s = time.perf_counter() - started
        progress.note(f"model loaded in {load_s:.1f} s")
        progress.step(f"cache: embedding, {EMBED_SAMPLES} texts alone, then {CONCURRENT} callers at once", 10)
        texts = [_question(i * 7 + 3) for i in range(EMBED_SAMPLES + CONCURRENT * CONCURRENT_EACH + 10)]
        for text in texts[:10]:
            await embedder.embed([text])
        alone: list[float] = []
        for text in texts[10 : 10 + EMBED_SAMPLES]:
            began = time.perf_counter()
            await embedder.embed([text])
            alone.append((time.perf_counter() - began) * 1000)
        together: list[float] = []
        rest = texts[10 + EMBED_SAMPLES :]

        async def caller(mine: list[str]) -> None:
            for text in mine:
                began = time.perf_counter()
                await embedder.embed([text])
                together.append((time.perf_counter() - began) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(caller(rest[n::CONCURRENT]) for n in range(CONCURRENT)))
        elapsed = time.perf_counter() - began
        return load_s, [
            _timing("one text at a time", alone, len(alone) / (sum(alone) / 1000)),
            _timing(f"{CONCURRENT} callers at once, {CONCURRENT_EACH} texts each", together, len(together) / elapsed),
        ]
    finally:
        await embedder.close()


def markdown(report: CacheReport, preamble: str) -> str:
    lines = [
        preamble,
        "Lookups: `ResponseCache.lookup` (the gateway's code, on uvloop) one call at a time from a process pinned "
        f"to the proxy's CPU, against {report.redis}; a `RedisCacheStore` with the gateway's defaults (ttl 3600 s, "
        f"max_entries 10,000, threshold 0.98, guard on) filled with {ENTRIES:,} entries (keys from `cache_key` "
        "on chat request bodies, ~1.5 KB chat completion bodies, random 384-dimension unit vectors: the search "
        "is a product over the scope's rows whatever they hold). Kinds interleaved, after "
        f"{WARMUP_ROUNDS} warm-up rounds. **Embedding excluded** (an embedder returning precomputed vectors), "
        "the `BatchingEmbedder` hop included. A semantic hit asks the stored question in lower case (an exact "
        "miss the guard lets through) with the stored vector plus noise (cosine ≈ 0.995); a semantic miss "
        "asks with a random vector. Target: p50 and p99 within the limit.",
        "",
        "| layout | lookup | what it does | samples | p50 ms | p99 ms | mean ms | target | |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in report.lookups:
        for row in run.rows:
            what, limit = KINDS[row.kind]
            verdict = "met" if row.p99_ms <= limit and row.p50_ms <= limit else "not met"
            lines.append(
                f"| {run.layout} | {row.kind} | {what} | {row.samples:,} | {row.p50_ms:.3f} | "
                f"{row.p99_ms:.3f} | {row.mean_ms:.3f} | ≤ {limit:g} ms | {verdict} |"
            )
    fills = "; ".join(f"{run.layout} in {run.fill_s:.1f} s" for run in report.lookups)
    lines.append(f"\nFilling (`store.put`, {FILL_BATCH} in flight, until this replica's index had them all): {fills}.")
    if report.embedding:
        lines += [
            "",
            "Embedding: what the gateway builds by default (`make_embedder`: all-MiniLM-L6-v2 in process on CPU, "
            "one torch thread, behind `BatchingEmbedder`), pinned to the proxy's CPU; real questions of 5–15 "
            f"words. Loading the model (torch import included) took {report.model_load_s:.1f} s.",
            "",
            "| embedding | texts | p50 ms | p99 ms | mean ms | texts/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.kind} | {r.samples:,} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.mean_ms:.2f} | {r.texts_per_s:,.0f} |"
            for r in report.embedding
        ]
        alone = report.embedding[0]
        worst = next((r for r in report.lookups[0].rows if r.kind == "semantic hit"), None) if report.lookups else None
        if worst is not None:
            lines.append(
                f"\nA lone semantic hit as the gateway serves it, {report.lookups[0].layout}: about "
                f"{alone.p50_ms + worst.p50_ms:.1f} ms at p50 ({alone.p50_ms:.1f} embedding + "
                f"{worst.p50_ms:.1f} lookup)."
            )
    if report.load is not None:
        lines += load_lines(report)
    return "\n".join(lines) + "\n"
