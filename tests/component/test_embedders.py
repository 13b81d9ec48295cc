"""The semantic cache's embedders: the remote client against the fake vLLM, the batcher, the local model."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import orjson
import pytest

from sluice.cache.embedders import (
    LOCAL_DIMENSIONS,
    BatchingEmbedder,
    LocalEmbedder,
    RemoteEmbedder,
    make_embedder,
    parse_embeddings,
)
from sluice.cache.types import Embedder, EmbedderUnavailable, Vector
from sluice.config import EmbedderConfig
from sluice.testing.fake_vllm_wire import embedding_vector
from tests.conftest import StartFake, free_port

DIM = 32  # the fake's default embedding_dim


def expected(text: str) -> Vector:
    return np.asarray(embedding_vector(text, DIM), dtype=np.float32)


class Recording:
    """Wraps an embedder and records the texts of every call it receives."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    @property
    def name(self) -> str:
        return self.inner.name

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        self.calls.append(list(texts))
        return await self.inner.embed(texts)

    async def close(self) -> None:
        await self.inner.close()


class Scripted:
    """A slow in-process embedder that fails any call containing "boom"."""

    name = "scripted:test"

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.calls: list[list[str]] = []

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        self.calls.append(list(texts))
        await asyncio.sleep(self.delay)
        if "boom" in texts:
            raise RuntimeError("boom")
        return [expected(t) for t in texts]

    async def close(self) -> None:
        pass


async def test_remote_vectors_are_the_servers(fake: StartFake) -> None:
    server = await fake("embedder")
    embedder = RemoteEmbedder(server.url, "embedder", timeout=5.0)
    try:
        texts = ["How do I reset my password?", "what is the capital of France", "How do I reset my password?"]
        vectors = await embedder.embed(texts)
    finally:
        await embedder.close()
    assert len(vectors) == 3
    for text, vector in zip(texts, vectors, strict=True):
        assert vector.dtype == np.float32 and vector.shape == (DIM,)
        assert np.allclose(vector, expected(text), atol=1e-6)
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert embedder.name == "openai:embedder"


def test_float_lists_and_order_by_index() -> None:
    body = orjson.dumps({"data": [{"index": 1, "embedding": [0.0, 2.0]}, {"index": 0, "embedding": [3.0, 4.0]}]})
    first, second = parse_embeddings(body, 2)
    assert np.allclose(first, [0.6, 0.8]) and np.allclose(second, [0.0, 1.0])
    assert first.dtype == np.float32
    for bad in (b"not json", b'{"data": []}', b'{"data": [{"index": 0, "embedding": "***"}]}', b"[1]"):
        with pytest.raises(EmbedderUnavailable):
            parse_embeddings(bad, 1)


async def test_concurrent_callers_are_batched_and_get_their_own_vectors(fake: StartFake) -> None:
    server = await fake("embedder", ttft_ms=100)
    recording = Recording(RemoteEmbedder(server.url, "embedder", timeout=5.0))
    embedder = BatchingEmbedder(recording, max_batch=4, timeout=5.0)
    try:
        texts = [f"question number {i}" for i in range(10)]
        results = await asyncio.gather(*(embedder.embed([t]) for t in texts))
    finally:
        await embedder.close()
    for text, (vector,) in zip(texts, results, strict=True):
        assert np.allclose(vector, expected(text), atol=1e-6)
    # All ten arrive while the first call is idle: they leave together, split at max_batch.
    assert [len(c) for c in recording.calls] == [4, 4, 2]
    assert server.stats.requests_total == 3  # what the server itself counted


async def test_a_lone_caller_does_not_wait_and_late_arrivals_queue() -> None:
    inner = Scripted(delay=0.1)
    embedder = BatchingEmbedder(inner, max_batch=64, timeout=5.0)
    first = asyncio.create_task(embedder.embed(["a"]))
    await asyncio.sleep(0.02)  # "a" is in flight now
    rest = await asyncio.gather(embedder.embed(["b", "c"]), embedder.embed(["c", "d"]), embedder.embed(["a"]))
    assert len(await first) == 1
    assert inner.calls == [["a"], ["b", "c", "d", "a"]]  # identical texts in one batch are embedded once
    assert [[v.tolist() for v in r] for r in rest] == [
        [expected("b").tolist(), expected("c").tolist()],
        [expected("c").tolist(), expected("d").tolist()],
        [expected("a").tolist()],
    ]
    await embedder.close()


