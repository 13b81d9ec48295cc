"""Timeouts for many short-lived things with one periodic sweep instead of a timer each.

Client connections (header, body and keep-alive timeouts) and upstream exchanges (read timeouts)
register here. Arming or moving a timeout is then an attribute write on the request path rather than
creating and cancelling an event-loop timer several times per request; a timeout fires at most
`resolution` seconds late.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Watched(Protocol):
    def check_deadline(self, now: float) -> None:
        """Act if this object's deadline has passed at loop time `now`."""


class Deadlines:
    def __init__(self, resolution: float) -> None:
        self.resolution = resolution
        self._watched: set[Watched] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, item: Watched) -> None:
        self._watched.add(item)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sweep())

    def discard(self, item: Watched) -> None:
        self._watched.discard(item)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.resolution)
            now = loop.time()
            for item in list(self._watched):
                item.check_deadline(now)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
