"""Loads registered LoRA adapters onto backends on demand, through vLLM's runtime LoRA API.

When a request names an adapter of `adapters.registry` that no usable backend has loaded, the adapter
is loaded (`POST /v1/load_lora_adapter`) onto the least-loaded healthy backend that runs its base model
and whose circuit is closed. A backend already holding `max_loras` adapters first unloads
(`POST /v1/unload_lora_adapter`) its least recently used registered adapter that has no request in
flight; the victim leaves the routing index before the unload is sent, so no new request is routed to it
meanwhile. Concurrent requests for one adapter wait for a single load. A failed load moves on to the next
backend; when all fail the request gets 503 naming each reason (or its fallback model answers). Adapters
loaded by other means (`--lora-modules`, another gateway replica) count towards `max_loras` but are never
unloaded by the gateway. A cold path, so it uses aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from sluice.config import AdapterConfig, AdaptersConfig
from sluice.errors import NoHealthyBackend
from sluice.instruments import Counter
from sluice.upstream.backends import Backend, Backends

log = logging.getLogger("sluice.adapters")


class AdapterPlacer:
    def __init__(self, backends: Backends, settings: AdaptersConfig, loads: Counter, retry_after: int = 5) -> None:
        self._backends = backends
        self.load_timeout = settings.load_timeout
        self.retry_after = (("retry-after", str(retry_after)),)
        self._loads = loads  # sluice_adapter_operations{backend, adapter, operation, outcome}
        self._session: aiohttp.ClientSession | None = None
        self._placing: dict[str, asyncio.Task[tuple[Backend, ...]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # one load or unload at a time per backend

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        for task in list(self._placing.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()

    def place(self, name: str) -> asyncio.Future[tuple[Backend, ...]]:
        """The backends that serve adapter `name` once it is loaded somewhere (one load for all callers).

        Raises `NoHealthyBackend` when no backend running its base model could load it.
        """
        task = self._placing.get(name)
        if task is None:
            task = asyncio.create_task(self._place(self._backends.registry[name]), name=f"place-{name}")
            self._placing[name] = task
            task.add_done_callback(self._placed)
        return asyncio.shield(task)  # a caller that goes away does not cancel the others' load

    def _placed(self, task: asyncio.Task[tuple[Backend, ...]]) -> None:
        for name, running in list(self._placing.items()):
            if running is task:
                del self._placing[name]
        if not task.cancelled():
            task.exception()  # retrieved here, so a load nobody waits for any more logs no warning

    async def _place(self, adapter: AdapterConfig) -> tuple[Backend, ...]:
        now = time.monotonic()
        hosts = sorted(
            (
                b for b in self._backends.serving(adapter.base_model)
                if adapter.name not in b.models and (b.breaker is None or b.breaker.available())
            ),
            key=lambda b: (b.load(now) + 1) / b.weight,
        )  # fmt: skip
        if not hosts:
            why = (
                f"Adapter '{adapter.name}' keeps failing on every backend running '{adapter.base_model}' "
                "(their circuits are open)"
                if self._backends.serving(adapter.base_model)
                else f"No healthy backend runs '{adapter.base_model}', the base model of adapter '{adapter.name}'"
            )
            raise NoHealthyBackend(f"{why}; retry later.", headers=self.retry_after)
        reasons = []
        for backend in hosts:
            async with self._locks.setdefault(backend.name, asyncio.Lock()):
                problem = await self._load(backend, adapter)
            if problem is None:
                return (backend,)
            reasons.append(f"{backend.name}: {problem}")
        log.error("adapter load failed everywhere", extra={"adapter": adapter.name, "reasons": reasons})
        raise NoHealthyBackend(
            f"Could not load adapter '{adapter.name}' on any backend running '{adapter.base_model}' "
            f"({'; '.join(reasons)}); retry later or check adapters.registry.",
            headers=self.retry_after,
        )

    async def _load(self, backend: Backend, adapter: AdapterConfig) -> str | None:
        """Load `adapter` on `backend`, making room first; None on success, else the reason."""
        if adapter.name in backend.models:
            return None  # loaded while this load waited for the backend's lock
        cap = backend.max_loras
        evicted = False
        while cap is not None and self._adapter_count(backend) >= cap:
            if not await self._evict(backend, adapter.name):
                break  # every resident adapter is busy or not ours: let the engine decide
            evicted = True
        status, text = await self._post(backend, "/v1/load_lora_adapter", adapter.name, adapter.path)
        if status == 400 and not evicted and "max_loras" in text and await self._evict(backend, adapter.name):
            status, text = await self._post(backend, "/v1/load_lora_adapter", adapter.name, adapter.path)
        if status == 200 or (status == 400 and "already been loaded" in text):
            backend.models = backend.models | {adapter.name}
            backend.model_cards[adapter.name] = {
                "id": adapter.name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                "root": adapter.path, "parent": adapter.base_model,
            }  # fmt: skip
            backend.adapters_used_at[adapter.name] = time.perf_counter()
            self._backends.rebuild()
            self._loads.child(backend.name, adapter.name, "load", "ok").inc()
            log.info("adapter loaded", extra={"backend": backend.name, "adapter": adapter.name})
            return None
        self._loads.child(backend.name, adapter.name, "load", "failed").inc()
        reason = f"load answered {status}: {text[:300]}" if status else text
        log.warning("adapter load failed", extra={"backend": backend.name, "adapter": adapter.name, "error": reason})
        return reason

    def _adapter_count(self, backend: Backend) -> int:
        registry = self._backends.registry
        return sum(
            1 for model in backend.models
            if model in registry or (backend.model_cards.get(model) or {}).get("parent")
        )  # fmt: skip

    async def _evict(self, backend: Backend, keep: str) -> bool:
        """Unload the backend's least recently used idle registered adapter; False when there is none."""
        idle = [
            model for model in backend.models
            if model in self._backends.registry and model != keep and not backend.adapters_in_use.get(model)
        ]  # fmt: skip
        if not idle:
            return False
        victim = min(idle, key=lambda model: backend.adapters_used_at.get(model, 0.0))
        backend.models = backend.models - {victim}  # out of the routing index before the engine drops it
        backend.model_cards.pop(victim, None)
        backend.adapters_used_at.pop(victim, None)
        self._backends.rebuild()
        status, text = await self._post(backend, "/v1/unload_lora_adapter", victim)
        outcome = "ok" if status in (200, 404) else "failed"
        self._loads.child(backend.name, victim, "unload", outcome).inc()
        log.info(
            "adapter unloaded",
            extra={"backend": backend.name, "adapter": victim, "status": status, "detail": text[:300]},
        )
        return True

    def forget(self, backend: Backend, name: str) -> None:
        """`backend` answered 404 for adapter `name` (unloaded elsewhere): stop routing it there."""
        if name in backend.models:
            backend.models = backend.models - {name}
            backend.model_cards.pop(name, None)
            self._backends.rebuild()
            log.warning("adapter vanished from backend", extra={"backend": backend.name, "adapter": name})

    async def _post(self, backend: Backend, path: str, name: str, lora_path: str | None = None) -> tuple[int, str]:
        """POST a runtime LoRA call; (status, body text), or (0, reason) when the backend was unreachable."""
        assert self._session is not None, "AdapterPlacer.start() was not called"
        body: dict[str, Any] = {"lora_name": name}
        if lora_path is not None:
            body["lora_path"] = lora_path
        headers = {"Authorization": f"Bearer {backend.config.api_key}"} if backend.config.api_key else {}
        try:
            timeout = aiohttp.ClientTimeout(total=self.load_timeout)
            async with self._session.post(
                backend.config.url + path, json=body, headers=headers, timeout=timeout
            ) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return 0, f"{path} failed: {type(exc).__name__}: {exc}"
