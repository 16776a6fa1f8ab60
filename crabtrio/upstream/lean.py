"""LeanTransport: an `httpx.AsyncBaseTransport` for direct HTTP/1.1 upstreams, on trio.

Why not httpx's own transport for these: on this gateway's hot path httpcore's HTTP/1.1
transport cost 270 µs of CPU per request against 106 µs for h11 driven directly (same
loopback upstream, one keep-alive connection), and h11 itself most of that: the codec is now
`http1`'s, chunked bodies are `chunked`'s. Proxies and HTTP/2 use httpx's transport.

What it promises, as a client library must:
- a request whose body was fully written is never sent again; one that failed while being
  written on a reused connection is retried once, on a new connection;
- a connection is reused only when its exchange ended exactly: response complete, no bytes
  left over in the parser or the socket, neither side asked to close;
- at most `max_connections` connections per origin; more requests wait (`pool` timeout);
- its errors are httpx's (`httpx.ConnectError`, `ReadTimeout`...), in our own words: never
  the upstream's bytes, which may carry anything.
"""

from __future__ import annotations

import contextlib
import math
import select
import ssl
import time
from contextlib import AbstractContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from ..deadline import Deadline
from ..sockets import stdlib_socket
from .chunked import ChunkedBody, ChunkedError
from .http1 import CHUNKED, CLOSE, NONE, HeadError, ResponseHead, parse_head, request_head
from .stalls import Stalls

READ_SIZE = 64 * 1024
# A pooled connection idle longer than this is closed rather than reused: servers close idle
# keep-alive connections after a few seconds, and a request on a half-closed one is wasted.
KEEPALIVE_SECONDS = 5.0

# A response extension: the connection goes back to the pool (or is closed) as soon as the
# body has been read to its end, so closing the response after that is not needed.
RELEASED_AT_END = "crabtrio.released_at_end"
# Errors of a connection that broke (or was never good), as opposed to a slow one.
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int


class _Connection:
    __slots__ = ("idle_since", "plain", "socket", "stream")

    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType) -> None:
        self.stream = stream
        self.socket = socket
        # Plain TCP is read from its stdlib socket directly (see `_receive`); TLS through trio.
        self.plain = None if isinstance(stream, trio.SSLStream) else stdlib_socket(socket)
        self.idle_since = 0.0

    def reusable(self, now: float) -> bool:
        """Not expired, and the server has said nothing since (a readable idle socket means
        it closed, or sent bytes out of turn: either way the connection is done)."""
        if now - self.idle_since > KEEPALIVE_SECONDS:
            return False
        if isinstance(self.stream, trio.SSLStream) and _tls_buffered(self.stream):
            return False
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN)
        return not poller.poll(0)

    def close_now(self) -> None:
        """Close without awaiting (no TLS goodbye): for connections we will not use again."""
        with contextlib.suppress(OSError):
            self.socket.close()


def _tls_buffered(stream: trio.SSLStream[Any]) -> bool:
    """Whether TLS records already read from the socket wait in trio's buffers, where poll()
    cannot see them (a server's bytes past its response, sent as a later record). trio has no
    public way to ask: its private buffers are read, and if they are not there (another trio
    version), the connection is not reused rather than trusted."""
    incoming = getattr(stream, "_incoming", None)
    ssl_object = getattr(stream, "_ssl_object", None)
    if incoming is None or ssl_object is None:
        return True
    return bool(incoming.pending or ssl_object.pending())


