"""Authenticates API calls: deny by default, public routes are the only exception.

Admin routes (`/admin/*`) take only the admin credential (`auth.admin_key`), API routes only API keys;
with no admin key configured the admin routes answer 404.

Keys from config are kept only as SHA-256 digests. The presented bearer token is hashed and looked up
by digest, so the time a lookup takes depends on a hash of the key, never on how many leading
characters of a real key were guessed right; the final comparison uses `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from sluice.config import ApiKeyConfig
from sluice.context import Principal, RequestContext
from sluice.errors import NotFound, Unauthorized

CHALLENGE = (("www-authenticate", 'Bearer realm="sluice"'),)


ADMIN = Principal(name="admin", models=frozenset())


class AuthStage:
    def __init__(self, keys: Iterable[ApiKeyConfig], admin_key: str | None = None) -> None:
        self._admin = hashlib.sha256(admin_key.encode()).digest() if admin_key else None
        self._by_digest: dict[bytes, tuple[bytes, Principal]] = {}
        for key in keys:
            digest = hashlib.sha256(key.key.encode()).digest()
            models = frozenset(key.models) if key.models is not None else None
            self._by_digest[digest] = (digest, Principal(name=key.name, models=models))

    def check(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is not None and route.admin:
            ctx.principal = self.authenticate_admin(ctx.request.header(b"authorization"))
        elif route is None or not route.public:
            ctx.principal = self.authenticate(ctx.request.header(b"authorization"))

    def authenticate_admin(self, header: bytes | None) -> Principal:
        if self._admin is None:
            raise NotFound("The admin API is off: set auth.admin_key to enable it.")
        digest = hashlib.sha256(_bearer(header)).digest()
        if not hmac.compare_digest(self._admin, digest):
            raise Unauthorized("Invalid admin key.", headers=CHALLENGE)
        return ADMIN

    def authenticate(self, header: bytes | None) -> Principal:
        digest = hashlib.sha256(_bearer(header)).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            raise Unauthorized("Invalid API key.", headers=CHALLENGE)
        return found[1]


def _bearer(header: bytes | None) -> bytes:
    if header is None or len(header) < 8 or header[:7].lower() != b"bearer ":
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.", headers=CHALLENGE)
    return header[7:].strip()
