"""Matches the request to a route: unknown paths get 404, wrong methods 405 with `Allow`.

Routes are exact paths, plus prefixes for paths that carry an id (`/admin/keys/<id>/revoke`). With a
separate admin listener each listener's ingress knows only its own routes, so the other's answer 404 —
except the console's playground calls (`CONSOLE_CALLS`), which the admin listener also routes, for
console sessions only (sluice/pipeline/auth.py), so the console works where it is served.
"""

from __future__ import annotations

from collections.abc import Mapping

from sluice.context import RequestContext, Route
from sluice.errors import MethodNotAllowed, NotFound

CONSOLE_CALLS = frozenset({"chat"})  # API routes the console's playground calls, on the admin listener too


class IngressStage:
    def __init__(
        self, routes: Mapping[str, Route], prefixes: Mapping[str, Route] | None = None, admin: bool | None = None
    ) -> None:
        """`admin`: None serves every route; True only the admin routes, the console's pages and its
        playground's calls, False all but the first two (for a gateway whose admin API has a listener of
        its own, `server.admin_port`)."""
        self.admin = admin

        def served(route: Route) -> bool:
            return admin is None or route.on_admin_listener == admin or (admin and route.name in CONSOLE_CALLS)

        self._routes = {path: route for path, route in routes.items() if served(route)}
        self._prefixes = tuple((prefix, route) for prefix, route in (prefixes or {}).items() if served(route))

    def route_for(self, path: str) -> Route | None:
        """The route serving `path`, whatever the method (CORS preflights ask before they send)."""
        route = self._routes.get(path)
        if route is None:
            route = next((r for prefix, r in self._prefixes if path.startswith(prefix)), None)
        return route

    def check(self, ctx: RequestContext) -> None:
        request = ctx.request
        route = self._routes.get(request.path)  # `route_for` inlined: this runs on every request
        if route is None:
            route = next((r for prefix, r in self._prefixes if request.path.startswith(prefix)), None)
        if route is None:
            raise NotFound(f"Unknown path {request.path[:200]}; the API lives under /v1 (see /v1/models).")
        if request.method not in route.methods:
            allowed = ", ".join(route.methods)
            raise MethodNotAllowed(
                f"{request.method} is not allowed on {request.path}; use {allowed}.", headers=(("allow", allowed),)
            )
        ctx.route = route