class _Pool:
    """Connections to one origin: idle ones to reuse, and a cap on how many exist at once."""

    def __init__(
        self,
        origin: Origin,
        ssl_context: ssl.SSLContext | None,
        limit: int,
        stalls: Stalls,
    ) -> None:
        self.origin = origin
        self.stalls = stalls
        self._ssl_context = ssl_context
        self._idle: list[_Connection] = []
        self._limit = limit  # connections open at once, in use or idle
        self._open = 0
        # Woken whenever a connection goes idle or closes: what a waiting request waits for.
        self._changed = trio.lowlevel.ParkingLot()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read")
        try:
            data = request_head(request.method, request.url.raw_path, request.headers.raw)
        except HeadError:
            raise httpx.LocalProtocolError("a request header cannot be sent") from None
        data += request.content
        connection = await self._checkout(timeouts.get("pool"), timeouts.get("connect"))
        # One cancel scope (each costs ~25k instructions) for writing the request and then
        # waiting for the response head, each step with its own deadline.
        scope = trio.CancelScope(deadline=_deadline(timeouts.get("write")))
        sent = False
        try:
            with scope:
                try:
                    await self._send(connection, data)
                except httpx.WriteError:
                    if not connection.idle_since:
                        raise
                    # A reused connection that the server had closed before our request
                    # reached it (it was idle and quiet when checked): once more, on a new
                    # connection (waiting for it is bounded by the pool and connect limits).
                    scope.deadline = math.inf
                    connection = await self._checkout(
                        timeouts.get("pool"), timeouts.get("connect"), fresh=True
                    )
                    scope.deadline = _deadline(timeouts.get("write"))
                    await self._send(connection, data)
                # From here on the request was sent: whatever happens, it is never sent again.
                sent = True
                scope.deadline = _deadline(read_timeout)
                response, rest = await _read_head(connection, request.method, self.stalls)
        except BaseException:
            if sent:  # (`_send` discards the connection it fails on)
                self._discard(connection)
            raise
        if scope.cancelled_caught:
            if not sent:
                raise httpx.WriteTimeout("sending the request took too long")
            self._discard(connection)
            raise httpx.ReadTimeout("the upstream sent no response in time")
        stream = LeanBody(self, connection, read_timeout, response, rest)
        return httpx.Response(
            response.status,
            headers=response.headers,  # (a list: faster for httpx to take in)
            stream=stream,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": response.reason,
                RELEASED_AT_END: True,
            },
        )

    async def _checkout(
        self, pool_timeout: float | None, connect_timeout: float | None, *, fresh: bool = False
    ) -> _Connection:
        if not fresh and (connection := self._reuse()) is not None:
            return connection  # the common case, without a deadline to set up
        try:
            with _limit(pool_timeout):
                while True:
                    if not fresh and (connection := self._reuse()) is not None:
                        return connection
                    if self._open < self._limit:
                        break
                    if self._idle:  # a fresh one is needed: make room
                        self._discard(self._idle.pop(0))
                        continue
                    await self._changed.park()
        except trio.TooSlowError:
            raise httpx.PoolTimeout("no free connection to the upstream in time") from None
        self._open += 1
        try:
            return await self._connect(connect_timeout)
        except BaseException:
            self._open -= 1
            self._changed.unpark()
            raise

    def _reuse(self) -> _Connection | None:
        """The most recently used idle connection that is still good; the others closed."""
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable(now):
                return connection
            self._discard(connection)
        return None

    async def _connect(self, timeout: float | None) -> _Connection:
        origin = self.origin
        try:
            with _limit(timeout):
                tcp = await trio.open_tcp_stream(origin.host, origin.port)
                tcp.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                stream: trio.abc.Stream = tcp
                if origin.scheme == "https":
                    assert self._ssl_context is not None
                    tls = trio.SSLStream(
                        tcp, self._ssl_context, server_hostname=origin.host, https_compatible=True
                    )
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(tcp)
                        raise
                    stream = tls
        except trio.TooSlowError:
            raise httpx.ConnectTimeout("connecting took too long") from None
        except (*_BROKEN, ssl.SSLError) as exc:
            # The cause stays attached: `upstream.client` words the reason (TLS, refused...).
            raise httpx.ConnectError("cannot connect") from exc
        return _Connection(stream, tcp.socket)

    async def _send(self, connection: _Connection, data: bytes) -> None:
        """Write the request; a connection that fails it (or is cancelled in it) is discarded.
        On plain TCP what the socket takes at once is sent without trio's layers."""
        try:
            sent = 0
            if connection.plain is not None:
                with contextlib.suppress(BlockingIOError):
                    sent = connection.plain.send(data)
            if sent < len(data):
                await connection.stream.send_all(memoryview(data)[sent:])
        except BaseException as exc:
            self._discard(connection)
            if isinstance(exc, _BROKEN):
                raise httpx.WriteError("the connection broke while sending") from exc
            raise

    def checkin(self, connection: _Connection, reusable: bool) -> None:
        """Keep a connection whose exchange ended exactly (`reusable`: the body ended with no
        byte past it and the server keeps the connection); close any other."""
        if not reusable:
            self._discard(connection)
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
        self._changed.unpark()

    def _discard(self, connection: _Connection) -> None:
        connection.close_now()
        self._open -= 1
        self._changed.unpark()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(connection.stream)


