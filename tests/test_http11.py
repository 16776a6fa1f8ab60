"""The upstream HTTP/1.1 client against scripted servers: reuse, staleness, framing, time."""

from __future__ import annotations

import contextlib
import gzip
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from crabtrio.http11 import ConnectionPool, HTTPError, Origin

Script = Callable[[trio.SocketStream, int], Awaitable[None]]
HEADERS = [(b"host", b"test"), (b"content-length", b"2")]


async def read_request(stream: trio.abc.Stream, buffer: bytearray) -> bool:
    """Read one request (head + content-length body) into nothing; False at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return False
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    buffer[:] = rest[length:]
    return True


class Server:
    """A scripted server: `script(stream, connection_number)` runs for every connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        with contextlib.suppress(trio.BrokenResourceError):
            await self.script(stream, self.connections)


async def serve(nursery: trio.Nursery, script: Script) -> tuple[Server, ConnectionPool]:
    server = Server(script)
    listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return server, ConnectionPool(Origin("http", "127.0.0.1", port), None)


def answer(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), b"".join(extra), body)


async def keep_answering(stream: trio.SocketStream, _: int) -> None:
    buffer = bytearray()
    while await read_request(stream, buffer):
        await stream.send_all(answer(b'{"ok":true}'))


async def test_sequential_requests_reuse_one_connection() -> None:
    async with trio.open_nursery() as nursery:
        server, pool = await serve(nursery, keep_answering)
        for _ in range(5):
            response = await pool.request(b"POST", b"/v1/x", HEADERS, b"{}", 5)
            assert (response.status, await response.read()) == (200, b'{"ok":true}')
        assert server.connections == 1
        await pool.aclose()
        nursery.cancel_scope.cancel()


async def test_a_pooled_connection_closed_by_the_server_is_retried_on_a_new_one() -> None:
    async def answer_once_then_close(stream: trio.SocketStream, _: int) -> None:
        buffer = bytearray()
        if await read_request(stream, buffer):
            await stream.send_all(answer(b"first"))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        server, pool = await serve(nursery, answer_once_then_close)
        first = await pool.request(b"POST", b"/", HEADERS, b"{}", 5)
        assert await first.read() == b"first"
        await trio.sleep(0.05)  # the server has closed the idle connection
        second = await pool.request(b"POST", b"/", HEADERS, b"{}", 5)
        assert await second.read() == b"first"
        assert server.connections == 2
        await pool.aclose()
        nursery.cancel_scope.cancel()


async def test_chunked_and_close_delimited_bodies_stream_and_close_is_not_reused() -> None:
    async def chunked_then_close(stream: trio.SocketStream, number: int) -> None:
        buffer = bytearray()
        await read_request(stream, buffer)
        if number == 1:
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            await trio.sleep(0.01)
            await stream.send_all(b"6\r\n world\r\n0\r\n\r\n")
            await read_request(stream, buffer)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        server, pool = await serve(nursery, chunked_then_close)
        response = await pool.request(b"POST", b"/", HEADERS, b"{}", 5)
        assert [await response.receive(), await response.receive(), await response.receive()] == [
            b"hello",
            b" world",
            b"",
        ]
        closing = await pool.request(b"POST", b"/", HEADERS, b"{}", 5)
        assert await closing.read() == b"until the end"
        assert server.connections == 1
        again = await pool.request(b"POST", b"/", HEADERS, b"{}", 5)
        assert await again.read() == b"until the end"
        assert server.connections == 2  # `connection: close` was honoured
        await pool.aclose()
        nursery.cancel_scope.cancel()


async def test_timeouts_for_the_head_and_for_each_read(autojump_clock) -> None:
    async def slow(stream: trio.SocketStream, number: int) -> None:
        await read_request(stream, bytearray())
        if number == 1:
            await trio.sleep(10)  # no head
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
        await trio.sleep(3)
        await stream.send_all(b"1\r\nb\r\n")
        await trio.sleep(10)  # then silence

    async with trio.open_nursery() as nursery:
        _, pool = await serve(nursery, slow)
        with pytest.raises(trio.TooSlowError):
            await pool.request(b"POST", b"/", HEADERS, b"{}", 5)
        response = await pool.request(b"POST", b"/", HEADERS, b"{}", 5)
        assert await response.receive() == b"a"
        assert await response.receive() == b"b"  # 3 s gap < 5 s: fine, whatever the total
        with pytest.raises(trio.TooSlowError):
            await response.receive()
        await response.aclose()
        await pool.aclose()
        nursery.cancel_scope.cancel()


async def test_gzip_bodies_are_decoded_and_broken_bodies_raise() -> None:
    packed = gzip.compress(b'{"usage":{}}')

    async def script(stream: trio.SocketStream, number: int) -> None:
        await read_request(stream, bytearray())
        if number == 1:
            await stream.send_all(answer(packed, b"content-encoding: gzip\r\n"))
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        _, pool = await serve(nursery, script)
        response = await pool.request(b"POST", b"/", HEADERS, b"{}", 5)
        assert await response.read() == b'{"usage":{}}'
        await response.aclose()
        broken = await pool.request(b"POST", b"/", HEADERS, b"{}", 5)
        assert await broken.receive() == b"partial"
        with pytest.raises(Exception) as info:
            await broken.receive()
        assert not isinstance(info.value, trio.TooSlowError)
        await broken.aclose()
        await pool.aclose()
        nursery.cancel_scope.cancel()


async def test_unsupported_encodings_and_refused_connections_are_errors() -> None:
    async def brotli(stream: trio.SocketStream, _: int) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(answer(b"x", b"content-encoding: br\r\n"))

    async with trio.open_nursery() as nursery:
        _, pool = await serve(nursery, brotli)
        with pytest.raises(HTTPError, match="unsupported content-encoding br"):
            await pool.request(b"POST", b"/", HEADERS, b"{}", 5)
        nursery.cancel_scope.cancel()
    with pytest.raises(OSError):
        await ConnectionPool(Origin("http", "127.0.0.1", 9), None).request(
            b"POST", b"/", HEADERS, b"{}", 5
        )


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make a certificate"
)
async def test_https_upstreams(tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    server = Server(keep_answering)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_ssl_over_tcp, server.handle, 0, server_context)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        pool = ConnectionPool(Origin("https", "localhost", port), client_context)
        for _ in range(2):
            response = await pool.request(
                b"POST", b"/", [(b"host", b"localhost"), (b"content-length", b"2")], b"{}", 5
            )
            assert await response.read() == b'{"ok":true}'
        assert server.connections == 1
        untrusted = ConnectionPool(Origin("https", "localhost", port), None)
        with pytest.raises(trio.BrokenResourceError):
            await untrusted.request(b"POST", b"/", HEADERS, b"{}", 5)
        await pool.aclose()
        nursery.cancel_scope.cancel()
