"""Rate limits per client address and per caller: requests, tokens and concurrent requests.

After the body is parsed (stream or not, `max_tokens`), every limit that applies to the request is
checked in one call to the limiter (one Redis round trip, all or nothing; sluice/ratelimit/):

- per client address (`rate_limits.per_ip`): requests per second with a burst, streaming and
  non-streaming counted separately;
- per caller (key or JWT subject; its own limits, else `rate_limits.per_key`): requests per minute (burst:
  one second's worth), tokens per minute (the prompt estimate + `max_tokens` × `n` is reserved now and
  settled with the real usage when the response ends, streams included), and concurrent requests.

A refusal is 429 with `Retry-After`; every answer carries OpenAI's `x-ratelimit-*` headers. With no
limit configured for the request this step costs a few attribute reads and no coroutine.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import Any

from sluice.config import RateConfig, RateLimitsConfig
from sluice.context import RequestContext
from sluice.errors import GatewayError
from sluice.metrics import GatewayMetrics
from sluice.ratelimit import Lease, LimiterUnavailable, Quota, QuotaState, RateLimiter, Verdict

BYTES_PER_TOKEN = 4  # a conservative prompt estimate from the body size; settled with the real count


class TooManyRequests(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class LimitsUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "rate_limiter_unavailable"


class Ticket:
    """What a request reserved, to settle when it ends."""

    __slots__ = ("lease", "tokens")

    def __init__(self, tokens: Quota | None, lease: Lease | None) -> None:
        self.tokens = tokens
        self.lease = lease


class LimitsCheck:
    def __init__(
        self, limiter: RateLimiter, settings: RateLimitsConfig, lease_ttl: float, metrics: GatewayMetrics
    ) -> None:
        self._limiter = limiter
        self._plain: RateConfig | None = settings.per_ip.requests
        self._stream: RateConfig | None = settings.per_ip.stream_requests
        self._defaults = settings.per_key
        self._default_max_tokens = settings.default_max_tokens
        self._lease_ttl = lease_ttl
        self._metrics = metrics
        self._settling: set[asyncio.Task[None]] = set()
        self._request_quotas: dict[tuple[str, int], Quota] = {}  # per caller: the same object every time

    def check(self, ctx: RequestContext) -> Awaitable[None] | None:
        route = ctx.route
        if route is None or not route.proxied:
            return None
        quotas: list[Quota] = []
        address = ctx.client_ip  # resolved behind a trusted proxy by pipeline/client_address.py
        per_ip = self._stream if ctx.stream else self._plain
        if per_ip is not None:
            kind = "stream" if ctx.stream else "req"
            quotas.append(Quota(f"ip:{address}:{kind}", per_ip.rate, per_ip.burst, 1.0, "requests"))
        principal = ctx.principal
        tokens: Quota | None = None
        lease: Lease | None = None
        if principal is not None:
            limits, defaults = principal.limits, self._defaults
            rpm = limits.requests_per_minute or defaults.requests_per_minute
            tpm = limits.tokens_per_minute or defaults.tokens_per_minute
            concurrency = limits.max_concurrency or defaults.max_concurrency
            subject = principal.subject or principal.name
            if rpm is not None:
                quotas.append(self._requests_quota(subject, rpm))
            if tpm is not None:
                cost = self._token_estimate(ctx)
                if cost > tpm:
                    ctx.rate_limit = "limited"
                    raise TooManyRequests(
                        f"This request may use up to {cost} tokens, more than this key's limit of {tpm} tokens "
                        "per minute; lower max_tokens or shorten the prompt."
                    )
                tokens = Quota(f"{subject}:tok", tpm / 60.0, float(tpm), float(cost), "tokens")
                quotas.append(tokens)
            if concurrency is not None:
                lease = Lease(f"{subject}:conc", concurrency, ctx.request_id, self._lease_ttl)
        if not quotas and lease is None:
            return None
        verdict = self._limiter.decide_now(quotas, lease)
        if verdict is not None:  # in process: decided without a coroutine
            self._apply(ctx, verdict, tokens, lease)
            return None
        return self._admit(ctx, quotas, tokens, lease)

    def _requests_quota(self, subject: str, rpm: int) -> Quota:
        quota = self._request_quotas.get((subject, rpm))
        if quota is None:
            if len(self._request_quotas) >= 100_000:
                self._request_quotas.clear()
            burst = max(1.0, math.ceil(rpm / 60.0))  # one second's worth
            quota = self._request_quotas[subject, rpm] = Quota(f"{subject}:req", rpm / 60.0, burst, 1.0, "requests")
        return quota

    def _token_estimate(self, ctx: RequestContext) -> int:
        body: dict[str, Any] = ctx.body or {}
        prompt = len(ctx.payload) // BYTES_PER_TOKEN + 1
        if ctx.route is not None and ctx.route.name == "embeddings":
            return prompt
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self._default_max_tokens
        n = body.get("n") or 1
        return int(prompt + max_tokens * n)

    async def _admit(self, ctx: RequestContext, quotas: list[Quota], tokens: Quota | None, lease: Lease | None) -> None:
        try:
            verdict = await self._limiter.admit(quotas, lease)
        except asyncio.CancelledError:
            if lease is not None:  # the client left while Redis decided: give back the slot it may now hold
                self._settle_later((), lease)
            raise
        except LimiterUnavailable:
            ctx.rate_limit = "fail_closed"
            self._metrics.rate_limited.child("unavailable").inc()
            raise LimitsUnavailable(
                "Rate limiting is unavailable (Redis cannot be reached) and the gateway is set to refuse "
                "requests then (rate_limits.on_redis_failure: fail_closed); retry later.",
                headers=(("retry-after", "1"),),
            ) from None
        self._apply(ctx, verdict, tokens, lease)

    def _apply(self, ctx: RequestContext, verdict: Verdict, tokens: Quota | None, lease: Lease | None) -> None:
        ctx.writer.extra += _headers(verdict)  # after what earlier stages added (CORS)
        ctx.rate_limit = "fail_open" if verdict.degraded else "allowed"
        if not verdict.allowed:
            ctx.rate_limit = "limited"
            refused = verdict.refused_by or ""
            self._metrics.rate_limited.child(_reason(refused)).inc()
            wait = max(1, math.ceil(verdict.retry_after))
            raise TooManyRequests(f"{_describe(refused)}; retry in {verdict.retry_after:.1f} s.",
                                  headers=(("retry-after", str(wait)),))  # fmt: skip
        if tokens is not None or lease is not None:
            ctx.limit_ticket = Ticket(tokens, lease)

    def finish(self, ctx: RequestContext) -> None:
        """Settle what the request reserved (in the background: the client is not kept waiting)."""
        ticket = ctx.limit_ticket
        if ticket is None:
            return
        ctx.limit_ticket = None
        adjust: list[tuple[Quota, float]] = []
        if ticket.tokens is not None:
            usage = ctx.usage or {}
            used = usage.get("total_tokens")
            if not isinstance(used, int):  # no usage seen: a failure before any answer used nothing, while
                # an answer that began (a stream the client left) keeps its whole reservation
                used = int(ticket.tokens.cost) if ctx.writer.status == 200 else 0
            adjust.append((ticket.tokens, float(used)))
        self._settle_later(adjust, ticket.lease)

    def _settle_later(self, adjust: list[tuple[Quota, float]] | tuple[()], lease: Lease | None) -> None:
        task = asyncio.get_running_loop().create_task(self._limiter.settle(adjust, lease))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def close(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)


def _reason(refused: str) -> str:
    if refused.startswith("ip:"):
        return "ip"
    return {"req": "requests", "tok": "tokens", "conc": "concurrency"}.get(refused.rsplit(":", 1)[-1], "other")


def _describe(refused: str) -> str:
    reason = _reason(refused)
    if reason == "ip":
        return "Too many requests from your address"
    if reason == "tokens":
        return "This key's tokens-per-minute limit is reached"
    if reason == "concurrency":
        return "This key already has as many requests in flight as it may"
    return "This key's requests-per-minute limit is reached"


def _headers(verdict: Verdict) -> bytes:
    """OpenAI's x-ratelimit-* headers from the tightest requests quota and the tokens quota (one pass)."""
    requests = tokens = None
    for state in verdict.states:
        if state.quota.kind == "requests":
            if requests is None or state.remaining < requests.remaining:
                requests = state
        elif tokens is None or state.remaining < tokens.remaining:
            tokens = state
    head = _family(b"requests", requests) if requests is not None else b""
    return head + _family(b"tokens", tokens) if tokens is not None else head


def _family(name: bytes, state: QuotaState) -> bytes:
    return b"x-ratelimit-limit-%s: %d\r\nx-ratelimit-remaining-%s: %d\r\nx-ratelimit-reset-%s: %s\r\n" % (
        name, round(state.quota.rate * 60), name, max(0, math.floor(state.remaining)), name,
        duration(state.reset_after).encode(),
    )  # fmt: skip


def duration(seconds: float) -> str:
    """A duration the way OpenAI writes it in x-ratelimit-reset-*: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"
