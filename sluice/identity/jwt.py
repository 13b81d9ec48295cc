"""JWT bearer tokens from an OIDC provider: verify them with PyJWT and map their claims to a Principal.

A token must be signed with an allowed algorithm (never `none`, never HS*) by a key of the provider's
JWKS, and carry `exp`, `iss` and `aud`; `nbf` and `iat` are checked when present, all with `leeway`.
A token with a `kid` is checked against that key only; one without is tried against every key of a
fitting type (providers with a single key often omit it). A missing `required_scope` is a 401 like any
other rejection: the client learns only "Invalid bearer token.", the reason goes to `InvalidToken.reason`.

Verified tokens are remembered in a bounded LRU keyed by their SHA-256 (never the token itself) until
they expire, and for at most CACHE_SECONDS, so a key retired by the provider stops working within that
time. Failures are never remembered. The clock (for the cache only; PyJWT reads the wall clock for
`exp`/`nbf`) must count seconds since the epoch, like `time.time`.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable

import jwt
import orjson
from jwt import PyJWK, PyJWTError
from jwt.exceptions import InvalidSignatureError
from jwt.types import Options

from sluice.config import JwtConfig
from sluice.context import Limits, Principal
from sluice.errors import Unauthorized
from sluice.identity.jwks import JwksCache

CACHE_ENTRIES = 10_000
CACHE_SECONDS = 60.0
CHALLENGE = (("www-authenticate", 'Bearer realm="sluice", error="invalid_token"'),)
JWT_SHAPE = re.compile(rb"([A-Za-z0-9_-]{2,8192})\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class InvalidToken(Unauthorized):
    """A rejected bearer token; `reason` says why, for logs only."""

    def __init__(self, reason: str) -> None:
        super().__init__("Invalid bearer token.", headers=CHALLENGE)
        self.reason = reason


def looks_like_jwt(token: bytes) -> bool:
    """Three base64url segments whose first decodes to a JSON object: cheap enough for every request."""
    return unverified_header(token) is not None


def unverified_header(token: bytes) -> dict[str, object] | None:
    """The JOSE header, only to pick keys (PyJWT parses and checks it again). Cheaper than PyJWT's parser."""
    shape = JWT_SHAPE.fullmatch(token)
    if shape is None:
        return None
    header = shape.group(1)
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(header + b"=" * (-len(header) % 4)))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        return None
    return decoded if isinstance(decoded, dict) else None


class JwtVerifier:
    def __init__(self, config: JwtConfig, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self.keys = JwksCache(config, clock)
        self._algorithms = list(config.algorithms)
        self._audience = list(config.audience)
        self._options: Options = {
            "require": ["exp", "iss", "aud"],
            "verify_signature": True,
            "verify_exp": True,
            "verify_nbf": True,
            "verify_iat": True,
            "verify_iss": True,
            "verify_aud": True,
            "enforce_minimum_key_length": True,
        }
        self._limits = Limits(**config.limits.model_dump())
        self._verified: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()

    async def start(self) -> None:
        await self.keys.start()

    async def close(self) -> None:
        await self.keys.close()
        self._verified.clear()

    def cached(self, token: str) -> Principal | None:
        """The Principal of a recently verified, unexpired token, without a coroutine or any crypto."""
        return self._recall(hashlib.sha256(token.encode()).digest())

    async def verify(self, token: str) -> Principal:
        raw = token.encode()
        digest = hashlib.sha256(raw).digest()
        principal = self._recall(digest)
        if principal is not None:
            return principal
        claims = self._decode(token, await self._keys_for(raw))
        principal = self._principal(claims)
        expires = claims["exp"]  # PyJWT checked it is an integer; one written as a string is not cached
        self._remember(digest, principal, float(expires) if isinstance(expires, int | float) else 0.0)
        return principal

    async def _keys_for(self, token: bytes) -> tuple[PyJWK, ...]:
        header = unverified_header(token)
        if header is None:
            raise InvalidToken("malformed: not three base64url segments with a JSON header")
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise InvalidToken(f"algorithm {str(algorithm)[:20]!r} is not allowed")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("kid is not a string")
        keys = await self.keys.candidates(kid, algorithm)
        if keys:
            return keys
        current = self.keys.current
        if current is None:
            raise InvalidToken("no key set: the JWKS could not be fetched")
        if kid is not None and not current.knows(kid):
            raise InvalidToken(f"unknown kid {kid[:64]!r}")
        raise InvalidToken(f"no {algorithm} key" + (f" with kid {kid[:64]!r}" if kid is not None else ""))

    def _decode(self, token: str, keys: tuple[PyJWK, ...]) -> dict[str, object]:
        failure = "no key"
        for key in keys:
            try:
                return self._decode_with(token, key)
            except InvalidSignatureError as error:
                failure = str(error)  # several keys share the kid, or the token has none: another may fit
            except PyJWTError as error:
                raise InvalidToken(str(error)) from None
        raise InvalidToken(failure)

    def _decode_with(self, token: str, key: PyJWK) -> dict[str, object]:
        claims: dict[str, object] = jwt.decode(
            token,
            key,
            algorithms=self._algorithms,
            audience=self._audience,
            issuer=self._config.issuer,
            leeway=self._config.leeway,
            options=self._options,
        )
        return claims

    def _principal(self, claims: dict[str, object]) -> Principal:
        config = self._config
        user = claims.get(config.user_claim)
        if not isinstance(user, str) or not user:
            raise InvalidToken(f"claim {config.user_claim!r} is missing or not a string")
        tenant = claims.get(config.tenant_claim)
        if tenant is not None and not isinstance(tenant, str):
            raise InvalidToken(f"claim {config.tenant_claim!r} is not a string")
        scopes = _names(claims, config.scopes_claim)
        if config.required_scope is not None and config.required_scope not in scopes:
            raise InvalidToken(f"missing scope {config.required_scope!r}")
        return Principal(
            name=f"jwt:{user}",
            # deny by default: with a models claim configured, a token without it may use no model
            models=_names(claims, config.models_claim) if config.models_claim is not None else None,
            subject=f"jwt:{config.issuer}:{user}",
            kind="jwt",
            tenant=tenant,
            user=user,
            scopes=scopes,
            limits=self._limits,
        )

    def _recall(self, digest: bytes) -> Principal | None:
        entry = self._verified.get(digest)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            del self._verified[digest]
            return None
        self._verified.move_to_end(digest)
        return entry[1]

    def _remember(self, digest: bytes, principal: Principal, expires: float) -> None:
        now = self._clock()
        until = min(expires, now + CACHE_SECONDS)
        if until <= now:
            return
        self._verified[digest] = (until, principal)
        if len(self._verified) > CACHE_ENTRIES:
            self._verified.popitem(last=False)


def _names(claims: dict[str, object], claim: str) -> frozenset[str]:
    """A claim holding names: a space-separated string (OAuth2 `scope`) or a list of strings."""
    value = claims.get(claim)
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    raise InvalidToken(f"claim {claim!r} is neither a string nor a list of strings")
