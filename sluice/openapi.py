"""The OpenAPI 3.1 description of the gateway's own API, served at `GET /openapi.json`.

Paths and their security follow the route table (`routes.py`; tests/component/test_openapi.py keeps the
two in step); the bodies' schemas are in `openapi_schemas.py`. Every error is OpenAI's error body, and
the statuses listed are those the gateway can answer with on that route. The document is built and
serialised once, when the gateway starts.
"""

from __future__ import annotations

from typing import Any

import orjson

from sluice import __version__
from sluice.context import RequestContext, Route
from sluice.openapi_schemas import (
    BOOLEAN,
    INTEGER,
    NUMBER,
    SCHEMAS,
    STRING,
    Schema,
    body_schemas,
    json_object,
    nullable,
    ref,
    sse_event,
)
from sluice.routes import PATHS, PREFIXES

JSON = "application/json"
DESCRIPTION = (
    "An OpenAI-compatible gateway in front of vLLM. Every response carries `X-Request-Id`; every error is "
    "OpenAI's error body. With `server.admin_port` set, `/admin/*` is served on that listener only (404 on the "
    "API's). With `cors.allow_origins` set, `OPTIONS` preflights from listed origins get 204 without a credential. "
    "The operator console (`/console`, on the admin listener when there is one) logs in with the admin key and "
    "keeps a session cookie, `sluice_console`, which stands for the admin credential on admin routes and for a "
    "caller on API routes when a request has no `Authorization` header and carries `X-Sluice-Console: 1`."
)
ERRORS = {
    400: "The request is malformed: bad HTTP, JSON that does not parse or nests over 254 levels, a field of the "
    "wrong type or value (`param` names it), a media URL the policy refuses. Also a backend's own 400, relayed.",
    401: "Missing or invalid credential (`WWW-Authenticate: Bearer`). Unknown, revoked and expired keys all "
    "get this same answer.",
    403: "The API key may not use this model (its model allow-list).",
    404: "Not found: an unknown model (`code: model_not_found`), key or path, or a feature that is off (the "
    "admin API without `auth.admin_key`, the cache, repair, managed keys).",
    405: "The method is not allowed here; `Allow` lists those that are.",
    408: "The client sent the request line, headers or body too slowly.",
    409: "Conflict with the stored state: a key name in use, rotating a revoked key, or draining the last healthy "
    "backend of a model.",
    413: "The body exceeds `limits.max_body_bytes`.",
    415: "The body is not JSON.",
    429: "A rate limit refused the request; `Retry-After` says when to try again.",
    431: "The request line and headers exceed `limits.max_header_bytes`.",
    500: "The gateway failed unexpectedly; the message names the request id, the traceback is in its log.",
    502: "The backend failed (a 5xx, a reset, a malformed answer) and no retry could help.",
    503: "Temporarily unavailable: no healthy backend, the queue is full, the audit log has no room, a store "
    "(rate limiter, cache, database) is unreachable, or the gateway is draining. `Retry-After` may say when.",
    504: "The backend did not answer in time.",
}
PROTOCOL = (400, 408, 413, 431, 500)  # any request can be refused this way by the HTTP server
PROXIED_ERRORS = (*PROTOCOL, 401, 403, 404, 415, 429, 502, 503, 504)
ADMIN_ERRORS = (*PROTOCOL, 401, 404)


def _json(schema: Schema, description: str = "OK", headers: tuple[str, ...] = ()) -> Schema:
    answer: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    answer["headers"] = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
    for name in headers:
        answer["headers"][name] = {"$ref": f"#/components/headers/{name}"}
    return answer


def _operation(summary: str, responses: Schema, errors: tuple[int, ...], **more: Any) -> Schema:
    described = {**responses, **{str(code): {"$ref": f"#/components/responses/{code}"} for code in errors}}
    return {"summary": summary, **more, "responses": dict(sorted(described.items()))}


def _body(name: str, description: str = "") -> Schema:
    return {"required": True, "description": description, "content": {JSON: {"schema": ref(name)}}}


def _proxied(summary: str, request: str, answer: str, chunk: str | None) -> Schema:
    ok = _json(ref(answer), headers=("X-Sluice-Model", "X-Sluice-Cache", "X-Sluice-Backend"))
    if chunk is not None:
        ok["description"] = (
            "The answer; with `stream: true` server-sent events (the schema describes one), each `data:` a chunk, "
            "then `data: [DONE]`. A failure after the stream started arrives as an event holding an error body."
        )
        ok["content"]["text/event-stream"] = {"schema": sse_event(chunk)}
    return _operation(summary, {"200": ok}, PROXIED_ERRORS, requestBody=_body(request))


