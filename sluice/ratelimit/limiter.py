"""The rate limiter the pipeline calls: Redis when configured, the local store otherwise, and the failure policy.

While Redis fails (refused, timed out, erroring), `fail_open` decides with the local store (limits per
replica) and `fail_closed` raises LimiterUnavailable. Either way Redis is tried again only every
`retry_interval` seconds, by one call while the others keep deciding without it, so an outage never costs
a timeout per request. At most `max_connections` calls wait on Redis at once; the rest queue for a slot
and look at the failure state again once they have one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

from sluice.ratelimit.gcra import ALLOWED, Lease, Quota, Verdict
from sluice.ratelimit.local import LocalStore
from sluice.ratelimit.redis_store import RedisStore
from sluice.resp import RespClient, RespError

log = logging.getLogger("sluice.ratelimit")
FAILURES = (RespError, OSError)  # what counts as Redis being unavailable (script errors included: they alert)


class LimiterUnavailable(Exception):
    """Redis cannot be reached and the policy is fail_closed (the pipeline answers 503)."""


class RateLimiter:
    def __init__(
        self,
        redis_url: str | None,
        *,
        on_failure: Literal["fail_open", "fail_closed"] = "fail_open",
        timeout: float = 0.25,
        key_prefix: str = "sluice:rl:",
        clock: Callable[[], float] = time.time,
        retry_interval: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        self.redis_errors = 0
        self.degraded = False  # True while Redis is considered down (fail_open: deciding locally)
        self._url = redis_url
        self._fail_open = on_failure == "fail_open"
        self._timeout = timeout
        self._prefix = key_prefix
        self._clock = clock
        self._retry_interval = retry_interval
        self._max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections)
        self._local = LocalStore(clock)
        self._redis: RedisStore | None = None
        self._retry_at = 0.0  # while degraded: when one call may try Redis again

    async def start(self) -> None:
        if self._url is None:
            return
        self._redis = RedisStore(RespClient(self._url, self._timeout), self._prefix)
        try:
            await self._redis.load()
        except FAILURES as error:
            self._failed(error)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.client.close()
            self._redis = None

    def decide_now(self, quotas: Sequence[Quota], lease: Lease | None = None) -> Verdict | None:
        """The verdict without waiting when no Redis is configured (embedded mode); else None: use `admit`."""
        if self._url is not None:
            return None
        return self._local.admit(quotas, lease) if quotas or lease is not None else ALLOWED

    async def admit(self, quotas: Sequence[Quota], lease: Lease | None = None) -> Verdict:
        """Allow the request only if every quota and the lease allow it; spend them only then."""
        if not quotas and lease is None:
            return ALLOWED
        if self._redis is None:
            return self._local.admit(quotas, lease)
        async with self._slots:
            redis = self._reachable()
            if redis is not None:
                try:
                    verdict = await redis.admit(quotas, lease)
                except FAILURES as error:
                    self._failed(error)
                else:
                    if self.degraded:
                        self._recovered()
                    return verdict
        if not self._fail_open:
            raise LimiterUnavailable("Redis is unreachable and rate_limits.on_redis_failure is fail_closed")
        return self._local.admit(quotas, lease, degraded=True)

    async def settle(self, adjust: Sequence[tuple[Quota, float]] = (), lease: Lease | None = None) -> None:
        """Charge each quota `actual - quota.cost` more (refund when negative) and release the lease. Never raises."""
        changes = [(quota, actual - quota.cost) for quota, actual in adjust if actual != quota.cost]
        if not changes and lease is None:
            return
        if self._redis is None:
            self._local.settle(changes, lease)
            return
        if lease is not None:
            self._local.release(lease)  # it may have been admitted locally during an outage
        async with self._slots:
            redis = self._reachable()
            if redis is not None:
                try:
                    await redis.settle(changes, lease)
                except FAILURES as error:
                    self._failed(error)
                else:
                    if self.degraded:
                        self._recovered()
                    return
        if self._fail_open:
            self._local.settle(changes, None)

    def _reachable(self) -> RedisStore | None:
        """Redis, unless it is down and not yet due for another try (this call then makes the try)."""
        if self.degraded:
            now = self._clock()
            if now < self._retry_at:
                return None
            self._retry_at = now + self._retry_interval
        return self._redis

    def _failed(self, error: Exception) -> None:
        self.redis_errors += 1
        self._retry_at = self._clock() + self._retry_interval
        if not self.degraded:
            self.degraded = True
            policy = "deciding locally, per replica" if self._fail_open else "refusing requests (fail_closed)"
            log.warning("rate limits: Redis unavailable (%s: %s); %s", type(error).__name__, error, policy)

    def _recovered(self) -> None:
        self.degraded = False
        log.warning("rate limits: Redis reachable again; limits are shared across replicas again")
