"""Server-sent events: split an upstream byte stream into events, and format our own."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def data_of(event: bytes) -> bytes:
    """The `data:` payload of one event (the lines joined, as the SSE spec says)."""
    parts = [
        line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(parts)


class EventTooLarge(Exception):
    """An event grew past the splitter's limit without ending."""


class EventSplitter:
    """Cuts a byte stream at blank lines; keeps the unfinished event for the next chunk.

    Linear in the stream's size: each chunk is searched once (a 40 MB stream with no blank
    line used to be re-joined and re-searched at every chunk: 18.6 s of CPU), and an event
    longer than `max_bytes` raises EventTooLarge instead of growing without bound.
    """

    __slots__ = ("_cr", "_max", "_parts", "_size")

    def __init__(self, max_bytes: int = 1 << 20) -> None:
        self._max = max_bytes
        self._parts: list[bytes] = []  # the unfinished event, in pieces
        self._size = 0
        self._cr = False  # the last chunk ended in a CR: maybe half of a CRLF

    def feed(self, chunk: bytes) -> bytes:
        """Add bytes; return every event now complete, concatenated, each ending in b"\n\n"."""
        if not self._parts and not self._cr and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            return chunk  # whole events, as upstreams usually send them
        if self._cr:
            chunk, self._cr = b"\r" + chunk, False
        if b"\r" in chunk:
            # Normalise CRLF and CR line ends; a final CR may be half of a CRLF, so hold it.
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        cut = chunk.rfind(b"\n\n")
        if cut >= 0:
            cut += 2
        elif chunk[:1] == b"\n" and self._parts and self._parts[-1].endswith(b"\n"):
            cut = 1  # the blank line straddles the two chunks
        if cut < 0:
            self._hold(chunk)
            return b""
        head, rest = chunk[:cut], chunk[cut:]
        if self._parts:
            self._parts.append(head)
            head = b"".join(self._parts)
            self._parts, self._size = [], 0
        self._hold(rest)
        return head

    def _hold(self, data: bytes) -> None:
        if not data:
            return
        self._parts.append(data)
        self._size += len(data)
        if self._size > self._max:
            raise EventTooLarge(f"an event longer than {self._max // 1024} KB")

    @property
    def pending(self) -> bytes:
        return b"".join(self._parts)


def split_events(complete: bytes) -> list[bytes]:
    """Split the output of `EventSplitter.feed` into single events, each ending in b"\\n\\n"."""
    return [part + b"\n\n" for part in complete.split(b"\n\n") if part]
