"""The floor under any trio relay on this machine: CPU per paced event of a bare loop (wait
for the upstream socket, `recv`, `send` to the client's), without HTTP, SSE or anything else.

    .venv/bin/python bench/trio_floor.py

Same shape as the `paced-*ev` scenarios: 200 streams over loopback TCP, 50 events each, 20 ms
apart, staggered as the mock's streams are (so the loop wakes for an event or a few, not for
200 at once: a burst of all the streams at once costs a third less per event, which is not
the gateway's case); a forked process writes the events and reads them back (its CPU is not
counted). The
gateway's CPU per paced event (issue 14's figure) is this plus everything the gateway does per
event; `make bench` records it beside that figure, in the same round, since both move with the
machine's load.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import time

import trio

STREAMS = 200
EVENTS = 50
GAP_S = 0.02
PAYLOAD = b"x" * 300  # an OpenAI chunk with its framing


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(STREAMS)
    return sock


def _peer(upstream: socket.socket, client: socket.socket) -> None:
    """In the forked process: pace the events into every stream, drain what is relayed.

    The streams are staggered, each one's events GAP_S apart at its own phase, as the bench
    mock's streams are (each paced by its own timer, from when its request came): the relay
    is woken for an event or a few at a time, not for all the streams at once."""
    ups = [socket.create_connection(upstream.getsockname()) for _ in range(STREAMS)]
    downs = [socket.create_connection(client.getsockname()) for _ in range(STREAMS)]
    for sock in ups + downs:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    relayed = selectors.DefaultSelector()
    for sock in downs:
        relayed.register(sock, selectors.EVENT_READ)
    start = time.monotonic() + 0.05
    for k in range(STREAMS * EVENTS):
        event, stream = divmod(k, STREAMS)
        due = start + event * GAP_S + stream * GAP_S / STREAMS
        while (wait := due - time.monotonic()) > 0:
            for key, _ in relayed.select(wait):
                key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
        ups[stream].sendall(PAYLOAD)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # what is still being relayed
        for key, _ in relayed.select(0.05):
            key.fileobj.recv(1 << 20)  # type: ignore[union-attr]


async def _relay(up: socket.socket, down: socket.socket) -> None:
    for _ in range(EVENTS):
        await trio.lowlevel.wait_readable(up)
        down.send(up.recv(65536))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure() -> dict[str, float]:
    """The floor's CPU µs per paced event (a fresh fork each time: call it from a process
    without threads)."""
    upstream, client = _listener(), _listener()
    pid = os.fork()
    if pid == 0:
        try:
            _peer(upstream, client)
        finally:
            os._exit(0)
    try:
        ups = [upstream.accept()[0] for _ in range(STREAMS)]
        downs = [client.accept()[0] for _ in range(STREAMS)]
        for sock in ups + downs:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def main() -> float:
            before = _cpu()
            async with trio.open_nursery() as nursery:
                for up, down in zip(ups, downs, strict=True):
                    nursery.start_soon(_relay, up, down)
            return _cpu() - before

        cpu = trio.run(main)
    finally:
        os.waitpid(pid, 0)
        upstream.close()
        client.close()
    return {"cpu_us_per_event": round(cpu / (STREAMS * EVENTS) * 1e6, 1)}


if __name__ == "__main__":
    print(json.dumps(measure()))
