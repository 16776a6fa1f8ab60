"""LeanTransport against scripted servers on 127.0.0.1: framing, reuse, retries, limits, time,
error words, TLS, and chunked bodies."""

from __future__ import annotations

import random
import socket
import ssl
import struct
import traceback
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import trustme

from crabtrio.config import ProviderConfig
from crabtrio.upstream import lean, stalls
from crabtrio.upstream.client import translate
from crabtrio.upstream.lean import LeanTransport

from .raw_servers import Peer, RawServer, Script, answer, keep_answering, raw_server

# Every test's real-time waits are bounded by this (the timeouts under test are far shorter).
LIMIT = 10.0
FORGED = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged"
SECRET = b"sk-secret-123"


@asynccontextmanager
async def lean_client(
    server: RawServer,
    *,
    max_connections: int = 10,
    ssl_context: ssl.SSLContext | None = None,
    **timeouts: float | None,
) -> AsyncIterator[httpx.AsyncClient]:
    transport = LeanTransport(ssl_context=ssl_context, max_connections=max_connections)
    async with httpx.AsyncClient(
        transport=transport,
        base_url=server.url,
        timeout=httpx.Timeout(5.0, **timeouts),
        trust_env=False,  # an HTTP_PROXY in the environment must not replace the transport
    ) as client:
        yield client


@asynccontextmanager
async def serving(
    script: Script, **client_options: Any
) -> AsyncIterator[tuple[RawServer, httpx.AsyncClient]]:
    async with AsyncExitStack() as stack:
        stack.enter_context(trio.fail_after(LIMIT))
        server = await stack.enter_async_context(raw_server(script))
        client = await stack.enter_async_context(lean_client(server, **client_options))
        yield server, client


def reset_on_close(peer: Peer) -> None:
    """Closing the peer's socket will send RST, not FIN."""
    tcp = peer.stream
    if isinstance(tcp, trio.SSLStream):
        tcp = tcp.transport_stream
    assert isinstance(tcp, trio.SocketStream)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- 1. desync: bytes past the end of a response are never the next response -------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("when", ["same-segment", "later-segment"])
async def test_bytes_past_the_end_of_a_response_end_its_connection_and_are_never_a_response(
    framing: str, when: str
) -> None:
    go, sent = trio.Event(), trio.Event()
    ok = answer(b"ok") if framing == "content-length" else CHUNKED_HEAD + chunk(b"ok") + LAST_CHUNK

    async def overlong(peer: Peer) -> None:
        if peer.number == 1:
            await peer.read_request()
            if when == "same-segment":  # a forged answer glued to an honest one
                await peer.send(ok + FORGED)
            else:
                await peer.send(ok)
                await go.wait()  # the client has read the whole response
                await peer.send(FORGED)
            sent.set()
            while await peer.read_request():
                await peer.send(FORGED)
        await keep_answering(peer)

    async with serving(overlong) as (server, client):
        assert (await client.get("/first")).content == b"ok"
        go.set()
        await sent.wait()  # on loopback the bytes are in the client's socket once sent
        assert (await client.get("/second")).content == b"ok"
    assert server.connections == 2
    assert server.peers[1].requests == [b"GET /second"]


# --- 2. a request whose body was sent is never sent again ----------------------------------


async def test_a_post_read_then_left_unanswered_is_never_sent_twice() -> None:
    async def hang_up_on_posts(peer: Peer) -> None:
        while await peer.read_request():
            if peer.requests[-1].startswith(b"POST"):
                return  # read in full, then closed without a word
            await peer.send(answer(b"warm"))

    def posts(server: RawServer) -> int:
        return sum(request.startswith(b"POST") for request in server.requests)

    async with serving(hang_up_on_posts) as (server, client):
        async with trio.open_nursery() as nursery:  # two pooled connections, both idle
            for _ in range(2):
                nursery.start_soon(client.get, "/warm")
        assert server.connections == 2
        for call in (1, 2):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/v1/chat/completions", content=b'{"n": %d}' % call)
            assert posts(server) == call
    assert server.connections == 2  # both POSTs went on the pooled connections, no retry


# --- 3. a stale pooled connection costs nothing but a new connection ----------------------


