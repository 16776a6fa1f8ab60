"""Shipper: copies every audit record of this host into PostgreSQL, exactly once.

One task, owned by `Shipper.open`'s nursery inside the audit log's block. Of the workers
sharing an audit file, the one holding `<path>.ship.lock` (flock) ships; the others poll
the lock every second and take over when its holder dies (the kernel releases it).

Each batch (whole lines of one file, at most `batch_max`) is written with COPY, and the
checkpoint `(instance, file_id, offset)` is advanced in the same transaction, so a crash
at any point neither loses nor duplicates a row. With a backlog two batches are in flight,
committed in order (see `_ship`). The checkpoint is advanced only from the
value this shipper read: if another shipper moved it (two replicas given one instance
name), the transaction rolls back and the shipper re-reads it. When rows may already be
there (the checkpoint's file is gone, so files are shipped from their start), the COPY
fails on the primary key and the batch goes through a staging table and
`INSERT ... ON CONFLICT DO NOTHING` instead.

A database that is down, slow or refusing costs nothing but lag: the request path never
waits for the shipper, which retries with capped backoff and says how far behind it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from ..audit.rollups import DAY_MS
from ..config import PostgresConfig
from . import schema
from .database import Connection, Database, DatabaseError
from .local import (
    Checkpoint,
    LocalFiles,
    lock_path,
    read_status,
    status_checkpoint,
    write_status,
)
from .rows import COLUMNS, rows

log = logging.getLogger("crabtrio.fleet")

LOCK_POLL_SECONDS = 1.0
# A shipper that is caught up ships what was written since at most this often.
SHIP_EVERY_SECONDS = 0.5
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
# A transaction that takes longer than this is abandoned (its connection closed) and retried.
COMMIT_SECONDS = 60.0
# Oldest unshipped record older than this: "lagging".
LAGGING_SECONDS = 5.0
STATUS_EVERY_SECONDS = 0.25
# An idle shipper checks the database this often, so /health shows an outage while idle.
PING_SECONDS = 2.0
MAINTAIN_EVERY_SECONDS = 3600.0
DECODE_CHUNK_LINES = 1000
UNIQUE_VIOLATION = "23505"


@dataclass(slots=True)
class _Prepared:
    rows: list[tuple[Any, ...]]
    checkpoint: Checkpoint  # where the checkpoint stands once these rows are committed
    full: bool  # batch_max lines: more are probably waiting


class CheckpointMoved(Exception):
    """Another shipper advanced this instance's checkpoint since we read it."""


