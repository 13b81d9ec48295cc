"""`GET /console/api/state`: what the console page shows, in one JSON answer (admin credential or session).

Backends with their health, drains, circuits, our in-flight count and what the engine last reported
(null when stale, never scraped or the backend is down), their base models and LoRA adapters apart;
every model a client may call now (RAG aliases included); and the traffic series of every worker
(sluice/console/traffic.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from sluice import __version__
from sluice.console.pages import console_off
from sluice.console.traffic import TrafficSampler
from sluice.context import RequestContext
from sluice.upstream.backends import Backend, Backends


class ConsoleState:
    def __init__(
        self, enabled: bool, backends: Backends, traffic: TrafficSampler, aliases: Mapping[str, str] | None = None
    ) -> None:
        """`aliases`: RAG route names -> base model (docs/rag.md)."""
        self._enabled = enabled
        self._backends = backends
        self._traffic = traffic
        self._aliases = dict(aliases or {})

    async def serve(self, ctx: RequestContext) -> None:
        if not self._enabled:
            raise console_off()
        state = self.describe(await self._traffic.describe_all())
        ctx.writer.send(200, orjson.dumps(state), headers=(("cache-control", "no-store"),))

    def describe(self, traffic: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        served = [card["id"] for card in self._backends.healthy_models()]
        aliases = [alias for alias, base in self._aliases.items() if base in served and alias not in served]
        return {
            "refresh_seconds": self._traffic.interval,
            "server_time": time.time(),
            "version": __version__,
            "backends": [_backend(backend, now) for backend in self._backends.all],
            "models": served + aliases,
            "rag_routes": sorted(self._aliases),
            "traffic": traffic,
        }


def _backend(backend: Backend, now: float) -> dict[str, Any]:
    fresh = backend.healthy and bool(backend.scraped_at) and now < backend.stale_after  # a dead engine reports nothing
    adapters = sorted(m for m in backend.models if (backend.model_cards.get(m) or {}).get("parent"))
    return {
        "name": backend.name,
        "url": backend.config.url,
        "healthy": backend.healthy,
        "drained": bool(backend.drained_by),
        "drained_by": sorted(backend.drained_by),
        "circuit": backend.breaker.state.name.lower() if backend.breaker is not None else "disabled",
        "model_circuits": {m: b.state.name.lower() for m, b in sorted(backend.model_breakers.items())},
        "in_flight": backend.in_flight,
        "running": backend.reported_running if fresh else None,
        "waiting": backend.reported_waiting if fresh else None,
        "kv_cache_usage": backend.reported_kv_usage if fresh else None,
        "models": sorted(m for m in backend.models if m not in adapters),
        "adapters": adapters,
        "last_error": backend.last_error,
    }
