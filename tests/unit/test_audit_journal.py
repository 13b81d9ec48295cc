"""The audit journal on a real filesystem: order, durability across failures, corruption, and adopting the
directory of a process that died (a real SIGKILLed subprocess)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sluice.audit.journal import Journal, JournalError, JournalFull, decode_line, encode_line
from sluice.audit.record import Record

REPO = Path(__file__).resolve().parents[2]


def batch(start: int, count: int) -> list[Record]:
    return [(f"req-{i}", i, i * 0.5, i % 2 == 0, None, "line\nbreak é") for i in range(start, start + count)]


def segments(directory: Path | None) -> list[Path]:
    assert directory is not None
    return sorted(directory.glob("seg-*.jsonl"))


class Collector:
    """A sink that keeps what it was given; `fail_on` makes that call (1-based) raise instead."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.records: list[Record] = []
        self.chunks: list[int] = []
        self.fail_on = fail_on

    async def __call__(self, records: list[Record]) -> None:
        if len(self.chunks) + 1 == self.fail_on:
            self.fail_on = None
            raise ConnectionError("database went away again")
        self.chunks.append(len(records))
        self.records.extend(records)


@pytest.fixture
async def journals(tmp_path: Path) -> AsyncIterator[Callable[..., Journal]]:
    """Make journals on tmp_path/"root" (opened by the test); all closed afterwards."""
    made: list[Journal] = []

    def make(max_bytes: int = 1 << 20, segment_bytes: int = 16 * 1024 * 1024) -> Journal:
        journal = Journal(tmp_path / "root", max_bytes=max_bytes, segment_bytes=segment_bytes)
        made.append(journal)
        return journal

    yield make
    for journal in made:
        await journal.close()


