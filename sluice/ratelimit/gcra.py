"""The limiter's value objects and the GCRA arithmetic that decides them: pure, no clock, no I/O.

GCRA (generic cell rate algorithm) keeps one number per quota, the theoretical arrival time (TAT): the
moment the bucket would be full again. Spending `cost` units pushes it `cost / rate` seconds later; a
spend is allowed when the TAT would then lie at most `burst / rate` seconds ahead of now. In token-bucket
terms the units available are `burst - (TAT - now) * rate`. The Lua scripts in `redis_store` repeat these
formulas operation for operation, so Redis and the local store decide alike; `docs/decisions/rate-limiting.md`
says why GCRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

EPSILON = 1e-6  # seconds of slack when comparing times: Redis TIME's resolution, far above float rounding
LEASE_RETRY_AFTER = 1.0  # a concurrency slot frees when some request ends, which no clock can predict
DIGITS = 6  # states are rounded to a microsecond (a millionth of a unit), so 4.9999999 does not floor to 4
# The value objects are built on every request, so they are plain slotted dataclasses: a frozen one costs
# four times as much to build (1.8 µs against 0.45 µs here). Treat them as immutable all the same.


@dataclass(slots=True)
class Quota:
    """One GCRA limit checked for a request."""

    key: str  # e.g. "ip:203.0.113.9:req", "key:k_abc:req", "key:k_abc:tok"
    rate: float  # units replenished per second
    burst: float  # units that may be spent at once (the bucket size)
    cost: float  # units this request spends
    kind: str  # "requests" or "tokens": which x-ratelimit-* header family it feeds


@dataclass(slots=True)
class Lease:
    """One concurrency slot, held from admission until settled (or until `ttl` if never settled)."""

    key: str  # e.g. "key:k_abc:conc"
    limit: int
    lease_id: str  # unique per request (the request id)
    ttl: float  # seconds after which the slot of a crashed gateway is reclaimed


@dataclass(slots=True)
class QuotaState:
    quota: Quota
    remaining: float  # units left after this request; when refused, the units available now
    reset_after: float  # seconds until the bucket is full again


@dataclass(slots=True)
class Verdict:
    allowed: bool
    retry_after: float  # seconds until this request would be allowed (0 when allowed; inf: cost > burst)
    states: tuple[QuotaState, ...]
    refused_by: str | None  # the quota key (or lease key) that refused
    degraded: bool  # decided by the local fallback because Redis is unreachable


ALLOWED = Verdict(True, 0.0, (), None, False)


def adjust(tat: float, now: float, rate: float, delta: float) -> float:
    """The TAT after charging `delta` units more (or refunding, when negative); never beyond a full bucket."""
    return max(now, max(tat, now) + delta / rate)


def state(quota: Quota, tat: float, now: float) -> QuotaState:
    ahead = tat - now if tat > now else 0.0
    left = quota.burst - ahead * quota.rate
    return QuotaState(quota, round(left, DIGITS) if left > 0 else 0.0, round(ahead, DIGITS))


def decide(
    now: float, quotas: Sequence[Quota], tats: Sequence[float], lease: Lease | None, lease_free: bool, degraded: bool
) -> tuple[Verdict, list[float]]:
    """The verdict for `quotas` whose TATs are `tats`, and the TATs to store (unchanged when refused).

    All or nothing: the request is allowed only if every quota and the lease (`lease_free`) allow it.
    The ADMIT script in `redis_store` repeats the two formulas marked below, operation for operation.
    """
    wait, refused_by = 0.0, None
    after = []
    for quota, tat in zip(quotas, tats, strict=True):
        rate = quota.rate
        end = max(tat, now) + quota.cost / rate  # formula 1: the TAT after this spend
        late = math.inf if quota.cost > quota.burst else end - now - quota.burst / rate  # 2: how early it is
        if late > EPSILON and late > wait:
            wait, refused_by = late, quota.key
        after.append(end)
    if lease is not None and not lease_free and wait < LEASE_RETRY_AFTER:
        wait, refused_by = LEASE_RETRY_AFTER, lease.key
    if refused_by is None:
        states = tuple([state(quota, tat, now) for quota, tat in zip(quotas, after, strict=True)])
        return Verdict(True, 0.0, states, None, degraded), after
    states = tuple([state(quota, tat, now) for quota, tat in zip(quotas, tats, strict=True)])
    return Verdict(False, round(wait, DIGITS), states, refused_by, degraded), list(tats)