def _query(name: str, description: str, schema: Schema = STRING) -> Schema:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _path(name: str, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "minLength": 1}}  # fmt: skip


KEY_PARAMETER = _path("key", "The key's id (`k_…`) or name.")
CONFLICT = (*ADMIN_ERRORS, 409)
BACKEND_PARAMETER = _path("backend", "The backend's name (`backends[].name`, or a discovered pod's).")
DRAIN_STATE = {
    "200": _json(
        json_object(
            {"name": STRING, "drained": BOOLEAN, "drained_by": {"type": "array", "items": STRING}},
            ("name", "drained", "drained_by"),
        )
    )
}
CONSOLE_ERRORS = (*PROTOCOL, 404)  # 404: the console is off (no admin key, or console.enabled: false)
HTML = "text/html"


def _see_other(description: str) -> Schema:
    """A 303 to the console page (login and logout answer a form with one)."""
    return {
        "description": description,
        "headers": {
            "X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"},
            "Location": {"schema": STRING, "description": "`/console`, or `/console#login-failed`."},
            "Set-Cookie": {
                "schema": STRING,
                "description": "`sluice_console=<session>; Path=/; HttpOnly; Secure; SameSite=Strict; "
                "Max-Age=<console.session_ttl>` (cleared with `Max-Age=0` on logout; absent after a failed login).",
            },
        },
    }


TRAFFIC_POINT = json_object(
    {
        "t": NUMBER,
        "rps": NUMBER,
        "errors_per_s": NUMBER,
        "rate_limited_per_s": NUMBER,
        "cache_hit_rate": nullable(NUMBER),
        "models": {
            "type": "object",
            "additionalProperties": json_object(
                {
                    "rps": NUMBER,
                    **{
                        name: nullable(NUMBER)
                        for name in ("ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms")
                    },
                }
            ),
        },
    }
)
CONSOLE_BACKEND = json_object(
    {
        "name": STRING,
        "url": STRING,
        "healthy": BOOLEAN,
        "drained": BOOLEAN,
        "drained_by": {"type": "array", "items": STRING},
        "circuit": {"enum": ["closed", "open", "half_open", "disabled"]},
        "model_circuits": {"type": "object", "additionalProperties": {"enum": ["closed", "open", "half_open"]}},
        "in_flight": INTEGER,
        "running": nullable(NUMBER),
        "waiting": nullable(NUMBER),
        "kv_cache_usage": nullable(NUMBER),
        "models": {"type": "array", "items": STRING},
        "adapters": {"type": "array", "items": STRING},
        "last_error": STRING,
    }
)
CONSOLE_STATE = json_object(
    {
        "refresh_seconds": NUMBER,
        "server_time": NUMBER,
        "version": STRING,
        "backends": {"type": "array", "items": CONSOLE_BACKEND},
        "models": {"type": "array", "items": STRING},
        "rag_routes": {"type": "array", "items": STRING},
        "traffic": json_object({"interval": NUMBER, "points": {"type": "array", "items": TRAFFIC_POINT}}),
    },
    ("refresh_seconds", "server_time", "version", "backends", "models", "rag_routes", "traffic"),
)


USAGE_REPORT = {
    "200": _json(
        json_object({"object": {"const": "list"}, "since": STRING, "until": STRING, "data": {"type": "array"}})
    )
}
USAGE_WINDOW = [
    _query("model", "A model name."),
    _query("since", "Start: 30m, 24h, 7d, 2w, a date or a time (default 24h)."),
    _query("until", "End, in the same forms (default now)."),
    _query(
        "daily", "`1` or `true`: rows per UTC day from the daily roll-up.", {"enum": ["1", "true", "0", "false", ""]}
    ),
]


