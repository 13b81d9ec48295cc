"""RAG routes through the gateway: the rewritten request, sources, streaming, Chroma outages, cache scope.

A real ChromaDB (embedded in a temporary folder, or a `chroma run` server that the test stops) holds a
handful of chunks embedded with the real local embedder (all-MiniLM-L6-v2), laid out as sluice/rag/types.py
says; the backend is a fake vLLM whose last request shows what the model was sent.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import chromadb
import openai
import orjson
import pytest
from chromadb.api import ClientAPI
from chromadb.config import Settings

from sluice.app import Gateway
from sluice.cache.embedders import LocalEmbedder
from sluice.cache.types import Vector
from sluice.rag.types import CHUNK_INDEX, CONTENT_HASH, EMBEDDER, SOURCE, TITLE, VERSION
from tests.conftest import API_KEY, StartFake, StartGateway, free_port

COLLECTION = "sluice-docs"
# (source, title, chunk index, text); deliberately not in source order
CHUNKS = (
    ("guides/keys.md", "API keys", 0, "Create an API key with sluice keys create --name alice. The key is shown once."),
    ("guides/install.md", "Installing Sluice", 1, "After installing, run sluice demo to start a gateway on port 8080."),
    (
        "guides/install.md",
        "Installing Sluice",
        0,
        "Install Sluice with pip install sluice. It needs Python 3.11 or newer.",
    ),
    ("notes/office.md", "Office", 0, "The office in Lisbon is sunny most of the year."),
)
INSTALL = "How do I install Sluice?"
OFF_TOPIC = "What is the boiling point of mercury in kelvin?"
ROUTE = {"model": "docs", "base_model": "base", "collection": COLLECTION, "top_k": 3, "min_score": 0.3}
SLOW = 60.0  # the local model loads in the background for seconds: tests that need context wait for it


@pytest.fixture(scope="module")
def vectors() -> list[Vector]:
    async def embed() -> list[Vector]:
        embedder = LocalEmbedder()
        try:
            return await embedder.embed([text for *_, text in CHUNKS])
        finally:
            await embedder.close()

    return asyncio.run(embed())


def fill(client: ClientAPI, vectors: list[Vector], version: int = 1) -> None:
    collection = client.create_collection(
        COLLECTION,
        metadata={EMBEDDER: "local:all-MiniLM-L6-v2", VERSION: version},
        configuration={"hnsw": {"space": "cosine"}},
        embedding_function=None,
    )
    collection.add(
        ids=[f"{source}:{index}" for source, _, index, _ in CHUNKS],
        embeddings=[v.tolist() for v in vectors],
        documents=[text for *_, text in CHUNKS],
        metadatas=[
            {SOURCE: source, TITLE: title, CHUNK_INDEX: index, CONTENT_HASH: "h-" + source}
            for source, title, index, _ in CHUNKS
        ],
    )


@pytest.fixture
def embedded(tmp_path: Path, vectors: list[Vector]) -> Iterator[ClientAPI]:
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"), settings=Settings(anonymized_telemetry=False))
    fill(client, vectors)
    yield client


def rag_section(chroma: dict[str, Any], timeout: float = SLOW, **route: Any) -> dict[str, Any]:
    return {
        "chroma": chroma,
        "timeout": timeout,
        "embedder": {"timeout": timeout},
        "routes": [{**ROUTE, **route}, {"model": "ghost", "base_model": "not-served", "collection": COLLECTION}],
    }


def embedded_section(client: ClientAPI, **route: Any) -> dict[str, Any]:
    path = client.get_settings().persist_directory
    return rag_section({"mode": "embedded", "path": path}, **route)


async def chat(
    gw: Gateway, question: str, model: str = "docs", **body: Any
) -> tuple[int, dict[str, str], dict[str, Any]]:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    payload = {"model": model, "messages": messages, "temperature": 0, **body}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {API_KEY}"}
        ) as response,
    ):
        return response.status, {k.lower(): v for k, v in response.headers.items()}, orjson.loads(await response.read())


async def metric(gw: Gateway, line_start: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as response:
        page = await response.text()
    values = [float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(line_start)]
    return sum(values)


async def test_grounded_request_is_rewritten(fake: StartFake, gateway: StartGateway, embedded: ClientAPI) -> None:
    backend = await fake("base")
    gw = await gateway([backend], rag=embedded_section(embedded))
    status, headers, answer = await chat(gw, INSTALL)
    assert status == 200, answer
    sent: Any = backend.stats.last_request_body
    assert sent["model"] == "base"
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "system", "user"]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}  # the client's, first, unchanged
    assert sent["messages"][2] == {"role": "user", "content": INSTALL}
    context = sent["messages"][1]["content"]
    assert context.startswith("Answer the question using the context below.")
    # ordered by source then chunk index, whatever the scores
    first = "[1] Installing Sluice (guides/install.md)\nInstall Sluice with pip install sluice."
    second = "[2] Installing Sluice (guides/install.md)\nAfter installing, run sluice demo"
    assert first in context and second in context and context.index(first) < context.index(second)
    assert "Lisbon" not in context and "[3]" not in context  # below min_score
    assert headers["x-sluice-grounded"] == "true"
    assert headers["x-sluice-model"] == "base"
    assert answer["model"] == "base"  # the model that answered, as OpenAI reports a resolved snapshot
    assert [(s["source"], s["chunk_index"]) for s in answer["sources"]] == [
        ("guides/install.md", 0),
        ("guides/install.md", 1),
    ]
    assert all(0.3 <= s["score"] <= 1 and s["title"] == "Installing Sluice" for s in answer["sources"])
    assert orjson.loads(headers["x-sluice-sources"]) == answer["sources"]
    assert answer["choices"][0]["message"]["content"]  # the rest of the answer is intact

    await chat(gw, INSTALL)
    assert backend.stats.last_request_body == sent  # the same retrieved set, the same prompt bytes
    assert await metric(gw, 'sluice_rag_retrievals_total{outcome="grounded",route="docs"}') == 2
    assert await metric(gw, 'sluice_rag_retrieval_duration_seconds_count{route="docs"}') == 2
    assert gw.retriever is not None and gw.retriever.chroma_up


async def test_no_match_keeps_the_template(fake: StartFake, gateway: StartGateway, embedded: ClientAPI) -> None:
    backend = await fake("base")
    gw = await gateway([backend], rag=embedded_section(embedded))
    status, headers, answer = await chat(gw, OFF_TOPIC)
    assert status == 200
    assert headers["x-sluice-grounded"] == "none"
    assert answer["sources"] == [] and headers["x-sluice-sources"] == "[]"
    sent: Any = backend.stats.last_request_body
    assert "No document in the knowledge base matches" in sent["messages"][1]["content"]
    assert await metric(gw, 'sluice_rag_retrievals_total{outcome="no_match",route="docs"}') == 1


async def test_openai_client_whole_and_streamed(fake: StartFake, gateway: StartGateway, embedded: ClientAPI) -> None:
    backend = await fake("base")
    gw = await gateway([backend], rag=embedded_section(embedded))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": INSTALL}]
    completion = await client.chat.completions.create(model="docs", messages=messages)
    assert completion.choices[0].message.content
    extra = completion.model_extra or {}
    assert [s["chunk_index"] for s in extra["sources"]] == [0, 1]  # the client keeps the unknown field

    raw = await client.chat.completions.with_raw_response.create(model="docs", messages=messages, stream=True)
    assert raw.headers["x-sluice-grounded"] == "true"
    assert [s["chunk_index"] for s in orjson.loads(raw.headers["x-sluice-sources"])] == [0, 1]
    stream = raw.parse()
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text
    sent: Any = backend.stats.last_request_body
    assert sent["model"] == "base" and sent["stream"] is True
    assert "[1] Installing Sluice (guides/install.md)" in sent["messages"][0]["content"]
    await client.close()


async def test_models_lists_served_aliases(fake: StartFake, gateway: StartGateway, embedded: ClientAPI) -> None:
    gw = await gateway([await fake("base")], rag=embedded_section(embedded))
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {API_KEY}"}) as response,
    ):
        cards = {card["id"]: card for card in (await response.json())["data"]}
    assert cards["docs"]["owned_by"] == "sluice" and cards["docs"]["parent"] == "base"
    assert "ghost" not in cards  # its base model is not served


async def test_alias_answers_chat_only(fake: StartFake, gateway: StartGateway, embedded: ClientAPI) -> None:
    gw = await gateway([await fake("base")], rag=embedded_section(embedded))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/completions",
            json={"model": "docs", "prompt": "hi"},
            headers={"authorization": f"Bearer {API_KEY}"},
        ) as response,
    ):
        assert response.status == 400
        assert "chat completions only" in (await response.json())["error"]["message"]


async def test_corpus_version_scopes_the_cache(fake: StartFake, gateway: StartGateway, embedded: ClientAPI) -> None:
    backend = await fake("base")
    gw = await gateway(
        [backend], rag=embedded_section(embedded), cache={"enabled": True, "default": {"semantic": False}}
    )
    assert (await chat(gw, INSTALL))[1]["x-sluice-cache"] == "miss"
    headers = await eventually_cached(gw)
    assert "x-sluice-grounded" not in headers  # retrieval did not run: a hit is a stored grounded answer
    served = backend.stats.requests_total

    collection = embedded.get_collection(COLLECTION)
    collection.modify(metadata={**(collection.metadata or {}), VERSION: 2})  # what an ingest does
    assert gw.retriever is not None
    await gw.retriever.poll()  # the background poll, now rather than in a few seconds
    status, headers, answer = await chat(gw, INSTALL)
    assert status == 200 and headers["x-sluice-cache"] == "miss" and answer["sources"]
    assert backend.stats.requests_total == served + 1
    assert (await eventually_cached(gw))["x-sluice-cache"] == "hit-exact"
    status, headers, _ = await chat(gw, INSTALL, model="base")  # the base model has its own scope
    assert headers["x-sluice-cache"] == "miss"


async def test_the_semantic_cache_and_rag_share_the_local_model(
    fake: StartFake, gateway: StartGateway, embedded: ClientAPI
) -> None:
    """Both run all-MiniLM-L6-v2 in process: one copy of it (sluice/app.py), and both levels use it."""
    gw = await gateway(
        [await fake("base")], rag=embedded_section(embedded),
        cache={"enabled": True, "store": "memory", "embedder": {"timeout": SLOW}},
    )  # fmt: skip
    assert gw.cache is not None and gw.cache.embedder is not None and gw.retriever is not None
    assert gw.cache.embedder.inner is gw.retriever._embedder.inner  # type: ignore[attr-defined]
    status, headers, answer = await chat(gw, INSTALL, model="base")
    assert status == 200 and headers["x-sluice-cache"] == "miss"
    status, headers, answer = await chat(gw, "How can I install Sluice?")
    assert status == 200 and headers["x-sluice-grounded"] == "true" and answer["sources"]
    for _ in range(50):  # the first answer is stored in the background
        status, headers, _ = await chat(gw, "How do I install Sluice ?", model="base")
        if headers["x-sluice-cache"].startswith("hit-semantic"):
            break
        await asyncio.sleep(0.1)
    assert headers["x-sluice-cache"].startswith("hit-semantic"), headers


async def eventually_cached(gw: Gateway) -> dict[str, str]:
    """The headers of a repeated question once its answer is in the cache (stored in the background)."""
    for _ in range(50):
        status, headers, answer = await chat(gw, INSTALL)
        if headers["x-sluice-cache"] == "hit-exact":
            assert status == 200 and answer["sources"]  # a replayed whole answer keeps its sources
            return headers
        await asyncio.sleep(0.05)
    raise AssertionError("the answer was never served from the cache")


class ChromaServer:
    """`chroma run` on a free port, in a folder of the test's."""

    def __init__(self, path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(Path(sys.executable).parent / "chroma"), "run", "--path", str(path)]
        self.process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client = chromadb.HttpClient(port=self.port, settings=Settings(anonymized_telemetry=False))
                self.client.heartbeat()
                return
            except ValueError:  # "Could not connect to a Chroma server"
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[ChromaServer]:
    server = ChromaServer(tmp_path / "chroma-server")
    yield server
    server.stop()


