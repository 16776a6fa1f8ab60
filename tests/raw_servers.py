"""Scripted upstreams on 127.0.0.1 that send exact bytes, for tests of the HTTP/1.1 client."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

Script = Callable[["Peer"], Awaitable[None]]


@dataclass(eq=False)
class Peer:
    """One accepted connection, as its script sees it."""

    server: RawServer
    stream: trio.abc.Stream
    number: int  # 1 for the first connection the server accepted
    buffer: bytearray = field(default_factory=bytearray)
    requests: list[bytes] = field(default_factory=list)  # "METHOD /path" of each, in order

    async def read_request(self) -> bool:
        """Read one request (head, then a content-length body) and record it; False at EOF."""
        while b"\r\n\r\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                return False
            self.buffer += data
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = bytearray(rest)
        while len(body) < length:
            data = await self.stream.receive_some(65536)
            if not data:
                return False
            body += data
        self.buffer[:] = body[length:]
        request = b" ".join(head.split(b" ")[:2])
        self.requests.append(request)
        self.server.requests.append(request)
        return True

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


class RawServer:
    """Runs `script(peer)` for every accepted connection and counts what it saw."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.url = ""
        self.peers: list[Peer] = []
        self.requests: list[bytes] = []  # over all connections, in arrival order
        self.open = 0  # connections open right now
        self.most_open = 0

    @property
    def connections(self) -> int:
        """How many connections the server accepted."""
        return len(self.peers)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        peer = Peer(self, stream, len(self.peers) + 1)
        self.peers.append(peer)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.script(peer)
        finally:
            self.open -= 1


@asynccontextmanager
async def raw_server(
    script: Script, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[RawServer]:
    """A server on 127.0.0.1 (port 0), stopped (its connections cancelled) on exit."""
    server = RawServer(script)
    async with trio.open_nursery() as nursery:
        if tls is None:
            listeners = await nursery.start(
                partial(trio.serve_tcp, server._handle, 0, host="127.0.0.1")
            )
            sock = listeners[0].socket
        else:
            listeners = await nursery.start(
                partial(trio.serve_ssl_over_tcp, server._handle, 0, tls, host="127.0.0.1")
            )
            sock = listeners[0].transport_listener.socket
        host, port = sock.getsockname()[:2]
        server.url = f"{'https' if tls else 'http'}://{host}:{port}"
        yield server
        nursery.cancel_scope.cancel()


def answer(body: bytes, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    """A 200 response with a content-length, and `headers` (each b"name: value") added."""
    extra = b"".join(header + b"\r\n" for header in headers)
    return b"%s 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (version, len(body), extra, body)


async def keep_answering(peer: Peer) -> None:
    """Answer every request on the connection with `ok`, keeping it open."""
    while await peer.read_request():
        await peer.send(answer(b"ok"))