async def test_a_pooled_connection_closed_while_idle_is_replaced_without_a_resend() -> None:
    closed = trio.Event()

    async def answer_once_then_close(peer: Peer) -> None:
        if peer.number == 1:
            await peer.read_request()
            await peer.send(answer(b"ok"))
            await peer.stream.aclose()
            closed.set()
            return
        await keep_answering(peer)

    async with serving(answer_once_then_close) as (server, client):
        assert (await client.post("/a", content=b"{}")).content == b"ok"
        await closed.wait()
        assert (await client.post("/b", content=b"{}")).content == b"ok"
    assert [peer.requests for peer in server.peers] == [[b"POST /a"], [b"POST /b"]]


async def test_a_write_failing_on_a_reused_connection_is_retried_once_on_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reset = trio.Event()

    async def answer_once_then_reset(peer: Peer) -> None:
        if peer.number == 1:
            await peer.read_request()
            await peer.send(answer(b"ok"))
            reset_on_close(peer)
            await peer.stream.aclose()
            reset.set()
            return
        await keep_answering(peer)

    async with serving(answer_once_then_reset) as (server, client):
        assert (await client.post("/a", content=b"{}")).content == b"ok"
        await reset.wait()
        # The RST arrives just after the idle check: the window the retry exists for.
        monkeypatch.setattr(lean._Connection, "reusable", lambda self, now: True)
        assert (await client.post("/b", content=b"{}")).content == b"ok"
    assert [peer.requests for peer in server.peers] == [[b"POST /a"], [b"POST /b"]]


async def test_a_write_failing_on_a_new_connection_is_not_retried() -> None:
    async def reset_at_once(peer: Peer) -> None:
        reset_on_close(peer)

    async with serving(reset_at_once) as (server, client):
        with pytest.raises(httpx.WriteError):
            # More than the socket buffers hold: the write is still going when the RST comes.
            await client.post("/", content=b"x" * (32 * 1024 * 1024))
    assert server.connections == 1


# --- 4. at most max_connections per origin; the rest wait, within the pool timeout ---------


async def test_150_requests_share_10_connections_and_all_succeed() -> None:
    async def slow_answers(peer: Peer) -> None:
        while await peer.read_request():
            await trio.sleep(0.002)
            await peer.send(answer(b"ok"))

    statuses: list[int | str] = []

    async def one(client: httpx.AsyncClient, number: int) -> None:
        try:
            statuses.append((await client.get(f"/{number}")).status_code)
        except httpx.HTTPError as exc:
            statuses.append(type(exc).__name__)

    async with (
        serving(slow_answers, max_connections=10, pool=3.0) as (server, client),
        trio.open_nursery() as nursery,
    ):
        for number in range(150):
            nursery.start_soon(one, client, number)
    assert Counter(statuses) == {200: 150}
    assert len(server.requests) == 150
    assert server.most_open <= 10
    assert server.connections <= 10


async def test_requests_beyond_the_cap_get_a_pool_timeout() -> None:
    release = trio.Event()

    async def hold_until_released(peer: Peer) -> None:
        while await peer.read_request():
            await release.wait()
            await peer.send(answer(b"ok"))

    outcomes: list[int | type[Exception]] = []
    timed_out = trio.Event()

    async def one(client: httpx.AsyncClient) -> None:
        try:
            outcomes.append((await client.get("/")).status_code)
        except httpx.PoolTimeout:
            outcomes.append(httpx.PoolTimeout)
            if outcomes.count(httpx.PoolTimeout) == 3:
                timed_out.set()

    async with (
        serving(hold_until_released, max_connections=2, pool=0.2) as (server, client),
        trio.open_nursery() as nursery,
    ):
        for _ in range(5):
            nursery.start_soon(one, client)
        await timed_out.wait()  # while the two admitted requests are still held
        release.set()
    assert sorted(outcomes, key=str) == [200, 200, *[httpx.PoolTimeout] * 3]
    assert server.connections == 2 and server.most_open == 2


# --- 5. reuse only after an exchange that ended exactly -----------------------------------


def always(response: bytes) -> Script:
    """A server that answers every request with `response`, never closing on its own."""

    async def script(peer: Peer) -> None:
        while await peer.read_request():
            await peer.send(response)

    return script


CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    ("response", "read", "connections"),
    [
        pytest.param(answer(b"ok"), "all", 1, id="keep-alive"),
        pytest.param(CHUNKED, "all", 1, id="chunked-keep-alive"),
        pytest.param(answer(b"ok", b"connection: close"), "all", 3, id="connection-close"),
        pytest.param(answer(b"ok", version=b"HTTP/1.0"), "all", 3, id="http-1.0"),
        pytest.param(answer(b"ok"), "nothing", 3, id="body-not-read"),
    ],
)
async def test_a_connection_is_reused_only_after_an_exchange_that_ended_exactly(
    response: bytes, read: str, connections: int
) -> None:
    async with serving(always(response)) as (server, client):
        for _ in range(3):
            async with client.stream("GET", "/") as streamed:
                assert streamed.status_code == 200
                if read == "all":
                    await streamed.aread()
                    assert streamed.content == b"ok"
    assert server.connections == connections
    assert len(server.requests) == 3


async def test_a_body_closed_before_its_end_loses_its_connection() -> None:
    # Through the transport itself: httpx's own body iterators are async generators, which
    # an early `break` leaves to the garbage collector (a ResourceWarning under trio).
    async with serving(always(answer(b"x" * 300_000))) as (server, _):
        transport = LeanTransport(ssl_context=None, max_connections=1)
        for _ in range(3):
            request = httpx.Request("GET", server.url, extensions={"timeout": {"read": 5.0}})
            response = await transport.handle_async_request(request)
            assert isinstance(response.stream, httpx.AsyncByteStream)
            chunks = aiter(response.stream)
            async with aclosing(chunks):  # type: ignore[type-var]
                assert set(await anext(chunks)) == {ord("x")}
            await response.aclose()
        # max_connections=1: a leaked slot would have made the second request wait forever
        assert transport.open_connections() == 0
        await transport.aclose()
    assert server.connections == 3


# --- 6. timeouts ---------------------------------------------------------------------------


async def test_a_head_that_never_comes_is_a_read_timeout() -> None:
    async def silent(peer: Peer) -> None:
        await peer.read_request()
        await trio.sleep_forever()

    async with serving(silent, read=0.2) as (_, client):
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/")


async def test_a_body_the_server_never_reads_is_a_write_timeout_and_loses_its_connection() -> None:
    async def never_reads(peer: Peer) -> None:
        await trio.sleep_forever()

    async with serving(never_reads, write=0.3, read=5.0) as (server, client):
        transport = client._transport
        assert isinstance(transport, LeanTransport)
        with pytest.raises(httpx.WriteTimeout):
            # More than the socket buffers hold, so the write blocks.
            await client.post("/", content=b"x" * (32 * 1024 * 1024))
        assert transport.open_connections() == 0
    assert server.connections == 1


async def test_the_read_timeout_bounds_each_gap_in_the_body_not_the_whole() -> None:
    async def trickle_then_stall(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        for _ in range(6):  # 0.6 s in all, longer than the read timeout
            await trio.sleep(0.1)
            await peer.send(b"a")
        await trio.sleep_forever()

    received = b""
    async with (
        serving(trickle_then_stall, read=0.5) as (_, client),
        client.stream("GET", "/") as response,
    ):
        with pytest.raises(httpx.ReadTimeout):
            async for chunk in response.aiter_raw():
                received += chunk
    assert received == b"a" * 6


async def test_a_connect_that_never_completes_is_a_connect_timeout() -> None:
    # A listener whose accept queue is full: Linux drops further SYNs, so a connect hangs.
    listener = trio.socket.socket()
    fillers: list[trio.socket.SocketType] = []
    with listener, trio.fail_after(LIMIT):
        await listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(8):
            filler = trio.socket.socket()
            with trio.move_on_after(0.2) as stalled:
                await filler.connect(address)
            if stalled.cancelled_caught:
                break
            fillers.append(filler)
        else:
            pytest.skip("cannot fill a loopback accept queue here")
        try:
            transport = LeanTransport(ssl_context=None, max_connections=1)
            async with httpx.AsyncClient(
                transport=transport, timeout=httpx.Timeout(5.0, connect=0.3), trust_env=False
            ) as client:
                with pytest.raises(httpx.ConnectTimeout):
                    await client.get(f"http://127.0.0.1:{address[1]}/")
        finally:
            for filler in fillers:
                filler.close()


async def test_a_refused_connection_is_a_connect_error() -> None:
    unused = trio.socket.socket()
    await unused.bind(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()  # bound, never listening: the port refuses
    transport = LeanTransport(ssl_context=None, max_connections=1)
    with trio.fail_after(LIMIT):
        async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/")


# --- 7. errors in our words, never the upstream's bytes -----------------------------------


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 2x0 " + SECRET + b"\r\ncontent-length: 0\r\n\r\n", id="status"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nx-leak " + SECRET + b"\r\ncontent-length: 0\r\n\r\n",
            id="header-line",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nx-leak: " + SECRET + b"\x00\r\ncontent-length: 0\r\n\r\n",
            id="header-value",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + SECRET + b"\r\n",
            id="chunk-size",
        ),
    ],
)
async def test_protocol_errors_never_quote_the_upstream(response: bytes) -> None:
    async with serving(always(response)) as (_, client):
        with pytest.raises(httpx.RemoteProtocolError) as info:
            await client.post("/", content=b"{}")
    error = info.value
    told = " ".join([str(error), repr(error), *traceback.format_exception(error)])
    assert "sk-secret" not in told
    assert "x-leak" not in told and "2x0" not in told


