"""hypercorn's idle timer as crabtrio replaces it (`hypercorn_fixes._IdleTimer`), on virtual
time: when a keep-alive connection is closed, and when it is not.

The timer is driven as hypercorn's `TCPServer` drives it (`restart` when the connection
opens and after each response, `stop` when a request arrives, and the read loop's end),
with hypercorn's own `Config` and `WorkerContext`; `_Server` stands in for the rest of the
`TCPServer` (the e2e tests in tests/e2e/test_connections_e2e.py run the real one).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio.worker_context import WorkerContext

from crabtrio.hypercorn_fixes import _IdleTimer

KEEP_ALIVE = 5.0


class _Server:
    """What the timer uses of hypercorn's `TCPServer`: its config, its worker's context, the
    close it starts, and `_idle_timeout` (the action hypercorn hands the timer)."""

    def __init__(self) -> None:
        self.config = Config()
        self.config.keep_alive_timeout = KEEP_ALIVE
        self.context = WorkerContext(None)
        self.closed_at: list[float] = []

    async def _idle_timeout(self) -> None:
        raise AssertionError("the timer does this itself: one task per connection")

    async def _initiate_server_close(self) -> None:
        self.closed_at.append(trio.current_time())


Restart = Callable[[], Awaitable[None]]
Steps = Callable[[_Server, _IdleTimer, Restart], Awaitable[None]]


async def _run(steps: Steps) -> _Server:
    """`steps(timer, restart)` drives the timer; then the read loop ends (as it does when
    the connection closes) unless the steps closed it already."""
    server = _Server()
    timer = _IdleTimer()
    async with trio.open_nursery() as nursery:
        group = SimpleNamespace(_nursery=nursery)

        async def restart() -> None:
            await timer.restart(group, server._idle_timeout)

        await restart()  # the connection opened
        await steps(server, timer, restart)
        timer.end()
    return server


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(autojump_clock) -> None:
    async def steps(server: _Server, timer: _IdleTimer, restart: Restart) -> None:
        await trio.sleep(KEEP_ALIVE * 3)

    assert (await _run(steps)).closed_at == [pytest.approx(KEEP_ALIVE)]


async def test_a_request_holds_the_connection_open_however_long_it_takes(
    autojump_clock,
) -> None:
    async def steps(server: _Server, timer: _IdleTimer, restart: Restart) -> None:
        await trio.sleep(1)
        await timer.stop()  # a request arrived
        await trio.sleep(KEEP_ALIVE * 20)  # a long stream
        assert server.closed_at == []
        await restart()  # its response ended
        answered = trio.current_time()
        await trio.sleep(KEEP_ALIVE - 0.1)
        assert server.closed_at == []
        await trio.sleep(0.2)
        assert server.closed_at == [pytest.approx(answered + KEEP_ALIVE)]

    assert len((await _run(steps)).closed_at) == 1


async def test_each_response_starts_the_idle_time_again(autojump_clock) -> None:
    async def steps(server: _Server, timer: _IdleTimer, restart: Restart) -> None:
        for _ in range(50):  # requests a little under the timeout apart
            await trio.sleep(KEEP_ALIVE - 1)
            await timer.stop()
            await trio.sleep(0.5)
            await restart()
        assert server.closed_at == []

    assert len((await _run(steps)).closed_at) == 0


async def test_shutdown_closes_an_idle_connection_at_once(autojump_clock) -> None:
    async def steps(server: _Server, timer: _IdleTimer, restart: Restart) -> None:
        await trio.sleep(1)
        await server.context.terminated.set()
        await trio.sleep(0.01)
        assert server.closed_at == [pytest.approx(1)]

    assert len((await _run(steps)).closed_at) == 1


async def test_shutdown_mid_request_closes_once_the_connection_is_idle_again(
    autojump_clock,
) -> None:
    """HTTP/2 restarts the timer when its last stream ends, even after shutdown began (HTTP/1.1
    closes by itself after the response)."""

    async def steps(server: _Server, timer: _IdleTimer, restart: Restart) -> None:
        await timer.stop()
        await server.context.terminated.set()
        await trio.sleep(KEEP_ALIVE * 3)
        assert server.closed_at == []  # the request is still being answered
        await restart()
        await trio.sleep(0.01)
        assert server.closed_at == [pytest.approx(KEEP_ALIVE * 3)]

    assert len((await _run(steps)).closed_at) == 1


async def test_a_connection_whose_read_loop_ended_is_not_closed_again(autojump_clock) -> None:
    async def steps(server: _Server, timer: _IdleTimer, restart: Restart) -> None:
        await trio.sleep(1)
        timer.end()  # the client closed: hypercorn closes the socket itself

    server = await _run(steps)
    assert server.closed_at == []