async def test_a_failure_fails_only_its_batch() -> None:
    inner = Scripted(delay=0.05)
    embedder = BatchingEmbedder(inner, max_batch=1, timeout=5.0)
    first = asyncio.create_task(embedder.embed(["a"]))
    await asyncio.sleep(0.01)
    results = await asyncio.gather(embedder.embed(["boom"]), embedder.embed(["b"]), return_exceptions=True)
    assert len(await first) == 1
    assert isinstance(results[0], EmbedderUnavailable) and "RuntimeError" in str(results[0])
    assert isinstance(results[1], list) and np.allclose(results[1][0], expected("b"))
    assert inner.calls == [["a"], ["boom"], ["b"]]
    await embedder.close()


async def test_a_caller_that_times_out_does_not_spoil_the_batch() -> None:
    inner = Scripted(delay=0.3)
    quick = BatchingEmbedder(inner, max_batch=8, timeout=0.1)
    with pytest.raises(EmbedderUnavailable, match="no embedding within"):
        await quick.embed(["slow"])
    await asyncio.sleep(0.3)  # the abandoned call finishes without anyone to answer
    inner.delay = 0.0
    assert np.allclose((await quick.embed(["next"]))[0], expected("next"))
    await quick.close()


async def test_slow_server_times_out(fake: StartFake) -> None:
    server = await fake("embedder", ttft_ms=2000)
    embedder = make_embedder(EmbedderConfig(kind="openai", model="embedder", url=server.url, timeout=0.2))
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(EmbedderUnavailable):
            await embedder.embed(["hello"])
        assert asyncio.get_running_loop().time() - started < 1.0
        with pytest.raises(EmbedderUnavailable):  # the client's own timeout, without the batcher
            await RemoteEmbedder(server.url, "embedder", timeout=0.2).embed(["hello"])
    finally:
        await embedder.close()


async def test_server_down_or_failing(fake: StartFake) -> None:
    down = RemoteEmbedder(f"http://127.0.0.1:{free_port()}", "embedder", timeout=2.0)
    with pytest.raises(EmbedderUnavailable):
        await down.embed(["hello"])
    await down.close()
    server = await fake("embedder", fail="503")
    failing = RemoteEmbedder(server.url, "embedder", timeout=2.0)
    with pytest.raises(EmbedderUnavailable, match="HTTP 503"):
        await failing.embed(["hello"])
    await failing.close()
    unknown = RemoteEmbedder((await fake("embedder")).url, "no-such-model", timeout=2.0)
    with pytest.raises(EmbedderUnavailable, match="HTTP 404"):
        await unknown.embed(["hello"])
    await unknown.close()


def test_make_embedder_names() -> None:
    config = EmbedderConfig(kind="openai", model="BAAI/bge-m3", url="http://127.0.0.1:1", api_key="k")
    assert make_embedder(config).name == "openai:BAAI/bge-m3"
    assert make_embedder(EmbedderConfig()).name == "local:all-MiniLM-L6-v2"
    with pytest.raises(ValueError, match="kind local runs only all-MiniLM-L6-v2"):
        EmbedderConfig(model="BAAI/bge-m3")


async def test_local_model_ranks_paraphrases_above_unrelated_text() -> None:
    embedder = make_embedder(EmbedderConfig(timeout=300.0))  # the first load imports torch: seconds
    assert isinstance(embedder.inner, LocalEmbedder)
    try:
        await embedder.warm_up()
        ask, paraphrase, unrelated = await asyncio.gather(
            embedder.embed(["How do I reset my password?"]),
            embedder.embed(["How can I change my forgotten password?"]),
            embedder.embed(["What is the boiling point of water at sea level?"]),
        )
    finally:
        await embedder.close()
    for (vector,) in (ask, paraphrase, unrelated):
        assert vector.dtype == np.float32 and vector.shape == (LOCAL_DIMENSIONS,) == (384,)
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4
    assert float(ask[0] @ paraphrase[0]) > float(ask[0] @ unrelated[0]) + 0.3


async def test_the_cache_and_rag_share_one_local_model() -> None:
    """Two users of one LocalEmbedder: one load, one thread; closing one leaves the other working."""
    local = LocalEmbedder()
    cache_side = make_embedder(EmbedderConfig(timeout=300.0), local)
    rag_side = make_embedder(EmbedderConfig(timeout=300.0), local)
    assert cache_side.inner is rag_side.inner is local
    try:
        await asyncio.gather(cache_side.warm_up(), rag_side.warm_up())
        model = local._loading
        (one,), (two,) = await asyncio.gather(cache_side.embed(["shared model"]), rag_side.embed(["shared model"]))
        assert local._loading is model and np.array_equal(one, two)  # loaded once, the same vectors
        await cache_side.close()
        (again,) = await rag_side.embed(["shared model"])  # still served after the other user left
        assert np.array_equal(again, one)
    finally:
        await rag_side.close()
        await local.close()  # the creator's share: the thread stops now
    with pytest.raises(RuntimeError, match="shutdown"):  # every share given up: the thread is gone
        await local.embed(["closed"])
