"""The audit journal: an append-only spill file on local disk for audit batches the database cannot take now.

Why: audit records must never be lost while PostgreSQL is unreachable or slow. The writer (writer.py) spills
such batches here and replays them, in order, once the database answers again. Inserts are idempotent (ON
CONFLICT DO NOTHING on the request id), so handing a record over twice is harmless; losing one is not, and
every choice below prefers a possible duplicate to a possible loss.

Durability: `append` writes the whole batch and fsyncs once; when it returns, the batch is on disk. A crash
loses at most the batches whose `append` had not returned. A failed write (a full disk) cuts the file back
to its size before the batch, so no half batch sits between good lines; if even that fails, the segment is
sealed and later appends go to a fresh file, leaving the torn batch as its last line.

Sharing a root: each process works in its own directory under the root, locked for as long as it lives, so
several workers or replicas can share one root. A directory whose lock nobody holds belongs to a gateway that
crashed: whoever scans next (`open`, `refresh_orphans`, `replay`) takes the lock, which makes the directory its
own, replays its records before its own (they are older) and removes it.

Format: a directory holds segment files, filled in sequence order. Appends go to the current segment; it is
sealed (closed for good) when the next batch would make it larger than `segment_bytes`, or on `seal()`. Only
sealed segments (and every segment of an adopted directory) are replayed, and a segment is deleted once all its
records were accepted. Each line holds one record, as a checksummed JSON array.

Corruption: a line whose checksum does not match, that does not parse or that lacks its newline is
skipped. As the last line of a segment it is the torn tail of a write a crash cut short (a warning); anywhere
else it is damage (an error naming the file and line, counted in `corrupt_lines`). The rest is replayed.

Layout: this module keeps the Journal (its bookkeeping and the order of operations); journal_format.py holds
the line codec, journal_files.py the directories, locks and segment files on disk (run in worker threads).
`encode_line`, `decode_line` and `JournalError` are re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sluice.audit.journal_files import (
    JournalError,
    _adopt_orphans,
    _create_segment,
    _make_process_dir,
    _Orphan,
    _remove_process_dir,
    _Segment,
    _SegmentReader,
    _shut,
    _unlink_quietly,
    _Unrepaired,
    _write_durably,
)
from sluice.audit.journal_format import decode_line, encode_line
from sluice.audit.record import Record

__all__ = ["Journal", "JournalError", "JournalFull", "Sink", "decode_line", "encode_line"]

log = logging.getLogger("sluice.audit")

T = TypeVar("T")
Sink = Callable[[list[Record]], Awaitable[None]]


class JournalFull(JournalError):
    """Appending would exceed max_bytes."""


class Journal:
    """See the module docstring. Not thread-safe: use it from one event loop."""

    def __init__(self, root: Path, *, max_bytes: int, segment_bytes: int = 16 * 1024 * 1024) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.root = root
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.corrupt_lines = 0  # lines skipped as damaged, not counting torn last lines (each skip counts)
        self._dir: Path | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._next_sequence = 1
        self._current: _Segment | None = None
        self._sealed: list[_Segment] = []
        self._orphans: dict[Path, _Orphan] = {}
        self._append_lock = asyncio.Lock()
        self._replay_lock = asyncio.Lock()
        self._seal_when_written = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def directory(self) -> Path | None:
        """This process's own directory, once open."""
        return self._dir

    @property
    def pending_bytes(self) -> int:
        """Bytes in own segments (sealed and current) and in adopted orphan segments not yet replayed."""
        segments = [*self._sealed, *(s for orphan in self._orphans.values() for s in orphan.segments)]
        return (self._current.size if self._current else 0) + sum(s.size for s in segments)

    @property
    def pending(self) -> bool:
        """Anything on disk waiting for replay, own or adopted (call refresh_orphans() to rescan)."""
        return self.pending_bytes > 0

    def has_sealed(self) -> bool:
        """Whether replay() has something to do: sealed own segments, or orphans adopted at the last scan."""
        return bool(self._sealed or self._orphans)

    async def open(self) -> None:
        """Create root and this process's locked directory, then adopt any orphans already there."""
        if self._closed:
            raise JournalError(f"the audit journal under {self.root} is closed")
        if self._dir is None:
            self._dir, self._lock_fd = await asyncio.to_thread(_make_process_dir, self.root)
            log.info("audit journal open in %s", self._dir)
        await self.refresh_orphans()

    async def append(self, records: Sequence[Record]) -> None:
        """Write the batch and fsync it; it is durable when this returns (even if the caller is cancelled
        meanwhile, the write completes). Raises JournalFull (nothing written) or JournalError."""
        if not records:
            return
        data = b"".join(encode_line(record) for record in records)  # TypeError before anything is written
        await self._run_to_end(self._append(data, len(records)))

    def seal(self) -> None:
        """Close the current segment if it has records, so replay() takes it. While a write is in flight the
        seal happens as soon as that write is done."""
        if self._append_lock.locked():
            self._seal_when_written = True
        else:
            self._seal_current()

    async def refresh_orphans(self) -> int:
        """Rescan root and adopt directories no live process holds. Returns the bytes newly adopted."""
        self._own_dir()
        return await self._run_to_end(self._refresh_orphans())

    async def replay(self, sink: Sink, *, chunk: int = 500) -> int:
        """Hand every sealed and adopted segment's records to `sink`, oldest first, at most `chunk` at a time;
        delete each segment once all of it was accepted. If `sink` raises, stop and re-raise: that segment
        stays and is handed over from its start next time. Returns the number of records handed over."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        async with self._replay_lock:
            await self.refresh_orphans()
            handed = 0
            for orphan in list(self._orphans.values()):
                while orphan.segments:
                    handed += await self._replay_segment(orphan.segments[0], orphan.segments, sink, chunk)
                await self._run_to_end(self._forget_orphan(orphan))
            for segment in list(self._sealed):  # segments sealed meanwhile wait for the next replay
                handed += await self._replay_segment(segment, self._sealed, sink, chunk)
            return handed

    async def close(self) -> None:
        """Seal, release every lock, and remove the own directory if it holds no segments. Waits for a running
        replay: cancel that first if the database may hang."""
        await self._run_to_end(self._close())

    async def _append(self, data: bytes, count: int) -> None:
        async with self._append_lock:
            try:
                own = self._own_dir()
                if self.pending_bytes + len(data) > self.max_bytes:
                    raise JournalFull(
                        f"appending {count} audit records ({len(data)} bytes) to the journal in {own} would exceed"
                        f" its limit of {self.max_bytes} bytes ({self.pending_bytes} pending)"
                    )
                current = self._current
                if current is not None and current.size + len(data) > self.segment_bytes:
                    self._seal_current()
                    current = self._current
                if current is None:
                    path = own / f"seg-{self._next_sequence:012d}.jsonl"
                    self._next_sequence += 1
                    current = self._current = _Segment(path, 0, await _to_thread_or_error(_create_segment, path))
                assert current.fd is not None
                try:
                    current.size = await asyncio.to_thread(_write_durably, current.fd, data)
                except _Unrepaired as failure:
                    current.size = failure.size
                    self._seal_current()
                    raise JournalError(
                        f"could not write {count} audit records to {current.path}: {failure.__cause__}"
                        " (could not cut the file back either; sealed it, later appends go to a new file)"
                    ) from failure.__cause__
                except OSError as error:
                    raise JournalError(f"could not write {count} audit records to {current.path}: {error}") from error
            finally:
                if self._seal_when_written:
                    self._seal_when_written = False
                    self._seal_current()

    def _seal_current(self) -> None:
        current = self._current
        if current is None or current.size == 0:
            return
        if current.fd is not None:
            os.close(current.fd)
            current.fd = None
        self._sealed.append(current)
        self._current = None

    async def _refresh_orphans(self) -> int:
        known = {self._own_dir(), *self._orphans}
        adopted = await asyncio.to_thread(_adopt_orphans, self.root, known)
        for orphan in adopted:
            log.warning(
                "audit journal: adopted %s, left by a process that stopped without closing it (%d segments)",
                orphan.directory,
                len(orphan.segments),
            )
            self._orphans[orphan.directory] = orphan
            if not orphan.segments:
                await self._forget_orphan(orphan)
        return sum(segment.size for orphan in adopted for segment in orphan.segments)

    async def _forget_orphan(self, orphan: _Orphan) -> None:
        await asyncio.to_thread(_remove_process_dir, orphan.directory, orphan.lock_fd)
        orphan.lock_fd = None
        self._orphans.pop(orphan.directory, None)

    async def _replay_segment(self, segment: _Segment, owner: list[_Segment], sink: Sink, chunk: int) -> int:
        reader = _SegmentReader(segment.path)
        handed = 0
        try:
            while records := await asyncio.to_thread(reader.read, chunk):
                await sink(records)
                handed += len(records)
        finally:
            await self._run_to_end(asyncio.to_thread(reader.close))  # waits for a read still in its thread
            self.corrupt_lines += reader.corrupt
        await self._run_to_end(self._delete_segment(segment, owner))
        return handed

    async def _delete_segment(self, segment: _Segment, owner: list[_Segment]) -> None:
        await asyncio.to_thread(_unlink_quietly, segment.path)
        owner.remove(segment)

    async def _close(self) -> None:
        async with self._replay_lock, self._append_lock:
            if self._closed:
                return
            self._closed = True
            self._seal_current()
            self._seal_when_written = False
            leftover, self._current = self._current, None  # a segment a failed first write left empty
            orphans, self._orphans = list(self._orphans.values()), {}
            if self._dir is not None:
                await asyncio.to_thread(_shut, self._dir, self._lock_fd, leftover, orphans)
                log.info("audit journal in %s closed (%d bytes left for replay)", self._dir, self.pending_bytes)
            self._lock_fd = None
            for orphan in orphans:
                orphan.lock_fd = None

    def _own_dir(self) -> Path:
        if self._dir is None or self._closed:
            raise JournalError(f"the audit journal under {self.root} is {'closed' if self._closed else 'not open'}")
        return self._dir

    async def _run_to_end(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` to its end even if the caller is cancelled (the caller still gets CancelledError at once):
        stopping a disk operation halfway would put the bookkeeping out of step with the files (a descriptor
        closed under a writing thread, a lock taken but never recorded). A failure nobody awaits is logged."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_abandoned_failure)
            raise


async def _to_thread_or_error(function: Callable[[Path], T], path: Path) -> T:
    try:
        return await asyncio.to_thread(function, path)
    except OSError as error:
        raise JournalError(f"could not create audit journal segment {path}: {error}") from error


def _log_abandoned_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("audit journal: an operation whose caller was cancelled failed: %s", error)