async def test_chroma_down_answers_without_context(
    fake: StartFake, gateway: StartGateway, chroma_server: ChromaServer, vectors: list[Vector]
) -> None:
    fill(chroma_server.client, vectors)
    backend = await fake("base")
    gw = await gateway(
        [backend],
        rag=rag_section({"mode": "http", "url": chroma_server.url}),
        cache={"enabled": True, "default": {"semantic": False}},
    )
    status, headers, _ = await chat(gw, INSTALL, temperature=0.5)  # not cacheable: every call retrieves
    assert status == 200 and headers["x-sluice-grounded"] == "true"

    await asyncio.to_thread(chroma_server.stop)
    status, headers, answer = await chat(gw, INSTALL)
    assert status == 200, answer
    assert headers["x-sluice-grounded"] == "false"
    assert "x-sluice-sources" not in headers and "sources" not in answer
    sent: Any = backend.stats.last_request_body
    assert sent["model"] == "base"
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": INSTALL}]
    assert await metric(gw, 'sluice_rag_retrievals_total{outcome="unavailable",route="docs"}') == 1
    assert gw.retriever is not None and not gw.retriever.chroma_up
    served = backend.stats.requests_total
    await asyncio.sleep(0.2)
    status, headers, _ = await chat(gw, INSTALL)  # the ungrounded answer was not cached
    assert status == 200 and headers["x-sluice-cache"] == "miss" and headers["x-sluice-grounded"] == "false"
    assert backend.stats.requests_total == served + 1


async def test_slow_retrieval_times_out(fake: StartFake, gateway: StartGateway, embedded: ClientAPI) -> None:
    """A retrieval slower than rag.timeout (here: the embedder still loading) answers without context."""
    backend = await fake("base")
    gw = await gateway([backend], rag=embedded_section(embedded) | {"timeout": 0.001})
    started = time.perf_counter()
    status, headers, _ = await chat(gw, INSTALL)
    assert status == 200 and headers["x-sluice-grounded"] == "false"
    assert time.perf_counter() - started < 1.0
