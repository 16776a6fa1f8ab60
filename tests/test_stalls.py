"""Stalls under virtual time, on real sockets: a stalled wait ends within [timeout, timeout +
tick], a wait that ends otherwise is forgotten, and the watcher sleeps while nothing waits."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from crabtrio.upstream.stalls import MAX_TICK, Stalls

WATCHER = "stalls-watcher"
# Float sums of ticks are off by an ulp or so; nothing here is about such a margin.
EPS = 1e-9
VIRTUAL_LIMIT = 1e6  # seconds of virtual time for any test

Pairs = Callable[[], tuple[socket.socket, socket.socket]]


@pytest.fixture
def pair() -> Iterator[Pairs]:
    """Connected socket pairs (read from the first, write to the second), closed at the end."""
    opened: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        a.setblocking(False)
        opened.extend((a, b))
        return a, b

    yield make
    for sock in opened:
        sock.close()


@asynccontextmanager
async def watching() -> AsyncIterator[Stalls]:
    """A Stalls with its watcher running, as the transport owns it; bounded in virtual time
    (a wait nothing wakes would otherwise leave the test asleep for good)."""
    stalls = Stalls()
    with trio.fail_after(VIRTUAL_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stalls.watch, name=WATCHER)
            yield stalls
            nursery.cancel_scope.cancel()


class WatcherSteps(trio.abc.Instrument):
    """Counts how often the watcher task runs."""

    def __init__(self) -> None:
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == WATCHER:
            self.count += 1


@pytest.fixture
async def watcher_steps() -> AsyncIterator[WatcherSteps]:  # (async: inside the test's run)
    steps = WatcherSteps()
    trio.lowlevel.add_instrument(steps)
    yield steps
    trio.lowlevel.remove_instrument(steps)


async def stalled_for(stalls: Stalls, sock: socket.socket, timeout: float) -> float:
    """How long a wait on a socket that gets nothing took to raise TooSlowError."""
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await stalls.wait_readable(sock, timeout)
    return trio.current_time() - start


async def check_forgotten(sock: socket.socket, past: float) -> None:
    """Nothing is left that would wake (close) a later wait on `sock` before `past` seconds:
    a plain trio wait on it over that time just times out."""
    with trio.move_on_after(past) as quiet:
        await trio.lowlevel.wait_readable(sock)  # ClosedResourceError if the watcher woke it
    assert quiet.cancelled_caught


def nothing_scheduled() -> bool:
    """No task sleeps on a deadline other than the test's limit (a ticking watcher would)."""
    return trio.lowlevel.current_statistics().seconds_to_next_deadline > MAX_TICK * 100


@pytest.mark.parametrize(
    ("timeout", "tick"),
    [
        pytest.param(2.5, 0.25, id="tenth"),
        pytest.param(0.05, 0.01, id="min-tick"),
        pytest.param(100.0, 1.0, id="max-tick"),
    ],
)
async def test_a_wait_that_gets_nothing_ends_between_its_timeout_and_a_tick_later(
    autojump_clock: MockClock,
    pair: Pairs,
    watcher_steps: WatcherSteps,
    timeout: float,
    tick: float,
) -> None:
    a, _ = pair()
    async with watching() as stalls:
        await trio.testing.wait_all_tasks_blocked()
        before = watcher_steps.count
        elapsed = await stalled_for(stalls, a, timeout)
        steps = watcher_steps.count - before
    assert timeout - EPS <= elapsed <= timeout + tick + EPS
    # It looks once a tick: never more often (CPU), and not less (how late a wait ends).
    assert timeout / tick <= steps <= timeout / tick + 2


# Where in the watcher's tick (0.25 s here) the wait begins: exact binary fractions, so the
# bounds are exact too.
@pytest.mark.parametrize("phase", [0.0, 1 / 64, 0.125, 15 / 64])
async def test_a_wait_beginning_mid_tick_still_ends_within_a_tick_of_its_timeout(
    autojump_clock: MockClock, pair: Pairs, phase: float
) -> None:
    a, b = pair()
    keeper, _ = pair()
    async with watching() as stalls, trio.open_nursery() as nursery:
        b.send(b"x")
        await stalls.wait_readable(a, 2.5)  # at once: sets the tick to 0.25
        a.recv(1)
        # A long wait keeps the watcher ticking, so the wait under test begins mid-tick.
        nursery.start_soon(stalls.wait_readable, keeper, 1000.0)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(phase)
        elapsed = await stalled_for(stalls, a, 2.5)
        nursery.cancel_scope.cancel()
    assert 2.5 <= elapsed <= 2.5 + 0.25


