"""The admin API for managed keys (`/admin/keys`), behind the admin credential (`auth.admin_key`).

    GET  /admin/keys                   list (`?all=1` includes revoked keys)
    POST /admin/keys                   create: {"name", "models", "tenant", "requests_per_minute",
                                       "tokens_per_minute", "max_concurrency", "expires_at",
                                       "log_bodies", "cache"} → 201, the key once
    GET  /admin/keys/<id or name>      one key's record
    POST /admin/keys/<id or name>/revoke
    POST /admin/keys/<id or name>/rotate   → the new key, once

Records never contain the key, only its display prefix. Revoking or rotating evicts the key from the cache of
every worker of this replica and announces it to the others (sluice/identity/revocations.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

import orjson
from pydantic import BaseModel, ConfigDict, Field

from sluice.admin_json import parse_body
from sluice.config import NAME_PATTERN
from sluice.context import RequestContext
from sluice.errors import GatewayError, InvalidRequest, MethodNotAllowed, NotFound
from sluice.identity.keys import DuplicateName, InvalidKeyRequest, KeyNotFound, KeyRecord, KeyRevoked, KeyStore
from sluice.identity.managed import ManagedKeys

PREFIX = "/admin/keys"
LIMIT_MAX = 2**31 - 1  # the key store's limit columns are 32-bit (also checked by KeyStore for the CLI)


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    models: list[str] | None = None
    tenant: str | None = None
    requests_per_minute: int | None = Field(None, ge=1, le=LIMIT_MAX)
    tokens_per_minute: int | None = Field(None, ge=1, le=LIMIT_MAX)
    max_concurrency: int | None = Field(None, ge=1, le=LIMIT_MAX)
    expires_at: datetime | None = None
    log_bodies: bool = False
    cache: bool = True


class AdminKeys:
    def __init__(
        self, managed: ManagedKeys | None, announce: Callable[[str], Awaitable[None]] | None = None
    ) -> None:
        self._managed = managed
        self._announce = announce

    async def collection(self, ctx: RequestContext) -> None:
        store = self._store()
        if ctx.request.method == "GET":
            query = parse_qs(ctx.request.query or "", keep_blank_values=True)
            records = await store.list(include_revoked=query.get("all") == ["1"])
            ctx.writer.send(200, orjson.dumps({"object": "list", "data": [_public(r) for r in records]}))
            return
        wanted = parse_body(ctx.request.body, NewKey)
        try:
            key, record = await store.create(
                wanted.name,
                models=wanted.models,
                tenant=wanted.tenant,
                requests_per_minute=wanted.requests_per_minute,
                tokens_per_minute=wanted.tokens_per_minute,
                max_concurrency=wanted.max_concurrency,
                expires_at=wanted.expires_at,
                log_bodies=wanted.log_bodies,
                cache=wanted.cache,
            )
        except DuplicateName as exc:
            raise Conflict(str(exc), param="name") from None
        except InvalidKeyRequest as exc:
            raise InvalidRequest(str(exc)) from None
        ctx.writer.send(201, orjson.dumps({**_public(record), "key": key}))

    async def item(self, ctx: RequestContext) -> None:
        store = self._store()
        parts = ctx.request.path[len(PREFIX) + 1 :].split("/")
        ident, action = parts[0], (parts[1] if len(parts) > 1 else "")
        if not ident or len(parts) > 2 or action not in ("", "revoke", "rotate"):
            raise NotFound(f"Unknown path {ctx.request.path[:200]}; see GET {PREFIX}.")
        wanted = "GET" if not action else "POST"
        if ctx.request.method != wanted:
            raise MethodNotAllowed(f"Use {wanted} on {ctx.request.path[:200]}.", headers=(("allow", wanted),))
        try:
            if not action:
                ctx.writer.send(200, orjson.dumps(_public(await store.get(ident))))
                return
            if action == "revoke":
                record = await store.revoke(ident)
                answer: dict[str, Any] = _public(record)
            else:
                key, record = await store.rotate(ident)
                answer = {**_public(record), "key": key}
        except KeyRevoked:
            raise Conflict(f"The key '{ident[:100]}' is revoked and cannot be rotated; create a new one.") from None
        except KeyNotFound:
            raise NotFound(f"No key with id or name '{ident[:100]}'.") from None
        assert self._managed is not None
        self._managed.evict(record.id)
        if self._announce is not None:
            await self._announce(record.id)
        ctx.writer.send(200, orjson.dumps(answer))

    def _store(self) -> KeyStore:
        if self._managed is None:
            raise NotFound("Managed keys are off: set auth.key_secret (e.g. from SLUICE_KEY_SECRET) to use them.")
        return self._managed.store


def _public(record: KeyRecord) -> dict[str, Any]:
    """A key's record as the API shows it: everything but the secret."""
    return record.as_dict()
