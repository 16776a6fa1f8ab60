"""Walk an audit file's retained segments, oldest first, and check its hash chain.

The first break is reported with its file, 1-based line number, byte offset and, as far as
the chain and `seq` can tell, its kind:
- corrupt: the line is no record (not JSON, a missing field, a torn line inside the file);
- removed: `seq` jumps ahead (lines, or whole segments, deleted);
- inserted: a line whose `seq` does not follow, while the line after it does;
- reordered: two lines swapped (each links where the other should);
- edited: the line is where it belongs but its bytes (or its `chain`) are not what was
  linked; also what a wrong chain key looks like.
A torn last line of the active file (a writer died mid-write; the next write cuts it) and
segments deleted by retention (their last links are noted in `<path>.chain`) are not breaks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .chain import CHAIN_FIELD, Chain, Link, retained_link, split
from .record import decode_fields
from .segments import complete_end, lines_between, retained_segments

_READ = 8 << 20
_SEQ = re.compile(rb',"seq":(\d{1,19})\}$')


@dataclass(frozen=True, slots=True)
class Break:
    path: str
    line: int  # 1-based, in its file
    offset: int  # of the line's first byte
    kind: str  # corrupt, removed, inserted, reordered, edited
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} (byte {self.offset}): {self.kind}: {self.detail}"


@dataclass(slots=True)
class Report:
    records: int = 0  # every record of the retained segments (chained or older)
    segments: int = 0
    head: str = ""  # the last record's chain
    unchained: int = 0  # records from before the chain (a file older than it)
    torn_tail: bool = False
    broken: Break | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None


def _lines(path: str, start: int = 0) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, line without its newline, complete) for each line of the file from `start`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        end = complete_end(fd, size, start)
        offset = start
        for line in lines_between(fd, start, end):
            yield offset, line, True
            offset += len(line) + 1
        if end < size:
            yield end, os.pread(fd, size - end, end), False
    finally:
        os.close(fd)


class _Lines:
    """A file's lines from a point, numbered, with a look at the next ones (to tell what a
    break is)."""

    def __init__(self, path: str, start: int = 0, number: int = 0) -> None:
        self._source = _lines(path, start)
        self._ahead: list[tuple[int, int, bytes, bool]] = []
        self._number = number

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> tuple[int, int, bytes, bool]:
        if self._ahead:
            return self._ahead.pop(0)
        offset, line, complete = next(self._source)
        self._number += 1
        return self._number, offset, line, complete

    def peek(self, count: int) -> list[tuple[int, int, bytes, bool]]:
        while len(self._ahead) < count:
            try:
                offset, line, complete = next(self._source)
            except StopIteration:
                break
            self._number += 1
            self._ahead.append((self._number, offset, line, complete))
        return self._ahead[:count]


class _Walk:
    """The chain as it is walked: where it stands, and with which key."""

    def __init__(self, expected: Link, chains: list[Chain], report: Report) -> None:
        self.expected = expected
        self.chains = chains
        self.report = report
        self.chained_yet = False

    def fast(self, segment: str, start: int) -> tuple[int, int] | None:
        """Check whole lines from byte `start` as long as each links (the usual case: a
        tight loop); return (offset, lines checked before it) of the first that does not,
        or None at the file's end."""
        field, width, skip = CHAIN_FIELD, len(CHAIN_FIELD) + 66, len(CHAIN_FIELD)
        previous, digest = self.expected.chain.encode(), self.chains[0].digest
        checked = 0
        offset = start
        found: tuple[int, int] | None = None
        with open(segment, "rb") as file:
            file.seek(start)
            rest = b""
            while found is None and (chunk := file.read(_READ)):
                data = rest + chunk
                end = data.rfind(b"\n") + 1
                lines = data[:end].split(b"\n")
                lines.pop()
                rest = data[end:]
                for line in lines:
                    at = line.rfind(field)
                    if (
                        at > 0
                        and len(line) == at + width
                        and digest(previous, line[:at] + b"}") == line[at + skip : -2]
                        and line.endswith(b'"}')
                    ):
                        previous = line[at + skip : -2]
                        checked += 1
                        offset += len(line) + 1
                        continue
                    found = (offset, checked)
                    break
            if found is None and rest:
                found = (offset, checked)
        if checked:
            self.chained_yet = True
            self.report.records += checked
            self.expected = Link(self.expected.seq + checked, previous.decode())
        return found

    def segment(self, segment: str, active: bool) -> Break | None:
        """Walk one file; the first break in it, if any. Lines the fast loop stops at (older
        unchained records, a key change) are walked one by one until one links again."""
        start, before = 0, 0  # (a byte offset, and the lines before it)
        while (position := self.fast(segment, start)) is not None:
            offset, checked = position
            lines = _Lines(segment, offset, before + checked)
            for entry in lines:
                window = [entry, *lines.peek(2)]
                broken, self.expected, self.chained_yet = _check(
                    segment,
                    window,
                    self.expected,
                    self.chains,
                    self.report,
                    self.chained_yet,
                    active,
                )
                if broken is not None:
                    return broken
                if not entry[3]:  # a torn last line: the file's end
                    return None
                following = lines.peek(1)
                if following and _links(following[0][2], self.expected.chain, self.chains[:1]):
                    start, before = following[0][1], entry[0]
                    break  # back to the fast loop
            else:
                return None
        return None


