"""Managed API keys: `sk-sluice-…` keys made here and stored only as HMAC-SHA256 digests under a server secret.

A key is `sk-sluice-` and 43 random base62 characters (256 bits from `secrets`). The database keeps its
digest keyed with `auth.key_secret` (a stolen table can neither be brute-forced nor checked against a
guess without the secret), a display prefix such as `sk-sluice-AbCd` so people can tell keys apart, and
its settings; the key itself is returned once, by `create` or `rotate`, and exists nowhere else. Ids
(`k_…`) are random and survive rotation; names are unique among keys that are not revoked. Revoked keys
stay in the table for the record.

`lookup` finds a key's record by digest and returns it even when it is revoked or expired, so the caller
can tell why a key is refused (`KeyRecord.state`); it returns None only for keys this store never made
(or made under another secret). Comparing digests in SQL leaks nothing worth timing: the digest of a guess
is unknown to whoever made the guess.
"""

from __future__ import annotations

import builtins
import hmac
import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from sluice.config import NAME_PATTERN
from sluice.context import Limits, Principal
from sluice.store.database import Database, Row, Session, UniqueViolation

KEY_PREFIX = "sk-sluice-"
KEY_ALPHABET = string.digits + string.ascii_letters
KEY_CHARS = 43  # 62**43 > 2**256
SHOWN_CHARS = len(KEY_PREFIX) + 4  # the display prefix: enough to tell keys apart, nothing to guess with
ID_PREFIX = "k_"
ID_CHARS = 10
COLUMNS = (
    "id, name, prefix, models, tenant, requests_per_minute, tokens_per_minute, max_concurrency, "
    "created_at, expires_at, revoked_at, rotated_at, log_bodies, cache"
)
KeyState = Literal["active", "revoked", "expired"]
MAX_LIMIT = 2**31 - 1  # the limit columns are 32-bit integers


class KeyStoreError(Exception):
    """A key operation was refused; the message says why and is safe to show."""


class KeyNotFound(KeyStoreError):
    pass


class KeyRevoked(KeyNotFound):
    """The key exists but is revoked, so it cannot be rotated."""


class DuplicateName(KeyStoreError):
    pass


class InvalidKeyRequest(KeyStoreError):
    """Bad settings for a new key (name, models, limits, expiry)."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A managed key's row: everything but the key."""

    id: str
    name: str
    prefix: str
    models: tuple[str, ...] | None  # None: every model
    tenant: str | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrency: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_at: datetime | None
    log_bodies: bool = False  # prompts and responses are stored with the audit rows (capped)
    cache: bool = True  # answers may come from and go to the response cache

    def state(self, now: datetime | None = None) -> KeyState:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC)):
            return "expired"
        return "active"

    def principal(self) -> Principal:
        return Principal(
            name=self.name,
            models=None if self.models is None else frozenset(self.models),
            subject=f"key:{self.id}",
            kind="managed",
            tenant=self.tenant,
            limits=Limits(self.requests_per_minute, self.tokens_per_minute, self.max_concurrency),
            log_bodies=self.log_bodies,
            cache=self.cache,
        )

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """JSON-ready, with the key's state at `now`."""

        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "state": self.state(now),
            "models": None if self.models is None else list(self.models),
            "tenant": self.tenant,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "max_concurrency": self.max_concurrency,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "rotated_at": iso(self.rotated_at),
            "log_bodies": self.log_bodies,
            "cache": self.cache,
        }


def new_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_CHARS))


