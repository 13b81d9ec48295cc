"""Authenticates API calls: deny by default, public routes are the only exception.

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
from sluice.errors import Unauthorized

CHALLENGE = (("www-authenticate", 'Bearer realm="sluice"'),)


class AuthStage:
    def __init__(self, keys: Iterable[ApiKeyConfig]) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Principal]] = {}
        for key in keys:
            digest = hashlib.sha256(key.key.encode()).digest()
            models = frozenset(key.models) if key.models is not None else None
            self._by_digest[digest] = (digest, Principal(name=key.name, models=models))

    def check(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is None or not route.public:
            ctx.principal = self.authenticate(ctx.request.header(b"authorization"))

    def authenticate(self, header: bytes | None) -> Principal:
        if header is None or len(header) < 8 or header[:7].lower() != b"bearer ":
            raise Unauthorized(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", headers=CHALLENGE
            )
        digest = hashlib.sha256(header[7:].strip()).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            raise Unauthorized("Invalid API key.", headers=CHALLENGE)
        return found[1]
