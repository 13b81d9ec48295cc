"""Sends a proxied request to a backend that serves its model, retrying elsewhere before the first byte.

Candidates: healthy backends that list the model (base or LoRA) whose circuits are closed; a registered
adapter nobody has loaded is loaded first (upstream/adapters.py); with none usable, the model's fallback
chain. The balancer (`routing.strategy`) picks one, under the concurrency caps (upstream/admission.py).
A connect error, timeout or 5xx answer is retried on another such backend (`routing.retries` times), but
only while nothing has reached the client; after that a failure ends the stream with an SSE error
event. Each outcome is counted by the backend's circuit or the model's circuit on it (`_settle`).
Cancellation (the client went away) aborts the upstream connection, so vLLM stops generating.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import orjson

from sluice.config import RoutingConfig, TimeoutsConfig
from sluice.context import RequestContext
from sluice.errors import GatewayError, ModelNotFound, NoHealthyBackend, UpstreamError, UpstreamTimeout
from sluice.metrics import GatewayMetrics
from sluice.pipeline.relay import StreamRelay
from sluice.upstream.adapters import AdapterPlacer
from sluice.upstream.admission import Admission
from sluice.upstream.backends import Backend, Backends
from sluice.upstream.balancer import make_balancer
from sluice.upstream.breaker import CircuitBreaker
from sluice.upstream.connection import Exchange, UpstreamConnection, UpstreamFailure, UpstreamTimeoutFailure
from sluice.upstream.monitor import BackendMonitor
from sluice.upstream.pool import ConnectFailure

log = logging.getLogger("sluice.dispatch")
EVENT_STREAM = b"text/event-stream"
# Headers that describe the client's connection or credentials, never forwarded to a backend: the hop-by-hop
# ones (RFC 9110 §7.6.1; also every `proxy-*` header and each header the client's `Connection` names), the
# framing the gateway writes itself, and the client's credentials (a backend gets its own `api_key` instead).
NOT_FORWARDED = frozenset(
    {
        b"host", b"authorization", b"connection", b"keep-alive", b"proxy-authorization", b"proxy-connection",
        b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length", b"expect", b"cookie",
        b"content-type", b"x-request-id",
    }
)
PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})  # the usual Connection values, naming no other header


class AdapterGone(UpstreamError):
    """A backend answered 404 for a registered adapter: not its fault, so no breaker counts it."""


class ErrorAnswer(UpstreamError):
    """A backend answered with a 5xx: it is reachable, but this model failed on it."""


class Dispatcher:
    def __init__(
        self,
        backends: Backends,
        monitor: BackendMonitor,
        metrics: GatewayMetrics,
        timeouts: TimeoutsConfig,
        routing: RoutingConfig,
        admission: Admission,
        placer: AdapterPlacer,
        body_max_bytes: int = 0,
    ) -> None:
        """`body_max_bytes`: how much of a response to keep for callers whose key logs bodies (audit log)."""
        self._backends = backends
        self._body_cap = body_max_bytes
        self._monitor = monitor
        self._metrics = metrics
        self._timeouts = timeouts
        self._routing = routing
        self._balancer = make_balancer(routing)
        self._admission = admission
        self._placer = placer
        self._registry = backends.registry
        self._capped = any(b.max_concurrency is not None for b in backends.all)
        self._retry_after = (("retry-after", str(routing.retry_after)),)

    async def __call__(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        if principal is not None and principal.log_bodies and self._body_cap:
            ctx.capture = bytearray()
        candidates = await self._candidates(ctx.model)
        candidates = self._closed_circuits(candidates, ctx.model) or self._fallback(ctx) or candidates
        if not candidates:
            chain = ", ".join((ctx.model, *self._routing.fallbacks.get(ctx.model, ())))
            raise NoHealthyBackend(f"No healthy backend serves {chain} right now; retry later.",
                                   headers=self._retry_after)
        if self._capped:
            candidates = await self._admission.wait_for_capacity(candidates)
        head = self._head(ctx)
        tried: list[Backend] = []
        failure: GatewayError | None = None
        for _ in range(1 + self._routing.retries):
            backend = self._balancer.pick(candidates, tried, ctx)
            if backend is None:
                break
            if tried:
                self._metrics.retries.child(tried[-1].name, failure.code if failure else "").inc()
            tried.append(backend)
            ctx.backend = backend.name
            ctx.attempts += 1
            backend.in_flight += 1
            model = ctx.served_model or ctx.model
            adapter = model if model in self._registry else None
            if adapter is not None:  # registered adapters in use are never unloaded to make room
                backend.adapters_in_use[adapter] = backend.adapters_in_use.get(adapter, 0) + 1
                backend.adapters_used_at[adapter] = ctx.started  # perf_counter, as in the placer
            breaker = backend.breaker
            model_breaker = backend.model_breaker(model) if breaker is not None else None
            if breaker is not None and model_breaker is not None:
                breaker.on_attempt()
                model_breaker.on_attempt()
            failure = None
            finished = False
            try:
                failure = await self._exchange(ctx, backend, head)
                finished = True
            finally:
                backend.in_flight -= 1
                if adapter is not None:
                    backend.adapters_in_use[adapter] -= 1
                if self._capped:
                    self._admission.released()
                if breaker is not None and model_breaker is not None:
                    _settle(breaker, model_breaker, failure, finished, ctx.stream_cut)
            if failure is None:
                return
            log.warning(
                "backend attempt failed",
                extra={"request_id": ctx.request_id, "backend": backend.name, "error": failure.message},
            )
            if ctx.span is not None:
                ctx.span.add_event("backend attempt failed", {"backend": backend.name, "error": failure.message})
            if isinstance(failure, AdapterGone):
                tried.remove(backend)  # it may serve the retry once the adapter is loaded again
            candidates = await self._retry_candidates(model, candidates, tried)
        raise failure or NoHealthyBackend(
            f"No healthy backend serves '{ctx.model}' right now; retry later.", headers=self._retry_after
        )

    async def _retry_candidates(
        self, model: str, previous: tuple[Backend, ...], tried: list[Backend]
    ) -> tuple[Backend, ...]:
        """Where a retry may go: the model's usable backends now (loading an adapter anew if it has
        none left), else the previous candidates; under concurrency caps only those with a free slot."""
        fresh = self._closed_circuits(self._backends.serving(model), model)
        if not fresh and model in self._registry:
            try:
                fresh = await self._placer.place(model)
            except GatewayError:
                fresh = ()
        candidates = tuple(b for b in fresh or previous if b not in tried)
        if self._capped and candidates:
            candidates = await self._admission.wait_for_capacity(candidates)
        return candidates

    def _closed_circuits(self, candidates: tuple[Backend, ...], model: str) -> tuple[Backend, ...]:
        """The candidates whose circuits (the backend's and `model`'s on it) let requests through now."""
        if not self._backends.circuits_not_closed:
            return candidates
        return tuple(b for b in candidates if b.available_for(model))

    def _fallback(self, ctx: RequestContext) -> tuple[Backend, ...]:
        """Backends of the first fallback model that can serve now; the request is rewritten for it.

        Used when every backend of the requested model is down or open. With no usable fallback the
        caller keeps the model's own (open) backends: a breaker never cuts a model off completely.
        """
        for model in self._routing.fallbacks.get(ctx.model, ()):
            usable = self._closed_circuits(self._backends.serving(model), model)
            if usable:
                assert ctx.body is not None
                ctx.body["model"] = model
                ctx.payload = orjson.dumps(ctx.body)
                ctx.served_model = model
                self._metrics.fallbacks.child(ctx.model, model).inc()
                return usable
        return ()

    async def _candidates(self, model: str) -> tuple[Backend, ...]:
        candidates = self._backends.serving(model)
        if model in self._registry and not self._closed_circuits(candidates, model):
            try:
                return await self._placer.place(model)  # load it where its base model runs
            except GatewayError:
                if self._routing.fallbacks.get(model):
                    return candidates  # the fallback chain answers instead
                raise
        if candidates or self._routing.fallbacks.get(model):
            return candidates
        if not self._backends.knows(model):
            await self._monitor.rediscover()  # an adapter may have been loaded since the last look
            if not self._backends.knows(model):
                raise ModelNotFound(
                    f"The model '{model}' does not exist or is not served here; see GET /v1/models.",
                    param="model",
                )
            candidates = self._backends.serving(model)
        if not candidates:
            raise NoHealthyBackend(
                f"No healthy backend serves '{model}' right now; retry later.", headers=self._retry_after
            )
        return candidates

    def _head(self, ctx: RequestContext) -> bytes:
        route = ctx.route
        assert route is not None
        parts = [
            b"POST ", route.upstream_path, b" HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            % len(ctx.payload),
            b"x-request-id: ", ctx.writer.request_id, b"\r\n",
        ]
        traceparent = ctx.traceparent
        first = len(parts)
        named: set[bytes] | None = None  # the headers the client's Connection header names
        for name, value in ctx.request.headers:
            if name in NOT_FORWARDED:
                if name == b"connection" and value.lower() not in PLAIN_CONNECTION:
                    named = (named or set()) | {option.strip().lower() for option in value.split(b",")}
            elif not (name.startswith(b"proxy-") or (traceparent and name == b"traceparent")):
                parts += (name, b": ", value, b"\r\n")
        if named:  # may come after the headers it names: drop those now (four parts per header)
            forwarded = parts[first:]
            del parts[first:]
            for i in range(0, len(forwarded), 4):
                if forwarded[i] not in named:
                    parts += forwarded[i : i + 4]
        if traceparent:
            parts += (b"traceparent: ", traceparent, b"\r\n")
        return b"".join(parts)

    async def _exchange(self, ctx: RequestContext, backend: Backend, head: bytes) -> GatewayError | None:
        """One attempt on `backend`: None when the client got an answer, else the error to retry on."""
        data = [head, backend.host_header, backend.auth_header, b"\r\n", ctx.payload]
        timeout = self._timeouts.read
        pool = backend.pool
        conn: UpstreamConnection | None = None
        exchange: Exchange | None = None
        try:
            try:
                while True:  # inline rather than a helper coroutine: one less frame on every resume
                    conn = pool.take_idle()
                    reused = conn is not None
                    if conn is None:
                        conn = await pool.connect()
                    exchange = conn.send(data, timeout, want_headers=ctx.stream)
                    try:
                        await (exchange.headers_ready or exchange.done)
                        break
                    except UpstreamFailure as exc:
                        # A pooled connection the backend had already closed: nothing was processed.
                        if not (reused and exc.nothing_received and not isinstance(exc, UpstreamTimeoutFailure)):
                            raise
                # vLLM answers a successful `stream: true` request with SSE, anything else with JSON: the
                # request decides, so the response's headers need not be parsed at all.
                streamed = ctx.stream and exchange.status == 200
                if not streamed:
                    await exchange.done  # a whole JSON answer (or error) is collected, then sent at once
            except ConnectFailure as exc:
                self._monitor.report_failure(backend, str(exc))
                return NoHealthyBackend(
                    f"Backend {backend.name} is unreachable; retry later.", headers=self._retry_after
                )
            except UpstreamTimeoutFailure as exc:
                return UpstreamTimeout(f"Backend {backend.name} did not answer in time ({exc}).")
            except UpstreamFailure as exc:
                return UpstreamError(f"Backend {backend.name} failed: {exc}.")
            model = ctx.served_model or ctx.model
            if exchange.status == 404 and model in self._registry:
                self._placer.forget(backend, model)  # unloaded behind our back (another replica, an operator)
                return AdapterGone(f"Backend {backend.name} no longer has adapter '{model}' loaded.")
            if exchange.status >= 500:
                return ErrorAnswer(
                    f"Backend {backend.name} answered {exchange.status}: {_message(exchange.body)}"
                )
            if streamed:
                await self._relay(ctx, exchange)
            else:
                self._answer(ctx, exchange)
            return None
        finally:
            if exchange is not None and conn is not None and not exchange.ended:
                conn.abort()

    def _answer(self, ctx: RequestContext, exchange: Exchange) -> None:
        body = exchange.body[0] if len(exchange.body) == 1 else b"".join(exchange.body)
        if exchange.status == 200:
            ctx.usage = _usage(body)
            if ctx.answer_extra is not None:
                body = _splice(body, ctx.answer_extra)
        elif exchange.status == 404:
            self._monitor.request_rediscovery()  # the backend no longer serves it: refresh the index
        if ctx.capture is not None:
            ctx.capture[:] = body[: self._body_cap]
        if ctx.cache_capture is not None:
            ctx.cache_capture += body
        ctx.writer.send(exchange.status, body, headers=_answer_headers(ctx))

    async def _relay(self, ctx: RequestContext, exchange: Exchange) -> None:
        writer = ctx.writer
        writer.start(exchange.status, EVENT_STREAM, _answer_headers(ctx))
        exchange.set_timeout(self._timeouts.stream_read)
        relay = StreamRelay(ctx, writer, self._body_cap)
        for part in exchange.body:  # arrived together with the headers
            relay.feed(part)
        exchange.body.clear()
        exchange.sink = relay.feed
        writer.set_flow(exchange.conn)
        try:
            await exchange.done
        except UpstreamFailure as exc:
            self._metrics.stream_errors.child(ctx.backend).inc()
            log.warning("stream cut", extra={"request_id": ctx.request_id, "backend": ctx.backend, "error": str(exc)})
            relay.fail(f"The backend stream was interrupted ({exc}); the answer is incomplete.")
            ctx.stream_cut = True
            return
        finally:
            writer.set_flow(None)
        relay.finish()


def _answer_headers(ctx: RequestContext) -> tuple[tuple[str, str], ...]:
    """`X-Sluice-Model` on every proxied answer; the console's playground is also told the backend."""
    principal = ctx.principal
    if principal is not None and principal.kind == "console":
        return (("x-sluice-model", ctx.served_model or ctx.model), ("x-sluice-backend", ctx.backend))
    return (("x-sluice-model", ctx.served_model or ctx.model),)


