"""Managed API keys on the request path: a short-lived in-memory cache in front of the key store.

A presented `sk-sluice-…` key is looked up by its keyed hash (never stored or cached in clear). Found
keys are cached for `auth.key_cache_ttl` seconds (never past their expiry), unknown ones too, so a flood
of wrong keys cannot turn into a flood of database queries; the cache is bounded. Revocation and rotation
evict a key's entries at once (`evict`), on this replica directly and on the others through the
revocation feed (sluice/identity/revocations.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

from sluice.context import Principal
from sluice.identity.keys import KeyRecord, KeyStore

MAX_ENTRIES = 50_000


class KeyRejected(Exception):
    """The key is unknown, revoked or expired (`reason` is for logs and metrics, never for the client)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ManagedKeys:
    def __init__(self, store: KeyStore, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._ttl = ttl
        self._clock = clock
        # digest → (principal or the reason it is refused, valid until (clock), key id)
        self._entries: OrderedDict[bytes, tuple[Principal | str, float, str]] = OrderedDict()

    def cached(self, key: bytes) -> Principal | None:
        """The caller of `key` if a fresh cache entry says so; None when the store must be asked.

        Raises KeyRejected when a fresh entry says the key is refused.
        """
        digest = self.store.digest(key)
        entry = self._entries.get(digest)
        if entry is None:
            return None
        found, until, _ = entry
        if self._clock() >= until:
            del self._entries[digest]
            return None
        if isinstance(found, str):
            raise KeyRejected(found)
        return found

    async def resolve(self, key: bytes) -> Principal:
        """Ask the store (a cache miss), remember the answer, return the caller or raise KeyRejected."""
        digest = self.store.digest(key)
        record = await self.store.lookup(key.decode("latin-1"))
        now = self._clock()
        found, until, key_id = self._judge(record, now)
        self._entries[digest] = (found, until, key_id)
        if len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)
        if isinstance(found, str):
            raise KeyRejected(found)
        return found

    def _judge(self, record: KeyRecord | None, now: float) -> tuple[Principal | str, float, str]:
        until = now + self._ttl
        if record is None:
            return "unknown", until, ""
        state = record.state()
        if state != "active":
            return state, until, record.id
        if record.expires_at is not None:  # never cached past its expiry
            until = min(until, now + (record.expires_at - datetime.now(UTC)).total_seconds())
        return record.principal(), until, record.id

    def evict(self, key_id: str) -> None:
        """Forget every cached lookup of `key_id` (revoked or rotated)."""
        for digest in [d for d, (_, _, kid) in self._entries.items() if kid == key_id]:
            del self._entries[digest]
