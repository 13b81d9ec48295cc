"""Matches the request to a route: unknown paths get 404, wrong methods 405 with `Allow`.

Routes are exact paths, plus prefixes for paths that carry an id (`/admin/keys/<id>/revoke`).
"""

from __future__ import annotations

from collections.abc import Mapping

from sluice.context import RequestContext, Route
from sluice.errors import MethodNotAllowed, NotFound


class IngressStage:
    def __init__(self, routes: Mapping[str, Route], prefixes: Mapping[str, Route] | None = None) -> None:
        self._routes = dict(routes)
        self._prefixes = tuple((prefix, route) for prefix, route in (prefixes or {}).items())

    def check(self, ctx: RequestContext) -> None:
        request = ctx.request
        route = self._routes.get(request.path)
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
