"""The HTTP/1.1 client codec of LeanTransport: request heads written, response heads parsed
strictly (RFC 9112), and how each response's body is framed.

Why not h11 any more: driving h11 cost ~130 µs of CPU per upstream request here (event
objects, validation and its state machine for a request head, a body and a response head;
`python -c` timing on this repo's bench machine), about 6% of a proxied request. What a client
needs of it is a head writer that refuses to write a header it cannot frame, and a head
parser as strict as h11's (its limits and its refusals: malformed lines, bad names or values,
Content-Length that is not one number, transfer codings other than chunked).

Errors are `HeadError` in our own words: an upstream's bytes may carry anything, and are never
quoted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A response head longer than this is refused (h11's own default is 16 KiB).
MAX_HEAD_BYTES = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([1-9][0-9]{2})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD = re.compile(
    rb"("
    + _TOKEN
    + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[\t \x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)[ \t]*"
)
_NAME = re.compile(_TOKEN)  # also a method
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t \x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
# The end of a head: its first empty line (CRLF line ends, or bare LF as h11 allows; the
# last line's own CR stays with it, where a stray one is refused).
_BLANK_LINE = re.compile(rb"\n\r?\n")
_LENGTH = re.compile(rb"[0-9]{1,18}")

# How a response body ends.
NONE = 0  # there is none (HEAD, 1xx, 204, 304)
LENGTH = 1  # after `length` bytes
CHUNKED = 2  # at the last chunk
CLOSE = 3  # when the server closes the connection


class HeadError(Exception):
    """A head that cannot be written, or a response head that is not valid HTTP/1.1."""


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased, values as sent
    framing: int
    length: int  # for LENGTH
    keep_alive: bool  # the server may take another request on this connection


def request_head(method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers, ready to send; HeadError for a header that would break
    the framing (a CR or LF in a value is a request smuggled after this one)."""
    verb = method.encode("ascii", "replace")
    if _NAME.fullmatch(verb) is None or _TARGET.fullmatch(target) is None:
        raise HeadError("the request line cannot be sent")
    lines = [b"%s %s HTTP/1.1\r\n" % (verb, target)]
    for name, value in headers:
        if _NAME.fullmatch(name) is None or _VALUE.fullmatch(value) is None:
            raise HeadError("a request header has a name or value that cannot be sent")
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


def parse_head(data: bytes, method: str) -> tuple[ResponseHead, int] | None:
    """The first complete response head in `data` and the bytes it took, or None while it is
    incomplete; HeadError when it is not valid (or longer than MAX_HEAD_BYTES)."""
    blank = _BLANK_LINE.search(data, 0, MAX_HEAD_BYTES)
    if blank is None:
        if len(data) > MAX_HEAD_BYTES:
            raise HeadError("the response head is too long")
        return None
    end, size = blank.start(), blank.end()
    lines = data[:end].split(b"\n")
    status_line = lines[0].removesuffix(b"\r")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise HeadError("the status line is malformed")
    version, status, reason = match[1], int(match[2]), match[3] or b""
    headers = _fields(lines[1:])
    return _framed(version, status, reason, headers, method), size


def _fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    for raw in lines:
        line = raw.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: a space, as RFC 9112 says
            if not headers:
                raise HeadError("a header line is malformed")
            folded = line.strip(b" \t")
            if _VALUE.fullmatch(folded) is None:
                raise HeadError("a header value is malformed")
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + folded if value and folded else value or folded)
            continue
        match = _FIELD.fullmatch(line)
        if match is None:
            raise HeadError("a header line is malformed")
        headers.append((match[1].lower(), match[2]))
    return headers


def _items(value: bytes) -> list[bytes]:
    """A comma-separated header value's items, without their whitespace."""
    return [item.strip(b" \t") for item in value.split(b",")]


def _framed(
    version: bytes, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], method: str
) -> ResponseHead:
    lengths: list[bytes] = []
    codings: list[bytes] = []
    close = version == b"1.0"
    for name, value in headers:
        if name == b"content-length":
            lengths.extend(_items(value))
        elif name == b"transfer-encoding":
            codings.extend(item.lower() for item in _items(value))
        elif name == b"connection":
            close = close or any(item.lower() == b"close" for item in _items(value))
    head = ResponseHead(status, reason, headers, NONE, 0, not close)
    if codings:
        if codings != [b"chunked"]:
            raise HeadError("only Transfer-Encoding: chunked is supported")
        if lengths:  # both: a desynchronising response (RFC 9112 §6.3 says close after it)
            raise HeadError("the response has both Content-Length and Transfer-Encoding")
    if lengths and (len(set(lengths)) != 1 or _LENGTH.fullmatch(lengths[0]) is None):
        raise HeadError("the Content-Length is not one number")
    if method == "HEAD" or status < 200 or status in (204, 304):
        return head
    if codings:
        head.framing = CHUNKED
    elif lengths:
        head.length = int(lengths[0])
        head.framing = LENGTH if head.length else NONE
    else:
        head.framing, head.keep_alive = CLOSE, False
    return head
