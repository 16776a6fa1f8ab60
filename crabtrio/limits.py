"""Rate limits: each key's requests and tokens of the last minute, shared by every worker.

Requests count when they are admitted, and records are written when requests end, so the
audit file is too late to hold `rpm` across workers. The counts live instead in a file every
worker maps (`<audit path>.limits`): per key, one bucket per second of the last 61 seconds.
A check reads and updates its key's buckets under a POSIX record lock on that key's bytes
(two fcntl calls), so a limit holds for the whole gateway, whatever the worker count.

Counting the 61 one-second buckets that overlap the last minute never lets more than `rpm`
through in any 60-second window; a client may wait up to a second longer than an exact
sliding window would make it. The file survives restarts (the buckets carry their second,
so stale counts expire by themselves); when it is missing or unreadable, the first worker
to open it rebuilds it from the audit trail's last minute.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable
from itertools import compress
from typing import NamedTuple

from .config import KeyConfig

log = logging.getLogger("crabtrio")

WINDOW_SECONDS = 60
BUCKETS = WINDOW_SECONDS + 1
CAPACITY = 16_384  # keys the file holds: 16 MB on disk, of which only used entries take RAM
_MAGIC = b"CRABLIM\x00"
_VERSION = 2
_HEADER = struct.Struct("<8sIII")  # magic, version, capacity, buckets
_HEADER_SIZE = 64
_ENTRY = 1024
# An entry: the key name's digest; then what the window holds in all, kept current as seconds
# pass so that a check reads a few fields rather than every bucket: the last second already
# taken out of the totals ("settled"), the newest seconds with requests and with tokens, and
# the totals; then per bucket its second, requests and tokens.
_DIGEST = 16
_META = struct.Struct("<IIIIQQ")  # settled, newest request, newest tokens, unused, totals
_META_AT = _DIGEST
_SECONDS_AT = _META_AT + _META.size
_REQUESTS_AT = _SECONDS_AT + 4 * BUCKETS
_TOKENS_AT = _REQUESTS_AT + 4 * BUCKETS
_BUCKETS = struct.Struct(f"<{BUCKETS}I{BUCKETS}I{BUCKETS}Q")
assert _SECONDS_AT + _BUCKETS.size <= _ENTRY
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MAX_TOKENS = 2**62

# (timestamp ms, key name, tokens) of a recorded request, for the rebuild.
Recent = Iterable[tuple[int, str, int]]


class LimitsFileError(Exception):
    """The limits file cannot be opened or mapped; the message names it."""


class Verdict(NamedTuple):
    """An admission: whether the request may go on, and what its response says about it."""

    admitted: bool
    headers: list[tuple[bytes, bytes]]
    retry_after: int = 0  # whole seconds, when refused
    exceeded: str = ""  # "requests" or "tokens", when refused


class Windows:
    """The shared per-key minute windows (see the module's docstring)."""

    def __init__(self, path: str, fd: int, mapped: mmap.mmap, clock: Callable[[], float]):
        self.path = path
        self._fd = fd
        self._map = mapped
        self._clock = clock
        self._entries: dict[str, int] = {}  # key name -> its entry's offset
        self._full_warned = False

    @classmethod
    def open(
        cls, path: str, recent: Callable[[int], Recent], clock: Callable[[], float] = time.time
    ) -> Windows:
        """Map `path`, creating or rebuilding it (from `recent(since_ms)`) when it is not a
        valid limits file. Raises LimitsFileError."""
        size = _HEADER_SIZE + CAPACITY * _ENTRY
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LimitsFileError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            with _locked(fd, 0, _HEADER_SIZE):
                header = os.pread(fd, _HEADER.size, 0)
                valid = (
                    len(header) == _HEADER.size
                    and _HEADER.unpack(header) == (_MAGIC, _VERSION, CAPACITY, BUCKETS)
                    and os.fstat(fd).st_size == size
                )
                if not valid:
                    os.ftruncate(fd, 0)
                    # Allocated, not sparse: a write into a hole of a mapped file on a full
                    # disk is a SIGBUS, which would end the worker mid-request.
                    os.posix_fallocate(fd, 0, size)
                mapped = mmap.mmap(fd, size)
                windows = cls(path, fd, mapped, clock)
                if not valid:
                    rebuilt = windows._rebuild(recent)
                    mapped[: _HEADER.size] = _HEADER.pack(_MAGIC, _VERSION, CAPACITY, BUCKETS)
                    log.info(
                        "crabtrio: rate-limit windows rebuilt from the audit trail's last "
                        "minute (%d records)",
                        rebuilt,
                    )
        except OSError as exc:
            os.close(fd)
            raise LimitsFileError(f"cannot use {path}: {exc.strerror or exc}") from None
        return windows

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self._fd)

    def admit(self, key: KeyConfig, *, count: bool = True) -> Verdict:
        """Count a request of `key` if its limits allow it now; else say when to retry.
        With `count` false, only report where the key stands (its headers)."""
        at = self._entry(key.name)
        if at is None:
            return Verdict(True, [])
        now = self._clock()
        second = int(now)
        rpm, tpm = key.rpm, key.tpm
        admitted = False
        values: tuple[int, ...] = ()
        fcntl.lockf(self._fd, fcntl.LOCK_EX, _ENTRY, at)  # (the hot path: no context manager)
        try:
            settled, newest, newest_tokens, requests, tokens = self._settle(at, second)
            if not count:
                pass
            elif (rpm is None or requests < rpm) and (tpm is None or tokens < tpm):
                self._add(at, second, settled, 1, 0)
                requests, newest, admitted = requests + 1, second, True
            else:  # refused: when it may retry needs the buckets
                values = _BUCKETS.unpack_from(self._map, at + _SECONDS_AT)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, _ENTRY, at)
        cutoff = second - WINDOW_SECONDS
        headers: list[tuple[bytes, bytes]] = []
        if rpm is not None:
            headers += _headers(b"requests", rpm, requests, newest, cutoff, now)
        if tpm is not None:
            headers += _headers(b"tokens", tpm, tokens, newest_tokens, cutoff, now)
        if admitted or not count:
            return Verdict(True, headers)
        if rpm is not None and requests >= rpm:
            exceeded, wait = "requests", _wait(values, 1, cutoff, requests - rpm + 1, now)
        else:
            assert tpm is not None
            exceeded, wait = "tokens", _wait(values, 2, cutoff, tokens - tpm + 1, now)
        retry_after = max(1, math.ceil(wait))
        return Verdict(
            False, [*headers, (b"retry-after", b"%d" % retry_after)], retry_after, exceeded
        )

    def count_tokens(self, name: str, tokens: int) -> None:
        """Add a written record's tokens to its key's current second."""
        at = self._entry(name)
        if at is None or tokens <= 0:
            return
        second = int(self._clock())
        fcntl.lockf(self._fd, fcntl.LOCK_EX, _ENTRY, at)
        try:
            settled = self._settle(at, second)[0]
            self._add(at, second, settled, 0, min(tokens, _MAX_TOKENS))
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, _ENTRY, at)

    def _settle(self, at: int, second: int) -> tuple[int, int, int, int, int]:
        """Take the buckets that left the window at `second` out of the entry's totals;
        (settled, newest request second, newest token second, requests, tokens). The totals
        are those of the buckets whose second is after `settled`."""
        mapped = self._map
        settled, newest, newest_tokens, _, requests, tokens = _META.unpack_from(
            mapped, at + _META_AT
        )
        cutoff = second - WINDOW_SECONDS  # the window is [cutoff, second]
        if settled == cutoff - 1:
            return settled, newest, newest_tokens, requests, tokens
        if 0 < cutoff - 1 - settled <= BUCKETS:  # a few seconds passed: take them out
            for gone in range(settled + 1, cutoff):
                slot = gone % BUCKETS
                if _U32.unpack_from(mapped, at + _SECONDS_AT + 4 * slot)[0] == gone:
                    requests -= _U32.unpack_from(mapped, at + _REQUESTS_AT + 4 * slot)[0]
                    tokens -= _U64.unpack_from(mapped, at + _TOKENS_AT + 8 * slot)[0]
        else:  # idle for a window, or the clock went back: add up what is in it
            values = _BUCKETS.unpack_from(mapped, at + _SECONDS_AT)
            live = [held >= cutoff for held in values[:BUCKETS]]
            requests = sum(compress(values[BUCKETS : 2 * BUCKETS], live))
            tokens = sum(compress(values[2 * BUCKETS :], live))
        settled = cutoff - 1
        _META.pack_into(mapped, at + _META_AT, settled, newest, newest_tokens, 0, requests, tokens)
        return settled, newest, newest_tokens, requests, tokens

    def _add(self, at: int, second: int, settled: int, requests: int, tokens: int) -> None:
        """Count requests and tokens in `second`'s bucket and the totals (after `_settle`)."""
        mapped = self._map
        slot = second % BUCKETS
        _, newest, newest_tokens, _, total_requests, total_tokens = _META.unpack_from(
            mapped, at + _META_AT
        )
        held_at = at + _SECONDS_AT + 4 * slot
        requests_at = at + _REQUESTS_AT + 4 * slot
        tokens_at = at + _TOKENS_AT + 8 * slot
        held = _U32.unpack_from(mapped, held_at)[0]
        in_bucket = (
            _U32.unpack_from(mapped, requests_at)[0],
            _U64.unpack_from(mapped, tokens_at)[0],
        )
        if held != second:  # the slot's last use left the window, or lies ahead (clock went back)
            if held > settled:  # still in the totals
                total_requests -= in_bucket[0]
                total_tokens -= in_bucket[1]
            _U32.pack_into(mapped, held_at, second)
            in_bucket = (0, 0)
        _U32.pack_into(mapped, requests_at, in_bucket[0] + requests)
        _U64.pack_into(mapped, tokens_at, min(in_bucket[1] + tokens, _MAX_TOKENS))
        if requests:
            newest = max(newest, second)
        if tokens:
            newest_tokens = max(newest_tokens, second)
        _META.pack_into(
            mapped,
            at + _META_AT,
            settled,
            newest,
            newest_tokens,
            0,
            total_requests + requests,
            min(total_tokens + tokens, _MAX_TOKENS),
        )

    def _entry(self, name: str) -> int | None:
        at = self._entries.get(name)
        if at is None:
            with _locked(self._fd, 0, _HEADER_SIZE):
                at = self._claim(name)
            if at is None:
                if not self._full_warned:
                    self._full_warned = True
                    log.critical(
                        "crabtrio: %s holds %d keys already; keys beyond them are not rate "
                        "limited (delete the file and restart to reclaim removed keys)",
                        self.path,
                        CAPACITY,
                    )
                return None
            self._entries[name] = at
        return at

    def _claim(self, name: str) -> int | None:
        """The offset of `name`'s entry, claiming a free one; call with the header locked."""
        digest = hashlib.blake2b(name.encode(), digest_size=_DIGEST).digest()
        start = int.from_bytes(digest[:8], "little") % CAPACITY
        empty = bytes(_DIGEST)
        for probe in range(CAPACITY):
            at = _HEADER_SIZE + ((start + probe) % CAPACITY) * _ENTRY
            held = self._map[at : at + _DIGEST]
            if held == digest:
                return at
            if held == empty:
                self._map[at : at + _DIGEST] = digest
                return at
        return None

    def _rebuild(self, recent: Callable[[int], Recent]) -> int:
        """Fill a fresh file from the recorded requests of the last window (the header is
        locked by the caller, so no worker uses the file meanwhile)."""
        now = int(self._clock())
        count = 0
        for timestamp, name, tokens in recent((now - WINDOW_SECONDS) * 1000):
            second = timestamp // 1000
            at = self._claim(name)
            if at is None or not now - WINDOW_SECONDS <= second <= now:
                continue
            settled = self._settle(at, now)[0]
            self._add(at, second, settled, 1, max(tokens, 0))
            count += 1
        return count


