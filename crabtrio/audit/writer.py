"""AuditLogger: hands records from requests to one writer task that batches them to disk."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import trio

from ..config import AuditConfig
from ..errors import Unavailable
from .chain import Chain, Link
from .record import AuditRecord, encode_batch
from .store import AuditFile

log = logging.getLogger("crabtrio.audit")

# How long the writer lets records gather before a write, outside "always" mode. Each write
# is a trip to a worker thread whose syscalls contend for the GIL with the event loop: at
# 1,000 requests/s, writing every 10 ms cost 5-9% of the CPU per request, every 50 ms 2%.
# Still far below the 1 s in which `tail -f` must see a line.
LINGER_SECONDS = 0.05
# How often an idle writer looks for a deleted or rotated file, and how soon it retries a
# failed write (a full disk): both well inside the 1 s the operator is promised.
IDLE_CHECK_SECONDS = 0.5
RETRY_SECONDS = 0.2
# At shutdown the final flush may outlive a cancellation by this much.
FLUSH_GRACE_SECONDS = 5.0
# How often retention looks for rotated files to delete, besides right after a rotation.
PRUNE_SECONDS = 60.0
MIB = 1024 * 1024


@dataclass(slots=True)
class AuditStatistics:
    state: str = "ok"  # ok | degraded (cannot write: retrying) | failed (the writer died)
    reason: str | None = None
    sync: str = "interval"
    written: int = 0
    fsyncs: int = 0
    pending: int = 0
    failed_writes: int = 0
    failed_syncs: int = 0
    refused: int = 0
    corrupt_lines_skipped: int = 0
    indexed_records: int = 0
    # Sealed segments whose index was mapped from a sidecar, and those rebuilt from JSONL.
    sidecars_loaded: int = 0
    sidecars_rebuilt: int = 0
    index_state: str = "ok"  # ok | degraded (the index cannot read the file: retrying)
    index_reason: str | None = None

    @property
    def healthy(self) -> bool:
        return self.state == "ok" and self.index_state == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditLogger:
    """Owns the audit file's writer task; `record()` queues without blocking or awaiting.

    The queue itself never drops: `record()` always succeeds, and `admit()` turns new
    requests away (503) while `queue_max` records wait, so memory stays bounded even when
    the disk stalls.
    """

    def __init__(self, config: AuditConfig, file: AuditFile | None) -> None:
        self.config = config
        self._file = file
        self._pending: deque[AuditRecord] = deque()
        self._wake = trio.Event()
        self._progress = trio.Event()
        self._flush_now = trio.Event()
        self._accepted = 0  # records accepted, ever: a record's sequence number
        self._written = 0  # records on disk (write returned)
        self._durable = 0  # records fsynced
        self._closed = False
        self._finished = False
        self._last_fsync = time.monotonic()
        self._dirty = False
        # Called after each successful write (the reader follows the file at once).
        self.on_written: Callable[[], None] = lambda: None
        self._stats = AuditStatistics(sync=config.sync)
        self._linger = 0.0 if config.sync == "always" else LINGER_SECONDS
        self._not_durable: list[tuple[int, int]] = []  # sequence ranges whose fsync failed
        mb = config.max_file_mb
        self._rotate_at = None if mb is None else max(1, int(mb * MIB))
        self._max_total = None if config.max_total_mb is None else int(config.max_total_mb * MIB)
        self._retention = config.retention_days is not None or self._max_total is not None
        self._next_prune = 0.0
        # With shipping on, retention deletes only files whose records are all shipped.
        self._shipped_only: Callable[[str, list[str]], list[str]] | None = None
        if config.postgres is not None:
            from ..fleet.local import shipped_only

            self._shipped_only = shipped_only

    @classmethod
    @asynccontextmanager
    async def open(cls, config: AuditConfig) -> AsyncIterator[AuditLogger]:
        """Open the file (raising OSError if it cannot be written) and run the writer."""
        if not config.enabled:
            yield cls(config, None)
            return
        chain = Chain(config.chain_key)
        file = await trio.to_thread.run_sync(AuditFile, config.path, chain)
        logger = cls(config, file)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(logger._run)
                try:
                    yield logger
                finally:
                    logger._closed = True
                    logger._wake.set()
        finally:
            file.close()

    @property
    def enabled(self) -> bool:
        return self._file is not None

    @property
    def failed(self) -> bool:
        """The writer died (or its owner closed it for a dead sibling): nothing is recorded."""
        return self._stats.state == "failed"

    def record(self, record: AuditRecord) -> int:
        """Queue one record and return its sequence number. Never blocks: safe in `finally`."""
        if self._file is None:
            return 0
        self._accepted += 1
        if self._finished:  # pragma: no cover - hypercorn ends requests before lifespan shutdown
            self._write_late(record)
            return self._accepted
        self._pending.append(record)
        self._wake.set()
        return self._accepted

    def admit(self) -> bool:
        """Whether a new request may start: no while the log cannot be written (a request
        answered then would wait unrecorded, or be lost with the process), nor while
        `queue_max` records wait for the disk."""
        blocked = len(self._pending) >= self.config.queue_max or self._stats.state != "ok"
        if blocked:
            self._stats.refused += 1
        return not blocked

    async def wait_durable(self, sequence: int) -> None:
        """Wait until the record with this sequence number is fsynced ("always" mode).

        Raises Unavailable if its fsync failed: the request must not be acknowledged.
        """
        while True:
            if any(low <= sequence <= high for low, high in self._not_durable):
                raise Unavailable(
                    "the audit record of this request could not be made durable",
                    code="audit_not_durable",
                )
            if self._durable >= sequence or self._finished:
                return
            await self._progress.wait()

    async def wait_written(self, timeout: float) -> None:
        """Wait (at most `timeout`) until every record accepted so far is in the file."""
        target = self._accepted
        with trio.move_on_after(timeout):
            while self._written < target and not self._finished:
                self._flush_now.set()
                await self._progress.wait()

    async def chain_head(self) -> Link:
        """Where the file's hash chain stands now (read under the file's lock)."""
        assert self._file is not None
        return await trio.to_thread.run_sync(self._file.head)

    def statistics(self) -> AuditStatistics:
        stats = self._stats
        stats.pending = len(self._pending)
        return AuditStatistics(**asdict(stats))

    async def _run(self) -> None:
        """The writer task. An OSError degrades it and is retried; anything else is a bug
        that kills it: it says so first (state "failed": requests are refused, and answers
        not yet sent are withheld), writes what it can, and re-raises for its owner to end
        the worker."""
        try:
            while self._pending or not self._closed:
                if not self._pending:
                    await self._idle()
                    continue
                if self._linger and not self._closed:
                    with trio.move_on_after(self._linger):
                        await self._flush_now.wait()  # a reader wants the records now
                    self._flush_now = trio.Event()
                if not await self._write_pending():
                    await trio.sleep(RETRY_SECONDS)
        except Exception as exc:
            self.fail(f"the audit writer died: {type(exc).__name__}")
            log.critical("audit: the writer task died", exc_info=True)
            raise
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FLUSH_GRACE_SECONDS
                # Records may arrive during a write (its thread hop): loop until none wait.
                while await self._write_pending(final=True) and self._pending:
                    pass
            self._finished = True
            self._progress.set()
            if self._pending:
                log.error(
                    "audit: %d record(s) could not be written at shutdown", len(self._pending)
                )

    def fail(self, reason: str) -> None:
        """Refuse all work from now on, saying why on /health (a task of the log died)."""
        if self._stats.state != "failed":
            self._stats.state, self._stats.reason = "failed", reason

    async def _idle(self) -> None:
        """Sleep until a record arrives, an interval fsync falls due, or it is time to check."""
        timeout = IDLE_CHECK_SECONDS
        if self._dirty and self.config.sync == "interval":
            due = self._last_fsync + self.config.sync_interval_ms / 1000 - time.monotonic()
            timeout = max(0.0, min(timeout, due))
        with trio.move_on_after(timeout):
            await self._wake.wait()
        self._wake = trio.Event()
        if not self._pending:
            await self._write_pending()  # an empty batch: fsync, reopen or prune when due

    def _fsync_due(self, final: bool) -> bool:
        mode = self.config.sync
        if mode == "never" or not (self._dirty or final):
            return False
        if mode == "always" or final:
            return True
        interval = self.config.sync_interval_ms / 1000
        return time.monotonic() - self._last_fsync >= interval

    def _prune_due(self) -> bool:
        return self._retention and time.monotonic() >= self._next_prune

    async def _write_pending(self, *, final: bool = False) -> bool:
        """Write what is queued (one write), fsync when the mode says so; False on failure."""
        assert self._file is not None
        batch = list(self._pending)
        fsync = self._fsync_due(final) or (bool(batch) and self.config.sync == "always")
        if not (batch or fsync or self._prune_due() or self._file.replaced()):
            return True
        try:
            outcome = await trio.to_thread.run_sync(self._write_sync, batch, fsync)
        except OSError as exc:
            self._stats.failed_writes += 1
            self._degraded(f"cannot write {self.config.path}: {exc.strerror or exc}")
            return False
        for _ in batch:
            self._pending.popleft()
        self._written += len(batch)
        self._stats.written += len(batch)
        self._dirty = self._dirty or bool(batch)
        if outcome.sync_error is not None:
            # Never claim durability after a failed fsync (the kernel may have dropped the
            # pages): the records since the last good fsync are marked lost for "always".
            self._not_durable.append((self._durable + 1, self._written))
            self._durable = self._written
            self._dirty = False
            self._stats.failed_syncs += 1
            error = outcome.sync_error
            self._degraded(f"fsync of {self.config.path} failed: {error.strerror or error}")
        elif outcome.synced:
            self._durable = self._written
            self._dirty = False
            self._stats.fsyncs += 1
        if batch or outcome.synced or outcome.sync_error:
            self._progress.set()
            self._progress = trio.Event()
        if outcome.reopened:
            log.warning("audit: %s was deleted or renamed; recreated it", self._file.path)
        if self._stats.state == "degraded" and outcome.sync_error is None:
            log.warning("audit: writing to %s again", self._file.path)
            self._stats.state, self._stats.reason = "ok", None
        if batch:
            self.on_written()
        return True

    def _write_sync(self, batch: list[AuditRecord], fsync: bool) -> _Outcome:
        """Runs in a worker thread: encode, append under the lock, maybe fsync, rotate, prune."""
        assert self._file is not None
        data = encode_batch(batch)
        result = self._file.append(data, rotate_at=self._rotate_at)
        outcome = _Outcome(reopened=result.reopened)
        if result.rotated_to is not None:
            outcome.synced = True  # rotation fsyncs the file before renaming it
        elif fsync:
            try:
                self._file.fsync()
                outcome.synced = True
            except OSError as exc:
                outcome.sync_error = exc
        if outcome.synced:
            self._last_fsync = time.monotonic()
        if result.rotated_to is not None or self._prune_due():
            self._next_prune = time.monotonic() + PRUNE_SECONDS
            try:
                self._file.prune(
                    retention_days=self.config.retention_days,
                    max_total_bytes=self._max_total,
                    shipped_only=self._shipped_only,
                )
            except OSError as exc:  # the batch is written: retention waits for the next time
                log.error("audit: retention failed (%s); it is retried later", exc)
        return outcome

    def _degraded(self, reason: str) -> None:
        if self._stats.reason != reason:
            log.error("audit: %s; %d record(s) held in memory", reason, len(self._pending))
        self._stats.state, self._stats.reason = "degraded", reason

    def _write_late(self, record: AuditRecord) -> None:  # pragma: no cover - see record()
        assert self._file is not None
        try:
            self._write_sync([record], fsync=self.config.sync != "never")
        except OSError as exc:
            log.error("audit: lost record %s after shutdown: %s", record.request_id, exc)


@dataclass(slots=True)
class _Outcome:
    reopened: bool = False
    synced: bool = False
    sync_error: OSError | None = None
