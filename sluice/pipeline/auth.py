"""Authenticates API calls: deny by default, public routes are the only exception.

A bearer credential is, in this order: a static key from the config (kept only as SHA-256 digests and
looked up by digest, so timing depends on a hash of the key, never on how many leading characters of a
real key were guessed; the final comparison is `hmac.compare_digest`), a managed `sk-sluice-…` key from
the key store (keyed hash, cached; sluice/identity/managed.py), or a JWT from the configured OIDC provider
(sluice/identity/jwt.py). Static keys and cached managed keys cost no coroutine; a cache miss or a JWT
waits once. Unknown, revoked and expired keys all get the same 401, which reveals nothing.

Admin routes (`/admin/*`) take only the admin credential (`auth.admin_key`), API routes only API keys;
with no admin key configured the admin routes answer 404.

A console session (sluice/console/session.py) stands for the admin credential on admin routes and for a
caller on API routes (principal kind "console": every model, no limits of its own), but only on requests
without an `Authorization` header that carry `X-Sluice-Console: 1`, which a cross-site form cannot send.
The cookie is only looked at when there is no bearer credential, so API calls pay nothing for it. A
logged-out session is refused (sluice/console/logouts.py; a Redis lookup when logouts are shared). On the
admin listener (`server.admin_port`), API routes take console sessions only: it routes the playground's
calls for the console, and API keys belong on the API listener.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable

from sluice.config import AuthConfig
from sluice.console.logouts import Logouts
from sluice.console.session import CONSOLE_HEADER, ConsoleSessions, Session, session_cookie
from sluice.context import Limits, Principal, RequestContext
from sluice.errors import NotFound, Unauthorized
from sluice.identity.jwt import InvalidToken, JwtVerifier, looks_like_jwt
from sluice.identity.managed import KeyRejected, ManagedKeys
from sluice.metrics import GatewayMetrics

log = logging.getLogger("sluice.auth")
CHALLENGE = (("www-authenticate", 'Bearer realm="sluice"'),)
ADMIN = Principal(name="admin", models=frozenset(), subject="admin", kind="admin")
CONSOLE = Principal(name="console", models=None, subject="console", kind="console")
MANAGED_PREFIX = b"sk-sluice-"


class AuthStage:
    def __init__(
        self,
        config: AuthConfig,
        metrics: GatewayMetrics,
        managed: ManagedKeys | None = None,
        jwt: JwtVerifier | None = None,
        sessions: ConsoleSessions | None = None,
        logouts: Logouts | None = None,
        console_only: bool = False,
    ) -> None:
        """`sessions`: console sessions, accepted as credentials while the console is on, unless `logouts`
        has them. `console_only`: API routes take console sessions and nothing else (the admin listener,
        which routes the playground's calls only for the console)."""
        self._admin = hashlib.sha256(config.admin_key.encode()).digest() if config.admin_key else None
        self._sessions = sessions
        self._logouts = logouts
        self._console_only = console_only
        self._metrics = metrics
        self._managed = managed
        self._jwt = jwt
        self._by_digest: dict[bytes, tuple[bytes, Principal]] = {}
        for key in config.api_keys:
            digest = hashlib.sha256(key.key.encode()).digest()
            principal = Principal(
                name=key.name,
                models=frozenset(key.models) if key.models is not None else None,
                subject=f"static:{key.name}",
                kind="static",
                tenant=key.tenant,
                limits=Limits(key.requests_per_minute, key.tokens_per_minute, key.max_concurrency),
                log_bodies=key.log_bodies,
                cache=key.cache,
            )
            self._by_digest[digest] = (digest, principal)

    def check(self, ctx: RequestContext) -> Awaitable[None] | None:
        route = ctx.route
        if route is not None and route.admin:
            header = ctx.request.header(b"authorization")
            if header is None and self._console_request(ctx):
                return self._console_session(ctx)
            ctx.principal = self.authenticate_admin(header)
            return None
        if route is not None and route.public:
            return None
        header = ctx.request.header(b"authorization")
        if header is None and self._console_request(ctx):
            return self._console_session(ctx)
        if self._console_only:
            raise NotFound(
                f"{ctx.request.path[:200]} is served on the API listener (server.port); this one (server.admin_port)"
                " serves the admin API and the console."
            )
        token = self._bearer(header)
        digest = hashlib.sha256(token).digest()
        found = self._by_digest.get(digest)
        if found is not None and hmac.compare_digest(found[0], digest):
            ctx.principal = found[1]
            return None
        if self._managed is not None and token.startswith(MANAGED_PREFIX):
            try:
                principal = self._managed.cached(token)
            except KeyRejected as rejected:
                raise self._refuse(rejected.reason) from None
            if principal is not None:
                ctx.principal = principal
                return None
            return self._look_up(ctx, self._managed, token)
        if self._jwt is not None:
            principal = self._jwt.cached(token.decode("latin-1"))  # a token verified a moment ago
            if principal is not None:
                ctx.principal = principal
                return None
            if looks_like_jwt(token):
                return self._verify(ctx, self._jwt, token)
        raise self._refuse("unknown")

    async def _look_up(self, ctx: RequestContext, managed: ManagedKeys, token: bytes) -> None:
        try:
            ctx.principal = await managed.resolve(token)
        except KeyRejected as rejected:
            raise self._refuse(rejected.reason) from None

    async def _verify(self, ctx: RequestContext, verifier: JwtVerifier, token: bytes) -> None:
        try:
            ctx.principal = await verifier.verify(token.decode("latin-1"))
        except InvalidToken as invalid:
            log.info("bearer token refused", extra={"request_id": ctx.request_id, "reason": invalid.reason})
            self._metrics.auth_failures.child("jwt").inc()
            raise

    def _console_request(self, ctx: RequestContext) -> bool:
        """Whether this is a request from the console's page (its session is then its only credential)."""
        return self._sessions is not None and ctx.request.header(CONSOLE_HEADER) == b"1"

    def _console_session(self, ctx: RequestContext) -> Awaitable[None] | None:
        """Admit the console's request if its session is valid and not logged out (401 otherwise)."""
        token = session_cookie(ctx.request.header(b"cookie"))
        assert self._sessions is not None
        session = self._sessions.verify(token) if token is not None else None
        if session is None:
            raise self._refuse("console_session")
        logouts = self._logouts
        if logouts is not None and logouts.ended_here(session):
            raise self._refuse("console_logged_out")
        if logouts is not None and logouts.shared:
            return self._not_logged_out_elsewhere(ctx, logouts, session)
        ctx.principal = CONSOLE
        return None

    async def _not_logged_out_elsewhere(self, ctx: RequestContext, logouts: Logouts, session: Session) -> None:
        if await logouts.ended(session):
            raise self._refuse("console_logged_out")
        ctx.principal = CONSOLE

    def _refuse(self, reason: str) -> Unauthorized:
        self._metrics.auth_failures.child(reason).inc()
        return Unauthorized("Invalid API key.", headers=CHALLENGE)

    def authenticate_admin(self, header: bytes | None) -> Principal:
        if self._admin is None:
            raise NotFound("The admin API is off: set auth.admin_key to enable it.")
        digest = hashlib.sha256(self._bearer(header)).digest()
        if not hmac.compare_digest(self._admin, digest):
            raise self._refuse("admin")
        return ADMIN

    def _bearer(self, header: bytes | None) -> bytes:
        if header is None or len(header) < 8 or header[:7].lower() != b"bearer ":
            self._metrics.auth_failures.child("missing").inc()
            raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.", headers=CHALLENGE)
        return header[7:].strip()