class Shipper:
    def __init__(self, config: PostgresConfig, path: str, db: Database) -> None:
        self.config = config
        self.path = os.path.abspath(path)
        self._db = db
        self._table = config.table
        self._files = LocalFiles(path)
        self._checkpoint: Checkpoint | None = None
        self._lock_fd = -1
        self._days: set[int] = set()
        self._next_maintenance = 0.0
        self._status_written = 0.0
        self._state = "starting"  # starting | standby | ok | lagging | down | stopped
        self._error: str | None = None
        self._lag: tuple[int, int | None] = (0, None)
        self.shipped = 0  # rows this worker committed

    @classmethod
    @asynccontextmanager
    async def open(cls, config: PostgresConfig, path: str) -> AsyncIterator[Shipper]:
        async with Database.open(config.dsn) as db:
            shipper = cls(config, path, db)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(shipper._run)
                    yield shipper
                    nursery.cancel_scope.cancel()
            finally:
                shipper._unlock()

    @property
    def database(self) -> Database:
        return self._db

    def status(self) -> dict[str, Any]:
        """The /health `shipping` block: this worker's view when it ships, else the shipping
        worker's last status file."""
        if self._state == "standby":
            shared = read_status(self.path)
            if shared is not None:
                return _public(shared)
        return _public(self._status())

    def _status(self) -> dict[str, Any]:
        records, oldest = self._lag
        checkpoint = self._checkpoint
        return {
            "state": self._state,
            "instance": self.config.instance,
            "lag_records": records,
            "oldest_ms": oldest,
            "last_error": self._error,
            "file_id": None if checkpoint is None else checkpoint.file_id,
            "file_name": None if checkpoint is None else checkpoint.file_name,
            "offset": None if checkpoint is None else checkpoint.offset,
            "pid": os.getpid(),
            "updated_ms": time.time_ns() // 1_000_000,
        }

    async def _run(self) -> None:
        """Ship while holding the lock; an unexpected error stops shipping (loudly, and
        /health says so) but never the gateway: its records stay in the files."""
        try:
            while not self._try_lock():
                self._state = "standby"
                await trio.sleep(LOCK_POLL_SECONDS)
            log.info("fleet: this worker ships the audit log to PostgreSQL")
            self._state = "starting"
            self._checkpoint = status_checkpoint(read_status(self.path))
            await self._ship_forever()
        except schema.SchemaTooNew as exc:
            self._state, self._error = "stopped", str(exc)
            log.error("fleet: %s", exc)
        except Exception as exc:
            self._state, self._error = "stopped", f"the shipper died: {type(exc).__name__}"
            log.critical("fleet: the shipper task died; records stay in the files", exc_info=True)
        # Keep the lock (no other worker would do better) and keep /health's lag current.
        while True:
            with contextlib.suppress(OSError):
                await self._survey(force=True)
            await trio.sleep(LOCK_POLL_SECONDS)

    async def _ship_forever(self) -> None:
        backoff = BACKOFF_FIRST_SECONDS
        while True:
            try:
                async with self._db.connect() as conn, self._db.connect() as spare:
                    await schema.migrate(conn, self._table)
                    self._days = await schema.partitions(conn, self._table)
                    self._checkpoint = await self._read_checkpoint(conn)
                    await self._check_resumable()
                    self._next_maintenance = 0.0
                    backoff = BACKOFF_FIRST_SECONDS
                    await self._ship(conn, spare)
            except DatabaseError as exc:
                self._down(str(exc))
            except OSError as exc:  # reading the audit files: retried like an outage
                self._down(f"cannot read the audit files: {exc.strerror or exc}")
            except CheckpointMoved:
                log.warning(
                    "fleet: another shipper advanced the checkpoint of instance %r (do two "
                    "replicas share that name?); re-reading it",
                    self.config.instance,
                )
                continue
            deadline = trio.current_time() + backoff
            while trio.current_time() < deadline:  # keep /health's lag current meanwhile
                await self._survey(force=True)
                await trio.sleep(min(1.0, max(0.0, deadline - trio.current_time())))
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    def _down(self, reason: str) -> None:
        if self._state != "down" or self._error != reason:
            log.warning("fleet: cannot ship to PostgreSQL: %s; retrying", reason)
        self._state, self._error = "down", reason

    async def _ship(self, conn: Connection, spare: Connection) -> None:
        """Ship while there is anything to ship.

        With a backlog, two batches are in flight, one per connection: both COPY at once,
        and the second advances the checkpoint only after the first has (its UPDATE waits
        for the first's row lock, then checks the first's value), so they commit in file
        order or not at all. Meanwhile the next batches are read and decoded. Caught up, a
        batch goes every SHIP_EVERY_SECONDS: a transaction per write would cost the
        request path more than the records are worth.
        """
        contact = last = time.monotonic()
        ready: list[_Prepared] = []
        while True:
            if time.monotonic() >= self._next_maintenance:
                await self._maintain(conn)
            if not ready:
                await self._read_ahead(self._checkpoint, ready)
                wait = SHIP_EVERY_SECONDS - (time.monotonic() - last)
                if not ready or (not ready[0].full and wait > 0):
                    ready.clear()  # read again when it is time: more will be there
                    if time.monotonic() - contact >= PING_SECONDS:
                        await self._ping(conn)
                        contact = time.monotonic()
                    await self._survey(force=self._state not in ("ok", "lagging"))
                    await trio.sleep(wait if wait > 0 else SHIP_EVERY_SECONDS)
                    continue
            later: list[_Prepared] = []
            if len(ready) == 2 and _overlap(ready[0], ready[1]):
                # The file holds a record twice: in two transactions at once, each would
                # wait for the other's row. One at a time, the second skips it.
                ready, later = ready[:1], ready[1:]
            days = {row[1] // DAY_MS for batch in ready for row in batch.rows}
            await self._ensure_days(conn, days)
            following: list[_Prepared] = []
            tail = (later or ready)[-1]
            failed: DatabaseError | CheckpointMoved | None = None
            async with trio.open_nursery() as nursery:
                if tail.full and not later:
                    nursery.start_soon(self._prefetch, tail.checkpoint, following)
                try:
                    await self._commit([(conn, ready[0]), *[(spare, b) for b in ready[1:]]])
                except (DatabaseError, CheckpointMoved) as exc:  # not in an ExceptionGroup
                    failed = exc
                    nursery.cancel_scope.cancel()
            if failed is not None:
                raise failed
            ready = later or following
            contact = last = time.monotonic()
            await self._survey()

    async def _read_ahead(self, after: Checkpoint | None, into: list[_Prepared]) -> None:
        """Read and decode the batch after `after`, and the one after it if the first is
        full (a backlog), into `into`."""
        for _ in range(2):
            batch = await self._prepare(after)
            if batch is None:
                return
            into.append(batch)
            if not batch.full:
                return
            after = batch.checkpoint

    async def _prefetch(self, after: Checkpoint, into: list[_Prepared]) -> None:
        """`_read_ahead` beside a commit; a read error is met again at the next read."""
        with contextlib.suppress(OSError):
            await self._read_ahead(after, into)

    async def _prepare(self, checkpoint: Checkpoint | None) -> _Prepared | None:
        """The batch after `checkpoint`, read (in a thread) and decoded, or None."""
        batch = await trio.to_thread.run_sync(
            self._files.next_batch, checkpoint, self.config.batch_max
        )
        if batch is None:
            return None
        assert batch.segment.file_id is not None
        found = await self._decode(batch.data)
        cutoff = self._cutoff()
        if cutoff is not None:  # older than retention: its partition is (to be) dropped
            found = [row for row in found if row[1] >= cutoff]
        after = Checkpoint(batch.segment.file_id, os.path.basename(batch.segment.path), batch.end)
        return _Prepared(found, after, batch.lines >= self.config.batch_max)

    async def _ping(self, conn: Connection) -> None:
        with trio.move_on_after(PING_SECONDS) as scope:
            await conn.fetchval("SELECT 1")
        if scope.cancelled_caught:
            raise DatabaseError(f"PostgreSQL did not answer within {PING_SECONDS:g} s")
        if self._state == "starting":
            self._state = "ok"

    async def _commit(self, lanes: list[tuple[Connection, _Prepared]]) -> None:
        """Commit one or two consecutive batches, each in its own transaction on its own
        connection, in order (see `_ship`). Raises the first one's error."""
        errors: list[DatabaseError | CheckpointMoved] = []
        before, ahead = self._checkpoint, None
        async with trio.open_nursery() as nursery:
            for conn, batch in lanes:
                locked = trio.Event()
                nursery.start_soon(
                    self._commit_one, conn, batch, before, ahead, locked, errors, nursery
                )
                before, ahead = batch.checkpoint, locked
        if errors:
            raise errors[0]
        for _, batch in lanes:
            self.shipped += len(batch.rows)
        self._checkpoint = lanes[-1][1].checkpoint
        if self._state in ("starting", "down"):
            log.info("fleet: shipping to PostgreSQL as instance %r", self.config.instance)
            self._state, self._error = "ok", None

    async def _commit_one(
        self,
        conn: Connection,
        batch: _Prepared,
        before: Checkpoint | None,
        ahead: trio.Event | None,
        locked: trio.Event,
        errors: list[DatabaseError | CheckpointMoved],
        nursery: trio.Nursery,
    ) -> None:
        """One batch's transaction: its rows, then (once the batch ahead of it holds the
        checkpoint row) the checkpoint from `before` to its own. A failure cancels the
        other lane: the connections are closed and shipping resumes from PostgreSQL's
        checkpoint."""
        rows, after = batch.rows, batch.checkpoint

        async def advance() -> None:
            if ahead is not None:
                await ahead.wait()
            await self._advance(conn, before, after)
            locked.set()

        try:
            with trio.move_on_after(COMMIT_SECONDS) as scope:
                try:
                    async with conn.transaction():
                        if rows:
                            await conn.copy_records(self._table, rows, COLUMNS)
                        await advance()
                except DatabaseError as exc:
                    if exc.sqlstate != UNIQUE_VIOLATION:
                        raise
                    async with conn.transaction():  # some rows are there already: skip them
                        await conn.execute(
                            f"CREATE TEMP TABLE IF NOT EXISTS crabtrio_staging "
                            f"(LIKE {self._table}) ON COMMIT DELETE ROWS"
                        )
                        await conn.copy_records("crabtrio_staging", rows, COLUMNS)
                        await conn.execute(
                            f"INSERT INTO {self._table} SELECT * FROM crabtrio_staging "
                            "ON CONFLICT DO NOTHING"
                        )
                        await advance()
            if scope.cancelled_caught:
                raise DatabaseError(f"a batch took longer than {COMMIT_SECONDS:g} s to commit")
        except (DatabaseError, CheckpointMoved) as exc:
            errors.append(exc)
            nursery.cancel_scope.cancel()

    async def _decode(self, data: bytes) -> list[tuple[Any, ...]]:
        """Rows of the batch, decoded a chunk at a time so the event loop keeps serving."""
        out: list[tuple[Any, ...]] = []
        start = 0
        while start < len(data):
            end = start
            for _ in range(DECODE_CHUNK_LINES):
                end = data.find(b"\n", end) + 1
                if end == 0 or end >= len(data):
                    end = len(data)
                    break
            found, _skipped = rows(data[start:end], self.config.instance)
            out += found
            start = end
            await trio.lowlevel.checkpoint()
        return out

    async def _advance(
        self, conn: Connection, before: Checkpoint | None, after: Checkpoint
    ) -> None:
        table = f"{self._table}_checkpoints"
        result = await conn.execute(
            f"INSERT INTO {table} AS c (instance, file_id, file_name, file_offset) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (instance) DO UPDATE SET "
            "file_id = excluded.file_id, file_name = excluded.file_name, "
            "file_offset = excluded.file_offset, updated_at = now() "
            "WHERE c.file_id IS NOT DISTINCT FROM $5 AND c.file_offset IS NOT DISTINCT FROM $6",
            self.config.instance,
            after.file_id,
            after.file_name,
            after.offset,
            None if before is None else before.file_id,
            None if before is None else before.offset,
        )
        if result != "INSERT 0 1":
            raise CheckpointMoved

    async def _read_checkpoint(self, conn: Connection) -> Checkpoint | None:
        row = await conn.fetchrow(
            f"SELECT file_id, file_name, file_offset FROM {self._table}_checkpoints "
            "WHERE instance = $1",
            self.config.instance,
        )
        if row is None:
            return None
        return Checkpoint(row["file_id"], row["file_name"], row["file_offset"])

    async def _check_resumable(self) -> None:
        checkpoint = self._checkpoint
        if checkpoint is None:
            return
        segments = await trio.to_thread.run_sync(self._files.segments)
        if not any(segment.file_id == checkpoint.file_id for segment in segments):
            log.warning(
                "fleet: the checkpoint's file (%s) is not among the local audit files; "
                "shipping them all from their start (rows already shipped are skipped)",
                checkpoint.file_name,
            )

    def _cutoff(self) -> int | None:
        days = self.config.retention_days
        if days is None:
            return None
        return (schema.today() - int(days)) * DAY_MS

    async def _ensure_days(self, conn: Connection, days: set[int]) -> None:
        missing = days - self._days
        if missing:
            await schema.create_partitions(conn, self._table, missing)
            self._days |= missing

    async def _maintain(self, conn: Connection) -> None:
        """Partitions for today and the days ahead; retention drops whole old partitions."""
        today = schema.today()
        await self._ensure_days(conn, set(range(today - 1, today + schema.DAYS_AHEAD + 1)))
        cutoff = self._cutoff()
        if cutoff is not None:
            old = {day for day in self._days if (day + 1) * DAY_MS <= cutoff}
            if old:
                await schema.drop_partitions(conn, self._table, old)
                self._days -= old
                log.info("fleet: retention dropped %d day partition(s)", len(old))
        self._next_maintenance = time.monotonic() + MAINTAIN_EVERY_SECONDS

    async def _survey(self, *, force: bool = False) -> None:
        """Count what is not shipped yet; refresh the state and the shared status file."""
        now = time.monotonic()
        if not force and now - self._status_written < STATUS_EVERY_SECONDS:
            return
        self._status_written = now
        self._lag = await trio.to_thread.run_sync(self._files.lag, self._checkpoint)
        if self._state in ("ok", "lagging"):
            age = _age_seconds(self._lag[1])
            self._state = "lagging" if age > LAGGING_SECONDS else "ok"
        status = self._status()
        try:
            await trio.to_thread.run_sync(write_status, self.path, status)
        except OSError as exc:
            log.warning("fleet: cannot write %s: %s", self.path + ".shipping", exc.strerror)

    def _try_lock(self) -> bool:
        if self._lock_fd < 0:
            self._lock_fd = os.open(
                lock_path(self.path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


def _overlap(first: _Prepared, second: _Prepared) -> bool:
    """Whether two batches hold the same record (its primary key, less the instance)."""
    keys = {(row[0], row[1]) for row in first.rows}
    return any((row[0], row[1]) in keys for row in second.rows)


def _age_seconds(oldest_ms: int | None) -> float:
    if oldest_ms is None:
        return 0.0
    return max(0.0, time.time() - oldest_ms / 1000)


def _public(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": status.get("state"),
        "instance": status.get("instance"),
        "lag_records": status.get("lag_records", 0),
        "lag_seconds": round(_age_seconds(status.get("oldest_ms")), 3),
        "last_error": status.get("last_error"),
    }
