"""Automatic repair: Alertmanager's webhook drains a sick backend and puts it back when the alert resolves.

    POST /admin/alerts   (Alertmanager webhook, version 4; admin credential)

For each alert named in `repair.drain_on` (by default VLLMKVCacheSaturated and SluiceBackendErrorRateHigh)
whose `backend` label names a backend (or whose `instance` label is a backend's host:port): firing drains
it, resolved undrains it. A drained backend is healthy but gets no new requests; those in flight finish.
A backend stays drained while any of its alerts fires. A drain that would leave one of the backend's models
without a healthy, undrained backend is refused: repair must never turn a slow model into a missing one.

With Redis (`redis.url`), drains are kept in a hash shared by every replica and worker, read every
`repair.sync_interval`, so whichever replica Alertmanager reaches, all of them act. Without Redis they
apply to the process that received the webhook. Every action is logged (`sluice.repair`) and counted
(`sluice_repair_actions_total`); `sluice_backend_drained` shows the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
import redis.asyncio as redis
from pydantic import BaseModel, ConfigDict

from sluice.admin_json import parse_body
from sluice.config import RepairConfig
from sluice.context import RequestContext
from sluice.errors import NotFound
from sluice.metrics import GatewayMetrics
from sluice.upstream.backends import Backend, Backends

log = logging.getLogger("sluice.repair")
SEPARATOR = "|"


class Alert(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: str
    labels: dict[str, str]
    fingerprint: str = ""


class Notification(BaseModel):
    """Alertmanager's webhook body (the fields used here; the rest is ignored)."""

    model_config = ConfigDict(extra="ignore")

    alerts: list[Alert]


async def repair_off(ctx: RequestContext) -> None:
    """`POST /admin/alerts` while repair is off: 404 that says how to turn it on."""
    raise NotFound("Automatic repair is off (repair.enabled: false); see docs/operations.md.")


class Repair:
    def __init__(
        self, config: RepairConfig, backends: Backends, metrics: GatewayMetrics, redis_url: str | None, prefix: str
    ) -> None:
        self._config = config
        self._backends = backends
        self._metrics = metrics
        self._key = prefix + "drained"
        shared = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) if redis_url else None
        self._client = shared
        self._drains: set[tuple[str, str]] = set()  # (backend, alert) pairs in force
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._client is not None:
            self._task = asyncio.create_task(self._follow(), name="repair-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def receive(self, ctx: RequestContext) -> None:
        notification = parse_body(ctx.request.body, Notification)
        actions = [await self._act(alert) for alert in notification.alerts]
        ctx.writer.send(200, orjson.dumps({"actions": actions}))

    async def _act(self, alert: Alert) -> dict[str, Any]:
        name = alert.labels.get("alertname", "")
        action = "undrain" if alert.status == "resolved" else "drain"
        backend = self._backend(alert.labels)
        if name not in self._config.drain_on:
            outcome = "ignored"
        elif backend is None:
            outcome = "unknown_backend"
        elif action == "drain":
            outcome = await self._drain(backend, name)
        else:
            outcome = await self._undrain(backend, name)
        label = name if name in self._config.drain_on else "other"
        self._metrics.repair_actions.child(action, label, outcome).inc()
        done = {"alert": name, "backend": backend.name if backend else alert.labels.get("backend")}
        if outcome != "ignored":
            level = logging.WARNING if outcome in ("done", "refused_last_backend") else logging.INFO
            log.log(level, f"auto-repair: {action} {outcome}", extra={**done, "fingerprint": alert.fingerprint})
        return {**done, "action": action, "outcome": outcome}

    def _backend(self, labels: dict[str, str]) -> Backend | None:
        by_name = self._backends.by_name
        if labels.get("backend") in by_name:
            return by_name[labels["backend"]]
        instance = labels.get("instance")
        return next((b for b in self._backends.all if f"{b.config.host}:{b.config.port}" == instance), None)

    async def _drain(self, backend: Backend, alert: str) -> str:
        if (backend.name, alert) in self._drains:
            return "already"
        orphaned = self._orphaned_by(backend)
        if orphaned:
            log.warning("auto-repair: not draining the last backend of a model",
                        extra={"backend": backend.name, "alert": alert, "models": orphaned})  # fmt: skip
            return "refused_last_backend"
        await self._store(backend.name, alert, True)
        self._drains.add((backend.name, alert))
        self.apply()
        return "done"

    async def _undrain(self, backend: Backend, alert: str) -> str:
        if (backend.name, alert) not in self._drains:
            return "already"
        await self._store(backend.name, alert, False)
        self._drains.discard((backend.name, alert))
        self.apply()
        return "done"

    def _orphaned_by(self, backend: Backend) -> list[str]:
        """The models that would have no healthy, undrained backend left without `backend`."""
        others = [b for b in self._backends.all if b is not backend and b.healthy and not b.drained_by]
        return sorted(m for m in backend.models if not any(m in b.models for b in others))

    async def _store(self, backend: str, alert: str, drained: bool) -> None:
        if self._client is None:
            return
        field = f"{backend}{SEPARATOR}{alert}"
        try:
            if drained:
                await self._client.hset(self._key, field, "1")
            else:
                await self._client.hdel(self._key, field)
        except (redis.RedisError, OSError) as exc:
            log.warning("auto-repair: drain not shared with other replicas (Redis)", extra={"error": str(exc)})

    def apply(self) -> None:
        """Mark each backend with the alerts draining it (also after a reload replaced backends)."""
        reasons: dict[str, set[str]] = {}
        for name, alert in self._drains:
            reasons.setdefault(name, set()).add(alert)
        changed = False
        for backend in self._backends.all:
            drained_by = frozenset(reasons.get(backend.name, ()))
            if drained_by != backend.drained_by:
                backend.drained_by = drained_by
                changed = True
        if changed:
            self._backends.rebuild()

    async def _follow(self) -> None:
        """Read the shared drains every sync interval (what another replica received counts here too)."""
        assert self._client is not None
        while True:
            with contextlib.suppress(redis.RedisError, OSError):  # keep the last known state meanwhile
                fields = await self._client.hkeys(self._key)
                pairs = (_text(field).partition(SEPARATOR) for field in fields)
                self._drains = {(backend, alert) for backend, _, alert in pairs if alert}
                self.apply()
            await asyncio.sleep(self._config.sync_interval)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
