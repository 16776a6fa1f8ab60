"""Connection lifecycle under hypercorn: closes after a response, idle timeouts, hostile clients."""

from __future__ import annotations

import json
import math
import resource
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from .faults import worker_pids
from .processes import Gateway, wait_until
from .sockets import (
    Connection,
    established,
    file_limit,
    parse_response,
    request,
    socket_fds,
    wait_for,
)

pytestmark = pytest.mark.e2e

KEY = {"Authorization": "Bearer sk-team-e2e"}
CHAT = json.dumps({"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]})
STREAM = json.dumps({"model": "mock-chat", "messages": [], "stream": True})
HEALTH = request("GET", "/health")
CHAT_REQUEST = request("POST", "/v1/chat/completions", headers=KEY, body=CHAT.encode())
STREAM_REQUEST = request("POST", "/v1/chat/completions", headers=KEY, body=STREAM.encode())
# No admin_token: /v1/admin/* answers loopback clients, which these tests are.
CONFIG = """
[providers.m]
kind = "mock"
models = ["mock-chat"]
chunks = 3
[[keys]]
name = "team-e2e"
key = "sk-team-e2e"
[audit]
path = "{audit}"
"""


def port_of(gateway: Gateway) -> int:
    port = urlsplit(gateway.url).port
    assert port is not None
    return port


def one_worker(
    start_gateway: Callable[..., Gateway], tmp_path: Path, keep_alive: int
) -> tuple[int, int]:
    """A gateway with this keep-alive timeout: its port and its one worker's PID."""
    gateway = start_gateway(
        CONFIG.format(audit=tmp_path / "audit.jsonl"), extra_args=("--keep-alive", str(keep_alive))
    )
    wait_until(lambda: worker_pids(gateway.proc.pid), 5, "hypercorn's worker process")
    (worker,) = worker_pids(gateway.proc.pid)
    return port_of(gateway), worker


def records(audit: Path) -> list[dict]:
    if not audit.exists():
        return []
    return [json.loads(line) for line in audit.read_bytes().splitlines() if line.strip()]


@pytest.fixture
def open_files() -> Iterator[Callable[[int], None]]:
    """`open_files(n)`: room for n descriptors here and in gateways started afterwards."""
    with file_limit() as need:
        yield need


# --- 1. A response that ends the connection ends it -------------------------------------------

# A long idle timeout, so only an explicit close (never the idle timer) passes within CLOSE_WITHIN.
CLOSE_WITHIN = 3.0


@pytest.fixture(scope="module")
def long_idle_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("close")
    gateway = Gateway(
        tmp, CONFIG.format(audit=tmp / "audit.jsonl"), extra_args=("--keep-alive", "60")
    )
    try:
        yield gateway
    finally:
        gateway.stop()


ROUTES = {
    "chat": ("POST", "/v1/chat/completions", KEY, CHAT, 200),
    "chat-stream": ("POST", "/v1/chat/completions", KEY, STREAM, 200),
    "health": ("GET", "/health", {}, "", 200),
    "models": ("GET", "/v1/models", KEY, "", 200),
    "admin-logs": ("GET", "/v1/admin/logs", {}, "", 200),
    "not-found": ("GET", "/v1/no-such-route", KEY, "", 404),
    "chat-without-key": ("POST", "/v1/chat/completions", {}, CHAT, 401),
}
CLOSING = {
    "http11-connection-close": ("HTTP/1.1", {"Connection": "close"}),
    "http10": ("HTTP/1.0", {}),
}


@pytest.mark.parametrize("closing", list(CLOSING))
@pytest.mark.parametrize("route", list(ROUTES))
async def test_the_server_closes_the_connection_after_a_closing_response(
    long_idle_gateway: Gateway, route: str, closing: str
) -> None:
    method, path, headers, body, status = ROUTES[route]
    version, connection = CLOSING[closing]
    raw = request(
        method, path, version=version, headers={**headers, **connection}, body=body.encode()
    )
    async with await Connection.open(port_of(long_idle_gateway)) as conn:
        await conn.stream.send_all(raw)
        with trio.move_on_after(CLOSE_WITHIN):
            received = await conn.wait_closed()
        assert conn.eof, (
            f"the connection is still open {CLOSE_WITHIN}s after the request; "
            f"received: {conn.buffer[:300]!r}"
        )
    parsed = parse_response(received, eof=True)
    assert parsed is not None, received
    response, used = parsed
    assert used == len(received), f"bytes after the response: {received[used:][:200]!r}"
    assert response.status == status, response
    if route == "chat-stream":
        assert response.body.endswith(b"data: [DONE]\n\n"), response.body[-200:]


# --- 2. Idle keep-alive connections time out ------------------------------------------------

IDLE_CONNECTIONS = 1000
KEEP_ALIVE = 5  # hypercorn's default keep_alive_timeout


@pytest.mark.faults
async def test_idle_keep_alive_connections_are_closed_after_the_timeout(
    tmp_path: Path, start_gateway, open_files: Callable[[int], None]
) -> None:
    open_files(IDLE_CONNECTIONS + 200)  # before the start: the gateway inherits it
    gateway = start_gateway(
        CONFIG.format(audit=tmp_path / "audit.jsonl"), extra_args=("--keep-alive", str(KEEP_ALIVE))
    )
    port = port_of(gateway)
    connecting = trio.CapacityLimiter(64)  # within hypercorn's listen backlog of 100
    idle_for: list[float] = []
    still_open = 0

    async def one_request_then_idle() -> None:
        nonlocal still_open
        async with connecting:
            conn = await Connection.open(port)
        async with conn:
            response = await conn.request(HEALTH)
            assert response.status == 200
            answered = trio.current_time()
            with trio.move_on_after(KEEP_ALIVE + 10):
                assert await conn.wait_closed() == b""
                idle_for.append(trio.current_time() - answered)
                return
            still_open += 1

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(IDLE_CONNECTIONS):
                nursery.start_soon(one_request_then_idle)

    assert still_open == 0, (
        f"{still_open} of {IDLE_CONNECTIONS} idle connections still open "
        f"{KEEP_ALIVE + 10}s after their response"
    )
    assert min(idle_for) > KEEP_ALIVE - 0.5, "closed before the keep-alive timeout"
    assert established(port) == 0


CLOSED_BY_CLIENT = 20
LONG_KEEP_ALIVE = 60


async def test_connections_the_client_closed_are_released_at_once_not_at_the_idle_timeout(
    tmp_path: Path, start_gateway
) -> None:
    """hypercorn kept its side of an idle connection the client had closed until the
    keep-alive timeout: its idle timer held the connection's task group open."""
    port, worker = one_worker(start_gateway, tmp_path, LONG_KEEP_ALIVE)
    before = socket_fds(worker)
    with trio.fail_after(30):
        connections = [await Connection.open(port) for _ in range(CLOSED_BY_CLIENT)]
        for conn in connections:
            assert (await conn.request(HEALTH)).status == 200
        assert socket_fds(worker) >= before + CLOSED_BY_CLIENT
        for conn in connections:
            await conn.aclose()
    await wait_for(
        lambda: socket_fds(worker) <= before,
        5,  # a twelfth of the keep-alive timeout
        f"the worker to close its side of {CLOSED_BY_CLIENT} connections the client closed",
    )


MAX_REQUESTS = 3


@pytest.mark.parametrize("kind", ["chat", "stream"])
async def test_the_answer_at_keep_alive_max_requests_closes_the_connection(
    tmp_path: Path, start_gateway, kind: str
) -> None:
    """hypercorn ends a connection after `keep_alive_max_requests` answers, the last one
    saying `connection: close`. A proxied answer's head is written by crabtrio's direct path
    (body_writer.py), which must add it as hypercorn does."""
    settings = tmp_path / "hypercorn.toml"
    settings.write_text(f"keep_alive_max_requests = {MAX_REQUESTS}\n")
    gateway = start_gateway(
        CONFIG.format(audit=tmp_path / "audit.jsonl"), extra_args=("--config", str(settings))
    )
    raw = CHAT_REQUEST if kind == "chat" else STREAM_REQUEST
    with trio.fail_after(20):
        async with await Connection.open(port_of(gateway)) as conn:
            for answered in range(1, MAX_REQUESTS + 1):
                response = await conn.request(raw)
                assert response.status == 200
                closing = response.headers.get("connection") == "close"
                assert closing == (answered == MAX_REQUESTS), (answered, response.headers)
            assert await conn.wait_closed() == b""


# --- 3. Many requests over keep-alive, then nothing left open ---------------------------------

CONNECTIONS = 200
PER_CONNECTION = 50  # below hypercorn's keep_alive_max_requests (1000)
SHORT_KEEP_ALIVE = 2


@pytest.mark.faults
async def test_ten_thousand_keep_alive_requests_then_every_connection_is_closed(
    tmp_path: Path, start_gateway, open_files: Callable[[int], None]
) -> None:
    open_files(CONNECTIONS + 200)
    audit = tmp_path / "audit.jsonl"
    gateway = start_gateway(
        CONFIG.format(audit=audit), extra_args=("--keep-alive", str(SHORT_KEEP_ALIVE))
    )
    port = port_of(gateway)
    wait_until(lambda: worker_pids(gateway.proc.pid), 5, "hypercorn's worker process")
    (worker,) = worker_pids(gateway.proc.pid)
    sockets_before = socket_fds(worker)
    statuses: Counter[tuple[str, int]] = Counter()
    chat_ids: list[str] = []
    still_open = 0
    done = trio.Event()
    finished = 0

    async def client(index: int) -> None:
        nonlocal finished, still_open
        async with await Connection.open(port) as conn:
            for n in range(PER_CONNECTION):
                kind = ("health", "health", "chat", "stream")[(index + n) % 4]
                raw = {"health": HEALTH, "chat": CHAT_REQUEST, "stream": STREAM_REQUEST}[kind]
                response = await conn.request(raw)
                statuses[kind, response.status] += 1
                if kind != "health":
                    chat_ids.append(response.headers["x-request-id"])
                if kind == "stream":
                    assert response.body.endswith(b"data: [DONE]\n\n")
            finished += 1
            if finished == CONNECTIONS:
                done.set()
            await done.wait()  # all requests answered: "10 s after the last response" starts
            with trio.move_on_after(10):
                assert await conn.wait_closed() == b""
                return
            still_open += 1

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for index in range(CONNECTIONS):
                nursery.start_soon(client, index)

    total = CONNECTIONS * PER_CONNECTION
    assert sum(statuses.values()) == total
    assert {status for _, status in statuses} == {200}, statuses
    assert still_open == 0, f"{still_open} of {CONNECTIONS} connections open 10s after the load"
    assert established(port) == 0
    await wait_for(lambda: socket_fds(worker) <= sockets_before, 2, "the worker's sockets closed")
    await wait_for(lambda: len(records(audit)) >= len(chat_ids), 5, "one record per chat")
    assert Counter(r["request_id"] for r in records(audit)) == Counter(chat_ids)


# --- 4. Slowloris -------------------------------------------------------------------------------

SLOW_CLIENTS = 50
SLOW_SECONDS = 30
SLOW_BYTE_EVERY = 0.15
# Never a whole request head: 30 s at one byte per 150 ms sends 200 of these bytes.
SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4000


@pytest.mark.faults
async def test_slowloris_does_not_slow_other_clients(tmp_path: Path, start_gateway) -> None:
    gateway = start_gateway(CONFIG.format(audit=tmp_path / "audit.jsonl"))
    port = port_of(gateway)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    trickled = 0
    cut = 0  # slow connections the server ended (hypercorn's idle timer runs until a full head)

    async def slow_client(stop_at: float) -> None:
        nonlocal trickled, cut
        for _ in range(100):  # reconnects, bounded
            async with await Connection.open(port) as conn:
                try:
                    for byte in SLOW_HEAD:
                        if trio.current_time() >= stop_at:
                            return
                        await conn.stream.send_all(bytes([byte]))
                        trickled += 1
                        await trio.sleep(SLOW_BYTE_EVERY)
                except trio.BrokenResourceError:
                    cut += 1

    async def probe(stop_at: float) -> None:
        while trio.current_time() < stop_at and len(latencies) < 2000:
            started = trio.current_time()
            async with await Connection.open(port) as conn:
                response = await conn.request(
                    request("GET", "/health", headers={"Connection": "close"})
                )
            latencies.append(trio.current_time() - started)
            statuses[response.status] += 1
            await trio.sleep(0.01)  # pacing: one client's sequential requests, not a flood

    with trio.fail_after(SLOW_SECONDS + 15):
        async with trio.open_nursery() as nursery:
            stop_at = trio.current_time() + SLOW_SECONDS
            for _ in range(SLOW_CLIENTS):
                nursery.start_soon(slow_client, stop_at)
            await trio.sleep(1)  # the slow connections are open before the first measurement
            nursery.start_soon(probe, stop_at)

    assert trickled > 0.8 * SLOW_CLIENTS * SLOW_SECONDS / SLOW_BYTE_EVERY, trickled
    assert statuses == {200: len(latencies)} and len(latencies) > 500, statuses
    latencies.sort()
    p99 = latencies[math.ceil(len(latencies) * 0.99) - 1]
    assert p99 < 0.050, f"p99 {p99 * 1000:.1f} ms over {len(latencies)} requests ({cut} slow cut)"


# --- 5. File descriptors exhausted by idle connections -----------------------------------------

FD_LIMIT = 256
FD_KEEP_ALIVE = 3


@pytest.mark.faults
async def test_a_new_client_is_served_after_idle_connections_used_every_fd(
    tmp_path: Path, start_gateway
) -> None:
    port, worker = one_worker(start_gateway, tmp_path, FD_KEEP_ALIVE)
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    room = FD_LIMIT - len(list(Path(f"/proc/{worker}/fd").iterdir()))
    attackers: list[Connection] = []
    answered = 0
    try:
        with trio.fail_after(30):
            for _ in range(room + 16):
                conn = await Connection.open(port)
                attackers.append(conn)
                await conn.stream.send_all(HEALTH)
                with trio.move_on_after(1):
                    assert (await conn.response()).status == 200
                    answered += 1
                    continue
                break  # unanswered: the worker has no descriptor left for it
        assert answered > room - 16, f"the attacker used {answered} connections of {room}"

        with trio.move_on_after(FD_KEEP_ALIVE + 5) as waited:
            async with await Connection.open(port) as conn:
                response = await conn.request(
                    request("GET", "/health", headers={"Connection": "close"})
                )
        assert not waited.cancelled_caught, (
            f"a new client got no answer within {FD_KEEP_ALIVE + 5}s while {answered} idle "
            f"connections held the worker's {FD_LIMIT} descriptors"
        )
        assert response.status == 200
    finally:
        for conn in attackers:
            await conn.aclose()
