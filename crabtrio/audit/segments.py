"""An audit file's retained segments read as lines: oldest first, from the end, and followed.

Lines are read as the gateway's index reads them: whole lines only (what follows the last
newline is a line still being written, or a torn one), a segment deleted by retention
meanwhile simply gone, and a file renamed by rotation known by its inode and read to its end
before the files rotated after it and the new one at the path.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from .rotation import rotated_name_pattern, rotated_siblings
from .store import last_newline_end

BLOCK = 1 << 20  # bytes read at a time
# A segment rotated this long before `since` holds nothing as recent (its records were all
# timestamped before it was renamed); the slack covers small clock steps.
ROTATION_SLACK_MS = 60_000
Identity = tuple[int, int]  # (st_ino, st_dev): a file, whatever its name now


class SegmentError(Exception):
    """A segment that cannot be read, in one line that names it."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"cannot read {path}: {why}")


def identity(info: os.stat_result) -> Identity:
    return info.st_ino, info.st_dev


def retained_segments(path: str) -> list[str]:
    """The retained segments of the audit file at `path`, oldest first (the active one last)."""
    found = rotated_siblings(path)
    return [*found, path] if os.path.exists(path) else found


def rotated_since(path: str, file: Identity) -> list[tuple[str, Identity]]:
    """`file` under its rotated name, then the files rotated after it, oldest first, each with
    its identity; none if no rotated sibling of `path` is `file` (deleted, or moved elsewhere:
    then nothing tells which came after it)."""
    newer: list[tuple[str, Identity]] = []
    for sibling in reversed(rotated_siblings(path)):  # the newest first: it is the likeliest
        with contextlib.suppress(OSError):  # deleted by retention meanwhile
            found = identity(os.stat(sibling))
            newer.append((sibling, found))
            if found == file:
                return newer[::-1]
    return []


def complete_end(fd: int, size: int, floor: int = 0) -> int:
    """Where the last complete line before `size` ends; `floor` if none ends after it."""
    return max(floor, last_newline_end(fd, size))


def lines_between(fd: int, start: int, end: int) -> Iterator[bytes]:
    """The lines between two line boundaries, first to last, without their newlines."""
    rest, position = b"", start
    while position < end:
        data = os.pread(fd, min(BLOCK, end - position), position)
        if not data:  # shrunk from outside
            return
        position += len(data)
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        yield from lines


def lines_before(fd: int, end: int) -> Iterator[bytes]:
    """The lines before the line boundary `end`, last to first."""
    rest, position = b"", end
    while position > 0:
        start = max(0, position - BLOCK)
        data = os.pread(fd, position - start, start)
        lines = (data + rest).split(b"\n")
        rest = lines[0]  # continues in the block before, unless this one began the file
        position = start
        yield from reversed(lines[1:])
    if rest:
        yield rest


def segment_lines(path: str, *, backward: bool = False) -> Iterator[bytes]:
    """A rotated segment's lines, first or last first; none if retention deleted it."""
    fd = _open(path)
    if fd is None:
        return
    try:
        with _reading(path):
            end = complete_end(fd, _file_size(fd, path))
            yield from lines_before(fd, end) if backward else lines_between(fd, 0, end)
    finally:
        os.close(fd)


class Retained:
    """The audit file and its retained rotated segments, as they were when opened. The active
    file is opened first: if it is rotated meanwhile, the renamed file is known by its inode
    and read once, as the active file. `since` (ms) passes over the segments rotated long
    before it. Closed by `close`."""

    def __init__(self, path: str, since: int | None = None) -> None:
        self.active = Tail(path)
        rotated = rotated_siblings(path)
        if self.active.fd is None and not rotated:
            raise SegmentError(path, "no such file")
        pattern = rotated_name_pattern(path)
        self.rotated = []  # oldest first
        for segment in rotated:
            match = pattern.match(os.path.basename(segment))
            if since is not None and match and _stamp_ms(match[1]) < since - ROTATION_SLACK_MS:
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted by retention meanwhile
                if identity(os.stat(segment)) != self.active.identity:
                    self.rotated.append(segment)

    def oldest_first(self) -> Iterator[bytes]:
        """Every line, the oldest segment's first."""
        for segment in self.rotated:
            yield from segment_lines(segment)
        active = self.active
        if active.fd is not None:
            with _reading(active.path):
                yield from lines_between(active.fd, 0, active.offset)

    def newest_first(self) -> Iterator[bytes]:
        """Every line, the last one first."""
        active = self.active
        if active.fd is not None:
            with _reading(active.path):
                yield from lines_before(active.fd, active.offset)
        for segment in reversed(self.rotated):
            yield from segment_lines(segment, backward=True)

    def last(self, admits: Callable[[bytes], bool], count: int) -> list[bytes]:
        """The last `count` lines `admits` takes, oldest first, read from the end (as tail)."""
        found: list[bytes] = []
        if count:
            for line in self.newest_first():
                if admits(line):
                    found.append(line)
                    if len(found) == count:
                        break
        return found[::-1]

    def close(self) -> None:
        self.active.close()


class Tail:
    """The active file, from its last complete line when opened, followed as the gateway's
    reader follows it: by inode, so a rotated file is read to its end, then the files rotated
    after it, before the new one is read from its start; never a line twice."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = _open(path)
        self.identity = None if self.fd is None else identity(os.fstat(self.fd))
        self.offset = 0
        if self.fd is not None:
            try:
                with _reading(path):
                    self.offset = complete_end(self.fd, _file_size(self.fd, path))
            except SegmentError:
                self.close()
                raise

    def read(self) -> list[bytes]:
        """The complete lines written since the last call."""
        lines = self._read()
        with _reading(self.path):
            try:
                info = os.stat(self.path)
            except FileNotFoundError:  # deleted, or between a rename and the new file
                return lines
        if self.fd is not None and identity(info) == self.identity:
            return lines
        lines += self._read()  # the path names another file now: finish this one first
        finished = self.identity
        self.close()
        # Opened before the rotated files are listed: one rotated meanwhile is among them.
        self.fd, self.offset = _open(self.path), 0  # None: rotated again already; next call
        self.identity = None if self.fd is None else identity(os.fstat(self.fd))
        return lines + self._rotated_after(finished) + self._read()

    def _rotated_after(self, finished: Identity | None) -> list[bytes]:
        """The lines of segments rotated after `finished` and before the file now open: the
        file was rotated more than once between two calls."""
        if finished is None:
            return []
        return [
            line
            for segment, found in rotated_since(self.path, finished)[1:]
            if found != self.identity
            for line in segment_lines(segment)
        ]

    def _read(self) -> list[bytes]:
        if self.fd is None:
            return []
        with _reading(self.path):
            size = os.fstat(self.fd).st_size
            if size < self.offset:  # truncated from outside: read it again, as the gateway does
                self.offset = 0
            end = complete_end(self.fd, size, self.offset)
            lines = list(lines_between(self.fd, self.offset, end))
        self.offset = end
        return lines

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """OSError as SegmentError: one line that names the file."""
    try:
        yield
    except OSError as exc:
        raise SegmentError(path, exc.strerror or str(exc)) from None


def _open(path: str) -> int | None:
    """A descriptor to read `path`; None if there is no such file."""
    with _reading(path):
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None


def _file_size(fd: int, path: str) -> int:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise SegmentError(path, "not a file")
    return info.st_size


def _stamp_ms(stamp: str) -> int:
    """ms since the epoch of a rotated segment's stamp, e.g. 20261127T051201.123Z."""
    moment = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
