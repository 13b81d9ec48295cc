"""Active health checks and model discovery for every backend.

Every `health.interval` seconds each backend's `/health` is probed; every `health.discovery_interval`
seconds (and whenever a backend comes back, or a request names a model nobody lists) its `/v1/models`
is read, which lists the base model and every LoRA adapter vLLM has loaded. A backend that fails a
probe, or a connection from the request path, leaves the rotation at once and returns when a probe
succeeds. These are cold paths, so they use aiohttp's client rather than the hot-path pool.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from sluice.config import HealthConfig
from sluice.upstream.backends import Backend, Backends

log = logging.getLogger("sluice.monitor")
MIN_REDISCOVERY_INTERVAL = 2.0


class BackendMonitor:
    def __init__(self, backends: Backends, settings: HealthConfig) -> None:
        self.backends = backends
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_discovery = 0.0
        self._discovery: asyncio.Task[None] | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64))
        await self.check_all(discover=True)
        self._tasks = [
            asyncio.create_task(self._every(self.settings.interval, self.check_all), name="health-checks"),
            asyncio.create_task(
                self._every(self.settings.discovery_interval, self.discover_all), name="model-discovery"
            ),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._discovery is not None:
            self._discovery.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _every(self, interval: float, job: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            await job()

    async def check_all(self, discover: bool = False) -> None:
        await asyncio.gather(*(self.check(b, discover) for b in self.backends.all))

    async def discover_all(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_discovery = loop.time()
        results = await asyncio.gather(*(self._discover(b) for b in self.backends.all if b.healthy))
        if any(results):
            self.backends.rebuild()

    def request_rediscovery(self) -> asyncio.Task[None] | None:
        """Start re-reading every backend's models unless one is running or ran in the last 2 s."""
        if self._discovery is None or self._discovery.done():
            if asyncio.get_running_loop().time() - self._last_discovery < MIN_REDISCOVERY_INTERVAL:
                return None
            self._discovery = asyncio.create_task(self.discover_all(), name="model-rediscovery")
        return self._discovery

    async def rediscover(self) -> None:
        """Re-read every backend's models now (rate-limited as above) and wait for the result."""
        task = self.request_rediscovery()
        if task is not None:
            await asyncio.shield(task)

    def report_failure(self, backend: Backend, reason: str) -> None:
        """The request path could not reach `backend`: take it out until a probe succeeds."""
        backend.last_error = reason
        if backend.healthy:
            backend.healthy = False
            log.warning("backend down", extra={"backend": backend.name, "reason": reason})
            self.backends.rebuild()

    async def check(self, backend: Backend, discover: bool = False) -> None:
        ok, reason = await self._probe(backend)
        changed = False
        if ok and (discover or not backend.healthy):
            changed = await self._discover(backend)
        if ok != backend.healthy:
            backend.healthy = ok
            changed = True
            if ok:
                backend.failures = 0
                if backend.breaker is not None:
                    backend.breaker.health_recovered()  # a restarted engine takes probes at once
                log.info("backend up", extra={"backend": backend.name, "models": sorted(backend.models)})
            else:
                log.warning("backend down", extra={"backend": backend.name, "reason": reason})
        if not ok:
            backend.last_error = reason
        if changed:
            self.backends.rebuild()

    async def _probe(self, backend: Backend) -> tuple[bool, str]:
        assert self._session is not None
        try:
            async with self._session.get(backend.config.url + "/health") as response:
                await response.read()
                if response.status == 200:
                    return True, ""
                return False, f"/health answered {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, f"/health failed: {type(exc).__name__}: {exc}"

    async def _discover(self, backend: Backend) -> bool:
        """Read the backend's model list; True when it changed. Keeps the old list on failure."""
        assert self._session is not None
        headers = {"Authorization": f"Bearer {backend.config.api_key}"} if backend.config.api_key else {}
        try:
            async with self._session.get(backend.config.url + "/v1/models", headers=headers) as response:
                if response.status != 200:
                    log.warning("model discovery failed", extra={"backend": backend.name, "status": response.status})
                    return False
                payload = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            log.warning("model discovery failed", extra={"backend": backend.name, "error": str(exc)})
            return False
        data = payload.get("data") if isinstance(payload, dict) else None
        cards = {
            card["id"]: card
            for card in (data if isinstance(data, list) else [])
            if isinstance(card, dict) and isinstance(card.get("id"), str)
        }
        models = frozenset(cards) | frozenset(backend.config.models)
        backend.model_cards = cards
        if models == backend.models:
            return False
        backend.models = models
        log.info("models discovered", extra={"backend": backend.name, "models": sorted(models)})
        return True