# --- 8. TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_https_with_a_trusted_ca_reuses_its_connection(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    with trio.fail_after(LIMIT):
        async with (
            raw_server(keep_answering, tls=server_tls) as server,
            lean_client(server, ssl_context=client_tls) as client,
        ):
            for _ in range(3):
                assert (await client.post("/", content=b"{}")).content == b"ok"
    assert server.connections == 1
    assert len(server.requests) == 3


async def test_https_with_an_untrusted_certificate_is_a_connect_error_saying_so(
    server_tls: ssl.SSLContext,
) -> None:
    with trio.fail_after(LIMIT):
        async with (
            raw_server(keep_answering, tls=server_tls) as server,
            lean_client(server, ssl_context=ssl.create_default_context()) as client,
        ):
            with pytest.raises(httpx.ConnectError) as info:
                await client.post("/", content=b"{}")
    causes = []
    cause = info.value.__cause__
    while cause is not None:  # trio wraps it: BrokenResourceError from SSLCertVerificationError
        causes.append(cause)
        cause = cause.__cause__
    assert any(isinstance(cause, ssl.SSLCertVerificationError) for cause in causes)
    assert server.requests == []
    provider = ProviderConfig(
        name="tls", kind="openai", base_url=server.url, api_key=None, models=("m",)
    )
    assert "certificate is not trusted" in str(translate(info.value, provider))


