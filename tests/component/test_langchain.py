"""LangChain's `ChatOpenAI` pointed at the gateway: invoke and stream, for a plain model and a RAG route.

The backend is a fake vLLM; the RAG route's collection is an embedded ChromaDB built by
test_rag_gateway.py's helpers with the real local embedder.
"""

from __future__ import annotations

from typing import Any

import orjson
from chromadb.api import ClientAPI
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from sluice.app import Gateway
from tests.component.test_rag_gateway import INSTALL, embedded, embedded_section, vectors
from tests.conftest import API_KEY, StartFake, StartGateway

__all__ = ["embedded", "vectors"]  # fixtures shared with test_rag_gateway.py


def chat_model(gw: Gateway, model: str, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=gw.url + "/v1", api_key=SecretStr(API_KEY), model=model, temperature=0, max_retries=0, **options
    )


async def test_plain_model(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    llm = chat_model(gw, "base")
    message = await llm.ainvoke("Say hello.")
    assert isinstance(message.content, str) and message.content
    assert message.response_metadata["model_name"] == "base"
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] > 0
    parts = [chunk.content async for chunk in llm.astream("Say hello.")]
    assert len(parts) > 1 and "".join(str(p) for p in parts)


async def test_rag_route_in_a_chain(fake: StartFake, gateway: StartGateway, embedded: ClientAPI) -> None:
    backend = await fake("base")
    gw = await gateway([backend], rag=embedded_section(embedded))
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("user", "{question}")])
    chain = prompt | chat_model(gw, "docs") | StrOutputParser()
    assert await chain.ainvoke({"question": INSTALL})
    sent: Any = backend.stats.last_request_body
    assert sent["model"] == "base"
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user"]
    assert "[1] Installing Sluice (guides/install.md)" in sent["messages"][1]["content"]

    streamed = [part async for part in chain.astream({"question": INSTALL})]
    assert len(streamed) > 1 and "".join(streamed)
    assert backend.stats.last_request_body["stream"] is True  # type: ignore[index]


async def test_rag_sources_reach_langchain(fake: StartFake, gateway: StartGateway, embedded: ClientAPI) -> None:
    gw = await gateway([await fake("base")], rag=embedded_section(embedded))
    llm = chat_model(gw, "docs", include_response_headers=True)
    message = await llm.ainvoke(INSTALL)
    headers = message.response_metadata["headers"]
    assert headers["x-sluice-grounded"] == "true"
    sources = orjson.loads(headers["x-sluice-sources"])
    assert [(s["source"], s["chunk_index"]) for s in sources] == [("guides/install.md", 0), ("guides/install.md", 1)]
