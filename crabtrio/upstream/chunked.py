"""ChunkedBody: decodes a `Transfer-Encoding: chunked` response body, every chunk a read holds
at once.

Why not h11's reader for this: h11 hands out one `Data` event per chunk, so a read holding
100 streamed events became 100 relays (a socket send and two scheduler passes each), and its
event machinery cost ~15 µs per chunk. Here a read is decoded in one call, into the data of
all the chunks it holds (whole or partial), so the relay forwards it with one send.

The grammar is RFC 9112 §7.1 with h11's limits: 1-20 hex digits, extensions ignored,
optional whitespace before the CRLF; trailers are read and dropped. Anything else is a
`ChunkedError` (the upstream's bytes are never quoted: they may carry anything).
"""

from __future__ import annotations

import re

# A size line longer than this (extensions included) is refused, as are trailers past it.
MAX_LINE = 4096
MAX_TRAILERS = 64 * 1024
_CRLF = -1
_TRAILERS = -2
_HEX = b"0123456789abcdefABCDEF"
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")


class ChunkedError(Exception):
    """The body is not well-formed chunked encoding."""


class ChunkedBody:
    """Feed it what the socket gives; it returns the body bytes those reads complete."""

    __slots__ = ("_buffer", "_held", "_left", "done", "trailing")

    def __init__(self, start: bytes = b"") -> None:
        self._buffer = start  # bytes not decoded yet (a size line or a CR in pieces)
        # Trailers so far: grown in place and searched only where new bytes came, so that
        # 64 KiB of them sent a byte at a time costs no more than sent at once.
        self._held = bytearray()
        # Data bytes still to come in the current chunk; then _CRLF (its CRLF), 0 (a size
        # line), or _TRAILERS (after the last chunk).
        self._left = 0
        self.done = False  # the last chunk and the trailers have been read
        self.trailing = b""  # bytes after the body's end (a well-behaved server sends none)

    def feed(self, data: bytes) -> bytes:
        """The body bytes in `data` (plus what was held back); b"" when they are all framing."""
        if not self._left and not self._buffer:
            # The common case: a read holding one whole chunk (a streamed event).
            line_end = data.find(b"\r\n", 0, 22)
            if line_end > 0:
                size_field = data[:line_end]
                if not size_field.strip(_HEX):
                    size = int(size_field, 16)
                    if size and len(data) == line_end + size + 4 and data.endswith(b"\r\n"):
                        return data[line_end + 2 : -2]
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        if self.done:
            self.trailing += data
            return b""
        if self._left == _TRAILERS:
            self._trailers(data)
            return b""
        out: list[bytes] = []
        at, end = 0, len(data)
        while at < end:
            left = self._left
            if left > 0:  # inside a chunk's data
                take = min(left, end - at)
                out.append(data[at : at + take])
                at += take
                self._left = left - take if take < left else _CRLF
            elif left == _CRLF:  # the CRLF after a chunk's data
                if end - at < 2 and data[at:] == b"\r":
                    self._buffer = b"\r"
                    break
                if data[at : at + 2] != b"\r\n":
                    raise ChunkedError("a chunk's data is not followed by CRLF")
                at += 2
                self._left = 0
            elif left == _TRAILERS:
                self._trailers(data[at:])
                break
            else:  # a size line
                line_end = data.find(b"\r\n", at, at + MAX_LINE)
                if line_end < 0:
                    if end - at >= MAX_LINE:
                        raise ChunkedError("a chunk size line is too long")
                    self._buffer = data[at:]
                    break
                match = _SIZE_LINE.fullmatch(data, at, line_end)
                if match is None:
                    raise ChunkedError("a chunk size line is malformed")
                size = int(match[1], 16)
                self._left = size if size else _TRAILERS
                at = line_end + 2
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _trailers(self, data: bytes) -> None:
        """After the last chunk: trailer lines up to an empty line, then the end (whatever
        follows is `trailing`). Held until the empty line arrives."""
        held = self._held
        searched = len(held)
        held += data
        if held.startswith(b"\r\n"):
            end, skip = 0, 2
        else:
            end, skip = held.find(b"\r\n\r\n", max(0, searched - 3)), 4
        # (Unfinished: up to 3 bytes of the final CRLFCRLF may be held with them.)
        if end > MAX_TRAILERS or (end < 0 and len(held) > MAX_TRAILERS + 3):
            raise ChunkedError("the trailers are too long")
        if end >= 0:
            self.done, self.trailing = True, bytes(held[end + skip :])
            self._held = bytearray()