def verify(path: str, keys: Sequence[str | None] = (None,)) -> Report:
    """Check the chain of every retained segment of `path`, with the first of `keys` that
    links each record (the current chain key, then older ones)."""
    path = os.path.abspath(path)
    report = Report()
    files = retained_segments(path)
    retained = {os.path.basename(file) for file in files}
    walk = _Walk(retained_link(path, retained), [Chain(key) for key in keys] or [Chain()], report)
    for number, segment in enumerate(files):
        report.segments += 1
        active = number == len(files) - 1 and segment == path
        report.broken = walk.segment(segment, active)
        if report.broken is not None:
            return report
    report.head = walk.expected.chain
    return report


def _check(
    segment: str,
    window: list[tuple[int, int, bytes, bool]],
    expected: Link,
    chains: list[Chain],
    report: Report,
    chained_yet: bool,
    active: bool,
) -> tuple[Break | None, Link, bool]:
    """Check the first line of `window` (the next two are for telling what a break is)."""
    line_no, offset, line, complete = window[0]
    if not complete:
        if active and len(window) == 1:
            report.torn_tail = True  # the next write cuts it: not a break
            return None, expected, chained_yet
        return Break(segment, line_no, offset, "corrupt", "a line without its end"), expected, True
    parts = split(line)
    if parts is None:
        if not chained_yet and decode_fields(line) is not None:
            report.unchained += 1  # written before the chain existed
            report.records += 1
            return None, expected, False
        kind = "corrupt" if decode_fields(line) is None else "inserted"
        detail = "not a record" if kind == "corrupt" else "a record without a chain link"
        return Break(segment, line_no, offset, kind, detail), expected, True
    canonical, stored = parts
    previous = expected.chain.encode()
    for index, chain in enumerate(chains):
        if chain.digest(previous, canonical) == stored:
            if index:  # the records from here on were linked with this (older or newer) key
                chains.insert(0, chains.pop(index))
            report.records += 1
            seq = _seq_of(canonical)
            return None, Link(seq if seq is not None else expected.seq + 1, stored.decode()), True
    kind, detail = _what_broke(window, expected, chains)
    return Break(segment, line_no, offset, kind, detail), expected, True


def _seq_of(canonical: bytes) -> int | None:
    found = _SEQ.search(canonical)
    return int(found.group(1)) if found else None


def _links(line: bytes, previous: str, chains: list[Chain]) -> bool:
    parts = split(line)
    if parts is None:
        return False
    canonical, stored = parts
    return any(chain.digest(previous.encode(), canonical) == stored for chain in chains)


def _what_broke(
    window: list[tuple[int, int, bytes, bool]], expected: Link, chains: list[Chain]
) -> tuple[str, str]:
    line = window[0][2]
    following = [entry[2] for entry in window[1:] if entry[3]]
    if decode_fields(line) is None:
        return "corrupt", "not a record"
    parts = split(line)
    assert parts is not None
    seq = _seq_of(parts[0])
    after = expected.seq + 1
    if following and _links(following[0], expected.chain, chains):
        own = split(following[0])
        if own is not None and _links(line, own[1].decode(), chains):
            return "reordered", f"this line and the next are swapped (seq {after} comes next)"
        return "inserted", f"this line does not belong in the chain (seq {seq}; {after} follows it)"
    if seq is not None and seq > after:
        missing = seq - after
        return "removed", f"{missing} record(s) missing before this one (seq {after} to {seq - 1})"
    if seq is not None and seq < after:
        return "inserted", f"seq {seq} repeats or goes back (expected {after})"
    return "edited", (
        f"seq {after} is not what was linked (its bytes or its chain changed, or the chain "
        "key is wrong)"
    )
