"""Draining a backend by hand (the console's buttons), behind the admin credential.

    POST /admin/backends/<name>/drain     → {"name", "drained", "drained_by"}; 409 if it is the last
                                            healthy, undrained backend of a model
    POST /admin/backends/<name>/undrain   → the same; alerts still draining it keep it drained

The reason recorded in `drained_by` is "console". Drains go through sluice/drains.py, as repair's do:
told to the sibling workers at once, and shared with every replica through Redis with `redis.url`.
"""

from __future__ import annotations

import logging

import orjson

from sluice.admin import Conflict
from sluice.context import RequestContext
from sluice.drains import Drains
from sluice.errors import NotFound
from sluice.upstream.backends import Backends

log = logging.getLogger("sluice.console")
PREFIX = "/admin/backends/"
REASON = "console"


class AdminBackends:
    def __init__(self, backends: Backends, drains: Drains) -> None:
        self._backends = backends
        self._drains = drains

    async def item(self, ctx: RequestContext) -> None:
        name, _, action = ctx.request.path[len(PREFIX) :].partition("/")
        if action not in ("drain", "undrain"):
            raise NotFound(f"Unknown path {ctx.request.path[:200]}; use {PREFIX}<name>/drain or /undrain.")
        backend = self._backends.by_name.get(name)
        if backend is None:
            raise NotFound(f"No backend named '{name[:100]}'.")
        if action == "drain":
            outcome = await self._drains.drain(backend, REASON)
            if outcome == "refused_last_backend":
                models = ", ".join(self._drains.orphaned_by(backend))
                raise Conflict(
                    f"Not draining '{name}': it is the last healthy, undrained backend of {models}.", param="name"
                )
        else:
            outcome = await self._drains.undrain(backend, REASON)
        log.warning(
            f"console: {action} {outcome}",
            extra={"request_id": ctx.request_id, "backend": name, "shared": self._drains.shared},
        )
        answer = {"name": name, "drained": bool(backend.drained_by), "drained_by": sorted(backend.drained_by)}
        ctx.writer.send(200, orjson.dumps(answer))
