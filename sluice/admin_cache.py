"""The response cache's admin API, behind the admin credential (`auth.admin_key`).

    GET  /admin/cache          {"enabled", "store", "store_up", "entries"}
    POST /admin/cache/purge    {"tenant": T} | {"caller": S} | {"model": M} | a tenant or caller with a model
                               | {"all": true}  →  {"purged": N}

`tenant` is a key's tenant (or a JWT's tenant claim); `caller` is the subject of a caller without a
tenant, as the audit log shows it (`static:<name>`, `key:<id>`, `jwt:<issuer>:<user>`). With the
Redis store a purge reaches every replica (sluice/cache/redis_store.py). With the in-process store and
several workers each worker has its own entries: the answering worker purges its own and its siblings'
(topic `cache-purge` on sluice/siblings.py) and counts them all, and so does the status; a purge that a
worker did not confirm in time answers 503 (nothing is undone: purge again). With the cache off both
answer 404.
"""

from __future__ import annotations

from collections.abc import Awaitable

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sluice.admin_json import parse_body
from sluice.cache.memory_store import MemoryCacheStore
from sluice.cache.service import ResponseCache
from sluice.cache.types import CacheUnavailable
from sluice.context import RequestContext
from sluice.errors import GatewayError, NotFound
from sluice.siblings import Siblings

RETRY_AFTER = (("retry-after", "5"),)
SIZE, PURGE = "cache-size", "cache-purge"  # topics between workers with in-process stores


class CacheStoreUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "cache_unavailable"


class Purge(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tenant: str | None = Field(None, min_length=1)
    caller: str | None = Field(None, min_length=1)
    model: str | None = Field(None, min_length=1)
    all: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> Purge:
        if self.tenant and self.caller:
            raise ValueError("give tenant or caller, not both")
        if self.all == bool(self.tenant or self.caller or self.model):
            raise ValueError('name a tenant, a caller and/or a model, or send {"all": true}')
        return self


class AdminCache:
    def __init__(self, cache: ResponseCache | None, siblings: Siblings | None = None) -> None:
        """`siblings`: the other workers, asked too when the store is in process (each has its own)."""
        self._cache = cache
        self._siblings: Siblings | None = None
        if siblings is not None and cache is not None and isinstance(cache.store, MemoryCacheStore):
            self._siblings = siblings
            store = cache.store
            siblings.answers[SIZE] = lambda _: _count(store.size())
            siblings.answers[PURGE] = lambda argument: _count(store.purge(*orjson.loads(argument)))

    async def status(self, ctx: RequestContext) -> None:
        cache = self._enabled()
        try:
            entries: int | None = await cache.store.size()
        except CacheUnavailable:
            entries = None
        if entries is not None and self._siblings is not None:
            entries += sum(int(answer) for answer in await self._siblings.ask(SIZE) if answer)
        document = {
            "enabled": True,
            "store": type(cache.store).__name__,
            "store_up": entries is not None,
            "entries": entries,
        }
        ctx.writer.send(200, orjson.dumps(document))

    async def purge(self, ctx: RequestContext) -> None:
        cache = self._enabled()
        wanted = parse_body(ctx.request.body, Purge)
        tenant = f"tenant:{wanted.tenant}" if wanted.tenant else f"caller:{wanted.caller}" if wanted.caller else None
        try:
            purged = await cache.store.purge(tenant, wanted.model)
        except CacheUnavailable as exc:
            raise CacheStoreUnavailable(
                f"The cache's store is unreachable ({exc}); nothing was purged, retry later.", headers=RETRY_AFTER
            ) from None
        if self._siblings is not None:
            answers = await self._siblings.ask_each(PURGE, orjson.dumps([tenant, wanted.model]).decode())
            purged += sum(int(answer) for answer in answers if answer)
            missing = sum(1 for answer in answers if not answer)
            if missing:
                raise CacheStoreUnavailable(
                    f"Purged {purged} entries, but {missing} worker(s) did not confirm in time and may still hold"
                    " matching entries: purge again.",
                    headers=RETRY_AFTER,
                )
        ctx.writer.send(200, orjson.dumps({"purged": purged}))

    def _enabled(self) -> ResponseCache:
        if self._cache is None:
            raise NotFound("The response cache is off (cache.enabled: false).")
        return self._cache


async def _count(counting: Awaitable[int]) -> bytes:
    return str(await counting).encode()
