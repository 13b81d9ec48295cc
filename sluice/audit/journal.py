"""The audit journal: an append-only spill file on local disk for audit batches the database cannot take now.

Why: audit records must never be lost while PostgreSQL is unreachable or slow. The writer (writer.py) spills
such batches here and replays them, in order, once the database answers again. Inserts are idempotent (ON
CONFLICT DO NOTHING on the request id), so handing a record over twice is harmless; losing one is not, and
every choice below prefers a possible duplicate to a possible loss.

Durability: `append` writes the whole batch and fsyncs once; when it returns, the batch is on disk. A crash
loses at most the batches whose `append` had not returned. A failed write (a full disk) cuts the file back
to its size before the batch, so no half batch sits between good lines; if even that fails, the segment is
sealed and later appends go to a fresh file, leaving the torn batch as its last line.

Sharing a root: each process works in its own directory `root/<uuid4 hex>/`, holding an exclusive
`flock` on the `lock` file inside for as long as it lives (the kernel drops it when the process dies, even
on SIGKILL). Several workers or replicas can therefore share one root. A directory whose lock nobody holds
belongs to a gateway that crashed: whoever scans next (`open`, `refresh_orphans`, `replay`) takes the lock,
which makes the directory its own, replays its records before its own (they are older) and removes it.
A new directory is built under a hidden name and renamed into place with its lock already held, so a
scanner never mistakes a starting process for a dead one.

Format: a directory holds segment files `seg-<12-digit sequence>.jsonl`, filled in sequence order. Appends
go to the current segment; it is sealed (closed for good) when the next batch would make it larger than
`segment_bytes`, or on `seal()`. Only sealed segments (and every segment of an adopted directory) are
replayed, and a segment is deleted once all its records were accepted. Each line is
`<crc32 of the JSON, 8 lowercase hex digits> <JSON array>\\n`; records come back as tuples.

Corruption: a line whose checksum does not match, that does not parse or that lacks its newline is
skipped. As the last line of a segment it is the torn tail of a write a crash cut short (a warning); anywhere
else it is damage (an error naming the file and line, counted in `corrupt_lines`). The rest is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import threading
import uuid
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import orjson

from sluice.audit.record import Record

log = logging.getLogger("sluice.audit")

T = TypeVar("T")
LOCK_NAME = "lock"
STAGING_PREFIX = ".new-"  # a directory still being set up; never adopted
PROCESS_DIR = re.compile(r"[0-9a-f]{32}")
SEGMENT = re.compile(r"seg-(\d{12})\.jsonl")
Sink = Callable[[list[Record]], Awaitable[None]]


class JournalError(Exception):
    """Writing to the journal failed (disk full, permissions, ...); message says what and where."""


class JournalFull(JournalError):
    """Appending would exceed max_bytes."""


def encode_line(record: Record) -> bytes:
    """One journal line; raises TypeError (orjson.JSONEncodeError) for a value JSON cannot hold."""
    payload = orjson.dumps(record)
    return b"%08x %b\n" % (zlib.crc32(payload), payload)


def decode_line(line: bytes) -> Record | None:
    """The record on one line, or None when the line is corrupt."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    payload = line[9:-1]
    if line[:8] != b"%08x" % zlib.crc32(payload):
        return None
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return tuple(value) if isinstance(value, list) else None


@dataclass(eq=False)
class _Segment:
    path: Path
    size: int
    fd: int | None = None  # open for appending while it is the current segment


@dataclass(eq=False)
class _Orphan:
    directory: Path
    lock_fd: int | None
    born: float  # the lock file's mtime: when the dead process started
    segments: list[_Segment] = field(default_factory=list)


class _Unrepaired(Exception):
    """A failed write could not be cut back; the segment holds up to `size` bytes, the last line torn."""

    def __init__(self, size: int) -> None:
        self.size = size


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


