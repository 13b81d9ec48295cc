"""Load shedding: per-backend concurrency caps and one bounded, time-limited queue in front of them.

A backend with `max_concurrency` set takes at most that many requests at once from this gateway. When
every backend that could serve a request is at its cap, the request waits in a FIFO queue of at most
`limits.queue_size` requests for at most `limits.queue_timeout` seconds; past either bound it is refused
at once with 503 and `Retry-After`, so overload shows up as fast, explicit refusals instead of work
piling onto vLLM and every request slowing down. With no caps configured this costs one check.
"""

from __future__ import annotations

import asyncio
from collections import deque

from sluice.errors import GatewayError
from sluice.upstream.backends import Backend


class Overloaded(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "overloaded"


class Admission:
    def __init__(self, queue_size: int, queue_timeout: float, retry_after: int) -> None:
        self._queue_size = queue_size
        self._queue_timeout = queue_timeout
        self.retry_after = (("retry-after", str(retry_after)),)
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def wait_for_capacity(self, candidates: tuple[Backend, ...]) -> tuple[Backend, ...]:
        """The candidates with a free slot, waiting in the queue for one if none has any."""
        free = _with_capacity(candidates)
        if free or not candidates:
            return free
        if len(self._waiters) >= self._queue_size:
            raise Overloaded("Every backend for this model is at capacity and the queue is full; retry later.",
                             headers=self.retry_after)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._queue_timeout
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    await waiter
                free = _with_capacity(candidates)
                if free:
                    return free
                waiter = loop.create_future()  # woken for another model's backend: wait again, first in line
                self._waiters.appendleft(waiter)
        except TimeoutError:
            raise Overloaded(
                f"No backend for this model had capacity within {self._queue_timeout:g} s; retry later.",
                headers=self.retry_after,
            ) from None
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def released(self) -> None:
        """A request left a backend: wake the request that has waited longest."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _with_capacity(candidates: tuple[Backend, ...]) -> tuple[Backend, ...]:
    if all(b.max_concurrency is None for b in candidates):
        return candidates
    return tuple(b for b in candidates if b.max_concurrency is None or b.in_flight < b.max_concurrency)