def _operations() -> dict[str, dict[str, Schema]]:
    """Every path and method, as documented; security is added from the route table."""
    record = {"200": _json(ref("KeyRecord"))}
    created = {"200": _json(ref("NewKeyCreated"))}
    return {
        "/v1/chat/completions": {
            "post": _proxied(
                "Chat completion (OpenAI-compatible)", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
            )
        },
        "/v1/completions": {"post": _proxied("Text completion", "CompletionRequest", "Completion", "Completion")},
        "/v1/embeddings": {"post": _proxied("Embeddings", "EmbeddingRequest", "EmbeddingList", None)},
        "/v1/models": {
            "get": _operation(
                "Models served now (healthy backends), limited to the key's allow-list",
                {"200": _json(ref("ModelList"))},
                (*PROTOCOL, 401),
            )
        },
        "/health": {"get": _operation("Liveness", {"200": _json(json_object({"status": {"const": "ok"}}))}, PROTOCOL)},
        "/ready": {
            "get": _operation(
                "Readiness: 503 while no backend is healthy or the gateway is draining",
                {"200": _json(json_object({"status": {"const": "ready"}, "healthy_backends": {"type": "array"}}))},
                (*PROTOCOL, 503),
            )
        },
        "/version": {
            "get": _operation(
                "Name and version", {"200": _json(json_object({"name": STRING, "version": STRING}))}, PROTOCOL
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics (text exposition format 0.0.4)",
                {"200": {"description": "OK", "content": {"text/plain": {"schema": STRING}}}},
                PROTOCOL,
            )
        },
        "/openapi.json": {
            "get": _operation("This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")}, PROTOCOL)
        },
        "/admin/reload": {
            "post": _operation(
                "Re-read the configuration file and apply its live sections (400 `invalid_config` if it cannot be)",
                {"200": _json(json_object({"status": STRING, "backends": {"type": "object"}, "pid": INTEGER}))},
                ADMIN_ERRORS,
            )
        },
        "/admin/keys": {
            "get": _operation(
                "List managed keys",
                {
                    "200": _json(
                        json_object({"object": {"const": "list"}, "data": {"type": "array", "items": ref("KeyRecord")}})
                    )
                },
                ADMIN_ERRORS,
                parameters=[_query("all", "`1`: include revoked keys.")],
            ),
            "post": _operation(
                "Create a managed key; the answer holds the key, shown this once",
                {"201": _json(ref("NewKeyCreated"), "Created")},
                CONFLICT,
                requestBody=_body("NewKey"),
            ),
        },
        "/admin/keys/{key}": {
            "get": _operation("One managed key's record", record, ADMIN_ERRORS, parameters=[KEY_PARAMETER])
        },
        "/admin/keys/{key}/revoke": {
            "post": _operation("Revoke a key, on every replica", record, ADMIN_ERRORS, parameters=[KEY_PARAMETER])
        },
        "/admin/keys/{key}/rotate": {
            "post": _operation(
                "Replace a key with a new one (same id and settings)", created, CONFLICT, parameters=[KEY_PARAMETER]
            )
        },
        "/v1/usage": {
            "get": _operation(
                "The calling key's (or token subject's) own usage per model from the audit log, nobody else's "
                "(503 without a database)",
                USAGE_REPORT,
                (*PROTOCOL, 401, 503),
                parameters=USAGE_WINDOW,
            )
        },
        "/admin/usage": {
            "get": _operation(
                "Usage per key and model from the audit log (503 without a database)",
                USAGE_REPORT,
                (*ADMIN_ERRORS, 503),
                parameters=[
                    _query("key", "A key's name or id, or a caller id such as `static:<name>`."),
                    *USAGE_WINDOW,
                ],
            )
        },
        "/admin/cache": {
            "get": _operation(
                "The response cache's state (404 when it is off)",
                {
                    "200": _json(
                        json_object(
                            {"enabled": BOOLEAN, "store": STRING, "store_up": BOOLEAN, "entries": nullable(INTEGER)}
                        )
                    )
                },
                ADMIN_ERRORS,
            )
        },
        "/admin/cache/purge": {
            "post": _operation(
                "Drop cached answers of a tenant or caller and/or a model, or all of them, on every replica",
                {"200": _json(json_object({"purged": INTEGER}, ("purged",)))},
                (*ADMIN_ERRORS, 503),
                requestBody=_body(
                    "Purge", 'One of: tenant, caller, model, tenant or caller with model, {"all": true}.'
                ),
            )
        },
        "/admin/backends/{backend}/drain": {
            "post": _operation(
                "Drain a backend: no new requests, those in flight finish (409 for the last healthy backend of a "
                "model); on every replica when repair shares drains through Redis",
                DRAIN_STATE,
                CONFLICT,
                parameters=[BACKEND_PARAMETER],
            )
        },
        "/admin/backends/{backend}/undrain": {
            "post": _operation(
                "Undrain a backend the console drained (alerts still draining it keep it drained)",
                DRAIN_STATE,
                ADMIN_ERRORS,
                parameters=[BACKEND_PARAMETER],
            )
        },
        "/console": {
            "get": _operation(
                "The operator console's page (no data in it; the data comes from `/console/api/state`)",
                {"200": {"description": "OK", "content": {HTML: {"schema": STRING}}}},
                CONSOLE_ERRORS,
            )
        },
        "/console/static/{name}": {
            "get": _operation(
                "A script, style sheet, page or image of the console",
                {
                    "200": {
                        "description": "OK",
                        "content": {
                            kind: {"schema": STRING} for kind in ("text/javascript", "text/css", HTML, "image/svg+xml")
                        },
                    }
                },
                CONSOLE_ERRORS,
                parameters=[
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "description": "A file name; anything else is 404.",
                        "schema": {"type": "string", "pattern": r"^[a-z0-9_-]+\.(js|css|html|svg)$"},
                    }
                ],
            )
        },
        "/console/login": {
            "post": _operation(
                "Log in to the console with the admin key: a session cookie, or a redirect to `#login-failed`",
                {"303": _see_other("See Other: back to the console")},
                CONSOLE_ERRORS,
                requestBody={
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": json_object({"admin_key": STRING}, ("admin_key",))
                        }
                    },
                },
            )
        },
        "/console/logout": {
            "post": _operation(
                "Log out of the console (clears the cookie and ends its session on every worker and replica)",
                {"303": _see_other("See Other: back to the console")},
                CONSOLE_ERRORS,
            )
        },
        "/console/api/state": {
            "get": _operation(
                "What the console shows: backends, models, and this worker's traffic series",
                {"200": _json(CONSOLE_STATE)},
                ADMIN_ERRORS,
            )
        },
        "/admin/alerts": {
            "post": _operation(
                "Alertmanager webhook: drain backends named by firing alerts, undrain on resolve",
                {"200": _json(json_object({"actions": {"type": "array", "items": {"type": "object"}}}, ("actions",)))},
                ADMIN_ERRORS,
                requestBody=_body("Notification"),
            )
        },
    }


