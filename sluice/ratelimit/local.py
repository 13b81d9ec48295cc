"""Rate-limit state in this process: the embedded mode's store and the fallback while Redis is unreachable.

The same GCRA arithmetic as the Redis scripts, on one dict of TATs and one dict of leases per key, with
the injected clock. Memory is bounded: when a dict reaches `max_entries`, idle entries (a full bucket, a
key without live leases) are swept; if live ones still fill three quarters of it, the oldest are dropped,
which only makes their limits forget recent spending. A sweep costs O(max_entries) once per
max_entries / 4 new keys, so millions of client addresses cost constant memory and O(1) amortised time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import islice

from sluice.ratelimit.gcra import Lease, Quota, Verdict, adjust, decide


class LocalStore:
    __slots__ = ("_clock", "_leases", "_max_entries", "_origin", "_tats")

    def __init__(self, clock: Callable[[], float], max_entries: int = 100_000) -> None:
        self._clock = clock
        self._origin = clock()  # times are kept relative to this: more float precision than epoch seconds
        self._max_entries = max_entries
        self._tats: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}  # key -> lease id -> expiry

    def __len__(self) -> int:
        return len(self._tats) + len(self._leases)

    def admit(self, quotas: Sequence[Quota], lease: Lease | None, degraded: bool = False) -> Verdict:
        now = self._clock() - self._origin
        held, lease_free = None, True
        if lease is not None:
            held = self._live_leases(lease.key, now)
            lease_free = held is None or lease.lease_id in held or len(held) < lease.limit
        tats = self._tats
        verdict, after = decide(now, quotas, [tats.get(q.key, 0.0) for q in quotas], lease, lease_free, degraded)
        if verdict.allowed:
            for quota, tat in zip(quotas, after, strict=True):
                self._keep(quota.key, tat, now)
            if lease is not None:
                if held is None:
                    if len(self._leases) >= self._max_entries:
                        self._sweep_leases(now)
                    held = self._leases[lease.key] = {}
                held[lease.lease_id] = now + lease.ttl
        return verdict

    def settle(self, changes: Iterable[tuple[Quota, float]], lease: Lease | None) -> None:
        """Charge (or refund, when negative) each quota by its change, and release the lease."""
        now = self._clock() - self._origin
        for quota, delta in changes:
            self._keep(quota.key, adjust(self._tats.get(quota.key, 0.0), now, quota.rate, delta), now)
        if lease is not None:
            self.release(lease)

    def release(self, lease: Lease) -> None:
        held = self._leases.get(lease.key)
        if held is not None:
            held.pop(lease.lease_id, None)
            if not held:
                del self._leases[lease.key]

    def _keep(self, key: str, tat: float, now: float) -> None:
        if tat > now:
            self._tats[key] = tat
            if len(self._tats) > self._max_entries:
                self._sweep_tats(now)
        else:
            self._tats.pop(key, None)  # a full bucket needs no state

    def _live_leases(self, key: str, now: float) -> dict[str, float] | None:
        held = self._leases.get(key)
        if held is not None:
            expired = [lease_id for lease_id, expiry in held.items() if expiry <= now]
            for lease_id in expired:
                del held[lease_id]
        return held

    def _sweep_tats(self, now: float) -> None:
        tats = self._tats
        for key in [key for key, tat in tats.items() if tat <= now]:
            del tats[key]
        for key in list(islice(tats, max(0, len(tats) - self._max_entries * 3 // 4))):
            del tats[key]

    def _sweep_leases(self, now: float) -> None:
        leases = self._leases
        for key in list(leases):
            self._live_leases(key, now)
            if not leases[key]:
                del leases[key]
        for key in list(islice(leases, max(0, len(leases) - self._max_entries * 3 // 4))):
            del leases[key]
