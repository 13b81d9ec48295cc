"""The hot path as an aiohttp web application with an aiohttp client upstream."""

from __future__ import annotations

from aiohttp import web

from bench.stacks.hotpath import (
    BAD_GATEWAY,
    BAD_REQUEST,
    CHAT_PATH,
    JSON_TYPE,
    UNAUTHORIZED,
    bearer_ok,
    parse_chat,
)
from bench.stacks.upstreams import UpstreamClient, UpstreamFailed


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, headers={"Content-Type": JSON_TYPE})


class ChatHandler:
    """Request handler holding the upstream client and the accepted keys."""

    def __init__(self, upstream: UpstreamClient, keys: frozenset[bytes]) -> None:
        self._upstream = upstream
        self._keys = keys

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not bearer_ok(request.headers.get("Authorization"), self._keys):
            return _json(401, UNAUTHORIZED)
        body = await request.read()
        chat = parse_chat(body)
        if chat is None:
            return _json(400, BAD_REQUEST)
        response: web.StreamResponse | None = None
        try:
            async with self._upstream.chat(body) as upstream:
                headers = {"Content-Type": upstream.content_type}
                if not chat.stream:
                    return web.Response(status=upstream.status, body=await upstream.read(), headers=headers)
                response = web.StreamResponse(status=upstream.status, headers=headers)
                await response.prepare(request)
                async for chunk in upstream.chunks():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except UpstreamFailed:
            if response is None:
                return _json(502, BAD_GATEWAY)
            return response


def build_app(upstream: UpstreamClient, keys: frozenset[bytes]) -> web.Application:
    """Wire the handler and tie the upstream client's life to the app's."""
    app = web.Application()
    app.router.add_post(CHAT_PATH, ChatHandler(upstream, keys).handle)

    async def start(_: web.Application) -> None:
        await upstream.start()

    async def stop(_: web.Application) -> None:
        await upstream.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app
