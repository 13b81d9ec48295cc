"""The chaos of the soak: a backend SIGKILLed and restarted every `kill_every_s` (round robin over the three),
Redis and PostgreSQL each stopped once and started again on the same port and data a few seconds later.

The store restarts sit halfway between two backend kills, after about a third and two thirds of the
kills, so each failure is seen on its own. Every action is timestamped (seconds since the load started);
the kill times are what `bench/soak_report.py` checks a cut stream against.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.soak_services import FakeBackend, ThrowawayPostgres, ThrowawayRedis


@dataclass(frozen=True, slots=True)
class ChaosPlan:
    """When things break, in seconds since the load started."""

    kills_at_s: tuple[float, ...]
    redis_at_s: float | None
    postgres_at_s: float | None
    backend_down_s: float
    store_down_s: float

    @classmethod
    def for_run(
        cls, duration_s: float, kill_every_s: float, *, backend_down_s: float = 5.0, store_down_s: float = 5.0
    ) -> ChaosPlan:
        """Kills every `kill_every_s` while at least half a period of the run is left after them."""
        kills: list[float] = []
        at = kill_every_s
        while at <= duration_s - kill_every_s / 2:
            kills.append(at)
            at += kill_every_s
        if not kills:
            return cls((), None, None, backend_down_s, store_down_s)
        redis_after = max(1, math.ceil(len(kills) / 3))
        postgres_after = max(1, math.ceil(2 * len(kills) / 3))
        return cls(
            kills_at_s=tuple(kills),
            redis_at_s=kills[redis_after - 1] + kill_every_s / 2,
            postgres_at_s=kills[postgres_after - 1] + kill_every_s / 2,
            backend_down_s=backend_down_s,
            store_down_s=store_down_s,
        )

    def describe(self) -> str:
        parts = [f"{len(self.kills_at_s)} backend kills (SIGKILL, restarted after {self.backend_down_s:g} s) at "
                 + ", ".join(f"{t:g}" for t in self.kills_at_s) + " s"]  # fmt: skip
        if self.redis_at_s is not None:
            parts.append(f"Redis stopped at {self.redis_at_s:g} s for {self.store_down_s:g} s")
        if self.postgres_at_s is not None:
            parts.append(f"PostgreSQL stopped (fast shutdown) at {self.postgres_at_s:g} s for {self.store_down_s:g} s")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class ChaosEvent:
    """`what` happened to `target` at `at_s` (since the load started); `took_s`: how long the step took."""

    what: str
    target: str
    at_s: float
    took_s: float


@dataclass(slots=True)
class Chaos:
    plan: ChaosPlan
    backends: list[FakeBackend]
    redis: ThrowawayRedis
    postgres: ThrowawayPostgres
    started: float  # time.monotonic() when the load started
    events: list[ChaosEvent] = field(default_factory=list)
    kills: list[tuple[str, float]] = field(default_factory=list)  # (backend, time.monotonic() of the kill)

    async def run(self) -> None:
        """Run the plan to its end (the last restart included)."""
        steps = [
            self._at(at, self._kill_and_restart(self.backends[index % len(self.backends)]))
            for index, at in enumerate(self.plan.kills_at_s)
        ]
        if self.plan.redis_at_s is not None:
            steps.append(self._at(self.plan.redis_at_s, self._restart("redis", self.redis.stop, self.redis.start)))
        if self.plan.postgres_at_s is not None:
            restart = self._restart("postgres", self.postgres.stop, self.postgres.start)
            steps.append(self._at(self.plan.postgres_at_s, restart))
        await asyncio.gather(*steps)

    async def _at(self, at_s: float, step: Awaitable[None]) -> None:
        await asyncio.sleep(max(0.0, self.started + at_s - time.monotonic()))
        await step

    async def _kill_and_restart(self, backend: FakeBackend) -> None:
        killed_at = await self._timed("SIGKILL", backend.name, backend.kill)
        self.kills.append((backend.name, killed_at))
        await asyncio.sleep(self.plan.backend_down_s)
        await self._timed("restarted", backend.name, backend.start)

    async def _restart(self, target: str, stop: Callable[[], None], start: Callable[[], None]) -> None:
        await self._timed("stopped", target, stop)
        await asyncio.sleep(self.plan.store_down_s)
        await self._timed("started", target, start)

    async def _timed(self, what: str, target: str, action: Callable[[], None]) -> float:
        """Run `action` in a thread (they block on processes); returns when it began (time.monotonic())."""
        begun = time.monotonic()
        await asyncio.to_thread(action)
        self.events.append(ChaosEvent(what, target, begun - self.started, time.monotonic() - begun))
        return begun