async def test_a_wait_that_gets_data_in_time_returns_then_and_is_forgotten(
    autojump_clock: MockClock, pair: Pairs
) -> None:
    a, b = pair()

    async def send_after(seconds: float) -> None:
        await trio.sleep(seconds)
        b.send(b"data")

    async with watching() as stalls, trio.open_nursery() as nursery:
        nursery.start_soon(send_after, 1.0)
        start = trio.current_time()
        await stalls.wait_readable(a, 2.5)
        assert trio.current_time() - start == 1.0
        assert a.recv(10) == b"data"
        await check_forgotten(a, past=10.0)  # well past its 2.5 s deadline
        assert nothing_scheduled()  # the watcher parked: no wait left to watch


async def test_waits_with_different_timeouts_each_expire_on_their_own(
    autojump_clock: MockClock, pair: Pairs
) -> None:
    timeouts = {"short": 0.625, "middle": 1.25, "long": 2.5}  # a tick of 0.0625
    ended: dict[str, float] = {}

    async def stall(name: str, sock: socket.socket) -> None:
        ended[name] = await stalled_for(stalls, sock, timeouts[name])

    async def fed(sock: socket.socket, peer: socket.socket) -> None:
        async def send_later() -> None:
            await trio.sleep(1.0)  # between the short and the long timeouts
            peer.send(b"x")

        nursery.start_soon(send_later)
        start = trio.current_time()
        await stalls.wait_readable(sock, 2.5)
        ended["fed"] = trio.current_time() - start

    async with watching() as stalls:
        await trio.testing.wait_all_tasks_blocked()  # the watcher parked
        async with trio.open_nursery() as nursery:
            # Longest first: the tick must follow the shortest, whichever came first.
            for name in reversed(timeouts):
                nursery.start_soon(stall, name, pair()[0])
            nursery.start_soon(fed, *pair())
    assert ended.pop("fed") == 1.0
    for name, timeout in timeouts.items():
        assert timeout <= ended[name] <= timeout + 0.0625, name


async def test_a_shorter_wait_arriving_while_the_watcher_sleeps_a_long_tick_is_on_time(
    autojump_clock: MockClock, pair: Pairs
) -> None:
    keeper, _ = pair()
    a, _ = pair()
    async with watching() as stalls, trio.open_nursery() as nursery:
        nursery.start_soon(stalls.wait_readable, keeper, 100.0)  # a tick of 1 s
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.125)
        elapsed = await stalled_for(stalls, a, 0.25)  # a tick of 0.025 s from now on
        nursery.cancel_scope.cancel()
    assert 0.25 <= elapsed <= 0.25 + 0.025 + EPS  # (not 0.875: when the old tick ends)


async def test_a_wait_cancelled_from_outside_is_cancelled_and_forgotten(
    autojump_clock: MockClock, pair: Pairs
) -> None:
    a, _ = pair()
    returned = False
    async with watching() as stalls:
        with trio.move_on_after(1.0) as scope:
            await stalls.wait_readable(a, 2.5)
            returned = True
        assert scope.cancelled_caught and not returned
        assert trio.current_time() == 1.0
        await check_forgotten(a, past=10.0)  # well past its 2.5 s deadline
        assert nothing_scheduled()


async def test_a_wait_cancelled_as_the_watcher_expires_it_sees_the_cancellation(
    autojump_clock: MockClock, pair: Pairs
) -> None:
    a, _ = pair()
    # The cancellation and the watcher's tick fall at the same instant; trio runs the two
    # woken tasks in a random order, so the race is run often enough to meet both orders.
    for _ in range(30):
        async with watching() as stalls:
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(2.5) as scope:
                await stalls.wait_readable(a, 2.5)  # (a TooSlowError escapes the scope)
            assert scope.cancelled_caught
        await check_forgotten(a, past=10.0)


async def test_the_watcher_parks_while_nothing_waits_and_wakes_for_a_new_wait(
    autojump_clock: MockClock, pair: Pairs, watcher_steps: WatcherSteps
) -> None:
    a, b = pair()
    async with watching() as stalls:
        await trio.testing.wait_all_tasks_blocked()
        idle_steps = watcher_steps.count
        await trio.sleep(10_000)  # even at its longest tick (1 s), 10,000 runs
        assert watcher_steps.count == idle_steps
        assert nothing_scheduled()

        b.send(b"x")
        await stalls.wait_readable(a, 2.5)  # returns at once; the watcher ticks, then parks
        a.recv(1)
        await trio.sleep(1.0)
        parked_steps = watcher_steps.count
        assert parked_steps > idle_steps
        await trio.sleep(10_000)
        assert watcher_steps.count == parked_steps
        assert nothing_scheduled()

        # Parked, it still wakes to bound the next wait.
        elapsed = await stalled_for(stalls, a, 2.5)
        assert 2.5 <= elapsed <= 2.5 + 0.25
        assert watcher_steps.count > parked_steps
