"""The channel between sibling workers (sluice/siblings.py), with real Unix sockets in one process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sluice.siblings import SIBLING_TIMEOUT, Siblings


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[tuple[Siblings, Siblings, Siblings]]:
    trio = (Siblings(tmp_path, "1"), Siblings(tmp_path, "2"), Siblings(tmp_path, "3"))
    for worker in trio:
        await worker.start()
    yield trio
    for worker in trio:
        await worker.close()


async def test_every_sibling_answers_a_topic_with_its_argument(workers: tuple[Siblings, Siblings, Siblings]) -> None:
    one, two, three = workers
    two.answers["echo"] = lambda argument: f"two:{argument}".encode()

    async def later(argument: str) -> bytes:
        await asyncio.sleep(0.01)
        return f"three:{argument}".encode()

    three.answers["echo"] = later  # an answer may be awaited
    assert sorted(await one.ask("echo", "a b|c")) == [b"three:a b|c", b"two:a b|c"]  # never itself
    assert sorted(await one.ask("echo")) == [b"three:", b"two:"]
    assert await one.ask_each("unknown") == [b"", b""]


async def test_listed_answers_are_read_as_lines(workers: tuple[Siblings, Siblings, Siblings]) -> None:
    one, two, three = workers
    two.answers["held"] = lambda _: b"a|x\nb|y"
    three.answers["held"] = lambda _: b""  # holds nothing
    assert sorted(await one.ask_lines("held")) == ["a|x", "b|y"]
    three.answers["held"] = lambda _: b"\xff|z"
    assert "\ufffd|z" in await one.ask_lines("held")  # undecodable bytes replaced, not raised


async def test_a_silent_failing_or_dead_sibling_is_reported_missing(
    tmp_path: Path, workers: tuple[Siblings, Siblings, Siblings], caplog: pytest.LogCaptureFixture
) -> None:
    one, two, three = workers

    async def stuck(_: str) -> bytes:
        await asyncio.sleep(SIBLING_TIMEOUT + 1)
        return b"too late"

    def broken(_: str) -> bytes:
        raise ValueError("a bug in one answer")

    two.answers["t"], three.answers["t"] = stuck, broken
    (tmp_path / "4.sock").write_bytes(b"")  # a worker that died without cleaning up
    with caplog.at_level(logging.WARNING):
        answers = await one.ask_each("t")
    assert sorted(answers, key=repr) == [None, None, b""]  # stuck and dead: None; broken: nothing written
    assert not (tmp_path / "4.sock").exists()  # forgotten
    assert any("answering a sibling worker failed" in r.getMessage() for r in caplog.records)
    two.answers["t"] = lambda _: b"fine"
    assert sorted(await one.ask("t")) == [b"", b"fine"]  # the channel still works for everyone


async def test_a_closed_worker_leaves_no_socket(tmp_path: Path) -> None:
    worker = Siblings(tmp_path, "9")
    await worker.start()
    assert (tmp_path / "9.sock").exists()
    await worker.close()
    assert not list(tmp_path.iterdir())
