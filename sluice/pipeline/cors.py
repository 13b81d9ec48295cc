"""Cross-origin access for browsers (CORS): preflights answered and answers marked, for listed origins only.

In the chain only when `cors.allow_origins` is set, so with CORS off no request pays for it and no answer
carries an `Access-Control-*` header. It runs before routing, so every answer to a listed origin — errors,
404s, streams, cache hits — carries `Access-Control-Allow-Origin` (with `Vary: Origin`). A preflight
(`OPTIONS` with `Access-Control-Request-Method`) from a listed origin for a known path gets 204 with the
allowed methods and headers, without a credential: browsers send none with it. Other origins get no CORS
headers; their preflight goes on to routing and gets the 405 of any OPTIONS request, which a browser takes
as a refusal.
"""

from __future__ import annotations

from collections.abc import Callable

from sluice.config import CorsConfig
from sluice.context import Handler, RequestContext, Route

Header = tuple[str, str]


class CorsStage:
    def __init__(self, config: CorsConfig, route_for: Callable[[str], Route | None]) -> None:
        self._route_for = route_for
        self._any_origin = "*" in config.allow_origins
        self._reflect_headers = "*" in config.allow_headers
        self._allow_headers = ", ".join(config.allow_headers)
        self._max_age = str(config.max_age)
        credentials = b"access-control-allow-credentials: true\r\n" if config.allow_credentials else b""
        exposed = ", ".join(config.expose_headers).encode()
        expose = b"access-control-expose-headers: " + exposed + b"\r\n" if exposed else b""
        # The header lines added to every answer, by origin, built once.
        self._marks: dict[bytes, bytes] = {}
        for origin in config.allow_origins:
            if origin != "*":
                allow = b"access-control-allow-origin: " + origin.encode() + b"\r\nvary: origin\r\n"
                self._marks[origin.encode()] = allow + credentials + expose
        self._any_mark = b"access-control-allow-origin: *\r\n" + expose
        self._credentials = config.allow_credentials

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> None:
        request = ctx.request
        origin = request.header(b"origin")
        if origin is not None:
            mark = self._marks.get(origin)
            if mark is None and self._any_origin:
                mark = self._any_mark
            if mark is not None:
                if request.method == "OPTIONS" and request.header(b"access-control-request-method") is not None:
                    route = self._route_for(request.path)
                    if route is not None:
                        self._preflight(ctx, origin, route)
                        return
                ctx.writer.extra += mark
        await call_next(ctx)

    def _preflight(self, ctx: RequestContext, origin: bytes, route: Route) -> None:
        listed = origin in self._marks
        headers: list[Header] = [
            ("access-control-allow-origin", origin.decode("latin-1") if listed else "*"),
            ("access-control-allow-methods", ", ".join(route.methods)),
            ("access-control-max-age", self._max_age),
            ("vary", "origin, access-control-request-method, access-control-request-headers"),
        ]
        asked = ctx.request.header(b"access-control-request-headers")
        if self._reflect_headers:
            allowed = asked.decode("latin-1") if asked is not None else ""
        else:
            allowed = self._allow_headers
        if allowed:
            headers.append(("access-control-allow-headers", allowed))
        if self._credentials:
            headers.append(("access-control-allow-credentials", "true"))
        ctx.writer.send(204, b"", headers=headers)
