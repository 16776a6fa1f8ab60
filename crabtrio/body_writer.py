"""DirectBody: a streamed response's body parts written straight to the client's socket, where
that is byte for byte what hypercorn would write.

Why: through the ASGI send, each relayed event went through hypercorn's `HTTPStream.app_send`,
`H11Protocol.stream_send`, h11's state machine and chunked writer, `TCPServer.protocol_send`
(a trio Lock and a shielded cancel scope) and trio's `send_all`: two scheduler passes and
about a third of the event's CPU (bench/figures/stream-profile.md). A body part in the middle
of a chunked HTTP/1.1 response needs only its chunk framing and one `send()`.

Taken only when all of these hold, checked per part: the connection is hypercorn's HTTP/1.1
over plain TCP; h11 frames this response as chunked; the response has started and h11 is
sending its body; no other send holds the server's send lock. Anything else (HTTP/2, TLS,
an HTTP/1.0 client, a body with a length) goes through the ASGI send, as does the last part
(h11 writes the end of the body and moves on to keep-alive or close). A send the socket
cannot take whole finishes under hypercorn's lock, shielded like hypercorn's own.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import h11
import trio
from h11._writers import ChunkedWriter
from hypercorn.events import Closed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio.tcp_server import TCPServer

from .sockets import stdlib_socket

_RESPONSE = ASGIHTTPState.RESPONSE
_SEND_BODY = h11.SEND_BODY


class DirectBody:
    __slots__ = ("_h11", "_http", "_server", "_socket")

    def __init__(self, http: Any, connection: h11.Connection, server: Any, sock: socket.socket):
        self._http = http
        self._h11 = connection
        self._server = server
        self._socket = sock

    @classmethod
    def of(cls, send: Callable[..., Any]) -> DirectBody | None:
        """The direct path behind hypercorn's ASGI `send`, once the response has started;
        None where there is none (another server, HTTP/2, TLS, no chunked framing)."""
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
        if type(getattr(connection, "_writer", None)) is not ChunkedWriter:
            return None
        sock = stdlib_socket(stream.socket)
        return None if sock is None else cls(http, connection, server, sock)

    def write(self, data: bytes) -> memoryview | None:
        """Write one non-empty body part that is not the last, as far as the socket takes it
        now. None: this path cannot (nothing was written; the ASGI send must). Otherwise what
        is left to write, empty when all went; when not empty, the server's send lock is now
        held, and `finish` must be awaited with it."""
        if (
            self._server.send_lock.locked()
            or self._h11.our_state is not _SEND_BODY
            or self._http.state is not _RESPONSE
        ):
            return None
        return _write_now(self._server, self._socket, b"%x\r\n%b\r\n" % (len(data), data))

    async def finish(self, rest: memoryview) -> None:
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
