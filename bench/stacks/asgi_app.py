"""The hot path as a raw ASGI app (no framework), run on uvicorn or granian."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from bench.stacks.hotpath import (
    BAD_GATEWAY,
    BAD_REQUEST,
    CHAT_PATH,
    JSON_TYPE,
    NOT_FOUND,
    UNAUTHORIZED,
    bearer_ok,
    parse_chat,
)
from bench.stacks.upstreams import UpstreamClient, UpstreamFailed, make_upstream

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ENV_UPSTREAM_URL = "BENCH_UPSTREAM_URL"
ENV_UPSTREAM_CLIENT = "BENCH_UPSTREAM_CLIENT"
ENV_KEY = "SLUICE_BENCH_KEY"


async def _reply(send: Send, status: int, body: bytes, content_type: str = JSON_TYPE) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


class ProxyApp:
    """ASGI app: ``POST /v1/chat/completions`` forwarded upstream, everything else 404."""

    def __init__(self, upstream: UpstreamClient, keys: frozenset[bytes]) -> None:
        self._upstream = upstream
        self._keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._upstream.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._upstream.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != CHAT_PATH or scope["method"] != "POST":
            await _reply(send, 404, NOT_FOUND)
            return
        auth = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        if not bearer_ok(auth, self._keys):
            await _reply(send, 401, UNAUTHORIZED)
            return
        body = await _read_body(receive)
        chat = parse_chat(body)
        if chat is None:
            await _reply(send, 400, BAD_REQUEST)
            return
        started = False
        try:
            async with self._upstream.chat(body) as upstream:
                if not chat.stream:
                    data = await upstream.read()
                    await _reply(send, upstream.status, data, upstream.content_type)
                    return
                headers = [(b"content-type", upstream.content_type.encode("latin-1"))]
                await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
                started = True
                async for chunk in upstream.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except UpstreamFailed:
            if not started:
                await _reply(send, 502, BAD_GATEWAY)


def app_from_env() -> ProxyApp:
    """Factory for servers that import the app by name (granian): config comes from the environment."""
    return ProxyApp(
        make_upstream(os.environ.get(ENV_UPSTREAM_CLIENT, "aiohttp"), os.environ[ENV_UPSTREAM_URL]),
        frozenset({os.environ[ENV_KEY].encode()}),
    )