class _SegmentReader:
    """Reads one segment a chunk at a time in a worker thread, looking one line ahead to tell a torn last
    line from damage in the middle. The guard lets close() wait for a read still running in its thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.corrupt = 0
        self._guard = threading.Lock()
        self._file: BinaryIO | None = None
        self._next = b""
        self._line_number = 0

    def read(self, limit: int) -> list[Record]:
        with self._guard:
            file = self._file
            if file is None:
                try:
                    file = self._file = self.path.open("rb")
                except FileNotFoundError:  # deleted by a replay cancelled before it could note that
                    return []
                self._next = file.readline()
            records: list[Record] = []
            while len(records) < limit and self._next:
                line, self._next = self._next, file.readline()
                self._line_number += 1
                record = decode_line(line)
                if record is not None:
                    records.append(record)
                elif not self._next:
                    log.warning("audit journal %s: skipped torn last line %d", self.path, self._line_number)
                else:
                    self.corrupt += 1
                    log.error("audit journal %s: skipped corrupt line %d", self.path, self._line_number)
            return records

    def close(self) -> None:
        with self._guard:
            if self._file is not None:
                self._file.close()


async def _to_thread_or_error(function: Callable[[Path], T], path: Path) -> T:
    try:
        return await asyncio.to_thread(function, path)
    except OSError as error:
        raise JournalError(f"could not create audit journal segment {path}: {error}") from error


def _make_process_dir(root: Path) -> tuple[Path, int]:
    name = uuid.uuid4().hex
    staging, final = root / f"{STAGING_PREFIX}{name}", root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging.mkdir(mode=0o700)
        fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, b"%d\n" % os.getpid())  # for whoever looks at the directory
            os.rename(staging, final)
            _fsync_dir(root)
        except OSError:
            os.close(fd)
            raise
    except OSError as error:
        with contextlib.suppress(OSError):
            (staging / LOCK_NAME).unlink(missing_ok=True)
            staging.rmdir()
        raise JournalError(f"cannot create the audit journal's directory under {root}: {error}") from error
    return final, fd


def _create_segment(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        _fsync_dir(path.parent)  # the new name must survive a crash as well as the data written to it
    except OSError:
        os.close(fd)
        _unlink_quietly(path)
        raise
    return fd


def _write_durably(fd: int, data: bytes) -> int:
    """Append and fsync; return the new size. On failure cut the file back to its size before the batch."""
    size_before = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as error:
        try:
            os.ftruncate(fd, size_before)  # O_APPEND: the next write lands at the new end
        except OSError:
            raise _Unrepaired(size_before + len(data)) from error
        raise
    return size_before + len(data)


def _adopt_orphans(root: Path, known: set[Path]) -> list[_Orphan]:
    try:
        names = os.listdir(root)
    except OSError as error:
        log.warning("audit journal: cannot scan %s for orphans: %s", root, error)
        return []
    adopted = []
    for name in names:
        directory = root / name
        if not PROCESS_DIR.fullmatch(name) or directory in known:
            continue
        try:
            orphan = _try_adopt(directory)
        except OSError as error:
            log.warning("audit journal: cannot inspect %s: %s", directory, error)
            continue
        if orphan is not None:
            adopted.append(orphan)
    return sorted(adopted, key=lambda orphan: orphan.born)


def _try_adopt(directory: Path) -> _Orphan | None:
    """Take the directory's lock if no process holds it; None when it is alive (or gone)."""
    lock = directory / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    adopted = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a live process (possibly another journal in this one)
        held = os.fstat(fd)
        try:
            if os.stat(lock).st_ino != held.st_ino:
                return None
            segments = _list_segments(directory)
        except FileNotFoundError:  # removed by its adopter between our open and our lock
            return None
        adopted = True
        return _Orphan(directory, fd, held.st_mtime, segments)
    finally:
        if not adopted:
            os.close(fd)


def _list_segments(directory: Path) -> list[_Segment]:
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if match := SEGMENT.fullmatch(entry.name):
                found.append((int(match[1]), _Segment(Path(entry.path), entry.stat().st_size)))
    return [segment for _, segment in sorted(found, key=lambda pair: pair[0])]


def _remove_process_dir(directory: Path, lock_fd: int | None) -> None:
    """Remove an emptied directory, then let go of its lock (in that order, so nobody adopts it meanwhile)."""
    try:
        (directory / LOCK_NAME).unlink(missing_ok=True)
        directory.rmdir()
    except OSError as error:
        log.warning("audit journal: could not remove %s: %s", directory, error)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _shut(own: Path, lock_fd: int | None, leftover: _Segment | None, orphans: list[_Orphan]) -> None:
    if leftover is not None:
        if leftover.fd is not None:
            os.close(leftover.fd)
        _unlink_quietly(leftover.path)
    for orphan in orphans:  # still holding segments: the next scanner (any process) adopts them again
        if orphan.lock_fd is not None:
            os.close(orphan.lock_fd)
    try:
        keep = bool(_list_segments(own))
    except OSError as error:
        log.warning("audit journal: cannot list %s, leaving it for the next scan: %s", own, error)
        keep = True
    if not keep:
        _remove_process_dir(own, lock_fd)
    elif lock_fd is not None:
        os.close(lock_fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _log_abandoned_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("audit journal: an operation whose caller was cancelled failed: %s", error)
