"""The audit writer: the request path hands over a record; batches reach the database, or the journal.

`submit(record)` is all a request does: an append to an in-memory queue, no I/O, no await. A background
task takes up to `audit.batch_size` records whenever that many are waiting or `audit.flush_interval` has
passed, and inserts them in one statement (sluice/audit/sink.py, idempotent on the request id).

When the database is unreachable, errs, or takes longer than `audit.write_timeout`, the batch is appended
to the on-disk journal instead (sluice/audit/journal.py; durable once the append returns), and so is every
batch after it while anything waits there, so the database receives records in the order they were made.
Every `audit.retry_interval` a recovery task probes the database; once it answers, the journal is replayed
into it, oldest first (including journals that a crashed gateway left behind), and direct inserts resume
when the journal is empty. A batch written twice (an insert that timed out but committed, a replay cut
short by a crash) is skipped by the database, so every record lands exactly once.

A database that is up but slower than the traffic is handled the same way: when the queue is half full
after an insert, the next batches go to the journal (a sequential append), and the recovery task feeds
them to the database at its own pace, so a burst is absorbed on disk rather than in memory.

Memory is bounded. The queue holds at most `audit.queue_size` records; it only fills when both the database
and the journal refuse (the disk is full, or the journal reached `audit.journal_max_bytes`). Then
`audit.on_full` decides: `reject` (default) answers new requests 503 until there is room (`saturated`,
checked at admission; requests already admitted still add their record, so the queue can exceed its size by
at most the requests in flight), `drop` counts each record it cannot keep in `sluice_audit_records_total`
{outcome="dropped"}. On shutdown the queue is written to the database or, failing that, to the journal.

The database may be down when the gateway starts: the writer journals from the first request and connects
in the background (`open_database` is retried every `retry_interval`). It also keeps the daily partitions
and the retention (sluice/audit/partitions.py): at start-up, after every reconnection and hourly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

from sluice.audit import sink
from sluice.audit.journal import Journal, JournalError, encode_line
from sluice.audit.partitions import maintain
from sluice.audit.record import Record
from sluice.config import AuditConfig
from sluice.store.database import Database, DatabaseUnavailable

log = logging.getLogger("sluice.audit")
MAINTENANCE_INTERVAL = 3600.0
OUTCOMES = ("written", "journaled", "replayed", "dropped", "rejected", "invalid")
DEAD_LETTER = "invalid.jsonl"  # records the database refused for their content, in the journal's line format
# The database is not there for us (try again later), as opposed to refusing what we sent.
UNAVAILABLE = (DatabaseUnavailable, TimeoutError, OSError)


class AuditWriter:
    def __init__(
        self,
        config: AuditConfig,
        open_database: Callable[[], Awaitable[Database]],
        *,
        journal: Journal | None = None,
        today: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """`open_database` returns a connected, migrated database (or raises DatabaseError)."""
        self.config = config
        self._open_database = open_database
        self._today = today
        self.journal = journal or Journal(Path(config.journal_dir), max_bytes=config.journal_max_bytes)
        self.database: Database | None = None
        self.queue: deque[Record] = deque()
        self.counts = dict.fromkeys(OUTCOMES, 0)  # exported as sluice_audit_records_total{outcome}
        self.database_up = False  # the last insert or probe succeeded
        self.journal_failing = False  # the last journal append failed (disk full, journal full)
        self._wake = asyncio.Event()  # a full batch is waiting, or closing
        self._recover = asyncio.Event()  # something for the recovery task: records journaled, or closing
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._maintained_at = -MAINTENANCE_INTERVAL
        self._told_unreachable = False
        self._in_hand = 0  # records taken from the queue by the write in progress (they count against its size)

    # ---- the request path ----

    def submit(self, record: Record) -> None:
        """Queue one record (never waits). With `on_full: drop` a record that does not fit is counted and dropped."""
        queue = self.queue
        if len(queue) + self._in_hand >= self.config.queue_size and self.config.on_full == "drop":
            self.counts["dropped"] += 1
            return
        queue.append(record)
        if len(queue) >= self.config.batch_size:
            self._wake.set()

    @property
    def saturated(self) -> bool:
        """New requests must be refused (`on_full: reject` and no room for their records)."""
        return len(self.queue) + self._in_hand >= self.config.queue_size and self.config.on_full == "reject"

    def rejected(self) -> None:
        """A request was refused because of `saturated` (it has no record of its own)."""
        self.counts["rejected"] += 1

    # ---- lifecycle ----

    async def start(self) -> None:
        await self.journal.open()
        await self._connect()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="audit-writer"),
            asyncio.create_task(self._recovery_loop(), name="audit-recovery"),
        ]
        if self.database is None or await self._has_journal():
            self._recover.set()

    async def close(self) -> None:
        """Write what is queued (database, else journal), stop the tasks, close the journal.

        The database belongs to whoever `open_database` got it from; it stays open.
        """
        self._closing = True
        self._stopping.set()
        self._wake.set()
        self._recover.set()
        if self._tasks:  # they stop at their next turn; a replay into a hanging database is cut short
            _, running = await asyncio.wait(self._tasks, timeout=self.config.write_timeout)
            for task in running:
                task.cancel()
            for task in running:
                with suppress(asyncio.CancelledError):
                    await task
        while self.queue:
            batch = self._take()
            if not await self._write(batch):
                log.error("audit records lost at shutdown: the database and the journal both refused",
                          extra={"records": len(batch) + len(self.queue)})  # fmt: skip
                self.counts["dropped"] += len(batch) + len(self.queue)
                self.queue.clear()
        await self.journal.close()

    # ---- the writer task ----

    async def _write_loop(self) -> None:
        await _forever(self._write_once, self._stopping)

    async def _write_once(self) -> None:
        while not self._closing:
            if len(self.queue) < self.config.batch_size:
                await _wait(self._wake, self.config.flush_interval)
            self._wake.clear()
            while self.queue:
                batch = self._take()
                self._in_hand = len(batch)
                try:
                    written = await self._write(batch)
                except BaseException:  # cancelled at shutdown, or a bug: the batch goes back, close() writes it
                    self.queue.extendleft(reversed(batch))
                    raise
                finally:
                    self._in_hand = 0
                if not written:
                    self.queue.extendleft(reversed(batch))  # keep the order; try again after a pause
                    await _wait(self._stopping, self.config.retry_interval)
                    break
                if len(self.queue) < self.config.batch_size:
                    break  # a partial batch waits for the next interval

    def _take(self) -> list[Record]:
        queue, size = self.queue, self.config.batch_size
        return [queue.popleft() for _ in range(min(size, len(queue)))]

    async def _write(self, batch: list[Record]) -> bool:
        """Insert `batch`, else journal it; False when neither worked (the batch is not stored)."""
        direct = self.database_up and not self.journal.pending and len(self.queue) < self.config.queue_size // 2
        if direct and await self._insert(batch):
            self.counts["written"] += len(batch)
            return True
        try:
            await self.journal.append(batch)
        except JournalError as exc:
            if not self.journal_failing:
                log.error("audit journal refused records; they wait in memory", extra={"error": str(exc)})
            self.journal_failing = True
            return False
        if self.journal_failing:
            log.warning("audit journal accepts records again")
        self.journal_failing = False
        self.counts["journaled"] += len(batch)
        self._recover.set()
        return True

    async def _insert(self, batch: list[Record]) -> bool:
        database = self.database
        if database is None:
            return False
        try:
            await self._store(database, batch)
        except UNAVAILABLE as exc:
            self._went_down(exc)
            return False
        return True

    async def _store(self, database: Database, records: list[Record]) -> None:
        """Insert `records` (bounded by `write_timeout`); raises one of UNAVAILABLE to try again later.

        A batch the database refuses for its content (not for being away) is retried record by record, and
        the records it still refuses go to the dead-letter file beside the journal, so one bad record can
        neither block the log nor be lost. When it refuses every record of the batch, and not all for their
        data (a data exception or a constraint), the fault is the database's (read-only after a failover,
        permissions): that counts as unavailable, and the batch goes to the journal to be tried again.
        """
        try:
            async with asyncio.timeout(self.config.write_timeout):
                await sink.insert(database, records)
            return
        except UNAVAILABLE:
            raise
        except Exception as exc:  # whatever the driver raised, the records must survive it
            log.error("audit database refused a batch; inserting its records one by one",
                      extra={"records": len(records), "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
        refused: list[tuple[Record, Exception]] = []
        for record in records:
            try:
                async with asyncio.timeout(self.config.write_timeout):
                    await sink.insert(database, [record])
            except UNAVAILABLE:
                raise
            except Exception as exc:
                refused.append((record, exc))
        if len(refused) == len(records) and not all(_about_the_data(error) for _, error in refused):
            # Not these records: the database (read-only after a failover, permissions, a trigger, ...).
            raise DatabaseUnavailable(f"the database refuses every audit record: {refused[0][1]}")
        for record, error in refused:
            await self._dead_letter(record, error)

    async def _dead_letter(self, record: Record, exc: Exception) -> None:
        path = Path(self.config.journal_dir) / DEAD_LETTER
        line = encode_line(record)

        def append() -> None:
            with path.open("ab") as file:
                file.write(line)
                file.flush()
                os.fsync(file.fileno())

        await asyncio.to_thread(append)
        self.counts["invalid"] += 1
        reason = f"{type(exc).__name__}: {exc}"
        log.error("audit record refused by the database; kept in the dead-letter file",
                  extra={"request_id": record[0], "file": str(path), "error": reason})  # fmt: skip

    def _went_down(self, exc: BaseException) -> None:
        if self.database_up:
            reason = str(exc) or f"no answer within {self.config.write_timeout:g} s"
            log.warning("audit database unavailable; records go to the journal", extra={"error": reason})
        self.database_up = False
        self._recover.set()

    # ---- recovery: connect, replay the journal, keep partitions ----

    async def _recovery_loop(self) -> None:
        await _forever(self._recover_once, self._stopping)

    async def _recover_once(self) -> None:
        while not self._closing:
            await _wait(self._recover, MAINTENANCE_INTERVAL / 4)
            self._recover.clear()
            while not self._closing and (not self.database_up or await self._has_journal()):
                if await self._reconnect() and await self._replay():
                    break
                await _wait(self._stopping, self.config.retry_interval)
            if time.monotonic() - self._maintained_at >= MAINTENANCE_INTERVAL and self.database_up:
                await self._maintain()

    async def _has_journal(self) -> bool:
        await self.journal.refresh_orphans()
        return self.journal.pending

    async def _reconnect(self) -> bool:
        """The database answers (connecting first if need be)."""
        if self.database is None:
            return await self._connect()
        try:
            async with asyncio.timeout(self.config.write_timeout):
                await self.database.fetchval("SELECT 1")
        except Exception:  # not answering, whichever way
            return False
        if not self.database_up:
            log.info("audit database reachable again")
            self._maintained_at = -MAINTENANCE_INTERVAL
        return True

    async def _connect(self) -> bool:
        try:
            self.database = await self._open_database()
        except Exception as exc:  # unreachable, refused, a migration failing: try again later
            if not self._told_unreachable:
                log.warning("audit database unavailable; records go to the journal", extra={"error": str(exc)})
                self._told_unreachable = True
            return False
        if self._told_unreachable:
            log.info("audit database connected")
        await self._maintain()
        self.database_up = True
        return True

    async def _replay(self) -> bool:
        """Replay the journal until it is empty; False if the database failed meanwhile."""
        database = self.database
        assert database is not None

        async def into_database(records: list[Record]) -> None:
            await self._store(database, records)
            self.counts["replayed"] += len(records)

        while await self._has_journal():
            self.journal.seal()
            try:
                replayed = await self.journal.replay(into_database, chunk=self.config.batch_size)
            except UNAVAILABLE as exc:
                self._went_down(exc)
                return False
            if replayed:
                log.info("audit journal replayed", extra={"records": replayed})
        self.database_up = True
        return True

    async def _maintain(self) -> None:
        database = self.database
        if database is None:
            return
        try:
            async with asyncio.timeout(self.config.write_timeout * 4):
                done = await maintain(
                    database,
                    today=self._today().date(),
                    ahead=self.config.partitions_ahead,
                    retention_days=self.config.retention_days,
                )
        except Exception as exc:  # retried at the next reconnection or hour
            log.warning(
                "audit partition maintenance failed; will retry", extra={"error": f"{type(exc).__name__}: {exc}"}
            )
            return
        self._maintained_at = time.monotonic()
        if done.created or done.dropped or done.deleted_rows:
            # (not "created": a LogRecord attribute, which `extra` may not overwrite)
            log.info("audit partitions maintained", extra={"partitions_created": list(done.created),
                     "partitions_dropped": list(done.dropped), "rows_deleted": done.deleted_rows})  # fmt: skip


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until `event` is set or `timeout` passes (`asyncio.timeout`: unlike 3.11's `wait_for`, it never
    swallows a cancellation that arrives as the event fires)."""
    with suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


def _about_the_data(error: BaseException) -> bool:
    """The database refused a value (PostgreSQL SQLSTATE class 22 data exception or 23 integrity constraint;
    SQLite's integrity and data errors), not the write itself."""
    while error is not None:
        state = getattr(error, "sqlstate", None)
        if isinstance(state, str):
            return state.startswith(("22", "23"))
        if isinstance(error, (sqlite3.IntegrityError, sqlite3.DataError)):
            return True
        error = error.__cause__  # type: ignore[assignment]
    return False


async def _forever(loop: Callable[[], Awaitable[None]], stopping: asyncio.Event) -> None:
    """Run `loop` until it returns; a bug that escapes it is logged and the loop restarted after a pause,
    so the writer never silently stops (records would pile up in memory)."""
    while True:
        try:
            await loop()
            return
        except Exception:
            log.exception("audit writer failed unexpectedly; restarting it")
            await _wait(stopping, 1.0)
