"""The console's public routes: the HTML shell, its static files, login and logout.

    GET  /console                 the page (sluice/console/static/console.html; no data in it)
    GET  /console/static/<name>   its scripts, styles and images (names: ^[a-z0-9_-]+\\.(js|css|html|svg)$)
    POST /console/login           form field `admin_key` → 303 to /console with the session cookie, or
                                  303 to /console#login-failed without one
    POST /console/logout          303 to /console, the cookie cleared and its session ended everywhere
                                  (sluice/console/logouts.py)

With the console off (`console.enabled: false`) or no `auth.admin_key`, all of them answer 404.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from urllib.parse import parse_qs

from sluice.console.logouts import Logouts
from sluice.console.session import CLEARED_COOKIE, ConsoleSessions, session_cookie
from sluice.context import RequestContext
from sluice.errors import NotFound
from sluice.metrics import GatewayMetrics

log = logging.getLogger("sluice.console")
STATIC = Path(__file__).parent / "static"
STATIC_PREFIX = "/console/static/"
STATIC_NAME = re.compile(r"[a-z0-9_-]+\.(js|css|html|svg)")
CONTENT_TYPES = {
    "js": b"text/javascript; charset=utf-8",
    "css": b"text/css; charset=utf-8",
    "html": b"text/html; charset=utf-8",
    "svg": b"image/svg+xml",
}
PLAIN = b"text/plain; charset=utf-8"
# The page loads only its own files (no inline script or style: injected markup could not run), talks only to
# this origin, may not be framed (clickjacking) nor send forms or load plug-ins elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; object-src 'none'; form-action 'self'"
)
PAGE_HEADERS = (
    ("cache-control", "no-cache"),
    ("content-security-policy", CSP),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
)
NO_STORE = ("cache-control", "no-store")
PLACEHOLDER = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sluice console</title></head>
<body><h1>Sluice console</h1>
<form method="post" action="/console/login">
<label>Admin key <input type="password" name="admin_key" autocomplete="current-password" required></label>
<button type="submit">Log in</button>
</form></body></html>
"""


def console_off() -> NotFound:
    return NotFound("The console is off: set auth.admin_key (and keep console.enabled) to use it.")


class ConsolePages:
    def __init__(
        self,
        sessions: ConsoleSessions | None,
        metrics: GatewayMetrics,
        logouts: Logouts | None = None,
        static: Path | None = None,
    ) -> None:
        """`sessions`: None while the console is off (no admin key, or `console.enabled: false`); `logouts`:
        where a logout is recorded; `static`: the files' folder (default: the package's)."""
        self._sessions = sessions
        self._logouts = logouts
        self._metrics = metrics
        self._static = static or STATIC

    async def shell(self, ctx: RequestContext) -> None:
        self._on()
        try:
            page = await asyncio.to_thread((self._static / "console.html").read_bytes)
        except FileNotFoundError:
            page = PLACEHOLDER
        ctx.writer.send(200, page, content_type=CONTENT_TYPES["html"], headers=PAGE_HEADERS)

    async def static(self, ctx: RequestContext) -> None:
        self._on()
        name = ctx.request.path[len(STATIC_PREFIX) :]
        matched = STATIC_NAME.fullmatch(name)
        if matched is None:
            raise NotFound(f"No console file {name[:100]!r}.")
        try:
            body = await asyncio.to_thread((self._static / name).read_bytes)
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"No console file {name!r}.") from None
        ctx.writer.send(200, body, content_type=CONTENT_TYPES[matched.group(1)], headers=PAGE_HEADERS)

    async def login(self, ctx: RequestContext) -> None:
        sessions = self._on()
        if sessions.accepts_key(_form_field(ctx.request.body, "admin_key")):
            cookie = sessions.cookie(sessions.issue())
            log.info("console login", extra={"request_id": ctx.request_id, "client_ip": ctx.client_ip})
            _redirect(ctx, "/console", ("set-cookie", cookie))
            return
        self._metrics.auth_failures.child("console_login").inc()
        log.warning("console login refused", extra={"request_id": ctx.request_id, "client_ip": ctx.client_ip})
        _redirect(ctx, "/console#login-failed")

    async def logout(self, ctx: RequestContext) -> None:
        """Clear the cookie, and end its session everywhere (sluice/console/logouts.py)."""
        sessions = self._on()
        token = session_cookie(ctx.request.header(b"cookie"))
        session = sessions.verify(token) if token is not None else None
        if session is not None and self._logouts is not None:
            await self._logouts.record(session)
            log.info("console logout", extra={"request_id": ctx.request_id, "client_ip": ctx.client_ip})
        _redirect(ctx, "/console", ("set-cookie", CLEARED_COOKIE))

    def _on(self) -> ConsoleSessions:
        if self._sessions is None:
            raise console_off()
        return self._sessions


def _redirect(ctx: RequestContext, location: str, *headers: tuple[str, str]) -> None:
    ctx.writer.send(303, b"", content_type=PLAIN, headers=(("location", location), NO_STORE, *headers))


def _form_field(body: bytes, name: str) -> bytes:
    """One field of an `application/x-www-form-urlencoded` body (empty when absent or unreadable)."""
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=8, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return b""
    values = fields.get(name)
    return values[0].encode() if values else b""
