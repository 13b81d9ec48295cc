"""The audit journal's files on disk: per-process directories, their locks and adoption, and segment files.

Why a module of its own: these are the blocking filesystem steps (creating, writing durably, listing, locking,
adopting, reading, removing). The Journal (journal.py) runs each in a worker thread and keeps the bookkeeping.

Directories: each process works in its own directory `root/<uuid4 hex>/`, holding an exclusive `flock` on the
`lock` file inside for as long as it lives (the kernel drops it when the process dies, even on SIGKILL). A
directory whose lock nobody holds belongs to a gateway that crashed: whoever takes the lock makes the directory
its own (orphans are adopted oldest first, by the lock file's mtime) and removes it once it is emptied. A new
directory is built under a hidden name and renamed into place with its lock already held, so a scanner never
mistakes a starting process for a dead one. Removal unlinks before it lets go of the lock, so nobody adopts a
directory meanwhile.

Segments: a directory holds segment files `seg-<12-digit sequence>.jsonl`, listed in sequence order. A new
segment's name is fsynced in its directory too. A write appends the whole batch and fsyncs once; if it fails,
the file is cut back to its size before the batch, and if even that fails `_Unrepaired` says how large the file
may now be. A reader looks one line ahead to tell a torn last line (a warning) from damage in the middle (an
error, counted).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sluice.audit.journal_format import decode_line
from sluice.audit.record import Record

log = logging.getLogger("sluice.audit")

LOCK_NAME = "lock"
STAGING_PREFIX = ".new-"  # a directory still being set up; never adopted
PROCESS_DIR = re.compile(r"[0-9a-f]{32}")
SEGMENT = re.compile(r"seg-(\d{12})\.jsonl")


class JournalError(Exception):
    """Writing to the journal failed (disk full, permissions, ...); message says what and where."""


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
