"""The read side of the audit log: replay the files into the index, then follow appends.

Every process follows the file rather than trusting its own memory, so with several
hypercorn workers each worker's index holds every worker's records within one poll.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import trio

from . import sidecar
from .columns import Location
from .index import AuditIndex, Segment
from .record import IndexedFields, decode_fields, decode_fields_lines
from .rotation import rotated_siblings, sidecar_path
from .segments import identity, rotated_since

log = logging.getLogger("crabtrio.audit")

POLL_SECONDS = 0.2
# What the follower reads and indexes at most between two chances for requests to run.
CATCH_UP_BYTES = 1 << 20
# The active file's index is checkpointed to its sidecar every this many new entries.
CHECKPOINT_RECORDS = 100_000
MAX_LINE = (1 << 24) - 1  # no record is longer (the writer's own limit is far below)
READ_CHUNK = MAX_LINE + 1  # a chunk without a newline holds no valid line


@dataclass(slots=True)
class _Source:
    """One file being read: where its complete lines end, and what they added to the index."""

    number: int
    path: str
    fd: int
    ino: int
    offset: int = 0
    skipping: bool = False  # inside an over-long line


@dataclass(slots=True)
class CorruptLines:
    count: int = 0
    first_offsets: list[int] = field(default_factory=list)

    def add(self, offset: int) -> None:
        self.count += 1
        if len(self.first_offsets) < 5:
            self.first_offsets.append(offset)


class AuditReader:
    """Owns the index and the read descriptors; `catch_up()` indexes whatever was appended."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.index = AuditIndex()
        self.corrupt_lines = 0
        self._sources: dict[int, _Source] = {}
        self._active: _Source | None = None
        self._next_number = 0
        self._nudged = trio.Event()
        self.failure: str | None = None  # why the last catch-up failed; None when it did not
        # Sealed segments whose index came from their sidecar, and those rebuilt from JSONL.
        self.sidecars = {"loaded": 0, "rebuilt": 0}
        # Rotated files read to their end, to seal (sort, write the sidecar) off the loop.
        self._to_seal: list[_Source] = []
        # Files rotated after the one this reader had open and before the active one (the
        # path was rotated more than once between two looks), oldest first: read next.
        self._skipped: list[_Source] = []
        self.checkpoints = {"loaded": 0, "written": 0}
        self._checkpointed = 0  # entries of the active file when it was last checkpointed
        # Told of every batch of records indexed (the budgets' spend follows them).
        self.on_indexed: Callable[[list[IndexedFields]], None] | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str) -> AsyncIterator[AuditReader]:
        """Replay every retained file, then follow the active one until the block exits."""
        reader = cls(path)
        try:
            reader.replay()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader._follow)
                try:
                    yield reader
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            reader.close()

    def replay(self) -> None:
        for path in rotated_siblings(self.path):
            source = self._open_source(path)
            if source is not None:
                self._load_sealed(source)
        source = self._open_source(self.path)
        if source is not None:
            self._resume(source)
            self._read_bulk(source, final=False)
            self._checkpointed = len(self.index.segment(source.number))
        self._active = source

    def _resume(self, source: _Source) -> None:
        """Start the active file from its checkpoint, if one describes its first bytes (it
        is stale after each rotation, and then simply not used)."""
        size = os.fstat(source.fd).st_size
        try:
            segment, described = sidecar.load(
                source.path, source.fd, size, source.number, prefix=True
            )
        except sidecar.SidecarError:
            return
        segment.rollups = segment.rollups.writable()  # it goes on growing
        self.index.put(segment)
        source.offset = described
        self.checkpoints["loaded"] += 1

    def checkpoint(self) -> None:
        """Write the active file's checkpoint now, in this thread (tools and benchmarks)."""
        job = self._checkpoint_job()
        if job is not None:
            sidecar.write(*job)
            self.checkpoints["written"] += 1

    async def _checkpoint(self) -> None:
        """Every CHECKPOINT_RECORDS new entries, write the active file's index as a sidecar
        (`<path>.idx`) in a worker thread, so a restart reads only what came after it."""
        source = self._active
        if source is None:
            return
        if len(self.index.segment(source.number)) - self._checkpointed < CHECKPOINT_RECORDS:
            return
        job = self._checkpoint_job()
        if job is None:
            return
        try:
            await trio.to_thread.run_sync(sidecar.write, *job)
        except OSError as exc:
            log.warning("audit: cannot write the index checkpoint of %s (%s)", self.path, exc)
            return
        self.checkpoints["written"] += 1

    def _checkpoint_job(self) -> tuple[str, int, sidecar.Snapshot] | None:
        """What writing the active file's checkpoint needs, taken on the loop's thread."""
        source = self._active
        if source is None or source.path != self.path:
            return None
        segment = self.index.segment(source.number)
        self._checkpointed = len(segment)
        return sidecar_path(source.path), source.fd, sidecar.Snapshot(segment, source.offset)

    def _read_bulk(self, source: _Source, *, final: bool) -> None:
        segment = self.index.segment(source.number)
        segment.bulk = True
        try:
            self._read_logged(source, final=final)
        finally:
            segment.bulk = False
            segment.flush()

    def _load_sealed(self, source: _Source) -> None:
        """A sealed segment's index from its sidecar; or from its JSONL, then written to a
        new sidecar and mapped from there (so every worker shares the pages)."""
        size = os.fstat(source.fd).st_size
        try:
            segment, _ = sidecar.load(source.path, source.fd, size, source.number)
        except sidecar.SidecarError as exc:
            log.warning(
                "audit: rebuilding the index of %s from its lines (sidecar %s)",
                os.path.basename(source.path),
                exc,
            )
        else:
            self.index.put(segment)
            source.offset = size
            self.sidecars["loaded"] += 1
            return
        self._read_bulk(source, final=True)
        self._seal(source)
        self.sidecars["rebuilt"] += 1

    def _seal(self, source: _Source) -> None:
        """The file was rotated and fully read: write its sidecar and map the index from it.
        If that fails (a read-only directory), the index keeps its own copy."""
        segment = self.index.segment(source.number)
        size = source.offset
        try:
            snapshot = sidecar.Snapshot(segment, size)
            sidecar.write(sidecar_path(source.path), source.fd, snapshot)
            self.index.put(sidecar.load(source.path, source.fd, size, source.number)[0])
        except (OSError, sidecar.SidecarError) as exc:
            log.warning(
                "audit: cannot write the index sidecar of %s (%s); keeping it in memory",
                os.path.basename(source.path),
                exc,
            )
            segment.sealed()

    def nudge(self) -> None:
        """Ask the follower to read now (the writer calls this after each append)."""
        self._nudged.set()

    async def _follow(self) -> None:
        """Catch up at each nudge or poll. An OSError (a vanished directory, EIO, EMFILE)
        degrades the index and is retried at the next poll; the reason shows on /health."""
        while True:
            with trio.move_on_after(POLL_SECONDS):
                await self._nudged.wait()
            self._nudged = trio.Event()
            try:
                await self.caught_up()
            except OSError as exc:
                reason = f"cannot read {self.path}: {exc.strerror or exc}"
                if reason != self.failure:
                    log.error("audit: the index %s; retrying", reason)
                self.failure = reason
                continue
            if self.failure is not None:
                log.warning("audit: the index reads %s again", self.path)
                self.failure = None
            await self._seal_rotated()
            await self._checkpoint()

    async def _seal_rotated(self) -> None:
        """Seal in a worker thread: sorting a 256 MB segment's entries and writing its
        sidecar takes a second or two that requests must not wait for. Its entries are
        queryable meanwhile (from memory); the thread only replaces them with mapped ones."""
        for source in self._rotated():
            await trio.to_thread.run_sync(self._seal_or_load, source)

    def seal_rotated(self) -> None:
        """Seal what `catch_up` found rotated, now, in this thread (tests, tools)."""
        for source in self._rotated():
            self._seal_or_load(source)

    def _rotated(self) -> list[_Source]:
        pending, self._to_seal = self._to_seal, []
        live = [source for source in pending if source.number in self._sources]
        for source in live:
            self.index.segment(source.number).flush()  # nothing is buffered from now on
        return live

    async def caught_up(self) -> None:
        """`catch_up` in bounded steps, letting requests run between them (a backlog of
        100 MB is 400k records to decode: seconds of CPU)."""
        while self.catch_up(budget=CATCH_UP_BYTES):
            await trio.sleep(0)

    def catch_up(self, budget: int | None = None) -> bool:
        """Index what was appended since the last call; switch files after a rotation.
        With a `budget` (bytes), stop after about that much and return True if more is due."""
        if self._read_skipped(budget):
            return True
        active = self._active
        if active is not None:
            if self._read_logged(active, budget=budget):
                return True
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == active.ino:
                    self._forget_deleted()
                    return False
            # The path was rotated or deleted: finish the old file, then pick up the new one
            # (opened first, so that a file rotated meanwhile is among those listed after).
            self._read_logged(active, final=True)
        self._active = self._open_source(self.path)
        self._checkpointed = 0
        if active is not None:
            self._rotated_after(active)
        self._forget_deleted()
        if self._read_skipped(budget):
            return True
        return self._active is not None and self._read_logged(self._active, budget=budget)

    def _rotated_after(self, finished: _Source) -> None:
        """Seal `finished` under its rotated name, and queue the files rotated after it that
        this reader does not know (another worker wrote a whole file between two looks) to
        be read before the active one. Nothing if it was deleted or moved elsewhere."""
        rotated = rotated_since(self.path, identity(os.fstat(finished.fd)))
        if not rotated:
            return
        finished.path = rotated[0][0]
        self._to_seal.append(finished)
        known = {source.ino for source in self._sources.values()}
        for path, (ino, _) in rotated[1:]:
            if ino not in known and (source := self._open_source(path)) is not None:
                self._skipped.append(source)

    def _read_skipped(self, budget: int | None) -> bool:
        """Read the queued rotated files to their end, oldest first, and queue them to be
        sealed; with a `budget`, True if more is due."""
        while self._skipped:
            source = self._skipped[0]
            if source.number in self._sources:  # (not deleted by retention meanwhile)
                if self._read_logged(source, budget=budget):
                    return True
                self._read_logged(source, final=True)
                self._to_seal.append(source)
            self._skipped.pop(0)
        return False

    def _seal_or_load(self, source: _Source) -> None:
        """Another worker may have sealed it first: use its sidecar if it is valid."""
        try:
            segment, _ = sidecar.load(source.path, source.fd, source.offset, source.number)
        except sidecar.SidecarError:
            self._seal(source)
        else:
            self.index.put(segment)

    def read_lines(self, locations: list[Location]) -> list[bytes]:
        """The stored lines at these index locations, in their order (files are read, not
        kept in memory). One pread each: from the page cache that is under a microsecond,
        less than any bookkeeping to merge neighbouring reads (measured: 79 against 288 µs
        for a page of 100)."""
        lines = []
        sources = self._sources
        for number, offset, length in locations:
            source = sources.get(number)
            if source is None:
                continue
            with contextlib.suppress(OSError):
                lines.append(os.pread(source.fd, length, offset))
        return lines

    def close(self) -> None:
        for number in list(self._sources):
            self._drop(number, discard=False)

    def _open_source(self, path: str) -> _Source | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        number = self._next_number
        self._next_number += 1
        source = _Source(number, path, fd, os.fstat(fd).st_ino)
        self._sources[number] = source
        return source

    def _drop(self, number: int, *, discard: bool = True) -> None:
        source = self._sources.pop(number)
        if discard:
            self.index.drop(number)
        with contextlib.suppress(OSError):
            os.close(source.fd)

    def _forget_deleted(self) -> None:
        for number, source in list(self._sources.items()):
            if source is self._active:
                continue
            with contextlib.suppress(OSError):
                if os.fstat(source.fd).st_nlink == 0:
                    self._drop(number)

    def _read_logged(
        self, source: _Source, *, final: bool = False, budget: int | None = None
    ) -> bool:
        corrupt = CorruptLines()
        more = self._read_new(source, corrupt, final=final, budget=budget)
        _warn_corrupt(corrupt, source.path)
        return more

    def _read_new(
        self,
        source: _Source,
        corrupt: CorruptLines,
        *,
        final: bool,
        budget: int | None = None,
    ) -> bool:
        """Index the complete lines after `source.offset`; `final`: give up on a partial tail.
        With a `budget`, stop after about that many bytes; True if complete lines remain."""
        size = os.fstat(source.fd).st_size
        if size < source.offset:
            log.warning("audit: %s shrank from outside; re-reading it", source.path)
            self.index.put(Segment(source.number))
            source.offset = 0
        progressed = False
        while source.offset < size:
            if budget is not None and budget <= 0:
                return True
            whole = min(READ_CHUNK, size - source.offset)
            data = os.pread(source.fd, min(whole, budget or whole), source.offset)
            end = data.rfind(b"\n") + 1
            if end == 0 and len(data) < whole:  # the budget cut a line short
                if progressed:
                    return True  # the rest next time
                data = os.pread(source.fd, whole, source.offset)  # a long line: read it all
                end = data.rfind(b"\n") + 1
            if not data:
                break
            if end == 0:
                if len(data) < READ_CHUNK:
                    break  # an incomplete last line: wait for the rest
                # No newline in READ_CHUNK bytes: longer than any record. Skip to its end.
                if not source.skipping:
                    corrupt.add(source.offset)
                source.skipping = True
                source.offset += len(data)
                continue
            if source.skipping:
                source.skipping = False
                source.offset += data.find(b"\n") + 1
                continue
            self._index_lines(source, data[:end], corrupt)
            source.offset += end
            progressed = True
            if budget is not None:
                budget -= end
        if final and source.offset < size:
            if not source.skipping:
                corrupt.add(source.offset)
            source.offset = size
        self.corrupt_lines += corrupt.count
        return False

    def _index_lines(self, source: _Source, data: bytes, corrupt: CorruptLines) -> None:
        """Index whole lines (`data` ends with a newline); count the ones that are not records."""
        lines = data.split(b"\n")
        lines.pop()  # after the final newline
        every = decode_fields_lines(data)
        if every is not None and len(every) == len(lines):  # the usual case: all records
            sizes = np.fromiter(map(len, lines), np.int64, len(lines))
            starts = np.cumsum(sizes + 1) - (sizes + 1) + source.offset
            self.index.segment(source.number).add(every, starts, sizes)
            if self.on_indexed is not None:
                self.on_indexed(every)
            return
        # Some line is blank or corrupt: decode them one by one.
        decoded = [None if line.isspace() or not line else decode_fields(line) for line in lines]
        records: list[IndexedFields] = []
        offsets: list[int] = []
        lengths: list[int] = []
        offset = source.offset
        for line, fields in zip(lines, decoded, strict=True):
            length = len(line)
            if fields is not None:
                records.append(fields)
                offsets.append(offset)
                lengths.append(length)
            elif length and not line.isspace():
                corrupt.add(offset)
            offset += length + 1
        self.index.segment(source.number).add(records, offsets, lengths)
        if self.on_indexed is not None:
            self.on_indexed(records)


def _warn_corrupt(corrupt: CorruptLines, path: str) -> None:
    if corrupt.count:
        log.warning(
            "audit: skipped %d corrupt line(s) in %s (first at byte offsets %s)",
            corrupt.count,
            path,
            ", ".join(map(str, corrupt.first_offsets)),
        )
