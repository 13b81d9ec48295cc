"""The OIDC provider's public keys (a JWKS): read from a URL or a file, indexed, cached and refreshed.

Each JWK becomes one `PyJWK` per allowed algorithm whose key family it fits (RSA for RS*/PS*, the
matching curve for ES*, OKP for EdDSA), or only for the `alg` it names itself. HS* is never allowed and
an `oct` key fits no family, so a public key can never end up used as an HMAC secret.

Refreshing: once the set is older than `jwks_cache_ttl` it is re-fetched in the background while the
current set keeps answering (and is kept if the fetch fails; it is retried after
`jwks_refresh_interval`). A token naming an unknown `kid` waits for at most one refetch, and such
refetches start at most once per `jwks_refresh_interval`, so a flood of random kids cannot hammer the
provider. While there is no set at all (the provider was down at start), use retries at most once a
second. One fetch runs at a time; concurrent callers share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson
from jwt import PyJWK, PyJWTError

from sluice.config import JwtConfig

log = logging.getLogger("sluice.jwks")

FETCH_TIMEOUT = aiohttp.ClientTimeout(total=5.0, connect=2.0)
MAX_DOCUMENT_BYTES = 1 << 20
EMPTY_RETRY_INTERVAL = 1.0

# algorithm -> (kty, allowed curves or None for "no curve")
KEY_FAMILIES: Mapping[str, tuple[str, frozenset[str] | None]] = {
    **{alg: ("RSA", None) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}


class JwksError(Exception):
    """The key set could not be read, or holds no usable signing key."""


@dataclass(frozen=True, slots=True)
class KeySet:
    by_kid: Mapping[str, Mapping[str, tuple[PyJWK, ...]]]  # kid -> algorithm -> keys
    by_algorithm: Mapping[str, tuple[PyJWK, ...]]  # every key, for tokens without a kid

    def knows(self, kid: str) -> bool:
        return kid in self.by_kid

    def candidates(self, kid: str | None, algorithm: str) -> tuple[PyJWK, ...]:
        if kid is None:
            return self.by_algorithm.get(algorithm, ())
        return self.by_kid.get(kid, {}).get(algorithm, ())


def parse_key_set(document: bytes, algorithms: Sequence[str]) -> KeySet:
    try:
        data = orjson.loads(document)
    except orjson.JSONDecodeError as error:
        raise JwksError(f"not JSON: {error}") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise JwksError("no 'keys' list")
    by_kid: dict[str, dict[str, tuple[PyJWK, ...]]] = {}
    by_algorithm: dict[str, tuple[PyJWK, ...]] = {}
    for jwk in keys:
        for algorithm in fitting_algorithms(jwk, algorithms):
            try:
                key = PyJWK(jwk, algorithm=algorithm)
            except PyJWTError:
                continue  # malformed or unsupported: the other keys still count
            by_algorithm[algorithm] = (*by_algorithm.get(algorithm, ()), key)
            kid = jwk.get("kid")
            if isinstance(kid, str):
                of_kid = by_kid.setdefault(kid, {})
                of_kid[algorithm] = (*of_kid.get(algorithm, ()), key)
    if not by_algorithm:
        raise JwksError(f"no usable signing key for {', '.join(algorithms)} among {len(keys)} keys")
    return KeySet(by_kid, by_algorithm)


def fitting_algorithms(jwk: object, allowed: Sequence[str]) -> list[str]:
    """The allowed algorithms this JWK can verify: its family fits, and it names no other `alg`."""
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
        return []
    operations = jwk.get("key_ops")
    if operations is not None and (not isinstance(operations, list) or "verify" not in operations):
        return []
    named = jwk.get("alg")
    fitting = []
    for algorithm in allowed:
        kty, curves = KEY_FAMILIES[algorithm]
        if jwk.get("kty") != kty or (curves is not None and jwk.get("crv") not in curves):
            continue
        if named is None or named == algorithm:
            fitting.append(algorithm)
    return fitting


class JwksSource(Protocol):
    async def fetch(self) -> bytes: ...

    async def close(self) -> None: ...


class UrlSource:
    """GET the JWKS URL (http or https) with one pooled aiohttp session, a timeout and a size limit."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"auth.jwt.jwks_url must be an http:// or https:// URL, not {url!r}")
        self.url = url
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=FETCH_TIMEOUT, headers={"Accept": "application/json"})
        try:
            async with self._session.get(self.url) as response:
                if response.status != 200:
                    raise JwksError(f"{self.url} answered HTTP {response.status}")
                document = bytearray()
                async for chunk in response.content.iter_any():
                    document += chunk
                    if len(document) > MAX_DOCUMENT_BYTES:
                        raise JwksError(f"{self.url} sent more than {MAX_DOCUMENT_BYTES} bytes")
                return bytes(document)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise JwksError(f"{self.url}: {error!r}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class FileSource:
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    async def fetch(self) -> bytes:
        try:
            return await asyncio.to_thread(self.path.read_bytes)
        except OSError as error:
            raise JwksError(str(error)) from None

    async def close(self) -> None:
        pass


class JwksCache:
    """The current key set and the rules for when to fetch it again. `clock` is in seconds."""

    def __init__(
        self, config: JwtConfig, clock: Callable[[], float] = time.time, source: JwksSource | None = None
    ) -> None:
        if source is None:
            source = UrlSource(config.jwks_url) if config.jwks_url is not None else FileSource(config.jwks_file or "")
        self._source = source
        self._algorithms = config.algorithms
        self._ttl = config.jwks_cache_ttl
        self._refresh_interval = config.jwks_refresh_interval
        self._clock = clock
        self.current: KeySet | None = None
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf  # the last fetch of any kind
        self._kid_fetch_at = -math.inf  # the last fetch for an unknown kid
        self._fetching: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        if self.current is None:
            self._attempted_at = -math.inf  # the first token retries at once

    async def close(self) -> None:
        task, self._fetching = self._fetching, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._source.close()

    async def candidates(self, kid: str | None, algorithm: str) -> tuple[PyJWK, ...]:
        """The keys that may have signed a token with this header, fetching the set first if it must."""
        now = self._clock()
        keys = self.current
        if keys is None:
            if self._fetching is not None or now - self._attempted_at >= EMPTY_RETRY_INTERVAL:
                await self.refresh()
            return self.current.candidates(kid, algorithm) if self.current is not None else ()
        stale = now - self._fetched_at >= self._ttl
        if stale and self._fetching is None and now - self._attempted_at >= self._refresh_interval:
            self._start_fetch()  # rotation: this token is still checked against the set in hand
        found = keys.candidates(kid, algorithm)
        if found or kid is None or keys.knows(kid):
            return found
        if self._fetching is not None or now - self._kid_fetch_at >= self._refresh_interval:
            if self._fetching is None:
                self._kid_fetch_at = now
            await self.refresh()
            if self.current is not None:
                return self.current.candidates(kid, algorithm)
        return ()

    async def refresh(self) -> None:
        """Fetch the set now, or wait for the fetch already running."""
        task = self._fetching or self._start_fetch()
        await asyncio.shield(task)  # a caller that gives up must not cancel the fetch the others wait for

    async def settle(self) -> None:
        """Wait for a background fetch, if one is running."""
        if self._fetching is not None:
            await asyncio.shield(self._fetching)

    def _start_fetch(self) -> asyncio.Task[None]:
        self._attempted_at = self._clock()
        self._fetching = asyncio.get_running_loop().create_task(self._fetch())
        return self._fetching

    async def _fetch(self) -> None:
        try:
            keys = parse_key_set(await self._source.fetch(), self._algorithms)
        except JwksError as error:
            kept = "keeping the previous key set" if self.current is not None else "no key set yet"
            log.warning("JWKS fetch failed (%s): %s", kept, error)
            return
        finally:
            self._fetching = None
        self.current = keys
        self._fetched_at = self._clock()
        log.info("JWKS loaded: %d key ids", len(keys.by_kid))
