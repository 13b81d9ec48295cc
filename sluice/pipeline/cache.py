"""The cache stage: answer from the response cache, or let the request through and file its answer.

Applies to chat and completions requests whose model and key allow caching and whose sampling is
deterministic enough (`cache.default.max_temperature`, 0 by default; a request without `temperature`
samples at the engine's default, 1, and is not cached). Requests asking for log probabilities or echo
are not cached (those are not kept). `Cache-Control: no-cache` skips the lookup, `no-store` the storing.

Every answer it sees says what happened in `X-Sluice-Cache`: `hit-exact`, `hit-semantic`, `miss`, or
`bypass` (not consulted: not cacheable, switched off, `no-cache`, or the store is unreachable). A hit is
replayed in the shape asked for (a whole body or an SSE stream) and uses no backend and no tokens of the
caller's token rate limit. Only complete answers from the model asked for are stored: not errors, not
cut streams, not answers from a fallback model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from sluice.cache.keys import CacheKey, cache_key
from sluice.cache.replay import assemble, is_complete, render_stream
from sluice.cache.service import Lookup, ResponseCache
from sluice.context import Handler, Principal, RequestContext
from sluice.metrics import GatewayMetrics

CACHED_ROUTES = frozenset({"chat", "completions"})
NOT_KEPT = ("logprobs", "top_logprobs", "echo", "prompt_logprobs")
EVENT_STREAM = b"text/event-stream"
NO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
HEADERS = {
    result: f"x-sluice-cache: {result.replace('_', '-')}\r\n".encode()
    for result in ("hit_exact", "hit_semantic", "miss", "bypass")
}


class CacheStage:
    __slots__ = ("_cache", "_config", "_corpus", "_metrics")

    def __init__(
        self, cache: ResponseCache, metrics: GatewayMetrics, corpus: Callable[[str], str] = lambda _model: ""
    ) -> None:
        """`corpus(model)`: the RAG corpus version a model's answers depend on ("" for none), in the scope."""
        self._cache = cache
        self._corpus = corpus
        self._config = cache.config
        self._metrics = metrics

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> None:
        route = ctx.route
        body = ctx.body
        if route is None or route.name not in CACHED_ROUTES or body is None:
            await call_next(ctx)
            return
        settings = self._config.for_model(ctx.model)
        directives = _cache_control(ctx)
        if not _cacheable(ctx.principal, body, settings.enabled, settings.max_temperature):
            self._mark(ctx, route.name, "bypass")
            await call_next(ctx)
            return
        key = cache_key(route.name, body, _tenant(ctx.principal), self._corpus(ctx.model))
        semantic = settings.semantic and self._config.semantic.enabled
        no_cache = "no-cache" in directives
        found = Lookup("bypass") if no_cache else await self._cache.lookup(key, semantic)
        self._mark(ctx, route.name, found.result)
        if found.entry is not None:
            self._replay(ctx, found)
            return
        store_down = found.result == "bypass" and not no_cache
        if "no-store" not in directives and not store_down:
            ctx.cache_capture = bytearray()
        await call_next(ctx)
        if ctx.cache_capture is not None:
            self._file(ctx, key, found, semantic)

    def _mark(self, ctx: RequestContext, route: str, result: str) -> None:
        ctx.cache_result = result
        ctx.writer.extra += HEADERS[result]
        self._metrics.cache_lookups.child(route, result).inc()

    def _replay(self, ctx: RequestContext, found: Lookup) -> None:
        entry = found.entry
        assert entry is not None
        writer = ctx.writer
        headers: tuple[tuple[str, str], ...] = (("x-sluice-model", ctx.model),)
        if found.similarity is not None:
            headers += (("x-sluice-cache-similarity", f"{found.similarity:.4f}"),)
        ctx.usage = dict(NO_USAGE)  # served without a backend: no tokens used
        if not ctx.stream:
            writer.send(200, entry.body, headers=headers)
            return
        writer.start(200, EVENT_STREAM, headers)
        writer.write(b"".join(render_stream(entry.body, ctx.include_usage)))
        writer.end()

    def _file(self, ctx: RequestContext, key: CacheKey, found: Lookup, semantic: bool) -> None:
        """Store the answer the backend gave, if it is a complete one from the model asked for."""
        captured = ctx.cache_capture
        ctx.cache_capture = None
        if captured is None or ctx.writer.status != 200 or ctx.stream_cut or ctx.served_model:
            return
        answer = assemble(bytes(captured)) if ctx.stream else bytes(captured) if _complete(captured) else None
        if answer is None:
            self._metrics.cache_stores.child("incomplete").inc()
            return
        self._cache.save(key, answer, found.vector, semantic)


def _cacheable(principal: Principal | None, body: dict[str, Any], enabled: bool, max_temperature: float) -> bool:
    if not enabled or (principal is not None and not principal.cache):
        return False
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0  # vLLM's default when the request does not say
    if temperature > max_temperature:
        return False
    return not any(body.get(name) for name in NOT_KEPT)


def _cache_control(ctx: RequestContext) -> frozenset[str]:
    value = ctx.request.header(b"cache-control")
    if not value:
        return frozenset()
    return frozenset(part.strip().lower() for part in value.decode("latin-1").split(","))


def _tenant(principal: Principal | None) -> str:
    """Whose answers these are: the key's tenant, else the caller itself (a key or a JWT subject)."""
    if principal is None:
        return "anonymous"
    if principal.tenant:
        return "tenant:" + principal.tenant
    return "caller:" + (principal.subject or principal.name)


def _complete(body: bytearray) -> bool:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(answer, dict) and is_complete(answer)
