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
from typing import Any

import trio

from .index import AuditIndex, Entry
from .record import IndexedFields, decode_fields, decode_fields_lines
from .rotation import rotated_siblings

log = logging.getLogger("crabtrio.audit")

POLL_SECONDS = 0.2
MAX_LINE = (1 << 24) - 1  # lengths are packed into 24 bits of a location
READ_CHUNK = MAX_LINE + 1  # a chunk without a newline holds no valid line
MAX_SOURCES = 1 << 16


@dataclass(slots=True)
class _Source:
    """One file being read: where its complete lines end, and what they added to the index."""

    number: int
    path: str
    fd: int
    ino: int
    offset: int = 0
    skipping: bool = False  # inside an over-long line
    entries: list[Entry] = field(default_factory=list)


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
        self._strings: dict[object, object] = {}
        self._nudged = trio.Event()
        self.failure: str | None = None  # why the last catch-up failed; None when it did not
        # Entries read but not yet in the index: added in one go, one sort per list.
        self._unindexed: list[Entry] = []

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
        for path in [*rotated_siblings(self.path), self.path]:
            source = self._open_source(path)
            if source is None:
                continue
            _warn_corrupt(self._read_new(source, final=path != self.path), path)
        self._flush_to_index()
        self._active = self._sources.get(self._next_number - 1)
        if self._active is not None and self._active.path != self.path:
            self._active = None

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
                self.catch_up()
            except OSError as exc:
                reason = f"cannot read {self.path}: {exc.strerror or exc}"
                if reason != self.failure:
                    log.error("audit: the index %s; retrying", reason)
                self.failure = reason
                continue
            if self.failure is not None:
                log.warning("audit: the index reads %s again", self.path)
                self.failure = None

    def catch_up(self) -> None:
        """Index what was appended since the last call; switch files after a rotation."""
        active = self._active
        if active is not None:
            self._read_logged(active)
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == active.ino:
                    self._forget_deleted()
                    return
            # The path was rotated or deleted: finish the old file, then pick up the new one.
            self._read_logged(active, final=True)
        self._active = self._open_source(self.path)
        if self._active is not None:
            self._read_logged(self._active)
        self._forget_deleted()

    def read_lines(self, locations: list[int]) -> list[bytes]:
        """The stored lines at these index locations (files are read, not kept in memory)."""
        lines = []
        for location in locations:
            source = self._sources.get(location & 0xFFFF)
            if source is None:
                continue
            span = location >> 16
            with contextlib.suppress(OSError):
                lines.append(os.pread(source.fd, span & MAX_LINE, span >> 24))
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
        if number >= MAX_SOURCES:  # pragma: no cover - 65,536 rotations in one process
            os.close(fd)
            raise OSError(f"audit: too many files opened for reading ({number})")
        self._next_number += 1
        source = _Source(number, path, fd, os.fstat(fd).st_ino)
        self._sources[number] = source
        return source

    def _drop(self, number: int, *, discard: bool = True) -> None:
        source = self._sources.pop(number)
        if discard:
            self.index.discard(source.entries)
        with contextlib.suppress(OSError):
            os.close(source.fd)

    def _forget_deleted(self) -> None:
        for number, source in list(self._sources.items()):
            if source is self._active:
                continue
            with contextlib.suppress(OSError):
                if os.fstat(source.fd).st_nlink == 0:
                    self._drop(number)

    def _flush_to_index(self) -> None:
        if self._unindexed:
            self.index.extend(self._unindexed)
            self._unindexed = []

    def _read_logged(self, source: _Source, *, final: bool = False) -> None:
        _warn_corrupt(self._read_new(source, final=final), source.path)
        self._flush_to_index()

    def _read_new(self, source: _Source, *, final: bool) -> CorruptLines:
        """Index the complete lines after `source.offset`; `final`: give up on a partial tail."""
        corrupt = CorruptLines()
        size = os.fstat(source.fd).st_size
        if size < source.offset:
            log.warning("audit: %s shrank from outside; re-reading it", source.path)
            self.index.discard(source.entries)
            source.entries.clear()
            source.offset = 0
        while source.offset < size:
            data = os.pread(source.fd, min(READ_CHUNK, size - source.offset), source.offset)
            if not data:
                break
            end = data.rfind(b"\n") + 1
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
        if final and source.offset < size:
            if not source.skipping:
                corrupt.add(source.offset)
            source.offset = size
        self.corrupt_lines += corrupt.count
        return corrupt

    def _index_lines(self, source: _Source, data: bytes, corrupt: CorruptLines) -> None:
        """Index whole lines (`data` ends with a newline); count the ones that are not records."""
        base, number = source.offset, source.number
        intern: Callable[[Any, Any], Any] = self._strings.setdefault
        lines = data.split(b"\n")
        lines.pop()  # after the final newline
        decoded: list[IndexedFields | None] | None = decode_fields_lines(data)  # type: ignore[assignment]
        if decoded is None or len(decoded) != len(lines):
            # Some line is blank or corrupt: decode them one by one.
            decoded = [
                None if line.isspace() or not line else decode_fields(line) for line in lines
            ]
        entries: list[Entry] = []
        append = entries.append
        offset = base
        for line, fields in zip(lines, decoded, strict=True):
            length = len(line)
            if fields is not None:
                append(
                    (
                        fields.timestamp,
                        fields.request_id,
                        (((offset << 24) | length) << 16) | number,
                        intern(fields.key_name, fields.key_name),
                        intern(fields.model, fields.model),
                        intern(fields.provider, fields.provider),
                        intern(fields.status, fields.status),
                    )
                )
            elif length and not line.isspace():
                corrupt.add(offset)
            offset += length + 1
        source.entries.extend(entries)
        self._unindexed.extend(entries)


def _warn_corrupt(corrupt: CorruptLines, path: str) -> None:
    if corrupt.count:
        log.warning(
            "audit: skipped %d corrupt line(s) in %s (first at byte offsets %s)",
            corrupt.count,
            path,
            ", ".join(map(str, corrupt.first_offsets)),
        )
