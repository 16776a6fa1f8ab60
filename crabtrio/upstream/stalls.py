"""Stalls: bounds every wait for an upstream's bytes without a cancel scope per wait.

Why: a deadline scope around each read cost ~12% of a relayed stream event's CPU (trio builds
a CancelStatus and registers the deadline through a generator context manager, on the way in
and out), measured with py-spy under 200 paced streams. Here a wait is noted in a dict with
its deadline; one task, owned by the transport (`watch`), looks at the waits every tick and
wakes a wait past its deadline with `trio.lowlevel.notify_closing` on its socket, which the
waiter reports as `trio.TooSlowError`. Its connection is never read again: the timed-out
response is dropped and the connection closed with it.

A stalled wait thus ends between `timeout` and `timeout + tick` after it began; the tick is a
tenth of the shortest timeout seen, within [10 ms, 1 s]. While no watcher runs (before its
owner starts it, after `close`), each wait has a deadline of its own.
"""

from __future__ import annotations

import math
import socket

import trio

from ..deadline import Deadline

MIN_TICK = 0.01
MAX_TICK = 1.0
_EXPIRED = -math.inf  # a wait's deadline once the watcher has woken it


class Stalls:
    __slots__ = ("_idle", "_nap", "_tick", "_waits", "_watching")

    def __init__(self) -> None:
        self._watching = False  # `watch` runs
        self._waits: dict[socket.socket, float] = {}
        self._tick = MAX_TICK
        self._idle: trio.Event | None = None  # set by the first wait while nothing waits
        self._nap: trio.CancelScope | None = None  # the watcher's sleep between looks

    async def wait_readable(self, sock: socket.socket, timeout: float | None) -> None:
        """`trio.lowlevel.wait_readable`, or `trio.TooSlowError` after `timeout` (None: the
        caller bounds the wait)."""
        if timeout is None:
            await trio.lowlevel.wait_readable(sock)
            return
        if not self._watching:
            with Deadline(timeout):
                await trio.lowlevel.wait_readable(sock)
            return
        waits = self._waits
        waits[sock] = trio.current_time() + timeout
        if timeout < self._tick * 10 and self._tick > MIN_TICK:
            self._tick = max(MIN_TICK, timeout / 10)
            if self._nap is not None:  # asleep for the old, longer tick: look now
                self._nap.cancel()
        if self._idle is not None:
            self._idle.set()
        try:
            await trio.lowlevel.wait_readable(sock)
        except BaseException as exc:
            if waits.pop(sock) == _EXPIRED and isinstance(exc, trio.ClosedResourceError):
                raise trio.TooSlowError from None
            raise
        # Woken by data as the watcher found it late: it was given up all the same.
        if waits.pop(sock) == _EXPIRED:
            raise trio.TooSlowError

    def close(self) -> None:
        """For an owner that stops `watch`: every wait is woken (as a closed connection:
        `trio.ClosedResourceError`; their connections are not read again), and later ones
        get deadlines of their own."""
        self._watching = False
        for sock in list(self._waits):
            trio.lowlevel.notify_closing(sock)

    async def watch(self) -> None:
        """Wake the waits past their deadline, every tick while any wait (runs until
        cancelled, in the nursery of the transport that owns this)."""
        waits = self._waits
        self._watching = True
        try:
            while True:
                if not waits:
                    self._idle = trio.Event()
                    await self._idle.wait()
                    self._idle = None
                with trio.CancelScope(deadline=trio.current_time() + self._tick) as self._nap:
                    await trio.sleep_forever()
                self._nap = None
                now = trio.current_time()
                for sock, deadline in list(waits.items()):
                    if deadline <= now and deadline != _EXPIRED:
                        waits[sock] = _EXPIRED
                        trio.lowlevel.notify_closing(sock)
        finally:
            self.close()  # (also when it dies: no wait is left unbounded)
