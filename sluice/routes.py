"""The route table (the one place public routes are listed) and the handlers the gateway answers itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

from sluice import __version__
from sluice.context import RequestContext, Route
from sluice.errors import NoHealthyBackend
from sluice.metrics import GatewayMetrics
from sluice.upstream.backends import Backends

PROXIED = (
    Route("chat", ("POST",), public=False, proxied=True, upstream_path=b"/v1/chat/completions"),
    Route("completions", ("POST",), public=False, proxied=True, upstream_path=b"/v1/completions"),
    Route("embeddings", ("POST",), public=False, proxied=True, upstream_path=b"/v1/embeddings"),
)
LOCAL = (
    Route("models", ("GET",), public=False, proxied=False),
    Route("health", ("GET",), public=True, proxied=False),
    Route("ready", ("GET",), public=True, proxied=False),
    Route("version", ("GET",), public=True, proxied=False),
    Route("metrics", ("GET",), public=True, proxied=False),
    Route("reload", ("POST",), public=False, proxied=False, admin=True),
    Route("admin_keys", ("GET", "POST"), public=False, proxied=False, admin=True),
    Route("admin_key", ("GET", "POST"), public=False, proxied=False, admin=True),
    Route("admin_usage", ("GET",), public=False, proxied=False, admin=True),  # sluice/admin_usage.py
    Route("admin_cache", ("GET",), public=False, proxied=False, admin=True),  # sluice/admin_cache.py
    Route("admin_cache_purge", ("POST",), public=False, proxied=False, admin=True),
    Route("admin_alerts", ("POST",), public=False, proxied=False, admin=True),  # sluice/repair.py
    Route("openapi", ("GET",), public=True, proxied=False),  # sluice/openapi.py
    Route("usage", ("GET",), public=False, proxied=False),  # the caller's own usage (sluice/admin_usage.py)
    Route("console", ("GET",), public=True, proxied=False, admin_listener=True),  # sluice/console/pages.py
    Route("console_static", ("GET",), public=True, proxied=False, admin_listener=True),
    Route("console_login", ("POST",), public=True, proxied=False, admin_listener=True),
    Route("console_logout", ("POST",), public=True, proxied=False, admin_listener=True),
    Route("console_state", ("GET",), public=False, proxied=False, admin=True, audited=False),  # a poll
    Route("admin_backend", ("POST",), public=False, proxied=False, admin=True),  # sluice/admin_backends.py
)
PATHS = {
    "/v1/chat/completions": PROXIED[0],
    "/v1/completions": PROXIED[1],
    "/v1/embeddings": PROXIED[2],
    "/v1/models": LOCAL[0],
    "/health": LOCAL[1],
    "/ready": LOCAL[2],
    "/version": LOCAL[3],
    "/metrics": LOCAL[4],
    "/admin/reload": LOCAL[5],
    "/admin/keys": LOCAL[6],
    "/admin/usage": LOCAL[8],
    "/admin/cache": LOCAL[9],
    "/admin/cache/purge": LOCAL[10],
    "/admin/alerts": LOCAL[11],
    "/openapi.json": LOCAL[12],
    "/v1/usage": LOCAL[13],
    "/console": LOCAL[14],
    "/console/login": LOCAL[16],
    "/console/logout": LOCAL[17],
    "/console/api/state": LOCAL[18],
}
PREFIXES = {
    "/admin/keys/": LOCAL[7],  # /admin/keys/<id or name>[/revoke|/rotate]
    "/console/static/": LOCAL[15],  # /console/static/<name>
    "/admin/backends/": LOCAL[19],  # /admin/backends/<name>/drain|undrain
}
PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"
LocalHandler = Callable[[RequestContext], Awaitable[None]]
Reload = Callable[[], Awaitable[dict[str, object]]]


class LocalRoutes:
    """Handlers for the routes answered without a backend."""

    def __init__(
        self,
        backends: Backends,
        metrics: GatewayMetrics,
        retry_after: int,
        draining: Callable[[], bool],
        reload: Reload,
        render_metrics: Callable[[], Awaitable[bytes]] | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        """`render_metrics`: the page for `/metrics` when it must cover several workers (metrics_workers.py);
        `aliases`: model names answered by another model (RAG routes: name -> base model)."""
        self.aliases = dict(aliases or {})
        self._render_metrics = render_metrics
        self._draining = draining
        self._reload = reload
        self._backends = backends
        self._metrics = metrics
        self._retry_after = (("retry-after", str(retry_after)),)
        self.handlers: dict[str, LocalHandler] = {
            "models": self.models,
            "health": self.health,
            "ready": self.ready,
            "version": self.version,
            "metrics": self.metrics,
            "reload": self.reload,
        }

    async def models(self, ctx: RequestContext) -> None:
        cards = self._backends.healthy_models()
        if self.aliases:
            cards += _alias_cards(cards, self.aliases)
        allowed = ctx.principal.models if ctx.principal is not None else None
        if allowed is not None:
            cards = [card for card in cards if card["id"] in allowed]
        ctx.writer.send(200, orjson.dumps({"object": "list", "data": cards}))

    async def health(self, ctx: RequestContext) -> None:
        ctx.writer.send(200, b'{"status":"ok"}')

    async def ready(self, ctx: RequestContext) -> None:
        if self._draining():
            raise NoHealthyBackend("The gateway is shutting down.", headers=self._retry_after)
        healthy = [b.name for b in self._backends.all if b.healthy]
        if not healthy:
            raise NoHealthyBackend("No backend is healthy yet.", headers=self._retry_after)
        ctx.writer.send(200, orjson.dumps({"status": "ready", "healthy_backends": healthy}))

    async def version(self, ctx: RequestContext) -> None:
        ctx.writer.send(200, orjson.dumps({"name": "sluice", "version": __version__}))

    async def metrics(self, ctx: RequestContext) -> None:
        page = self._metrics.render() if self._render_metrics is None else await self._render_metrics()
        ctx.writer.send(200, page, content_type=PROMETHEUS_TEXT)

    async def reload(self, ctx: RequestContext) -> None:
        """`POST /admin/reload`: re-read the configuration file and apply it (see `Gateway.reload`)."""
        ctx.writer.send(200, orjson.dumps(await self._reload()))


def _alias_cards(cards: list[dict[str, Any]], aliases: Mapping[str, str]) -> list[dict[str, Any]]:
    """A card for each alias whose base model is served now: the base's card renamed, `parent` the base."""
    served = {card["id"]: card for card in cards}
    return [
        {**served[base], "id": alias, "owned_by": "sluice", "parent": base}
        for alias, base in aliases.items()
        if base in served and alias not in served
    ]
