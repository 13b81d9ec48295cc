"""The per-request state that flows through the pipeline, and the two kinds of pipeline step.

A `Stage` is `async (ctx, call_next) -> None`: it calls `call_next(ctx)` to continue, or answers itself
through `ctx.writer` / by raising a `GatewayError` (Envoy's continue or local reply). A `Check` is a
step that usually never waits (routing, credentials, body validation, rate limits): `check(ctx)` returns
None to continue or raises to answer, and costs no coroutine; when it must wait this time (a database
lookup, a Redis round trip) it returns an awaitable, which the chain awaits before going on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sluice.http.request import HttpRequest
from sluice.http.response import ResponseWriter


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-caller limits (None: unlimited), from the key's record, its config entry or `rate_limits.per_key`."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the name of the key (never the key itself) and what it may use.

    `subject` is the stable identity limits are counted against: `key:<id>` for API keys,
    `jwt:<issuer>:<user>` for tokens.
    """

    name: str
    models: frozenset[str] | None = None  # None: every model
    subject: str = ""
    kind: str = "static"  # static | managed | jwt | admin | console (a console session, sluice/console/)
    tenant: str | None = None
    user: str | None = None
    scopes: frozenset[str] = frozenset()
    limits: Limits = Limits()
    log_bodies: bool = False  # store prompts and responses with the audit rows (capped)
    cache: bool = True  # answers may come from and go to the response cache


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # bounded label for metrics: "chat", "completions", "embeddings", "models", ...
    methods: tuple[str, ...]
    public: bool  # reachable without a credential
    proxied: bool  # forwarded to a backend (needs a JSON body with a model)
    upstream_path: bytes = b""
    admin: bool = False  # needs the admin credential (auth.admin_key), not an API key
    admin_listener: bool = False  # public, but served where the admin routes are (the console's pages)
    audited: bool = True  # recorded in the audit log (public routes never are; nor the console's polls)

    @property
    def on_admin_listener(self) -> bool:
        """Served by the admin listener when `server.admin_port` gives the admin routes one of their own."""
        return self.admin or self.admin_listener


class RequestContext:
    __slots__ = (
        "answer_extra",
        "attempts",
        "backend",
        "body",
        "cache_capture",
        "cache_result",
        "capture",
        "client_ip",
        "include_usage",
        "limit_ticket",
        "model",
        "payload",
        "principal",
        "rate_limit",
        "request",
        "route",
        "served_model",
        "span",
        "started",
        "stream",
        "stream_cut",
        "tpot",
        "traceparent",
        "ttft",
        "usage",
        "writer",
    )

    def __init__(self, request: HttpRequest, writer: ResponseWriter, started: float) -> None:
        self.request = request
        self.writer = writer
        self.started = started
        self.route: Route | None = None
        self.body: dict[str, Any] | None = None
        self.payload: bytes = request.body  # what is sent upstream (the body, possibly rewritten)
        self.model = ""
        self.served_model = ""  # the fallback model that answered instead, if any
        self.stream = False
        self.include_usage = False  # the client asked for the usage chunk
        self.stream_cut = False  # the backend failed after the stream had started
        self.principal: Principal | None = None
        self.client_ip = request.client_ip  # the real client behind a trusted proxy, once resolved
        self.limit_ticket: Any = None  # what the rate limits reserved, settled when the request ends
        self.rate_limit: str | None = None  # the limits' verdict for the audit log: allowed, limited, fail_open…
        self.capture: bytearray | None = None  # the response, kept for the audit log (keys that log bodies)
        self.cache_capture: bytearray | None = None  # the whole answer as received, to store in the cache
        self.cache_result: str | None = None  # hit_exact, hit_semantic, miss, bypass; None: not cacheable route
        self.backend = ""
        self.attempts = 0
        self.usage: dict[str, Any] | None = None
        self.ttft: float | None = None
        self.tpot: float | None = None
        self.span: Any = None  # the request's OpenTelemetry span, when tracing is on (sluice/tracing.py)
        self.traceparent = b""  # the span's W3C traceparent, sent to the backend instead of the caller's
        # JSON members (`"name":value`) the dispatcher adds to a whole 200 answer (RAG's `sources`)
        self.answer_extra: bytes | None = None

    @property
    def request_id(self) -> str:
        return self.writer.request_id.decode("ascii")


Handler = Callable[[RequestContext], Awaitable[None]]


class Stage(Protocol):
    async def __call__(self, ctx: RequestContext, call_next: Handler) -> None: ...


class Check(Protocol):
    def check(self, ctx: RequestContext) -> Awaitable[None] | None: ...
