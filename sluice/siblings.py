"""The channel between sibling workers (`server.workers` > 1): ask every other worker for one named answer.

Workers share the listening port, so any request reaches one of them at random; what must cover them all
(`/metrics`, the console's traffic charts) is assembled by the worker that answered, from its siblings'
answers; what one worker learns that all must know (a console logout) is told to the siblings the same
way. Each worker listens on a Unix socket `<pid>.sock` in a folder the supervisor made
(`SLUICE_WORKERS_DIR`); a sibling connects, sends a topic (and an argument after a space, if any) on
one line and reads the answer until the connection closes. An unknown topic gets an empty answer.
Siblings are asked concurrently and given `SIBLING_TIMEOUT` in all; one that does not answer is left
out (and its socket removed when nothing listens on it any more: a worker that died without cleaning up).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("sluice.workers")
SIBLING_TIMEOUT = 1.0
WORKERS_ENV = "SLUICE_WORKERS_DIR"
LINE_MAX_BYTES = 1024

Answer = Callable[[str], bytes | Awaitable[bytes]]  # the argument ("" when none) -> the answer


class Siblings:
    def __init__(self, directory: Path, name: str | None = None) -> None:
        """`name`: of this worker's socket (its pid by default)."""
        self._directory = directory
        self._socket = directory / f"{name or os.getpid()}.sock"
        self._server: asyncio.AbstractServer | None = None
        self.answers: dict[str, Answer] = {}  # topic -> this worker's answer, registered by each user

    async def start(self) -> None:
        self._socket.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._answer, path=str(self._socket))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._socket.unlink(missing_ok=True)

    async def ask(self, topic: str, argument: str = "") -> list[bytes]:
        """Every sibling's answer to `topic` that arrives in time (this worker's own is not included)."""
        return [answer for answer in await self.ask_each(topic, argument) if answer is not None]

    async def ask_lines(self, topic: str) -> list[str]:
        """The lines of every sibling's answer to `topic`, for answers that list what a worker holds."""
        answers = await self.ask(topic)
        return [line for answer in answers for line in answer.decode("utf-8", "replace").splitlines()]

    async def ask_each(self, topic: str, argument: str = "") -> list[bytes | None]:
        """Each sibling's answer to `topic`, None for one that did not answer in time."""
        siblings = [path for path in self._directory.glob("*.sock") if path != self._socket]
        line = f"{topic} {argument}" if argument else topic
        return list(await asyncio.gather(*(_ask(path, line) for path in siblings)))

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        topic = ""
        try:
            async with asyncio.timeout(SIBLING_TIMEOUT):
                line = (await reader.readline())[:LINE_MAX_BYTES].strip().decode("utf-8", "replace")
            topic, _, argument = line.partition(" ")
            answer = self.answers.get(topic)
            result = answer(argument) if answer is not None else b""
            writer.write(await result if inspect.isawaitable(result) else result)
            await writer.drain()
        except (OSError, TimeoutError):
            pass  # the asking worker gave up (timeout) or exited
        except Exception:  # a bug in one answer: the asker sees no answer, this worker goes on
            log.exception("answering a sibling worker failed", extra={"topic": topic})
        finally:
            writer.close()


async def _ask(path: Path, line: str) -> bytes | None:
    try:
        async with asyncio.timeout(SIBLING_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(line.encode() + b"\n")
                await writer.drain()
                return await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
            with contextlib.suppress(OSError):
                os.unlink(path)  # a worker that died without cleaning up
        log.warning("a sibling worker did not answer", extra={"topic": line.partition(" ")[0], "error": str(exc)})
        return None


def sibling_directory() -> Path | None:
    """The folder of the workers' sockets, when this process is one of several workers."""
    value = os.environ.get(WORKERS_ENV)
    return Path(value) if value else None
