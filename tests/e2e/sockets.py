"""Raw HTTP/1.x over loopback sockets for connection tests: explicit bytes, explicit EOF."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pytest
import trio


def request(
    method: str,
    path: str,
    *,
    version: str = "HTTP/1.1",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    """One request's bytes, exactly as written (no header is added but Host and Content-Length)."""
    lines = [f"{method} {path} {version}"]
    fields = {"Host": "127.0.0.1", **(headers or {})}
    if body or method == "POST":
        fields["Content-Length"] = str(len(body))
    lines += [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes  # de-chunked


def parse_response(data: bytes, *, eof: bool) -> tuple[Response, int] | None:
    """The first whole response in `data` and the bytes it took, or None while incomplete.

    A body framed by neither Content-Length nor chunked encoding ends at EOF only.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end].decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    start = end + 4
    if "content-length" in headers:
        stop = start + int(headers["content-length"])
        return (Response(status, headers, data[start:stop]), stop) if len(data) >= stop else None
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, at = b"", start
        while True:
            line_end = data.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(data[at:line_end].split(b";")[0], 16)
            if len(data) < line_end + 2 + size + 2:
                return None
            if size == 0:  # no trailers from these servers: the last chunk ends with CRLF
                return Response(status, headers, body), line_end + 4
            body += data[line_end + 2 : line_end + 2 + size]
            at = line_end + 2 + size + 2
    if status in (204, 304) or 100 <= status < 200:
        return Response(status, headers, b""), start
    return (Response(status, headers, data[start:]), len(data)) if eof else None


@dataclass
class Connection:
    """One client TCP connection; `request()` reads exactly one response off it."""

    stream: trio.SocketStream
    buffer: bytes = b""
    eof: bool = False

    @classmethod
    async def open(cls, port: int, *, receive_buffer: int | None = None) -> Self:
        """`receive_buffer`: SO_RCVBUF, set before connecting (it sets the window offered)."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        return cls(trio.SocketStream(sock))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
        self.buffer += data

    async def request(self, raw: bytes) -> Response:
        await self.stream.send_all(raw)
        return await self.response()

    async def response(self) -> Response:
        while True:
            parsed = parse_response(self.buffer, eof=self.eof)
            if parsed is not None:
                response, used = parsed
                self.buffer = self.buffer[used:]
                return response
            if self.eof:
                raise ConnectionError(f"closed mid-response after {self.buffer[:200]!r}")
            await self._fill()

    async def wait_closed(self) -> bytes:
        """Read until the server closes; returns what arrived meanwhile (nothing, if polite)."""
        while not self.eof:
            try:
                await self._fill()
            except trio.BrokenResourceError:  # a reset is a close too
                self.eof = True
        extra, self.buffer = self.buffer, b""
        return extra


def established(port: int) -> int:
    """Established TCP connections whose local port is `port`: the server's side of them."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


def socket_fds(pid: int) -> int:
    """Sockets a process holds open (listeners and trio's wakeup pair included)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


async def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """`processes.wait_until` for async tests: /proc and the audit file offer no event."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def file_limit() -> Iterator[Callable[[int], None]]:
    """`need(count)` raises this process's soft RLIMIT_NOFILE to `count` (processes started
    afterwards inherit it) or skips the test; the old limit is restored on exit."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)

    def need(count: int) -> None:
        soft, hard = saved
        if soft >= count:
            return
        if hard != resource.RLIM_INFINITY and hard < count:
            pytest.skip(f"needs {count} open files; the hard limit (ulimit -Hn) is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))

    try:
        yield need
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
