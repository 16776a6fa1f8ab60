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


class EventSplitter:
    """Cuts a byte stream at blank lines; keeps the unfinished event for the next chunk."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> bytes:
        """Add bytes; return every event now complete, concatenated, each ending in b"\\n\\n"."""
        data = self._rest + chunk if self._rest else chunk
        held = b""
        if b"\r" in data:
            # Normalise CRLF and CR line ends; a final CR may be half of a CRLF, so hold it.
            if data.endswith(b"\r"):
                data, held = data[:-1], b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._rest = data + held
            return b""
        self._rest = data[cut + 2 :] + held
        return data[: cut + 2]

    @property
    def pending(self) -> bytes:
        return self._rest


def split_events(complete: bytes) -> list[bytes]:
    """Split the output of `EventSplitter.feed` into single events, each ending in b"\\n\\n"."""
    return [part + b"\n\n" for part in complete.split(b"\n\n") if part]
