"""`GET /console/api/state`: what the console page shows, in one JSON answer (admin credential or session).

Backends with their health, drains, circuits, the gateway's in-flight count (every worker's, asked with
topic `in-flight` on sluice/siblings.py) and what the engine last reported (null when stale, never
scraped or the backend is down), their base models and LoRA adapters apart;
every model a client may call now (RAG aliases included); and the traffic series of every worker
(sluice/console/traffic.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from sluice import __version__
from sluice.console.pages import console_off
from sluice.console.traffic import TrafficSampler
from sluice.context import RequestContext
from sluice.siblings import Siblings
from sluice.upstream.backends import Backend, Backends

IN_FLIGHT = "in-flight"


class ConsoleState:
    def __init__(
        self,
        enabled: bool,
        backends: Backends,
        traffic: TrafficSampler,
        aliases: Mapping[str, str] | None = None,
        siblings: Siblings | None = None,
    ) -> None:
        """`aliases`: RAG route names -> base model (docs/rag.md); `siblings`: the other workers, whose
        in-flight counts are added to this one's."""
        self._enabled = enabled
        self._backends = backends
        self._traffic = traffic
        self._aliases = dict(aliases or {})
        self._siblings = siblings
        if siblings is not None:
            siblings.answers[IN_FLIGHT] = lambda _: orjson.dumps({b.name: b.in_flight for b in backends.all})

    async def serve(self, ctx: RequestContext) -> None:
        if not self._enabled:
            raise console_off()
        traffic, in_flight = await asyncio.gather(self._traffic.describe_all(), self._siblings_in_flight())
        state = self.describe(traffic, in_flight)
        ctx.writer.send(200, orjson.dumps(state), headers=(("cache-control", "no-store"),))

    async def _siblings_in_flight(self) -> list[dict[str, int]]:
        if self._siblings is None:
            return []
        return [orjson.loads(answer) for answer in await self._siblings.ask(IN_FLIGHT) if answer]

    def describe(self, traffic: dict[str, Any], siblings_in_flight: Sequence[Mapping[str, int]] = ()) -> dict[str, Any]:
        now = time.monotonic()
        served = [card["id"] for card in self._backends.healthy_models()]
        aliases = [alias for alias, base in self._aliases.items() if base in served and alias not in served]
        return {
            "refresh_seconds": self._traffic.interval,
            "server_time": time.time(),
            "version": __version__,
            "backends": [_backend(backend, now, siblings_in_flight) for backend in self._backends.all],
            "models": served + aliases,
            "rag_routes": sorted(self._aliases),
            "traffic": traffic,
        }


def _backend(backend: Backend, now: float, siblings_in_flight: Sequence[Mapping[str, int]]) -> dict[str, Any]:
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
        "in_flight": backend.in_flight + sum(counts.get(backend.name, 0) for counts in siblings_in_flight),
        "running": backend.reported_running if fresh else None,
        "waiting": backend.reported_waiting if fresh else None,
        "kv_cache_usage": backend.reported_kv_usage if fresh else None,
        "models": sorted(m for m in backend.models if m not in adapters),
        "adapters": adapters,
        "last_error": backend.last_error,
    }
