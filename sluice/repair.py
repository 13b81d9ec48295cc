"""Automatic repair: Alertmanager's webhook drains a sick backend and puts it back when the alert resolves.

    POST /admin/alerts   (Alertmanager webhook, version 4; admin credential)

For each alert named in `repair.drain_on` (by default VLLMKVCacheSaturated and SluiceBackendErrorRateHigh)
whose `backend` label names a backend (or whose `instance` label is a backend's host:port): firing drains
it, resolved undrains it. A drained backend is healthy but gets no new requests; those in flight finish.
A backend stays drained while any of its alerts fires. A drain that would leave one of the backend's models
without a healthy, undrained backend is refused: repair must never turn a slow model into a missing one.

Drains are kept by sluice/drains.py (the console's drain buttons use it too): with Redis (`redis.url`) in
a hash shared by every replica and worker, read every `repair.sync_interval`, so whichever replica
Alertmanager reaches, all of them act. Without Redis they apply to the workers of the replica that received it.
Every action is logged (`sluice.repair`) and counted (`sluice_repair_actions_total`);
`sluice_backend_drained` shows the state.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from sluice.admin_json import parse_body
from sluice.config import RepairConfig
from sluice.context import RequestContext
from sluice.drains import Drains
from sluice.errors import NotFound
from sluice.metrics import GatewayMetrics
from sluice.upstream.backends import Backend, Backends

log = logging.getLogger("sluice.repair")


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
    def __init__(self, config: RepairConfig, drains: Drains, backends: Backends, metrics: GatewayMetrics) -> None:
        self._config = config
        self._drains = drains
        self._backends = backends
        self._metrics = metrics

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
        outcome = await self._drains.drain(backend, alert)
        if outcome == "refused_last_backend":
            models = self._drains.orphaned_by(backend)
            log.warning("auto-repair: not draining the last backend of a model",
                        extra={"backend": backend.name, "alert": alert, "models": models})  # fmt: skip
        return outcome

    async def _undrain(self, backend: Backend, alert: str) -> str:
        return await self._drains.undrain(backend, alert)