@contextlib.contextmanager
def _locked(fd: int, start: int, length: int):  # type: ignore[no-untyped-def]
    """An exclusive POSIX record lock on [start, start + length): per process, so workers
    exclude each other and one worker's single thread never waits on itself."""
    fcntl.lockf(fd, fcntl.LOCK_EX, length, start)
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, length, start)


def _live(values: tuple[int, ...], column: int, cutoff: int) -> list[tuple[int, int]]:
    """(second, count) of the buckets in the window [cutoff, ...] with a count (column 1:
    requests, 2: tokens), from an entry's buckets."""
    counts = values[column * BUCKETS : (column + 1) * BUCKETS]
    return [
        (held, n) for held, n in zip(values[:BUCKETS], counts, strict=True) if held >= cutoff and n
    ]


def _wait(values: tuple[int, ...], column: int, cutoff: int, excess: int, now: float) -> float:
    """Seconds until the oldest buckets holding `excess` counts leave the window."""
    freed = 0
    for held, n in sorted(_live(values, column, cutoff)):
        freed += n
        if freed >= excess:
            return held + BUCKETS - now
    return BUCKETS


def _headers(
    kind: bytes, limit: int, used: int, newest: int, cutoff: int, now: float
) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens}: reset is when the
    window holds none of what it counts now (its newest bucket leaves it)."""
    reset = 0.0 if newest < cutoff else newest + BUCKETS - now
    whole = math.ceil(reset) if reset >= 1 else len(_WHOLE_SECONDS)
    names = _NAMES[kind]
    return [
        (names[0], b"%d" % limit),
        (names[1], b"%d" % (limit - used if used < limit else 0)),
        (
            names[2],
            _WHOLE_SECONDS[whole] if whole < len(_WHOLE_SECONDS) else duration(reset).encode(),
        ),
    ]


def duration(seconds: float) -> str:
    """A duration as OpenAI's headers write it: `250ms`, `7s`, `1m1s`."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


_NAMES = {
    kind: tuple(b"x-ratelimit-%s-%s" % (part, kind) for part in (b"limit", b"remaining", b"reset"))
    for kind in (b"requests", b"tokens")
}
# What reset headers say most of the time, encoded once (the hot path).
_WHOLE_SECONDS = [duration(seconds).encode() for seconds in range(BUCKETS + 2)]
