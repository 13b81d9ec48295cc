"""Pooled keep-alive upstream clients (aiohttp, httpx) behind one small protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import aiohttp
import httpx
import yarl

from bench.stacks.hotpath import CHAT_PATH, JSON_TYPE

POOL_SIZE = 256
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
_REQUEST_HEADERS = {"Content-Type": JSON_TYPE}


class UpstreamFailed(Exception):
    """The upstream could not be reached or broke the exchange."""


class UpstreamReply(Protocol):
    """An upstream response whose body is read whole or chunk by chunk."""

    @property
    def status(self) -> int: ...

    @property
    def content_type(self) -> str: ...

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...


class UpstreamClient(Protocol):
    """Forwards chat bodies to one upstream over pooled keep-alive connections."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def chat(self, body: bytes) -> AbstractAsyncContextManager[UpstreamReply]: ...


class _AiohttpReply:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def content_type(self) -> str:
        return self._response.headers.get("Content-Type", JSON_TYPE)

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(str(exc)) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(str(exc)) from exc


class AiohttpUpstream:
    """``aiohttp.ClientSession`` with a bounded keep-alive connector."""

    def __init__(self, base_url: str) -> None:
        self._url = yarl.URL(base_url.rstrip("/") + CHAT_PATH)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=POOL_SIZE, keepalive_timeout=60.0)
        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @asynccontextmanager
    async def chat(self, body: bytes) -> AsyncIterator[UpstreamReply]:
        if self._session is None:
            raise UpstreamFailed("client not started")
        try:
            async with self._session.post(self._url, data=body, headers=_REQUEST_HEADERS) as response:
                yield _AiohttpReply(response)
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(str(exc)) from exc


class _HttpxReply:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def content_type(self) -> str:
        return str(self._response.headers.get("Content-Type", JSON_TYPE))

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.HTTPError as exc:
            raise UpstreamFailed(str(exc)) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamFailed(str(exc)) from exc


class HttpxUpstream:
    """``httpx.AsyncClient`` with the same pool size and timeouts."""

    def __init__(self, base_url: str) -> None:
        self._url = base_url.rstrip("/") + CHAT_PATH
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    @asynccontextmanager
    async def chat(self, body: bytes) -> AsyncIterator[UpstreamReply]:
        if self._client is None:
            raise UpstreamFailed("client not started")
        try:
            async with self._client.stream("POST", self._url, content=body, headers=_REQUEST_HEADERS) as resp:
                yield _HttpxReply(resp)
        except httpx.HTTPError as exc:
            raise UpstreamFailed(str(exc)) from exc


def make_upstream(kind: str, base_url: str) -> UpstreamClient:
    """Build the upstream client called ``kind`` (``aiohttp`` or ``httpx``)."""
    if kind == "aiohttp":
        return AiohttpUpstream(base_url)
    if kind == "httpx":
        return HttpxUpstream(base_url)
    raise ValueError(f"unknown upstream client {kind!r} (expected aiohttp or httpx)")