async def test_https_bytes_past_the_response_in_a_later_tls_record_are_not_the_next_response(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    async def overlong(peer: Peer) -> None:
        if peer.number == 1:
            await peer.read_request()
            assert isinstance(peer.stream, trio.SSLStream)
            tcp = peer.stream.transport_stream
            assert isinstance(tcp, trio.SocketStream)
            # Two TLS records in one TCP segment: the client reads both in one go, the TLS
            # layer decrypts the first and keeps the second, so the socket looks quiet.
            cork = getattr(socket, "TCP_CORK", None)
            if cork is not None:
                tcp.setsockopt(socket.IPPROTO_TCP, cork, 1)
            await peer.send(answer(b"ok"))
            await peer.send(FORGED)
            if cork is not None:
                tcp.setsockopt(socket.IPPROTO_TCP, cork, 0)
            while await peer.read_request():
                await peer.send(FORGED)
        await keep_answering(peer)

    with trio.fail_after(LIMIT):
        async with (
            raw_server(overlong, tls=server_tls) as server,
            lean_client(server, ssl_context=client_tls) as client,
        ):
            first = await client.get("/first")
            second = await client.get("/second")
    assert (first.content, second.content) == (b"ok", b"ok")
    assert server.connections == 2


# --- 9. chunked bodies: a part per read, reuse only after an exact end; stalls -------------

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
EVENTS = [b'data: {"n": %d}\n\n' % n for n in range(20)]
READ = 0.2  # the read timeout of the stall tests
TICK = READ / 10  # how late Stalls may notice a stall (stalls.py)
# Real time: scheduling delays on a busy machine come on top (a tick of 1 s, the watcher's
# default, or a per-read deadline of 5x the timeout would still be caught).
SLACK = 0.25


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("with_head", [True, False], ids=["with-head", "after-head"])
async def test_chunks_that_arrive_in_one_segment_come_out_as_one_part(with_head: bool) -> None:
    head_seen, part_seen = trio.Event(), trio.Event()

    async def events_at_once(peer: Peer) -> None:
        await peer.read_request()
        if with_head:  # the whole answer, head included, in one send
            await peer.send(CHUNKED_HEAD + b"".join(map(chunk, EVENTS)) + LAST_CHUNK)
        else:  # the head, then (once the client has it) every event in one send
            await peer.send(CHUNKED_HEAD)
            await head_seen.wait()
            await peer.send(b"".join(map(chunk, EVENTS)))
            await part_seen.wait()
            await peer.send(LAST_CHUNK)
        await keep_answering(peer)

    parts: list[bytes] = []
    async with serving(events_at_once) as (_, client), client.stream("GET", "/") as response:
        head_seen.set()
        async for part in response.aiter_raw():
            parts.append(part)
            part_seen.set()
    assert parts == [b"".join(EVENTS)]  # not one part per chunk


def random_chunked(seed: int) -> tuple[bytes, bytes]:
    """A chunked body with extensions and trailers, and the body it encodes."""
    rng = random.Random(seed)
    wire, body = b"", b""
    for _ in range(8):
        data = rng.randbytes(rng.randint(1, 30))
        extension = rng.choice([b"", b";x=1", b";name"])
        wire += b"%X%s\r\n%s\r\n" % (len(data), extension, data)
        body += data
    return wire + b"0;end\r\nx-checksum: 1\r\n\r\n", body


async def test_a_chunked_body_in_many_tiny_segments_is_reassembled_exactly() -> None:
    wire, body = random_chunked(seed=1)

    async def trickle(peer: Peer) -> None:
        while await peer.read_request():
            await peer.send(CHUNKED_HEAD)
            for at in range(0, len(wire), 3):
                await peer.send(wire[at : at + 3])
                # once the client has read this piece: each piece is a read of its own
                await trio.testing.wait_all_tasks_blocked()

    parts: list[bytes] = []
    async with serving(trickle) as (server, client):
        async with client.stream("GET", "/") as response:
            async for part in response.aiter_raw():
                parts.append(part)
        assert (await client.get("/again")).content == body
    assert b"".join(parts) == body
    assert len(parts) > len(wire) // 6  # it did come in pieces
    assert server.connections == 1  # and ended exactly, twice


async def test_a_connection_is_reused_after_a_chunked_body_that_ended_exactly() -> None:
    response = CHUNKED_HEAD + chunk(b"o") + chunk(b"k") + LAST_CHUNK
    async with serving(always(response)) as (server, client):
        assert (await client.get("/a")).content == b"ok"
        assert (await client.get("/b")).content == b"ok"
    assert server.peers[0].requests == [b"GET /a", b"GET /b"]


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nconnection: close\r\n", id="connection-close"),
        pytest.param(b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\n", id="close-listed"),
        pytest.param(b"HTTP/1.0 200 OK\r\n", id="http-1.0"),
    ],
)
async def test_a_chunked_body_the_server_will_close_after_is_read_and_not_reused(
    head: bytes,
) -> None:
    # The server keeps answering on the same connection: only the client's choice is seen.
    response = head + b"transfer-encoding: chunked\r\n\r\n" + chunk(b"ok") + LAST_CHUNK
    async with serving(always(response)) as (server, client):
        for _ in range(3):
            assert (await client.get("/")).content == b"ok"
    assert server.connections == 3


