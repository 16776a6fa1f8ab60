"""The hash chain that makes the audit file tamper-evident.

Every record ends with two fields the writer adds under the file's lock: `seq`, its number
in the chain (1, 2, ... across every segment of the file, whichever worker wrote it), and
`chain`, a hex digest over the previous record's `chain` and this record's canonical bytes:

    canonical = the line without its newline and without its last member `,"chain":"<hex>"`
    chain     = hex(HMAC-SHA256(chain_key, previous_chain_hex + canonical))   with a chain_key
              = hex(SHA-256(previous_chain_hex + canonical))                   without one

The first record ever links to GENESIS. Any language can recompute it with byte operations;
`seq` makes a removed or inserted line show as a gap or a repeat rather than only a
mismatch. The digest is over bytes as written, so nothing needs re-serialising.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection
from dataclasses import dataclass

GENESIS = "0" * 64
_BLOCK = 64  # SHA-256's block size, for HMAC
CHAIN_FIELD = b',"chain":"'
_SEGMENT = re.compile(rb'^\{"segment":"([^"]*)"')
_TAIL = re.compile(rb',"seq":(\d{1,19}),"chain":"([0-9a-f]{64})"\}$')
# How much of a file's end is read to find its last record: a few records' worth first,
# then what no record exceeds.
_TAIL_READS = (1 << 12, 1 << 16)


@dataclass(frozen=True, slots=True)
class Link:
    """Where a chain stands: the last record's `seq` and `chain` (0 and GENESIS at first)."""

    seq: int = 0
    chain: str = GENESIS


class Chain:
    """Computes digests with or without a key."""

    __slots__ = ("_inner", "_outer", "digest")

    def __init__(self, key: str | None = None) -> None:
        if not key:
            self.digest = _sha256
            return
        # HMAC (RFC 2104) from its two padded key states, copied per record: 3x faster than
        # hmac.digest, which redoes the key schedule every call.
        block = key.encode()
        if len(block) > _BLOCK:
            block = hashlib.sha256(block).digest()
        block = block.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
        self.digest = self._hmac

    def _hmac(self, previous: bytes, canonical: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(previous + canonical)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest().encode()

    def link(self, data: bytes, head: Link) -> tuple[bytes, Link]:
        """Whole encoded lines (each `{...}\\n`) with `seq` and `chain` added after `head`."""
        seq, previous = head.seq, head.chain.encode()
        digest = self.digest
        lines = data.split(b"}\n")
        lines.pop()  # after the last line
        out: list[bytes] = []
        append = out.append
        for line in lines:  # (the writer's hot loop: parts, not formatted copies)
            seq += 1
            body = line + b',"seq":%d' % seq
            previous = digest(previous, body + b"}")
            append(body)
            append(b',"chain":"')
            append(previous)
            append(b'"}\n')
        return b"".join(out), Link(seq, previous.decode())


def _sha256(previous: bytes, canonical: bytes) -> bytes:
    """The hex digest (as ASCII bytes) linking `canonical` to the `previous` one."""
    return hashlib.sha256(previous + canonical).hexdigest().encode()


def split(line: bytes) -> tuple[bytes, bytes] | None:
    """A stored line (no newline) as (canonical bytes, its `chain` hex), or None if it has no
    chain at its end."""
    at = line.rfind(CHAIN_FIELD)
    if at < 0 or len(line) != at + len(CHAIN_FIELD) + 66 or not line.endswith(b'"}'):
        return None
    return line[:at] + b"}", line[at + len(CHAIN_FIELD) : -2]


def link_of(line: bytes) -> Link | None:
    """The `seq` and `chain` a stored line ends with, if it ends with them."""
    found = _TAIL.search(line.rstrip(b"\n"))
    if found is None:
        return None
    return Link(int(found.group(1)), found.group(2).decode())


def last_link(fd: int, size: int) -> Link | None:
    """The link of the last chained line in the first `size` bytes of an open file (looking
    back through its last 64 KB: lines without one are older records, or damage). Writers
    ask at each batch after another process appended: the last line nearly always links,
    so a few KB are read first."""
    for window in _TAIL_READS:
        start = max(0, size - window)
        data = os.pread(fd, size - start, start)
        end = data.rfind(b"\n")
        while end >= 0:
            begin = data.rfind(b"\n", 0, end) + 1
            if begin == 0 and start > 0:
                break  # this line began before what was read
            found = link_of(data[begin:end])
            if found is not None:
                return found
            end = begin - 1
        if start == 0:
            return None
    return None


def segment_link(path: str) -> Link | None:
    """The link a file's last chained record holds (None: no such record, or no file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return last_link(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def retained_link(path: str, retained: Collection[str] = ()) -> Link:
    """Where the chain stood before the oldest retained segment of `path`: the last link
    that retention noted in `<path>.chain` for a segment it deleted, else GENESIS. A note of
    a segment still `retained` (by file name) is skipped: retention notes a segment, then
    deletes it, and a crash in between leaves both."""
    try:
        with open(deleted_path(path), "rb") as file:
            lines = file.read().splitlines()
    except FileNotFoundError:
        return Link()
    for line in reversed(lines):
        found = link_of(line)
        if found is None:
            continue
        named = _SEGMENT.search(line)
        if named is not None and named.group(1).decode("utf-8", "replace") in retained:
            continue
        return found
    return Link()


def deleted_path(path: str) -> str:
    """Where retention notes the last link of each segment it deletes."""
    return path + ".chain"


def note_deleted(path: str, segment: str) -> None:
    """Before retention deletes `segment`: note its last link (fsynced) in `<path>.chain`,
    so that the next segment's first link can still be checked."""
    found = segment_link(segment)
    if found is None:
        return
    line = b'{"segment":"%s","seq":%d,"chain":"%s"}\n' % (
        os.path.basename(segment).encode(),
        found.seq,
        found.chain.encode(),
    )
    fd = os.open(deleted_path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
