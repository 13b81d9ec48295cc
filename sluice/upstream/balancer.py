"""Chooses the backend for a request among the healthy ones serving its model (`routing.strategy`).

- `least_loaded` (default): score = (load + 1) / weight, where load is the gateway's in-flight count or,
  when fresher and larger, the running + waiting requests the engine reports on /metrics
  (`Backend.load`). Ties rotate so equal backends share work instead of the first taking everything.
- `round_robin`: each backend in turn, ignoring load and weight (the baseline to measure against).
- `affinity`: requests with the same key go to the same backend, so vLLM's prefix cache already holds
  their shared prefix. The key is a session header, else the OpenAI `user` field, else the leading
  characters of the prompt (the system prompt, typically). Rendezvous hashing, weighted, keeps keys in
  place when backends come and go; a backend loaded past 1.5 × the average (+2) is passed over for the
  next one in the key's order (bounded load), so one hot prefix cannot drown a backend.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Container
from typing import Any, Protocol

from sluice.config import RoutingConfig
from sluice.context import RequestContext
from sluice.upstream.backends import Backend

BOUNDED_LOAD_FACTOR = 1.5
BOUNDED_LOAD_SLACK = 2.0


class Balancer(Protocol):
    def pick(
        self, candidates: tuple[Backend, ...], exclude: Container[Backend], ctx: RequestContext
    ) -> Backend | None: ...


class _Rotation:
    """Candidates in an order that starts one further along on every pick, so ties are shared."""

    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def _rotated(self, candidates: tuple[Backend, ...], exclude: Container[Backend]) -> list[Backend]:
        self._turn += 1
        n = len(candidates)
        return [b for i in range(n) if (b := candidates[(self._turn + i) % n]) not in exclude]


class LeastLoaded(_Rotation):
    __slots__ = ()

    def pick(
        self, candidates: tuple[Backend, ...], exclude: Container[Backend] = (), ctx: RequestContext | None = None
    ) -> Backend | None:
        if len(candidates) == 1:
            only = candidates[0]
            return None if only in exclude else only
        now = time.monotonic()
        # min() keeps the first of equal scores, which the rotation moves along on every pick.
        return min(self._rotated(candidates, exclude), key=lambda b: (b.load(now) + 1) / b.weight, default=None)


class RoundRobin(_Rotation):
    __slots__ = ()

    def pick(
        self, candidates: tuple[Backend, ...], exclude: Container[Backend] = (), ctx: RequestContext | None = None
    ) -> Backend | None:
        usable = self._rotated(candidates, exclude)
        return usable[0] if usable else None


class Affinity:
    def __init__(self, header: str, prefix_chars: int) -> None:
        self._header = header.lower().encode()
        self._prefix_chars = prefix_chars
        self._fallback = LeastLoaded()

    def key(self, ctx: RequestContext) -> bytes | None:
        session = ctx.request.header(self._header)
        if session:
            return b"s:" + session
        body = ctx.body or {}
        user = body.get("user")
        if isinstance(user, str) and user:
            return b"u:" + user.encode()
        prefix = _prompt_prefix(body, self._prefix_chars)
        return b"p:" + prefix.encode() if prefix else None

    def pick(
        self, candidates: tuple[Backend, ...], exclude: Container[Backend] = (), ctx: RequestContext | None = None
    ) -> Backend | None:
        key = self.key(ctx) if ctx is not None else None
        usable = [b for b in candidates if b not in exclude]
        if key is None or len(usable) <= 1:
            return self._fallback.pick(candidates, exclude)
        digest = hashlib.blake2b(key, digest_size=16).digest()
        ranked = sorted(usable, key=lambda b: _rendezvous(digest, b), reverse=True)
        now = time.monotonic()
        loads = [b.load(now) for b in usable]
        bound = BOUNDED_LOAD_FACTOR * (sum(loads) / len(loads)) + BOUNDED_LOAD_SLACK
        for backend in ranked:
            if backend.load(now) <= bound:
                return backend
        return ranked[0]


def _rendezvous(digest: bytes, backend: Backend) -> float:
    """Weighted highest-random-weight score of `backend` for a key."""
    h = hashlib.blake2b(digest + backend.name.encode(), digest_size=8).digest()
    unit = (int.from_bytes(h, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return backend.weight / -math.log(unit)


def _prompt_prefix(body: dict[str, Any], limit: int) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        out: list[str] = []
        size = 0
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            text = content if isinstance(content, str) else ""
            out.append(text[: limit - size])
            size += len(out[-1])
            if size >= limit:
                break
        return "\x00".join(out)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt[:limit]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0][:limit]
    return ""


def make_balancer(routing: RoutingConfig) -> Balancer:
    if routing.strategy == "round_robin":
        return RoundRobin()
    if routing.strategy == "affinity":
        return Affinity(routing.affinity_header, routing.affinity_prefix_chars)
    return LeastLoaded()