def _settle(
    backend: CircuitBreaker, model: CircuitBreaker, failure: GatewayError | None, finished: bool, cut: bool
) -> None:
    """Count an attempt's outcome: transport failures (connect, timeout, a cut stream) against the
    backend's circuit, 5xx answers against the model's circuit on it, so one failing adapter cannot take
    its healthy base model down. No verdict when the client left or an adapter had vanished."""
    if not finished or isinstance(failure, AdapterGone):
        backend.abandon()
        model.abandon()
    elif failure is None and not cut:
        backend.record(True)
        model.record(True)
    elif isinstance(failure, ErrorAnswer):
        backend.record(True)  # it answered
        model.record(False)
    else:
        backend.record(False)
        model.abandon()


def _message(parts: Iterable[bytes]) -> str:
    """The error message inside a backend's error body, for our own error text."""
    body = b"".join(parts)[:4096]
    try:
        payload = orjson.loads(body)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        message = error.get("message") if isinstance(error, dict) else None
        return str(message or error)[:500]
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")[:500] or "(empty body)"


def _splice(body: bytes, members: bytes) -> bytes:
    """`body` (a JSON object) with `members` (`"name":value,...`) added before its closing brace; a body
    that is not an object is returned as it is."""
    end = body.rstrip()
    if not end.startswith(b"{") or not end.endswith(b"}"):
        return body
    head = end[:-1].rstrip()
    return b"".join((head, b"" if head == b"{" else b",", members, b"}"))


def _usage(body: bytes) -> dict[str, int] | None:
    """The `usage` object of a completion body, found from the end without decoding the whole body."""
    start = body.rfind(b'"usage":')
    if start < 0:
        return None
    opening = body.find(b"{", start)
    if opening < 0 or body[start + 8 : opening].strip():
        return None
    close = opening
    while True:  # the usage object nests only objects and numbers: match braces with C-speed searches
        close = body.find(b"}", close + 1)
        if close < 0:
            return None
        if body.count(b"{", opening, close) == body.count(b"}", opening, close + 1):
            break
    try:
        usage = orjson.loads(body[opening : close + 1])
    except orjson.JSONDecodeError:
        return None
    return usage if isinstance(usage, dict) else None
