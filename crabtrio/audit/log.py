"""AuditLog: the audit log as the rest of the gateway sees it, one object.

It owns the writer (`AuditLogger`) and the reader with its index (`AuditReader`), wires the
one to the other, and answers what routes ask: may a request start, what its record's
durability requires before the answer, which records match a query, what the rollups sum to,
and how the log is doing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ..config import AuditConfig, KeyConfig
from ..errors import InvalidRequest, Unavailable
from .chain import Link
from .columns import Cursor
from .reader import AuditReader
from .record import AuditRecord, decode_fields
from .rollups import DIMENSIONS, HOUR_MS
from .sums import Sums, summed
from .writer import AuditLogger, AuditStatistics

if TYPE_CHECKING:  # the fleet modules import asyncpg: only when [audit.postgres] is set
    from ..budgets import Spend
    from ..fleet.database import Database
    from ..fleet.shipper import Shipper

# How long a query waits for this process's accepted records to be written (read your writes).
READ_YOUR_WRITES_SECONDS = 1.0
# Pages with more lines than this are read from the file in a worker thread.
THREADED_READ_LINES = 200


class AuditLog:
    def __init__(
        self,
        config: AuditConfig,
        writer: AuditLogger,
        reader: AuditReader | None,
        shipper: Shipper | None = None,
    ):
        self.config = config
        self._writer = writer
        self._reader = reader
        self._shipper = shipper

    @classmethod
    @asynccontextmanager
    async def open(cls, config: AuditConfig) -> AsyncIterator[AuditLog]:
        """Open the file for appending (OSError if it cannot be), replay it into the index,
        and run the writer, the follower and (with `[audit.postgres]`) the shipper until the
        block exits."""
        async with AuditLogger.open(config) as writer:
            if not writer.enabled:
                yield cls(config, writer, None)
                return
            async with AuditReader.open(config.path) as reader:
                if config.postgres is None:
                    writer.on_written = reader.nudge
                    yield cls(config, writer, reader)
                    return
                from ..fleet.shipper import Shipper

                writer.on_written = reader.nudge
                async with Shipper.open(config.postgres, config.path) as shipper:
                    yield cls(config, writer, reader, shipper)

    @property
    def enabled(self) -> bool:
        return self._writer.enabled

    def record(self, record: AuditRecord) -> int:
        """Queue a record; its sequence number for `settle`. Never blocks."""
        return self._writer.record(record)

    def admit(self) -> bool:
        """Whether a new request may start (the log can record it)."""
        return self._writer.admit()

    async def settle(self, sequence: int) -> None:
        """What must hold before a request's answer goes out: the log has not failed, and in
        `sync = "always"` mode its record is fsynced. Raises Unavailable otherwise."""
        if self._writer.failed:
            raise Unavailable(
                "the audit log failed and cannot record this request", code="audit_failed"
            )
        if self.config.sync == "always" and sequence:
            await self._writer.wait_durable(sequence)

    def fail(self, reason: str) -> None:
        """Mark the log failed (a task it depends on died): nothing more is answered."""
        self._writer.fail(reason)

    async def query(
        self,
        *,
        filters: dict[str, Any] | None = None,
        since: int | None = None,
        until: int | None = None,
        before: Cursor | None = None,
        limit: int = 100,
    ) -> tuple[list[bytes], Cursor | None]:
        """The matching records' lines, newest first, and the cursor of the next page.
        Records this process accepted are written and indexed first (read your writes)."""
        reader = await self._current()
        page = reader.index.query(
            filters=filters, since=since, until=until, before=before, limit=limit
        )
        if len(page.locations) > THREADED_READ_LINES:
            lines = await trio.to_thread.run_sync(reader.read_lines, page.locations)
        else:
            lines = reader.read_lines(page.locations)
        return lines, page.next_cursor

    async def summed(
        self,
        *,
        since: int | None = None,
        until: int | None = None,
        filters: dict[str, Any] | None = None,
        group_by: Sequence[str] = DIMENSIONS,
        interval: int | None = HOUR_MS,
    ) -> Sums:
        """Summed rollup cells as arrays, errors counted (see `sums.summed`), this process's
        records included."""
        reader = await self._current()
        return summed(
            reader.index.rollup_sources(),
            since=since,
            until=until,
            filters=filters,
            group_by=group_by,
            interval=interval,
        )

    def follow_spend(self, spend: Spend, keys: Sequence[KeyConfig]) -> None:
        """Sum the keys' spend from the index as it stands, then count every record indexed
        after (one step: nothing is indexed in between)."""
        reader = self._reader
        if reader is None:
            return
        spend.start(reader.index.rollup_sources(), keys)
        reader.on_indexed = spend.observe

    def recent(self, since: int) -> list[tuple[int, str, int]]:
        """(timestamp, key name, tokens) of the indexed records since `since` (ms) of
        requests that were admitted (they name a provider: a refused one never got that far),
        what the rate limits rebuild their last minute from."""
        reader = self._reader
        if reader is None:
            return []
        found: list[tuple[int, str, int]] = []
        before: Cursor | None = None
        while True:
            page = reader.index.query(since=since, before=before, limit=10_000)
            for line in reader.read_lines(page.locations):
                r = decode_fields(line)
                if r is not None and r.provider:
                    tokens = (r.prompt_tokens or 0) + (r.completion_tokens or 0)
                    found.append((r.timestamp, r.key_name, tokens))
            if page.next_cursor is None:
                return found
            before = page.next_cursor

    async def head(self) -> Link:
        """Where the hash chain stands (the file's last link)."""
        return await self._writer.chain_head()

    async def chain(self) -> tuple[Link, int]:
        """The hash chain's head (after this process's accepted records are written) and the
        count of every retained record."""
        reader = await self._current()
        return await self._writer.chain_head(), len(reader.index)

    def shipping(self) -> dict[str, Any] | None:
        """The /health `shipping` block, or None when shipping is off."""
        return None if self._shipper is None else self._shipper.status()

    async def fleet_query(self, **query: Any) -> tuple[list[dict[str, Any]], Cursor | None]:
        """Records of every instance from PostgreSQL (see `fleet.query.query`)."""
        from ..fleet import query as fleet

        return await fleet.query(*self._fleet(), **query)

    async def fleet_usage(self, **report: Any) -> list[dict[str, Any]]:
        """The usage report over every instance, from PostgreSQL (see `fleet.query.usage`)."""
        from ..fleet import query as fleet

        return await fleet.usage(*self._fleet(), **report)

    def _fleet(self) -> tuple[Database, str]:
        """The database and table fleet queries read: a 400 when shipping is off."""
        if self._shipper is None or self.config.postgres is None:
            raise InvalidRequest(
                "scope=fleet needs [audit.postgres] in the gateway's config", param="scope"
            )
        return self._shipper.database, self.config.postgres.table

    def statistics(self) -> AuditStatistics:
        stats = self._writer.statistics()
        reader = self._reader
        if reader is not None:
            stats.corrupt_lines_skipped = reader.corrupt_lines
            stats.indexed_records = len(reader.index)
            stats.sidecars_loaded = reader.sidecars["loaded"]
            stats.sidecars_rebuilt = reader.sidecars["rebuilt"]
            if reader.failure is not None:
                stats.index_state, stats.index_reason = "degraded", reader.failure
        return stats

    async def _current(self) -> AuditReader:
        """The reader, its index holding every record this process accepted so far."""
        reader = self._reader
        if reader is None:
            raise Unavailable(
                "the audit log is disabled in this configuration", code="audit_disabled"
            )
        await self._writer.wait_written(timeout=READ_YOUR_WRITES_SECONDS)
        try:
            await reader.caught_up()
        except OSError as exc:  # the follower retries it and /health says so meanwhile
            raise Unavailable(
                f"the audit index cannot read the log: {exc.strerror or type(exc).__name__}",
                code="audit_index_unavailable",
            ) from None
        return reader