class LeanBody(httpx.AsyncByteStream):
    """A response body read from its connection, which goes back to the pool at its end.

    Each read is handed on whole: every chunk (or byte) it completes, joined, so that events
    an upstream wrote back to back are relayed with one send."""

    def __init__(
        self,
        pool: _Pool,
        connection: _Connection,
        timeout: float | None,
        head: ResponseHead,
        start: bytes,
    ) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self._timeout = timeout
        self._keep_alive = head.keep_alive
        self._framing = head.framing
        self._left = head.length  # bytes still to come, for a body with a Content-Length
        self._chunked = ChunkedBody() if head.framing == CHUNKED else None
        self._start = start  # read past the head: where the body starts
        if head.framing == NONE:
            self._end(connection, start)

    # An iterator, not an async generator: one abandoned mid-body (a client that left) would
    # be finalized by the GC, with a warning from trio and its cleanup run too late.
    def __aiter__(self) -> LeanBody:
        return self

    async def __anext__(self) -> bytes:
        part = await self.next_part()
        if not part:
            raise StopAsyncIteration
        return part

    async def next_part(self) -> bytes:
        """What the next read completes of the body; b"" at its end."""
        connection = self._connection
        if connection is None:
            return b""
        data, self._start = self._start, b""
        while True:
            if data:
                out = self._take(connection, data)
                if out or self._connection is None:
                    return out
            data = await _receive(connection, self._timeout, self._pool.stalls)
            if not data:
                if self._framing == CLOSE:
                    self._end(connection, b"")
                    return b""
                raise httpx.RemoteProtocolError("the upstream closed the connection mid-body")

    def _take(self, connection: _Connection, data: bytes) -> bytes:
        """The body in `data` (ending it, and the exchange, when it is complete)."""
        body = self._chunked
        if body is not None:
            try:
                out = body.feed(data)
            except ChunkedError:
                raise httpx.RemoteProtocolError("the upstream sent a malformed body") from None
            if body.done:
                self._end(connection, body.trailing)
            return out
        if self._framing == CLOSE:
            return data
        left = self._left
        if len(data) < left:
            self._left = left - len(data)
            return data
        self._left = 0
        self._end(connection, data[left:])
        return data[:left]

    def _end(self, connection: _Connection, past: bytes) -> None:
        self._connection = None
        reusable = self._keep_alive and self._framing != CLOSE and not past
        self._pool.checkin(connection, reusable)

    async def aclose(self) -> None:
        """Called when the response is closed: a body not read to its end loses its
        connection (what is left of it could be read as the next response)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool._discard(connection)


class LeanTransport(httpx.AsyncBaseTransport):
    """Direct HTTP/1.1 to upstreams: one `_Pool` per origin, at most `max_connections` each.

    Used as an async context manager (httpx's client enters its transport), it owns the
    task that bounds body reads (`Stalls`); otherwise each read gets its own deadline."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None, max_connections: int) -> None:
        self._ssl_context = ssl_context
        self._max_connections = max_connections
        self._pools: dict[Origin, _Pool] = {}
        self._stalls = Stalls()
        self._tasks = AsyncExitStack()

    async def __aenter__(self) -> LeanTransport:
        nursery = await self._tasks.enter_async_context(trio.open_nursery())
        nursery.start_soon(self._stalls.watch)
        self._tasks.callback(nursery.cancel_scope.cancel)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.aclose()
        finally:
            self._stalls.close()
            await self._tasks.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = Origin(url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        pool = self._pools.get(origin)
        if pool is None:
            if origin.scheme == "https" and self._ssl_context is None:
                raise httpx.ConnectError("no TLS context for an https upstream")
            pool = self._pools[origin] = _Pool(
                origin, self._ssl_context, self._max_connections, self._stalls
            )
        return await pool.handle(request)

    def open_connections(self) -> int:
        return sum(pool._open for pool in self._pools.values())

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()


async def _receive(connection: _Connection, timeout: float | None, stalls: Stalls) -> bytes:
    """The next bytes from the upstream (b"" when it closed), each wait bounded by `timeout`
    (on plain TCP through `stalls`).

    On plain TCP, the wait comes first and then one `recv()` on the stdlib socket: trio's
    `receive_some` tries a `recv()` first, which for a stream's next event almost always
    fails (2 µs), then waits anyway, through 3 layers more per relayed event. Waiting first
    costs one scheduler pass when bytes are already there, as trio's own call would."""
    sock = connection.plain
    try:
        if sock is None:
            with _limit(timeout):
                return bytes(await connection.stream.receive_some(READ_SIZE))
        while True:
            await stalls.wait_readable(sock, timeout)
            try:
                return sock.recv(READ_SIZE)
            except BlockingIOError:
                continue
    except trio.TooSlowError:
        raise httpx.ReadTimeout("the upstream sent nothing in time") from None
    except _BROKEN as exc:
        raise httpx.ReadError("the connection broke") from exc


async def _read_head(
    connection: _Connection, method: str, stalls: Stalls
) -> tuple[ResponseHead, bytes]:
    """The response head and the bytes read past it (the caller bounds the wait for all of
    it: an upstream trickling it byte by byte does not get a new deadline per read)."""
    data = b""
    while True:
        try:
            parsed = parse_head(data, method) if data else None
        except HeadError:
            raise httpx.RemoteProtocolError("the upstream sent a malformed response head") from None
        if parsed is None:
            more = await _receive(connection, None, stalls)
            if not more:
                raise httpx.RemoteProtocolError("the upstream closed the connection unanswered")
            data += more
            continue
        head, size = parsed
        data = data[size:]
        if head.status == 101:
            raise httpx.RemoteProtocolError("the upstream switched protocols unasked")
        if head.status >= 200:
            return head, data
        # 100 Continue and friends: the answer follows


_NO_LIMIT = contextlib.nullcontext()


def _deadline(timeout: float | None) -> float:
    return trio.current_time() + timeout if timeout is not None else math.inf


def _limit(timeout: float | None) -> AbstractContextManager[object]:
    return Deadline(timeout) if timeout is not None else _NO_LIMIT
