"""Streamed responses on their way to the client: the direct body path (crabtrio/body_writer.py)
and its fallback through hypercorn, `stream.relay`, and the upstream reads relayed as parts
(crabtrio/upstream/lean.py), against a real `hypercorn --worker-class trio` gateway, the mock
upstream process (bench/mock_upstream.py) and a scripted upstream (tests/e2e/scripted_upstream.py)
that writes exactly what a test says, when it says.

The gateway runs `tests.e2e.direct_probe:app`: `crabtrio:app` unchanged, plus counters that say
which path each part took, so a test can tell the direct path from the fallback. Responses are
read off raw sockets and their chunked framing parsed strictly here (`RawClient`).
"""

from __future__ import annotations

import itertools
import json
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import trio
import trustme

from .faults import worker_pids
from .processes import HYPERCORN, ROOT, MockUpstream, Process, wait_until
from .scripted_upstream import LAST_CHUNK, Script, ScriptedUpstream, frame
from .sockets import Connection, request, socket_fds, wait_for
from .test_protocol_e2e import H2Client

pytestmark = pytest.mark.e2e

KEY = "sk-team-e2e"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
DONE = b"data: [DONE]\n\n"
EVENT_WITHIN = 3.0  # seconds for one relayed event to reach the client (loopback: ~1 ms)
MB = 1024 * 1024


# --- the stack: a probed gateway, the mock upstream, the scripted upstream --------------------


class ProbedGateway(Process):
    """`hypercorn tests.e2e.direct_probe:app --worker-class trio`, one worker (the counters are
    per worker)."""

    def __init__(self, tmp: Path, config: str, *, extra_args: tuple[str, ...] = ()) -> None:
        (tmp / "crabtrio-test.toml").write_text(config)
        env = {"CRABTRIO_CONFIG": str(tmp / "crabtrio-test.toml"), "PYTHONPATH": str(ROOT)}
        args = [HYPERCORN, "tests.e2e.direct_probe:app", "--worker-class", "trio"]
        args += ["--bind", "127.0.0.1:0", "--workers", "1", "--graceful-timeout", "3"]
        super().__init__([*args, *extra_args], cwd=tmp, env=env)
        self.url = self.wait_for_line(r"Running on (https?://[\d.:]+)").group(1)
        port = urlsplit(self.url).port
        assert port is not None
        self.port = port
        wait_until(lambda: worker_pids(self.proc.pid), 5, "hypercorn's worker process")
        (self.worker,) = worker_pids(self.proc.pid)

    def sockets(self) -> int:
        """Sockets the worker holds open: clients', upstreams', listeners'."""
        return socket_fds(self.worker)


def config(mock: str, scripted: str, audit: Path) -> str:
    return f"""
[providers.mock]
kind = "openai"
base_url = "{mock}/v1"
api_key = "sk-upstream-e2e"
models = ["gpt-e2e"]
max_retries = 0
timeout = 5
[providers.scripted]
kind = "openai"
base_url = "{scripted}/v1"
api_key = "sk-upstream-e2e"
models = ["scripted"]
max_retries = 0
timeout = 10
[providers.scripted-claude]
kind = "anthropic"
base_url = "{scripted}/v1"
api_key = "sk-ant-upstream-e2e"
models = ["scripted-claude"]
max_retries = 0
timeout = 10
[[keys]]
name = "team-e2e"
key = "{KEY}"
[audit]
path = "{audit}"
"""