def looks_like_key(presented: str) -> bool:
    return len(presented) == len(KEY_PREFIX) + KEY_CHARS and presented.startswith(KEY_PREFIX) and presented.isascii()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class KeyStore:
    def __init__(self, db: Database, secret: bytes, clock: Callable[[], datetime] = _utc_now) -> None:
        if len(secret) < 32:
            raise ValueError("the key secret (auth.key_secret) must be at least 32 bytes")
        self._db = db
        self._secret = secret
        self._clock = clock

    def digest(self, key: bytes) -> bytes:
        """HMAC-SHA256 of `key` under the secret: what the table stores and lookups search by."""
        return hmac.digest(self._secret, key, "sha256")

    async def create(
        self,
        name: str,
        *,
        models: Sequence[str] | None = None,
        tenant: str | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        max_concurrency: int | None = None,
        expires_at: datetime | None = None,
        log_bodies: bool = False,
        cache: bool = True,
    ) -> tuple[str, KeyRecord]:
        """A new key (returned this once) and its record; naive `expires_at` is taken as UTC."""
        now = self._clock()
        expires_at = None if expires_at is None else _expiry(expires_at)
        limits = (requests_per_minute, tokens_per_minute, max_concurrency)
        _check_settings(name, models, tenant, limits, expires_at, now)
        key = new_key()
        record = KeyRecord(
            id=ID_PREFIX + "".join(secrets.choice(KEY_ALPHABET) for _ in range(ID_CHARS)),
            name=name,
            prefix=key[:SHOWN_CHARS],
            models=None if models is None else tuple(dict.fromkeys(models)),
            tenant=tenant,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            max_concurrency=max_concurrency,
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
            rotated_at=None,
            log_bodies=log_bodies,
            cache=cache,
        )
        try:
            await self._db.execute(
                f"INSERT INTO api_keys (digest, {COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                self.digest(key.encode()),
                record.id,
                record.name,
                record.prefix,
                None if record.models is None else json.dumps(list(record.models)),
                record.tenant,
                record.requests_per_minute,
                record.tokens_per_minute,
                record.max_concurrency,
                record.created_at,
                record.expires_at,
                None,
                None,
                record.log_bodies,
                record.cache,
            )
        except UniqueViolation:
            raise DuplicateName(f"a key named {name!r} already exists; revoke it or choose another name") from None
        return key, record

    async def list(self, include_revoked: bool = False) -> builtins.list[KeyRecord]:
        where = "" if include_revoked else "WHERE revoked_at IS NULL"
        rows = await self._db.fetch(f"SELECT {COLUMNS} FROM api_keys {where} ORDER BY created_at, id")
        return [_record(row) for row in rows]

    async def get(self, id_or_name: str) -> KeyRecord:
        """By id, else by name (the live key of that name, else the latest revoked one)."""
        return await _find(self._db, id_or_name)

    async def revoke(self, id_or_name: str) -> KeyRecord:
        """Revoke at once (a key already revoked is returned as it is)."""
        async with self._db.transaction() as tx:
            record = await _find(tx, id_or_name)
            if record.revoked_at is not None:
                return record
            now = self._clock()
            await tx.execute("UPDATE api_keys SET revoked_at = $2 WHERE id = $1", record.id, now)
        return replace(record, revoked_at=now)

    async def rotate(self, id_or_name: str) -> tuple[str, KeyRecord]:
        """A new key (returned this once) for the same id, name and settings; the old key stops working."""
        async with self._db.transaction() as tx:
            record = await _find(tx, id_or_name)
            if record.revoked_at is not None:
                raise KeyRevoked(f"key {record.id} ({record.name}) is revoked; create a new key instead")
            key, now = new_key(), self._clock()
            await tx.execute(
                "UPDATE api_keys SET digest = $2, prefix = $3, rotated_at = $4 WHERE id = $1",
                record.id,
                self.digest(key.encode()),
                key[:SHOWN_CHARS],
                now,
            )
        return key, replace(record, prefix=key[:SHOWN_CHARS], rotated_at=now)

    async def lookup(self, presented: str) -> KeyRecord | None:
        """The record of `presented`, revoked and expired ones included; None for a key this store never made."""
        if not looks_like_key(presented):
            return None
        row = await self._db.fetchrow(
            f"SELECT {COLUMNS} FROM api_keys WHERE digest = $1", self.digest(presented.encode())
        )
        return None if row is None else _record(row)


async def _find(session: Session, id_or_name: str) -> KeyRecord:
    row = await session.fetchrow(
        f"SELECT {COLUMNS} FROM api_keys WHERE id = $1 OR name = $1 "
        "ORDER BY id = $1 DESC, revoked_at IS NULL DESC, created_at DESC LIMIT 1",
        id_or_name,
    )
    if row is None:
        raise KeyNotFound(f"no key with id or name {id_or_name!r}")
    return _record(row)


def _record(row: Row) -> KeyRecord:
    models = row["models"]
    return KeyRecord(
        **{
            **row,
            "models": None if models is None else tuple(json.loads(models)),
            "log_bodies": bool(row["log_bodies"]),
            "cache": bool(row["cache"]),
        }
    )


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _expiry(value: datetime) -> datetime:
    try:
        return _aware(value)
    except OverflowError:  # an offset that takes it past year 1 or 9999 in UTC
        raise InvalidKeyRequest(f"expiry {value.isoformat()} is out of range") from None


def _check_settings(
    name: str,
    models: Sequence[str] | None,
    tenant: str | None,
    limits: tuple[int | None, ...],
    expires_at: datetime | None,
    now: datetime,
) -> None:
    if not re.fullmatch(NAME_PATTERN, name):
        raise InvalidKeyRequest(f"invalid name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    if isinstance(models, str) or (models is not None and (not models or not all(models))):
        raise InvalidKeyRequest("models must list at least one model name (or be left out: every model)")
    if any(limit is not None and not 1 <= limit <= MAX_LIMIT for limit in limits):
        raise InvalidKeyRequest(f"limits must be at least 1 and at most {MAX_LIMIT} (or left out: unlimited)")
    if "\x00" in (tenant or "") or any("\x00" in model for model in models or ()):
        raise InvalidKeyRequest("tenant and model names cannot contain NUL characters")  # PostgreSQL text cannot
    if expires_at is not None and expires_at <= now:
        raise InvalidKeyRequest(f"expiry {expires_at.isoformat()} is not in the future")