def route_of(path: str) -> Route:
    """The route-table entry that answers `path` (a templated path's prefix for `/admin/keys/{key}/…`)."""
    if path in PATHS:
        return PATHS[path]
    return next(route for prefix, route in PREFIXES.items() if path.startswith(prefix))


def _security(route: Route) -> list[dict[str, list[str]]]:
    if route.admin:
        return [{"adminKey": []}]
    return [] if route.public else [{"apiKey": []}]


def build_document() -> Schema:
    paths = _operations()
    for path, operations in paths.items():
        security = _security(route_of(path))
        for operation in operations.values():
            operation["security"] = security
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sluice",
            "version": __version__,
            "description": DESCRIPTION,
        },
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, **body_schemas()},
            "responses": {
                str(code): _json(ref("Error"), text, ("Retry-After",) if code in (429, 503) else ())
                for code, text in ERRORS.items()
            },
            "headers": {
                "X-Request-Id": {"required": True, "schema": STRING, "description": "Names the request in the logs."},
                "Retry-After": {"schema": STRING, "description": "Seconds to wait before trying again."},
                "X-Sluice-Model": {"schema": STRING, "description": "The model that answered (after fallbacks)."},
                "X-Sluice-Cache": {"schema": STRING, "description": "hit-exact, hit-semantic, miss or bypass."},
                "X-Sluice-Backend": {
                    "schema": STRING,
                    "description": "The backend that answered; only on the console's requests, never on a cache hit.",
                },
            },
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (static, or managed: `sk-sluice-…`), or a JWT when `auth.jwt` is set.",
                },
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`auth.admin_key`; without one the admin routes answer 404. The console's "
                    "session cookie stands for it on requests with `X-Sluice-Console: 1` and no `Authorization`.",
                },
            },
        },
    }


class OpenApiDocument:
    """The document, serialised once; `serve` answers `GET /openapi.json` with those bytes."""

    def __init__(self) -> None:
        self.document = build_document()
        self.body = orjson.dumps(self.document)

    async def serve(self, ctx: RequestContext) -> None:
        ctx.writer.send(200, self.body)