@dataclass
class Stack:
    gateway: ProbedGateway
    mock: MockUpstream
    scripted: ScriptedUpstream
    audit: Path

    @property
    def port(self) -> int:
        return self.gateway.port

    def probe(self) -> dict[str, int]:
        """The worker's direct-path counters (see tests/e2e/direct_probe.py)."""
        url = f"{self.gateway.url}/_probe/direct"
        counts: dict[str, int] = httpx.get(url, headers={"connection": "close"}).json()
        return counts

    def records(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        lines = self.audit.read_bytes().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    async def record(self, request_id: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def written() -> bool:
            found[:] = [r for r in self.records() if r["request_id"] == request_id]
            return bool(found)

        await wait_for(written, 5, f"the record of {request_id}")
        (record,) = found
        return record

    def replay(self, path: str, marker: str) -> bytes:
        """The mock upstream's body for the request the gateway sent it with `marker` in it,
        asked again directly: what the gateway was sent (the mock is deterministic)."""
        (sent,) = [r for r in self.mock.requests() if marker in r["body"]]
        answer = httpx.post(
            f"{self.mock.url}{path}",
            content=sent["body"].encode(),
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert answer.status_code == 200
        return answer.content


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("relay")
    audit = tmp / "audit.jsonl"
    mock = MockUpstream(tmp)
    scripted = ScriptedUpstream()
    gateway = None
    try:
        gateway = ProbedGateway(tmp, config(mock.url, scripted.url, audit))
        yield Stack(gateway, mock, scripted, audit)
    finally:
        if gateway is not None:
            gateway.stop()
        mock.stop()
        scripted.close()


def grew(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after}


# --- a raw HTTP/1.x client that parses chunked framing strictly ------------------------------

# What h11 and DirectBody write: lowercase hex, no extensions, no trailers.
SIZE_LINE = re.compile(rb"[0-9a-f]{1,16}")


@dataclass
class Head:
    version: bytes
    status: int
    headers: dict[str, str]  # lowercased names; a repeated name is a test failure


@dataclass
class RawClient(Connection):
    """A raw connection that reads framing itself (a bytearray: events are taken off its
    front)."""

    buffer: bytearray = field(default_factory=bytearray)  # type: ignore[assignment]

    @property
    def local_port(self) -> int:
        port: int = self.stream.socket.getsockname()[1]
        return port

    async def send(self, raw: bytes) -> None:
        await self.stream.send_all(raw)

    async def _take(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if self.eof:
                raise AssertionError(f"EOF {count - len(self.buffer)} bytes short")
            await self._fill()
        taken = bytes(self.buffer[:count])
        del self.buffer[:count]
        return taken

    async def _take_line(self, end: bytes, limit: int = 65536) -> bytes:
        while (at := self.buffer.find(end)) < 0:
            assert len(self.buffer) < limit, f"no {end!r} in {bytes(self.buffer[:200])!r}"
            if self.eof:
                raise AssertionError(f"EOF before {end!r}; got {bytes(self.buffer[:200])!r}")
            await self._fill()
        line = bytes(self.buffer[:at])
        del self.buffer[: at + len(end)]
        return line

    async def head(self) -> Head:
        lines = (await self._take_line(b"\r\n\r\n")).split(b"\r\n")
        version, status, _ = lines[0].split(b" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            assert name.lower() not in headers, f"{name} twice"
            headers[name.lower()] = value.strip()
        return Head(version, int(status), headers)

    async def chunk(self) -> bytes:
        """The next chunk's data; b"" for the last chunk, which must end the body (no
        trailers). Any other framing than exactly what h11 writes fails the test."""
        line = await self._take_line(b"\r\n", limit=64)
        assert SIZE_LINE.fullmatch(line), f"not a chunk size line: {line!r}"
        size = int(line, 16)
        data = await self._take(size + 2)
        assert data[size:] == b"\r\n", f"chunk of {size} not followed by CRLF: {data[-20:]!r}"
        return data[:size]

    async def chunks(self) -> list[bytes]:
        """Every chunk up to the last one (not included)."""
        found = []
        while chunk := await self.chunk():
            found.append(chunk)
        return found

    async def read(self, count: int) -> bytes:
        return await self._take(count)

    async def until_eof(self) -> bytes:
        while not self.eof:
            await self._fill()
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def tcp_states(local_port: int, remote_port: int) -> list[str]:
    """The states (hex, as in /proc/net/tcp: 01 established, 08 close-wait) of the sockets
    between these two loopback ports whose local end is `local_port`."""
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local = int(fields[1].rsplit(":", 1)[1], 16)
        remote = int(fields[2].rsplit(":", 1)[1], 16)
        if (local, remote) == (local_port, remote_port):
            states.append(fields[3])
    return states


# --- the three streamed APIs, as the scripted upstream speaks them ---------------------------


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _typed(payload: dict[str, Any]) -> bytes:
    return b"event: " + payload["type"].encode() + b"\n" + _data(payload) + b"\n\n"


def chat_events(words: list[str]) -> list[bytes]:
    """OpenAI's chat chunks with `include_usage`: `"usage":null` in each, then the usage-only
    chunk, then [DONE]."""
    base = {"id": "chatcmpl-relay", "object": "chat.completion.chunk", "created": 1}
    base["model"] = "scripted"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _data({**base, "choices": [choice], "usage": None}) + b"\n\n"

    usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
    return [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": w}) for w in words),
        chunk({}, "stop"),
        _data({**base, "choices": [], "usage": usage}) + b"\n\n",
        DONE,
    ]


def responses_events(words: list[str]) -> list[bytes]:
    response = {"id": "resp_relay", "object": "response", "status": "in_progress", "usage": None}
    at = {"item_id": "msg_relay", "output_index": 0, "content_index": 0}
    usage = {"input_tokens": 5, "output_tokens": len(words), "total_tokens": 5 + len(words)}
    done = {**response, "status": "completed", "usage": usage}
    return [
        _typed({"type": "response.created", "response": response, "sequence_number": 0}),
        *(
            _typed({"type": "response.output_text.delta", **at, "delta": w, "sequence_number": n})
            for n, w in enumerate(words, 1)
        ),
        _typed({"type": "response.completed", "response": done, "sequence_number": 99}),
    ]


def messages_events(words: list[str]) -> list[bytes]:
    usage = {"input_tokens": 5, "output_tokens": 1}
    message = {"id": "msg_relay", "type": "message", "role": "assistant", "content": []}
    block = {"type": "content_block_delta", "index": 0}
    end = {"stop_reason": "end_turn", "stop_sequence": None}
    return [
        _typed({"type": "message_start", "message": {**message, "usage": usage}}),
        _typed({"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
        *(_typed({**block, "delta": {"type": "text_delta", "text": w}}) for w in words),
        _typed({"type": "content_block_stop", "index": 0}),
        _typed({"type": "message_delta", "delta": end, "usage": {"output_tokens": len(words)}}),
        _typed({"type": "message_stop"}),
    ]


@dataclass(frozen=True)
class Api:
    path: str
    model: str
    events: Any  # words -> the upstream's events

    def request(self, script: str) -> bytes:
        body: dict[str, Any] = {"model": self.model, "stream": True, "script": script}
        if self.path.endswith("/chat/completions"):
            body["messages"] = [{"role": "user", "content": "hi"}]
            body["stream_options"] = {"include_usage": True}  # nothing held back
        elif self.path.endswith("/responses"):
            body["input"] = "hi"
        else:
            body["messages"] = [{"role": "user", "content": "hi"}]
            body["max_tokens"] = 64
        return request("POST", self.path, headers=AUTH, body=json.dumps(body).encode())


APIS = {
    "chat": Api("/v1/chat/completions", "scripted", chat_events),
    "responses": Api("/v1/responses", "scripted", responses_events),
    "messages": Api("/v1/messages", "scripted-claude", messages_events),
}
WORDS = ["crabs", " walk", " sideways", " on", " warm", " sand"]


def mock_body(path: str, marker: str, mock: dict[str, Any]) -> dict[str, Any]:
    """A streamed request's body for the mock upstream, `marker` in its text (see
    `Stack.replay`)."""
    body: dict[str, Any] = {"model": "gpt-e2e", "stream": True, "mock": mock}
    if path.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": marker}]
        body["stream_options"] = {"include_usage": True}
    else:
        body["input"] = marker
    return body


def mock_request(
    path: str, marker: str, mock: dict[str, Any], *, version: str = "HTTP/1.1"
) -> bytes:
    body = json.dumps(mock_body(path, marker, mock)).encode()
    return request("POST", path, version=version, headers=AUTH, body=body)


# --- 1. every event is on its way before the upstream writes the next --------------------------


@pytest.mark.parametrize("api", list(APIS))
async def test_each_event_reaches_the_client_before_the_upstream_writes_the_next(
    stack: Stack, api: str
) -> None:
    """The scripted upstream writes event k+1 only once the client has event k: a gateway
    that held an event back (buffering, or waiting for a next read) fails at EVENT_WITHIN."""
    events = APIS[api].events(WORDS)
    name = f"stepped-{api}"
    script = stack.scripted.add(name, Script([frame(e) for e in events] + [LAST_CHUNK], gated=True))
    before = stack.probe()
    with trio.fail_after(30):
        async with await RawClient.open(stack.port) as client:
            await client.send(APIS[api].request(name))
            for index, event in enumerate(events):
                script.allow()  # event `index` is written; the next one is not
                with trio.fail_after(EVENT_WITHIN):
                    if index == 0:
                        head = await client.head()
                        assert head.status == 200, head
                        assert head.headers["transfer-encoding"] == "chunked"
                    received = await client.chunk()
                # One part per upstream read, one chunk per part: exactly this event.
                assert received == event, f"event {index}"
            script.allow()  # the upstream's last chunk: the gateway then ends the body
            with trio.fail_after(EVENT_WITHIN):
                assert await client.chunk() == b""
            assert client.buffer == b""
    assert script.outcome == "complete"
    record = await stack.record(head.headers["x-request-id"])
    assert (record["status"], record["stream"]) == (200, True)
    counts = grew(before, stack.probe())
    assert counts["found"] == 1 and counts["none"] == 0
    assert (counts["written"], counts["declined"]) == (len(events), 0), counts


# --- 2. a slow reader ----------------------------------------------------------------------------


async def test_a_slow_reader_gets_a_multi_megabyte_stream_whole_and_in_order(
    stack: Stack,
) -> None:
    """A client with a small receive buffer reads nothing until the gateway's socket is full
    (a part the socket could not take whole, finished under hypercorn's send lock), then reads
    ~5 MB of 1 KB-delta events: all of them, in order, framed correctly."""
    mock = {"chunks": 4000, "delta_bytes": 1024}
    before = stack.probe()
    with trio.fail_after(40):
        async with await RawClient.open(stack.port, receive_buffer=4096) as client:
            await client.send(mock_request("/v1/chat/completions", "slow-reader", mock))
            await wait_for(
                lambda: stack.probe()["finished"] > before["finished"],
                15,
                "a part the gateway's socket could not take whole",
            )
            # The worker serves others meanwhile: its send waits for the socket, not the loop.
            health = httpx.get(f"{stack.gateway.url}/health", headers={"connection": "close"})
            assert health.status_code == 200
            head = await client.head()
            assert head.status == 200
            body = b"".join(await client.chunks())
            assert client.buffer == b""
    assert len(body) > 4 * MB
    events = body.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert len(events) == 4000 + 5  # role, 4000 deltas, finish, usage, [DONE], and the end
    assert body == stack.replay("/v1/chat/completions", "slow-reader")  # in order, intact
    record = await stack.record(head.headers["x-request-id"])
    assert (record["status"], record["completion_tokens"]) == (200, 4000 * 256)
    counts = grew(before, stack.probe())
    # One part declined: /health's, whose body has a length (only chunks are framed here).
    assert counts["finished"] > 0 and counts["declined"] == 1, counts
    assert (counts["heads"], counts["ends"]) == (2, 2), counts


# --- 3. byte for byte ----------------------------------------------------------------------------


def awkward_wire(events: list[bytes]) -> list[bytes]:
    """The events as chunks of assorted sizes and size-line spellings (uppercase hex, leading
    zeros, an extension), trailers after the last chunk, and the whole cut into writes that
    split size lines, CRLFs and a multi-byte character."""
    body = b"".join(events)
    sizes = itertools.cycle([7, 1, 300, 2, 40000, 13, 5000, 90000])
    spellings = itertools.cycle(["lower", "upper", "zeros", "extension"])
    framed = []
    at = 0
    while at < len(body):
        piece = body[at : at + next(sizes)]
        at += len(piece)
        spelling = next(spellings)
        if spelling == "upper":
            framed.append(frame(piece, size=b"%X" % len(piece)))
        elif spelling == "zeros":
            framed.append(frame(piece, size=b"00%x" % len(piece)))
        elif spelling == "extension":
            framed.append(frame(piece, extension=b";relay=yes"))
        else:
            framed.append(frame(piece))
    wire = b"".join(framed) + b"0\r\nx-relay-trailer: 1\r\n\r\n"
    crab = wire.index("🦀".encode())
    cuts = {crab + 1, crab + 2, wire.index(b"\r\n") + 1}
    at = 0
    for size in itertools.cycle([1, 2, 3, 5, 11, 64, 1000, 65536]):
        at += size
        if at >= len(wire):
            break
        cuts.add(at)
    points = [0, *sorted(cuts), len(wire)]
    return [wire[start:end] for start, end in itertools.pairwise(points)]


@pytest.mark.parametrize("framing", ["keep-alive", "close"])
@pytest.mark.parametrize("api", list(APIS))
async def test_the_client_gets_exactly_the_bytes_the_upstream_sent(
    stack: Stack, api: str, framing: str
) -> None:
    """Multi-byte characters, a 300 KB event, an SSE comment, events split over many chunks
    and reads and several in one: the body the client gets is the upstream's, byte for byte.
    `close`: the upstream says `connection: close` (a body read to its end, then closed)."""
    words = ["🦀 crabs", " über", " " + "sand " * 60_000, *WORDS]
    events = APIS[api].events(words)
    events.insert(1, b": a comment, kept\n\n")
    name = f"awkward-{api}-{framing}"
    writes = awkward_wire(events)
    stack.scripted.add(name, Script(writes, close=framing == "close", pause=0.002))
    before = stack.probe()
    with trio.fail_after(20):
        async with await RawClient.open(stack.port) as client:
            await client.send(APIS[api].request(name))
            head = await client.head()
            assert head.status == 200, head
            chunks = await client.chunks()
            assert client.buffer == b""
    body = b"".join(chunks)
    assert body.split(b"\n\n") == [e.removesuffix(b"\n\n") for e in events] + [b""]
    assert body == b"".join(events)
    record = await stack.record(head.headers["x-request-id"])
    assert record["status"] == 200
    counts = grew(before, stack.probe())
    assert counts["declined"] == 0 and counts["written"] == len(chunks), counts
    assert len(writes) > 40  # the cuts above did happen


# --- 4. a client that leaves -------------------------------------------------------------------


async def test_a_client_that_leaves_mid_stream_is_recorded_499_and_nothing_stays_open(
    stack: Stack,
) -> None:
    events = chat_events(["tick"] * 20)
    name = "left-mid-stream"
    script = stack.scripted.add(name, Script([frame(e) for e in events] + [LAST_CHUNK], gated=True))
    sockets = stack.gateway.sockets()
    with trio.fail_after(30):
        client = await RawClient.open(stack.port)
        try:
            await client.send(APIS["chat"].request(name))
            script.allow()
            with trio.fail_after(EVENT_WITHIN):
                head = await client.head()
                assert await client.chunk() == events[0]
            client_port = client.local_port
        finally:
            await client.aclose()  # after the first of 20 events
        # The gateway lets go of the upstream connection it no longer needs...
        assert await trio.to_thread.run_sync(script.wait_ended, 5)
        assert script.outcome == "gateway_closed"
        # ...and closes its side of the client's connection (no CLOSE_WAIT left behind).
        await wait_for(
            lambda: not set(tcp_states(stack.port, client_port)) & {"01", "08"},
            3,  # (within hypercorn's 5 s keep-alive timeout: closed, not timed out)
            "the gateway's side of the connection closed",
        )
        await wait_for(lambda: stack.gateway.sockets() <= sockets, 3, "no socket left open")
        record = await stack.record(head.headers["x-request-id"])
        assert (record["status"], record["stream"]) == (499, True)

        # Still healthy: the next stream goes through.
        async with await RawClient.open(stack.port) as client:
            await client.send(mock_request("/v1/chat/completions", "after-a-leaver", {"chunks": 5}))
            assert (await client.head()).status == 200
            assert b"".join(await client.chunks()).endswith(DONE)


async def test_a_slow_reader_that_leaves_while_a_part_waits_for_it_is_recorded_499(
    stack: Stack,
) -> None:
    """The client goes away while the gateway waits, under hypercorn's send lock, for it to
    take the rest of a part: that send ends, the stream is recorded 499 and the connection
    closed, and the worker goes on serving."""
    mock = {"chunks": 4000, "delta_bytes": 1024}
    sockets = stack.gateway.sockets()
    before = stack.probe()
    with trio.fail_after(30):
        client = await RawClient.open(stack.port, receive_buffer=4096)
        try:
            await client.send(mock_request("/v1/chat/completions", "slow-leaver", mock))
            await wait_for(
                lambda: stack.probe()["finished"] > before["finished"],
                15,
                "a part the gateway's socket could not take whole",
            )
            head = await client.head()
            client_port = client.local_port
        finally:
            await client.aclose()  # unread bytes in its buffer: a reset
        record = await stack.record(head.headers["x-request-id"])
        assert (record["status"], record["stream"]) == (499, True)
        await wait_for(
            lambda: not set(tcp_states(stack.port, client_port)) & {"01", "08"},
            3,
            "the gateway's side of the connection closed",
        )
        # (A reset connection leaves /proc/net/tcp at once: only the worker's descriptors
        # tell whether hypercorn let go of it.)
        await wait_for(lambda: stack.gateway.sockets() <= sockets, 3, "no socket left open")
        async with await RawClient.open(stack.port) as client:
            await client.send(mock_request("/v1/chat/completions", "after-a-slow-leaver", {}))
            assert (await client.head()).status == 200
            assert b"".join(await client.chunks()).endswith(DONE)


# --- 5. an HTTP/1.0 client ----------------------------------------------------------------------


async def test_an_http10_client_gets_a_close_delimited_stream_through_hypercorn(
    stack: Stack,
) -> None:
    """h11 frames an HTTP/1.0 response by closing the connection: no chunks, so every part in
    the middle goes through hypercorn; the head and the end are h11's bytes (hypercorn's own
    h11 connection), and hypercorn closes the connection after the end."""
    mock = {"chunks": 30, "chunk_delay_ms": 5}
    before = stack.probe()
    with trio.fail_after(20):
        async with await RawClient.open(stack.port) as client:
            raw = mock_request("/v1/chat/completions", "http10", mock, version="HTTP/1.0")
            await client.send(raw)
            head = await client.head()
            body = await client.until_eof()
    assert head.status == 200
    assert "transfer-encoding" not in head.headers and "content-length" not in head.headers
    assert body.endswith(DONE)
    assert body == stack.replay("/v1/chat/completions", "http10")
    record = await stack.record(head.headers["x-request-id"])
    assert record["status"] == 200
    counts = grew(before, stack.probe())
    assert (counts["found"], counts["none"], counts["written"]) == (1, 0, 0), counts
    assert (counts["heads"], counts["ends"]) == (1, 1) and counts["declined"] > 1, counts


# --- 6. keep-alive after a stream --------------------------------------------------------------


@pytest.mark.parametrize("sending", ["in-turn", "pipelined"])
async def test_streams_one_after_another_on_one_keep_alive_connection(
    stack: Stack, sending: str
) -> None:
    """The connection's return to keep-alive after a body ended on the direct path stays
    hypercorn's: a second stream, then a plain request, on the same connection (`pipelined`: the second request
    sent with the first, read by hypercorn once the first stream has ended)."""
    exchanges = [("/v1/chat/completions", f"{sending}-1"), ("/v1/responses", f"{sending}-2")]
    raws = [
        mock_request(path, marker, {"chunks": 20, "chunk_delay_ms": 2})
        for path, marker in exchanges
    ]
    before = stack.probe()
    ids = []
    with trio.fail_after(20):
        async with await RawClient.open(stack.port) as client:
            if sending == "pipelined":
                await client.send(b"".join(raws))
            for (path, marker), raw in zip(exchanges, raws, strict=True):
                if sending == "in-turn":
                    await client.send(raw)
                head = await client.head()
                assert head.status == 200 and head.headers.get("connection") != "close"
                body = b"".join(await client.chunks())
                if sending == "in-turn":
                    assert client.buffer == b""  # nothing after the last chunk
                assert body == stack.replay(path, marker)
                ids.append(head.headers["x-request-id"])
            await client.send(request("GET", "/health"))
            head = await client.head()
            health = await client.read(int(head.headers["content-length"]))
            assert head.status == 200 and json.loads(health)["status"] == "ok"
            assert client.buffer == b"" and not client.eof
    assert [(await stack.record(i))["status"] for i in ids] == [200, 200]
    counts = grew(before, stack.probe())
    assert counts["found"] == 3 and counts["written"] >= 2, counts
    assert (counts["heads"], counts["ends"]) == (3, 3), counts
    assert counts["declined"] == 1, counts  # /health's part: a body with a length, not chunks


def test_an_h2c_client_gets_the_stream_through_hypercorn(stack: Stack) -> None:
    """HTTP/2 (cleartext, prior knowledge) has no chunks either: every part goes through
    hypercorn's HTTP/2 protocol, as DATA frames."""
    body = mock_body("/v1/chat/completions", "h2c", {"chunks": 30})
    before = stack.probe()
    client = H2Client(stack.port)
    try:
        headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
        stream_id = client.open("POST", "/v1/chat/completions", headers)
        client.send_body(stream_id, json.dumps(body).encode(), frames=1)
        status, received = client.wait_response(stream_id)
    finally:
        client.close()
    assert status == 200
    assert received == stack.replay("/v1/chat/completions", "h2c")
    counts = grew(before, stack.probe())
    assert (counts["found"], counts["none"], counts["written"]) == (0, 1, 0), counts


def test_a_tls_client_gets_the_stream_through_hypercorn(stack: Stack, tmp_path: Path) -> None:
    """Over TLS the socket carries ciphertext: the direct path must stand aside."""
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    trusted = ssl.create_default_context()
    authority.configure_trust(trusted)
    tls = ("--certfile", str(cert), "--keyfile", str(key))
    settings = config(stack.mock.url, stack.scripted.url, tmp_path / "audit.jsonl")
    gateway = ProbedGateway(tmp_path, settings, extra_args=tls)
    try:
        assert gateway.url.startswith("https://")
        body = mock_body("/v1/chat/completions", "tls", {"chunks": 30, "chunk_delay_ms": 2})
        url = f"{gateway.url}/v1/chat/completions"
        with httpx.Client(verify=trusted, timeout=20) as http:
            with http.stream("POST", url, json=body, headers=AUTH) as response:
                assert (response.status_code, response.http_version) == (200, "HTTP/1.1")
                received = b"".join(response.iter_raw())
            counts = http.get(f"{gateway.url}/_probe/direct").json()
    finally:
        gateway.stop()
    assert received == stack.replay("/v1/chat/completions", "tls")
    assert (counts["found"], counts["none"], counts["written"]) == (0, 1, 0), counts


# --- 7. the official client --------------------------------------------------------------------


def test_the_openai_client_streams_every_chunk_and_the_usage(stack: Stack) -> None:
    expected = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"] * 5
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=20) as http:
        api = openai.OpenAI(
            base_url=f"{stack.gateway.url}/v1", api_key=KEY, max_retries=0, http_client=http
        )
        for include_usage in (True, False):
            stream = api.chat.completions.create(
                model="gpt-e2e",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": include_usage},
                extra_body={"mock": {"chunks": 45, "chunk_delay_ms": 1}},
            )
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text.split() == expected
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
            assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
            if include_usage:
                assert len(chunks) == 1 + 45 + 1 + 1  # role, deltas, finish, usage
                assert chunks[-1].choices == [] and chunks[-1].usage is not None
                assert chunks[-1].usage.completion_tokens == 45
                assert all(c.usage is None for c in chunks[:-1])
            else:  # the usage-only chunk the gateway asked for is held back
                assert len(chunks) == 1 + 45 + 1
                assert all(c.usage is None for c in chunks)