def test_lines_round_trip_and_reject_damage() -> None:
    record = ("id", 1, 2.5, True, None, "ünï\ncode")
    line = encode_line(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_line(line) == record
    assert decode_line(line[:-1]) is None  # no newline
    assert decode_line(line.replace(b"2.5", b"2.6")) is None  # checksum
    assert decode_line(b"%08x {}\n" % 0) is None


async def test_replay_hands_over_everything_in_order_across_segments(journals: Callable[..., Journal]) -> None:
    journal = journals(segment_bytes=600)
    await journal.open()
    sent = [record for start in range(0, 50, 10) for record in batch(start, 10)]
    for start in range(0, 50, 10):
        await journal.append(sent[start : start + 10])
    journal.seal()
    assert len(segments(journal.directory)) >= 3
    assert journal.pending and journal.has_sealed()

    sink = Collector()
    assert await journal.replay(sink, chunk=4) == 50

    assert sink.records == sent
    assert max(sink.chunks) <= 4
    assert segments(journal.directory) == []
    assert not journal.pending and journal.pending_bytes == 0 and not journal.has_sealed()


async def test_replay_leaves_the_current_segment_alone(journals: Callable[..., Journal]) -> None:
    journal = journals()
    await journal.open()
    await journal.append(batch(0, 3))
    assert not journal.has_sealed()
    assert await journal.replay(Collector()) == 0
    assert journal.pending and len(segments(journal.directory)) == 1


async def test_a_failing_sink_keeps_the_segment_for_the_next_replay(journals: Callable[..., Journal]) -> None:
    journal = journals()
    await journal.open()
    await journal.append(batch(0, 10))
    journal.seal()

    failing = Collector(fail_on=2)
    with pytest.raises(ConnectionError):
        await journal.replay(failing, chunk=3)
    assert failing.records == batch(0, 3)
    assert len(segments(journal.directory)) == 1 and journal.pending

    sink = Collector()
    assert await journal.replay(sink, chunk=3) == 10
    assert sink.records == batch(0, 10)  # from the start of the segment again: idempotent inserts absorb it
    assert not journal.pending


async def test_appends_during_a_replay_wait_for_the_next_one(journals: Callable[..., Journal]) -> None:
    journal = journals(segment_bytes=400)
    await journal.open()
    await journal.append(batch(0, 10))
    journal.seal()
    arriving = iter(range(100, 1000, 5))

    class AppendingSink(Collector):
        async def __call__(self, records: list[Record]) -> None:
            await super().__call__(records)
            await journal.append(batch(next(arriving), 5))  # live traffic keeps spilling meanwhile

    first = AppendingSink()
    assert await journal.replay(first, chunk=2) == 10
    assert first.records == batch(0, 10)
    spilled = [record for start in range(100, 125, 5) for record in batch(start, 5)]
    assert journal.pending

    journal.seal()
    second = Collector()
    assert await journal.replay(second, chunk=7) == len(spilled)
    assert second.records == spilled
    assert not journal.pending


async def test_a_torn_last_line_is_skipped_quietly(
    journals: Callable[..., Journal], caplog: pytest.LogCaptureFixture
) -> None:
    journal = journals()
    await journal.open()
    await journal.append(batch(0, 4))
    journal.seal()
    [segment] = segments(journal.directory)
    with segment.open("ab") as file:  # a crash in the middle of writing the next line
        file.write(encode_line(batch(4, 1)[0])[:20])

    sink = Collector()
    with caplog.at_level(logging.WARNING, logger="sluice.audit"):
        assert await journal.replay(sink) == 4
    assert sink.records == batch(0, 4)
    assert journal.corrupt_lines == 0
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "torn last line 5" in caplog.text


async def test_a_corrupt_middle_line_is_skipped_and_counted(
    journals: Callable[..., Journal], caplog: pytest.LogCaptureFixture
) -> None:
    journal = journals()
    await journal.open()
    await journal.append(batch(0, 4))
    journal.seal()
    [segment] = segments(journal.directory)
    data = bytearray(segment.read_bytes())
    second_line = data.index(b"\n") + 1
    data[second_line + 15] ^= 0x01  # one bit flipped inside line 2's JSON
    segment.write_bytes(bytes(data))

    sink = Collector()
    with caplog.at_level(logging.WARNING, logger="sluice.audit"):
        assert await journal.replay(sink) == 3
    assert sink.records == [batch(0, 4)[i] for i in (0, 2, 3)]
    assert journal.corrupt_lines == 1
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert segment.name in error.getMessage() and "line 2" in error.getMessage()


async def test_journal_full_writes_nothing_until_a_replay_frees_space(journals: Callable[..., Journal]) -> None:
    one_batch = len(b"".join(encode_line(r) for r in batch(0, 5)))
    journal = journals(max_bytes=one_batch * 2 + 10)
    await journal.open()
    await journal.append(batch(0, 5))
    await journal.append(batch(5, 5))
    size = journal.pending_bytes
    on_disk = [p.stat().st_size for p in segments(journal.directory)]

    with pytest.raises(JournalFull, match="would exceed"):
        await journal.append(batch(10, 5))
    assert journal.pending_bytes == size
    assert [p.stat().st_size for p in segments(journal.directory)] == on_disk

    journal.seal()
    await journal.replay(Collector())
    await journal.append(batch(10, 5))
    journal.seal()
    sink = Collector()
    await journal.replay(sink)
    assert sink.records == batch(10, 5)


def fill_the_disk(monkeypatch: pytest.MonkeyPatch, *, truncate_fails: bool = False) -> None:
    """Make writes to segment files fail with ENOSPC after writing half their bytes, as a disk filling up
    mid-batch does. A real full filesystem needs a mount (tmpfs) that tests cannot count on, so the write
    system call is wrapped instead; other descriptors (the event loop, logging) are untouched."""
    real_write, real_truncate = os.write, os.ftruncate

    def is_segment(fd: int) -> bool:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl")

    def write(fd: int, data: bytes) -> int:
        if not is_segment(fd):
            return real_write(fd, data)
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def ftruncate(fd: int, length: int) -> None:
        if truncate_fails and is_segment(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_truncate(fd, length)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "ftruncate", ftruncate)


async def test_a_failed_write_leaves_the_segment_as_it_was(
    journals: Callable[..., Journal], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    journal = journals()
    await journal.open()
    await journal.append(batch(0, 5))
    [segment] = segments(journal.directory)
    size = segment.stat().st_size

    with monkeypatch.context() as patch:
        fill_the_disk(patch)
        with pytest.raises(JournalError, match="No space left on device") as failure:
            await journal.append(batch(5, 5))
    assert str(segment) in str(failure.value)
    assert segment.stat().st_size == size == journal.pending_bytes

    await journal.append(batch(10, 5))
    journal.seal()
    sink = Collector()
    with caplog.at_level(logging.WARNING, logger="sluice.audit"):
        await journal.replay(sink)
    assert sink.records == batch(0, 5) + batch(10, 5)
    assert journal.corrupt_lines == 0 and "torn" not in caplog.text


async def test_a_write_that_cannot_be_cut_back_seals_its_segment(
    journals: Callable[..., Journal], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    journal = journals()
    await journal.open()
    await journal.append(batch(0, 5))

    with monkeypatch.context() as patch:
        fill_the_disk(patch, truncate_fails=True)
        with pytest.raises(JournalError, match="sealed it"):
            await journal.append(batch(5, 5))
    assert journal.has_sealed()

    await journal.append(batch(10, 5))
    assert len(segments(journal.directory)) == 2  # the later batch went to a fresh file
    journal.seal()
    sink = Collector()
    with caplog.at_level(logging.WARNING, logger="sluice.audit"):
        await journal.replay(sink)
    # Whole lines of the failed batch may come through too (a harmless duplicate if the writer retries it).
    assert sink.records[:5] == batch(0, 5) and sink.records[-5:] == batch(10, 5)
    assert set(sink.records) <= set(batch(0, 15))
    assert journal.corrupt_lines == 0 and "torn last line" in caplog.text


async def test_a_cancelled_append_still_finishes_its_write(journals: Callable[..., Journal]) -> None:
    journal = journals()
    await journal.open()
    task = asyncio.create_task(journal.append(batch(0, 5)))
    await asyncio.sleep(0)  # the write has started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await journal.append(batch(5, 5))  # queues behind the cancelled caller's write
    journal.seal()
    sink = Collector()
    await journal.replay(sink)
    assert sink.records == batch(0, 10)


async def test_open_names_a_root_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")  # works as root too, unlike chmod
    journal = Journal(tmp_path / "a-file" / "journal", max_bytes=1000)
    with pytest.raises(JournalError, match="a-file"):
        await journal.open()
    with pytest.raises(JournalError, match="not open"):
        await journal.append(batch(0, 1))


async def test_close_removes_an_empty_directory_and_keeps_one_with_records(journals: Callable[..., Journal]) -> None:
    empty, busy = journals(), journals()
    await empty.open()
    await busy.open()
    await busy.append(batch(0, 3))  # never sealed: close seals it
    await empty.close()
    await busy.close()
    assert empty.directory is not None and not empty.directory.exists()
    assert len(segments(busy.directory)) == 1

    later = journals()
    await later.open()  # a closed journal's directory is free to adopt, like a crashed one's
    assert later.pending
    sink = Collector()
    await later.replay(sink)
    assert sink.records == batch(0, 3)
    assert busy.directory is not None and not busy.directory.exists()


async def test_a_live_journals_directory_is_left_alone(journals: Callable[..., Journal]) -> None:
    alive, other = journals(), journals()
    await alive.open()
    await alive.append(batch(0, 3))
    alive.seal()
    await other.open()
    assert await other.refresh_orphans() == 0
    assert await other.replay(Collector()) == 0
    assert not other.pending and len(segments(alive.directory)) == 1


CHILD = """
import asyncio, sys
from pathlib import Path
from sluice.audit.journal import Journal

async def main():
    journal = Journal(Path(sys.argv[1]), max_bytes=1 << 20)
    await journal.open()
    for start in range(0, int(sys.argv[2]), 4):  # one sealed segment per batch, the last one left current
        await journal.append([(f"req-{i}", i) for i in range(start, min(start + 4, int(sys.argv[2])))])
        journal.seal()
    await journal.append([("req-current", -1)])
    print(journal.directory, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def start_child(root: Path, records: int) -> tuple[asyncio.subprocess.Process, Path]:
    """A gateway process with spilled records, waiting to be killed; returns it and its journal directory."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(root), str(records), cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), timeout=10)
    return child, Path(line.decode().strip())


async def test_a_killed_process_directory_is_adopted_and_replayed_first(
    journals: Callable[..., Journal], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    child, directory = await start_child(root, 10)
    journal = journals(segment_bytes=100)
    try:
        await journal.open()
        assert not journal.pending  # the child is alive: its directory is not ours to take
        await journal.append(batch(0, 2))
        journal.seal()
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()

    assert await journal.refresh_orphans() > 0
    assert journal.pending and journal.has_sealed()
    sink = Collector()
    assert await journal.replay(sink, chunk=3) == 13
    orphaned = [(f"req-{i}", i) for i in range(10)] + [("req-current", -1)]
    assert sink.records == orphaned + batch(0, 2)  # the dead process's records, in its order, before ours
    assert not directory.exists()
    assert [p.name for p in root.iterdir()] == [journal.directory.name if journal.directory else ""]


async def test_an_adopted_empty_directory_is_removed(tmp_path: Path, journals: Callable[..., Journal]) -> None:
    root = tmp_path / "root"
    child, directory = await start_child(root, 0)
    child.send_signal(signal.SIGKILL)
    await child.wait()
    for segment in segments(directory):  # as if the child had spilled nothing
        segment.unlink()

    journal = journals()
    await journal.open()
    assert not directory.exists() and not journal.pending