@pytest.mark.parametrize(
    ("method", "status"),
    [("HEAD", b"200 OK"), ("GET", b"204 No Content"), ("GET", b"304 Not Modified")],
)
async def test_an_answer_that_has_no_body_is_not_read_as_chunked(
    method: str, status: bytes
) -> None:
    async def bodiless_then_ok(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 %s\r\ntransfer-encoding: chunked\r\n\r\n" % status)
        await keep_answering(peer)

    async with serving(bodiless_then_ok, read=1.0) as (server, client):
        first = await client.request(method, "/")
        assert first.content == b""
        assert (await client.get("/next")).content == b"ok"
    assert server.connections == 1


async def test_an_empty_body_with_a_content_length_of_0_ends_at_once() -> None:
    async with serving(always(answer(b"")), read=0.5) as (server, client):
        for _ in range(2):
            assert (await client.get("/")).content == b""
    assert server.connections == 1


MALFORMED_BODIES = {
    "data-without-crlf": chunk(b"ok") + b"5\r\nhello" + SECRET + b"\r\n",
    "bad-size": chunk(b"ok") + SECRET + b"\r\n",
    "size-too-long": chunk(b"ok") + b"0" * 21 + b"5\r\n",
    "size-line-too-long": b"5;" + SECRET * 400 + b"\r\n",
    "trailers-too-long": chunk(b"ok") + b"0\r\nx-leak: " + SECRET * 6000,
}


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
async def test_malformed_chunk_framing_is_a_protocol_error_that_quotes_nothing(
    body: bytes,
) -> None:
    async def malformed_once(peer: Peer) -> None:
        if peer.number == 1:
            await peer.read_request()
            await peer.send(CHUNKED_HEAD)
            await peer.send(body)
            while await peer.read_request():
                await peer.send(FORGED)
        await keep_answering(peer)

    async with serving(malformed_once) as (server, client):
        transport = client._transport
        assert isinstance(transport, LeanTransport)
        with pytest.raises(httpx.RemoteProtocolError) as info:
            await client.get("/")
        assert transport.open_connections() == 0
        assert (await client.get("/next")).content == b"ok"
    error = info.value
    told = " ".join([str(error), repr(error), *traceback.format_exception(error)])
    assert "sk-secret" not in told and "hello" not in told
    assert server.connections == 2


async def test_a_chunked_body_cut_short_by_a_close_is_a_protocol_error() -> None:
    async def close_mid_body(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(CHUNKED_HEAD + chunk(b"ok") + b"5\r\nhel")

    async with serving(close_mid_body) as (_, client):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/")


@asynccontextmanager
async def unentered_client(
    server: RawServer, **timeouts: float
) -> AsyncIterator[httpx.AsyncClient]:
    """A client (and transport) used without `async with`: no watcher, a deadline per read."""
    client = httpx.AsyncClient(
        transport=LeanTransport(ssl_context=None, max_connections=10),
        base_url=server.url,
        timeout=httpx.Timeout(5.0, **timeouts),
        trust_env=False,
    )
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize("entered", [True, False], ids=["stalls", "deadline-per-read"])
async def test_a_stall_mid_chunk_is_a_read_timeout_within_a_tick_of_the_read_timeout(
    entered: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits_watched = 0
    watched_wait = stalls.Stalls.wait_readable

    async def counted(self: stalls.Stalls, sock: socket.socket, timeout: float) -> None:
        nonlocal waits_watched
        waits_watched += self._watching  # (unwatched, Stalls gives the wait a deadline)
        await watched_wait(self, sock, timeout)

    monkeypatch.setattr(stalls.Stalls, "wait_readable", counted)

    async def stall_mid_chunk(peer: Peer) -> None:
        if peer.number == 1:
            await peer.read_request()
            await peer.send(CHUNKED_HEAD + chunk(b"first") + b"5\r\nsec")
            await peer.read_request()  # nothing more, until the client gives up
            return
        await keep_answering(peer)

    got = 0.0
    parts: list[bytes] = []
    async with AsyncExitStack() as stack:
        stack.enter_context(trio.fail_after(LIMIT))
        server = await stack.enter_async_context(raw_server(stall_mid_chunk))
        opening = lean_client if entered else unentered_client
        client = await stack.enter_async_context(opening(server, read=READ))
        async with client.stream("GET", "/") as response:
            with pytest.raises(httpx.ReadTimeout):
                async for part in response.aiter_raw():
                    parts.append(part)
                    got = trio.current_time()
        waited = trio.current_time() - got
        transport = client._transport
        assert isinstance(transport, LeanTransport)
        assert transport.open_connections() == 0  # the timed-out connection was dropped
        assert (await client.get("/next")).content == b"ok"
    assert parts == [b"firstsec"]
    assert READ <= waited <= READ + TICK + SLACK
    assert (waits_watched > 0) == entered  # the path under test was the one taken


async def test_trailers_after_the_last_chunk_are_accepted_and_the_connection_reused() -> None:
    trailers = b"x-checksum: abc\r\nx-usage: {}\r\n\r\n"
    response = CHUNKED_HEAD + chunk(b"ok") + b"0\r\n" + trailers
    async with serving(always(response)) as (server, client):
        for _ in range(3):
            assert (await client.get("/")).content == b"ok"
    assert server.connections == 1


async def test_a_body_still_read_after_its_client_closed_is_bounded_by_the_read_timeout() -> None:
    async def stall(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(CHUNKED_HEAD + chunk(b"first"))
        await peer.read_request()  # nothing more, until the client gives up

    with trio.fail_after(LIMIT):
        async with raw_server(stall) as server:
            async with lean_client(server, read=READ) as client:
                response = await client.send(client.build_request("GET", "/"), stream=True)
            with trio.move_on_after(READ + TICK + SLACK) as unbounded:
                with pytest.raises(httpx.ReadTimeout):
                    await response.aread()
            await response.aclose()
    assert not unbounded.cancelled_caught
