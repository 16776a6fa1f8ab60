"""The local side of shipping: which audit files hold records not yet in PostgreSQL.

Files are the rotated segments, oldest first, then the active file. A file is known by a
digest of its first line (`file_id`): rotation renames the active file but never changes
its first line, so a checkpoint `(file_id, offset)` survives rotation, restarts and copies.

The worker that ships writes its progress to `<audit path>.shipping` (a small JSON file,
replaced atomically); the other workers read it for /health, and retention reads it so it
never deletes a file with records not yet shipped. PostgreSQL holds the authoritative
checkpoint; this copy may only lag behind it, which keeps more files, never fewer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import orjson

from ..audit.record import decode_fields
from ..audit.rotation import rotated_siblings

# A first line is read in this much, then in bigger steps if it is longer (a record is not).
FIRST_READ = 1024
FIRST_LINE_STEP = 64 * 1024
READ_STEP = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Checkpoint:
    file_id: str
    file_name: str
    offset: int


@dataclass(frozen=True, slots=True)
class Segment:
    path: str
    file_id: str | None  # None while the file has no complete line
    size: int
    inode: int


@dataclass(slots=True)
class Batch:
    segment: Segment
    start: int
    end: int
    data: bytes
    lines: int


def status_path(path: str) -> str:
    return os.path.abspath(path) + ".shipping"


def lock_path(path: str) -> str:
    return os.path.abspath(path) + ".ship.lock"


def first_line_id(fd: int) -> str | None:
    """A digest of the file's first line (however long), or None while it has no newline."""
    digest = hashlib.sha256()
    offset, step = 0, FIRST_READ
    while True:
        chunk = os.pread(fd, step, offset)
        if not chunk:
            return None
        end = chunk.find(b"\n")
        if end >= 0:
            digest.update(chunk[: end + 1])
            return digest.hexdigest()[:32]
        digest.update(chunk)
        offset, step = offset + len(chunk), FIRST_LINE_STEP


