"""The append side of the JSONL audit file: whole-line O_APPEND writes under a shared flock.

Several processes (hypercorn workers) may append to one file. Each batch is written with
os.write on an O_APPEND descriptor while holding an exclusive flock on `<path>.lock`, so:
- batches never interleave, and a writer that finds the file not ending in a newline knows
  the fragment was left by a writer that died mid-write, and cuts it off before appending;
- a failed (short) write is cut back to where it started, so no fragment stays behind;
- rotation (rename, then create) and retention happen under the same lock, and a writer that
  sees the path now names another inode reopens it before writing, so nothing lands in a
  rotated file and two processes never rotate at once;
- each batch is linked into the hash chain (see `chain`) after the last record in the file,
  whoever wrote it, and retention notes each deleted segment's last link first.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .chain import Chain, Link, last_link, note_deleted, retained_link, segment_link
from .rotation import expired, rotated_name, rotated_siblings, sidecar_path

log = logging.getLogger("crabtrio.audit")

_TAIL_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class AppendResult:
    size: int  # the file's size after the append
    reopened: bool  # the path had been replaced (rotated or deleted) and was reopened
    rotated_to: str | None = None  # this append filled the file: it was renamed to this


def fsync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until all of `data` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def last_newline_end(fd: int, size: int) -> int:
    """Offset just past the last b"\\n" in the first `size` bytes (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        found = chunk.rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


class AuditFile:
    """An append-only audit file that many processes may share. Methods block: use a thread."""

    def __init__(self, path: str, chain: Chain | None = None) -> None:
        self.path = os.path.abspath(path)
        self.lock_path = self.path + ".lock"
        self._fd = -1
        self._ino = -1
        self._chain = chain
        # The chain's head after this process's last append, and where that left the file:
        # while nobody else appended, it need not be read back.
        self._head = Link()
        self._head_at = (-1, -1)
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            with self.locked():
                self._open()
                self.cut_torn_tail()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            fd = os.open(self.path, flags | os.O_CREAT, 0o640)
            os.fsync(fd)
            fsync_directory(self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._ino = fd, os.fstat(fd).st_ino

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def replaced(self) -> bool:
        """Whether the path no longer names our inode (deleted, or renamed away by logrotate)."""
        try:
            return os.stat(self.path).st_ino != self._ino or os.fstat(self._fd).st_nlink == 0
        except FileNotFoundError:
            return True

    def reopen_if_replaced(self) -> bool:
        """Call with the lock held. Reopen (creating) the path if it names another inode now."""
        if not self.replaced():
            return False
        self._open()
        return True

    def cut_torn_tail(self) -> int:
        """Call with the lock held. Truncate a trailing partial line; return the new size."""
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return size
        keep = last_newline_end(self._fd, size)
        os.ftruncate(self._fd, keep)
        log.warning(
            "audit: cut a torn trailing line of %d bytes from %s (a writer died mid-write)",
            size - keep,
            self.path,
        )
        return keep

    def append(self, data: bytes, *, rotate_at: int | None = None) -> AppendResult:
        """Append whole lines with one O_APPEND write (looping on short writes), under the lock.

        On failure (disk full, I/O error) the file is cut back to its size before this call,
        so it never keeps a fragment, and the OSError propagates; the caller retries later.
        When the file reaches `rotate_at` bytes it is rotated before the lock is released.
        """
        with self.locked():
            reopened = self.reopen_if_replaced()
            start = self.cut_torn_tail()
            if self._chain is not None:
                data, self._head = self._chain.link(data, self._last_link(start))
                self._head_at = (self._ino, start + len(data))
            try:
                write_all(self._fd, data)
            except OSError:  # (a no-op if nothing was written)
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                raise
            size = start + len(data)
            if rotate_at is not None and size >= rotate_at:
                rotated = self._rotate()
                self._head_at = (self._ino, 0)  # the new file continues the chain
                return AppendResult(0, reopened, rotated)
            return AppendResult(size, reopened)

    def head(self) -> Link:
        """Where the chain stands now: the last link in the file (or before it)."""
        with self.locked():
            self.reopen_if_replaced()
            return self._last_link(self.cut_torn_tail())

    def _last_link(self, size: int) -> Link:
        """Call with the lock held: the link a batch appended at `size` follows."""
        if self._head_at == (self._ino, size):
            return self._head
        if size:
            return last_link(self._fd, size) or Link()  # (an unchained file: a new chain)
        for segment in reversed(rotated_siblings(self.path)):  # a new file continues the last
            found = segment_link(segment)
            if found is not None:
                return found
        return retained_link(self.path)

    def _rotate(self) -> str:
        """Call with the lock held: rename the file to a timestamped sibling, start a new one.

        Readers (`tail -F`, every worker's index) notice the new inode at the path and follow.
        """
        target = rotated_name(self.path, time.time())
        os.fsync(self._fd)
        os.rename(self.path, target)
        self._open()  # creates the new file and fsyncs it and the directory (the rename too)
        log.info("audit: rotated %s to %s", self.path, os.path.basename(target))
        return target

    def prune(
        self,
        *,
        retention_days: float | None,
        max_total_bytes: int | None,
        shipped_only: Callable[[str, list[str]], list[str]] | None = None,
    ) -> list[str]:
        """Delete rotated files past the retention limits, under the lock; return them.
        `shipped_only(path, files)` keeps those not yet shipped to PostgreSQL."""
        if retention_days is None and max_total_bytes is None:
            return []
        with self.locked():
            doomed = expired(
                self.path,
                retention_days=retention_days,
                max_total_bytes=max_total_bytes,
                now=time.time(),
            )
            if shipped_only is not None and doomed:
                kept = set(doomed) - set(shipped_only(self.path, doomed))
                if kept:
                    log.warning(
                        "audit: retention keeps %d file(s) not yet shipped to PostgreSQL",
                        len(kept),
                    )
                doomed = [f for f in doomed if f not in kept]
            for path in doomed:
                if self._chain is not None:
                    note_deleted(self.path, path)
                for gone in (path, sidecar_path(path)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(gone)
                log.info("audit: retention deleted %s", os.path.basename(path))
            if doomed:
                fsync_directory(self.path)
        return doomed

    def fsync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = -1
