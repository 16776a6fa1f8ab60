"""DirectBody: a proxied response written straight to the client's socket, where that is byte
for byte what hypercorn would write.

Why: through the ASGI send, each write went through hypercorn's `HTTPStream.app_send`,
`H11Protocol.stream_send`, h11, `TCPServer.protocol_send` (a trio Lock and a shielded cancel
scope) and trio's `send_all`: two scheduler passes and about a third of a relayed event's CPU
(bench/figures/stream-profile.md). A body part in the middle of a chunked HTTP/1.1 response
needs only its chunk framing and one `send()`.

Taken only on hypercorn's HTTP/1.1 over plain TCP, with no other send holding the server's send
lock; anything else (HTTP/2, TLS, another server) goes through the ASGI send. The response's
head (`start`) and its end (`end`: the last part, if any, and the body's end) are h11's own bytes
from hypercorn's own h11 connection, with hypercorn's state moved as its `app_send` moves it,
and hypercorn's steps after the end (the access log, the stream's close, keep-alive or close)
are its own. A middle part (`write`) is framed here, and only when h11 frames the body as
chunked (not for an HTTP/1.0 client, nor a body with a length). A write the socket cannot take
whole finishes under hypercorn's lock, shielded like hypercorn's own.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import h11
import trio
from h11._writers import ChunkedWriter
from hypercorn.events import Closed
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.utils import build_and_validate_headers, suppress_body

from .sockets import stdlib_socket

_REQUEST = ASGIHTTPState.REQUEST
_RESPONSE = ASGIHTTPState.RESPONSE
_CLOSED = ASGIHTTPState.CLOSED
_SEND_RESPONSE = h11.SEND_RESPONSE
_SEND_BODY = h11.SEND_BODY
_END = h11.EndOfMessage()


class DirectBody:
    __slots__ = ("_h11", "_http", "_protocol", "_server", "_socket")

    def __init__(
        self,
        http: Any,
        protocol: Any,
        connection: h11.Connection,
        server: Any,
        sock: socket.socket,
    ):
        self._http = http
        self._protocol = protocol
        self._h11 = connection
        self._server = server
        self._socket = sock

    @classmethod
    def of(cls, send: Callable[..., Any]) -> DirectBody | None:
        """The direct path behind hypercorn's ASGI `send`; None where there is none (another
        server, HTTP/2, TLS)."""
        http = getattr(send, "__self__", None)
        if type(http) is not HTTPStream:
            return None
        protocol = getattr(http.send, "__self__", None)
        if not isinstance(protocol, H11Protocol):
            return None
        server = getattr(protocol.send, "__self__", None)
        if type(server) is not TCPServer:
            return None
        stream: Any = server.stream  # (typed as TLS by hypercorn: plain TCP is the case here)
        if type(stream) is not trio.SocketStream:
            return None
        connection = protocol.connection
        if not isinstance(connection, h11.Connection):  # (a WebSocket's, in hypercorn's types)
            return None
        sock = stdlib_socket(stream.socket)
        return None if sock is None else cls(http, protocol, connection, server, sock)

    async def start(self, message: MutableMapping[str, Any]) -> bool:
        """Send the response's head, as hypercorn's `app_send` and `stream_send` do for an
        `http.response.start` (a final status). False: this path cannot (nothing was done;
        the ASGI send must)."""
        http = self._http
        status = int(message["status"])
        if (
            status < 200
            or http.state is not _REQUEST
            or self._h11.our_state is not _SEND_RESPONSE
            or self._server.send_lock.locked()
        ):
            return False
        headers = build_and_validate_headers(message.get("headers", []))
        http.response = message
        config = self._protocol.config
        headers.extend(config.response_headers("h11"))
        if self._protocol.keep_alive_requests >= config.keep_alive_max_requests:
            headers.append((b"connection", b"close"))
        await self._write(self._h11_bytes(h11.Response(headers=headers, status_code=status)))
        http.state = _RESPONSE
        return True

    def write(self, data: bytes) -> memoryview | None:
        """Write one non-empty body part that is not the last, as far as the socket takes it
        now. None: this path cannot (nothing was written; the ASGI send must). Otherwise what
        is left to write, empty when all went; when not empty, the server's send lock is now
        held, and `finish` must be awaited with it."""
        if not self._ready() or type(self._h11._writer) is not ChunkedWriter:
            return None
        return _write_now(self._server, self._socket, b"%x\r\n%b\r\n" % (len(data), data))

    async def finish(self, rest: memoryview) -> None:
        await _finish(self._server, rest)

    async def end(self, body: bytes) -> bool:
        """Send the last part (`body`, maybe empty) and end the body, as hypercorn's `app_send`
        does for an `http.response.body` without `more_body`. False: this path cannot (nothing
        was done; the ASGI send must)."""
        http = self._http
        if not self._ready() or http.response.get("trailers", False):
            return False
        data = b""
        if body and not suppress_body(http.scope["method"], int(http.response["status"])):
            data = self._h11_bytes(h11.Data(data=body))
        await self._write(data + self._h11_bytes(_END))
        http.state = _CLOSED
        await http.config.log.access(http.scope, http.response, time.time() - http.start_time)
        await http.send(StreamClosed(stream_id=http.stream_id))
        return True

    def _ready(self) -> bool:
        return (
            not self._server.send_lock.locked()
            and self._h11.our_state is _SEND_BODY
            and self._http.state is _RESPONSE
        )

    def _h11_bytes(self, event: Any) -> bytes:
        """What h11 writes for `event`, as hypercorn's `_send_h11_event` has it."""
        try:
            return self._h11.send(event) or b""
        except h11.LocalProtocolError:
            if self._h11.their_state is not h11.ERROR:
                raise
            return b""

    async def _write(self, data: bytes) -> None:
        """All of `data`, with its failure handled as hypercorn's `protocol_send` does."""
        if not data:
            return
        rest = _write_now(self._server, self._socket, data)
        if rest is None:  # the client is gone
            await self._server.protocol.handle(Closed())
        elif rest:
            await _finish(self._server, rest)


def _write_now(server: Any, sock: socket.socket, data: bytes) -> memoryview | None:
    """`data` written as far as the socket takes it now, with the send lock free: what is
    left (the lock then held: taken before any other task can run, as hypercorn's
    `protocol_send` takes it), or None when the socket failed (nothing was written)."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        return None
    rest = memoryview(data)[sent:]
    if rest:
        server.send_lock.acquire_nowait()
    return rest


async def _finish(server: Any, rest: memoryview) -> None:
    """The rest of a write the client reads slower than we send, under the lock `_write_now`
    took, shielded and with its errors handled as in hypercorn's own `protocol_send`."""
    try:
        with trio.CancelScope(shield=True):
            await server.stream.send_all(rest)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await server.protocol.handle(Closed())
    finally:
        server.send_lock.release()