class LocalFiles:
    """Reads what is not shipped yet, and counts it. Methods block: call them in a thread."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        # file_id -> (bytes counted, newlines in them): whole files, and checkpoint prefixes
        self._lines: dict[str, tuple[int, int]] = {}
        self._prefixes: dict[str, tuple[int, int]] = {}

    def segments(self) -> list[Segment]:
        """The rotated files, oldest first, then the active file. The active file is looked
        at first: if it is rotated meanwhile, it is found among the rotated files (its
        checkpoint never goes missing), and its stale entry is dropped."""
        active = None
        with contextlib.suppress(FileNotFoundError):
            active = self._segment(self.path)
        out = []
        for path in rotated_siblings(self.path):
            with contextlib.suppress(FileNotFoundError):
                out.append(self._segment(path))
        if active is not None and all(s.inode != active.inode for s in out):
            out.append(active)
        return out

    def _segment(self, path: str) -> Segment:
        # The id is read every time, never cached by inode: a deleted file's inode is
        # soon given to a new file.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            return Segment(path, first_line_id(fd), info.st_size, info.st_ino)
        finally:
            os.close(fd)

    def locate(self, segments: list[Segment], checkpoint: Checkpoint | None) -> tuple[int, int]:
        """(index of the segment, offset) where shipping resumes. (0, 0) when nothing was
        shipped, or when the checkpoint's file is gone (re-sent rows are no-ops)."""
        if checkpoint is not None:
            for i, segment in enumerate(segments):
                if segment.file_id == checkpoint.file_id:
                    return i, min(checkpoint.offset, segment.size)
        return 0, 0

    def next_batch(self, checkpoint: Checkpoint | None, max_lines: int) -> Batch | None:
        """The next whole lines after the checkpoint (at most `max_lines`, in one file), or
        None when everything written so far is shipped."""
        segments = self.segments()
        i, offset = self.locate(segments, checkpoint)
        while i < len(segments):
            segment = segments[i]
            if offset < segment.size and segment.file_id is not None:
                batch = self._read(segment, offset, max_lines)
                if batch is not None:
                    return batch
            i, offset = i + 1, 0  # a rotated file ends with a whole line: it is done
        return None

    def _read(self, segment: Segment, offset: int, max_lines: int) -> Batch | None:
        try:
            fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # rotated away just now: found again at the next call
            return None
        try:
            if os.fstat(fd).st_ino != segment.inode:
                return None
            want = min(segment.size - offset, max(READ_STEP, max_lines * 512))
            data = os.pread(fd, want, offset)
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1
        if end == 0:
            return None  # a line still being written
        data = data[:end]
        lines = data.count(b"\n")
        if lines > max_lines:
            cut = -1
            for _ in range(max_lines):
                cut = data.find(b"\n", cut + 1)
            data, lines = data[: cut + 1], max_lines
        return Batch(segment, offset, offset + len(data), data, lines)

    def lag(self, checkpoint: Checkpoint | None) -> tuple[int, int | None]:
        """(records not shipped, timestamp in ms of the oldest of them or None)."""
        segments = self.segments()
        self.forget(segments)
        i, offset = self.locate(segments, checkpoint)
        records, oldest = 0, None
        for j in range(i, len(segments)):
            segment = segments[j]
            start = offset if j == i else 0
            if segment.file_id is None or start >= segment.size:
                continue
            records += self._count(segment, segment.size)
            records -= self._count(segment, start, prefix=True)
            if oldest is None:
                oldest = self._timestamp_at(segment, start)
        return records, oldest

    def _count(self, segment: Segment, upto: int, *, prefix: bool = False) -> int:
        """Newlines in the first `upto` bytes of a segment. Counts only grow (the active file
        and the checkpoint move forward), so each is extended, never redone."""
        assert segment.file_id is not None
        table = self._prefixes if prefix else self._lines
        counted, lines = table.get(segment.file_id, (0, 0))
        if counted > upto:
            counted, lines = 0, 0
        if counted < upto:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    while counted < upto:
                        chunk = os.pread(fd, min(READ_STEP, upto - counted), counted)
                        if not chunk:
                            break
                        lines += chunk.count(b"\n")
                        counted += len(chunk)
                finally:
                    os.close(fd)
            table[segment.file_id] = (counted, lines)
        return lines

    def _timestamp_at(self, segment: Segment, offset: int) -> int | None:
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                head = os.pread(fd, FIRST_LINE_STEP, offset)
            finally:
                os.close(fd)
            fields = decode_fields(head[: head.find(b"\n") + 1])
            if fields is not None:
                return fields.timestamp
        return None

    def forget(self, segments: list[Segment]) -> None:
        """Drop counts of files that are gone (retention deleted them)."""
        live = {s.file_id for s in segments}
        self._lines = {k: v for k, v in self._lines.items() if k in live}
        self._prefixes = {k: v for k, v in self._prefixes.items() if k in live}


def write_status(path: str, status: dict[str, Any]) -> None:
    """Replace `<path>.shipping` atomically (a reader never sees half of it)."""
    target = status_path(path)
    temporary = f"{target}.{os.getpid()}.tmp"
    with open(temporary, "wb") as out:
        out.write(orjson.dumps(status))
    os.replace(temporary, target)


def read_status(path: str) -> dict[str, Any] | None:
    try:
        with open(status_path(path), "rb") as source:
            value = orjson.loads(source.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def status_checkpoint(status: dict[str, Any] | None) -> Checkpoint | None:
    try:
        if status is None or status.get("file_id") is None:
            return None
        return Checkpoint(str(status["file_id"]), str(status["file_name"]), int(status["offset"]))
    except (KeyError, TypeError, ValueError):
        return None


def shipped_only(path: str, doomed: list[str]) -> list[str]:
    """Of the rotated files retention would delete, those whose records are all shipped
    (by the checkpoint in `<path>.shipping`). With no checkpoint, none."""
    checkpoint = status_checkpoint(read_status(path))
    if checkpoint is None or not doomed:
        return []
    files = LocalFiles(path)
    segments = files.segments()
    i, offset = files.locate(segments, checkpoint)
    if segments and segments[i].file_id != checkpoint.file_id:
        return []  # the checkpoint's file is not here: nothing is known to be shipped
    done = {s.path for s in segments[:i]}
    if segments and offset >= segments[i].size:
        done.add(segments[i].path)
    return [f for f in doomed if f in done]
