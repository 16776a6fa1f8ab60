"""The gateway app with counters on its direct body path, for the stream relay tests:

    hypercorn tests.e2e.direct_probe:app --worker-class trio    (with the repository on PYTHONPATH)

It is `crabtrio:app` unchanged (same handlers, same hypercorn `send` underneath: the probe never
wraps `send` or `receive`), plus `GET /_probe/direct`, which answers how often, in this worker,
`DirectBody.of` found a direct path (`found`) or none (`none`), how many heads its `start` sent
(`heads`), how many parts its `write` wrote (`written`) or handed back to the ASGI send
(`declined`), how many bodies its `end` ended (`ends`), and how many writes the socket could not
take whole, so that they were finished under hypercorn's send lock (`finished`).
"""

from __future__ import annotations

from typing import Any

import orjson

import crabtrio
from crabtrio.body_writer import DirectBody

COUNTS = {"found": 0, "none": 0, "heads": 0, "written": 0, "declined": 0, "ends": 0, "finished": 0}
_of = DirectBody.of.__func__  # type: ignore[attr-defined]
_start = DirectBody.start
_write = DirectBody.write
_end = DirectBody.end


class _CountingLock:
    """hypercorn's send lock as DirectBody sees it: the same lock, its takings counted."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock

    def locked(self) -> bool:
        return bool(self._lock.locked())

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()
        COUNTS["finished"] += 1

    def release(self) -> None:
        self._lock.release()


class _Server:
    """hypercorn's TCPServer as DirectBody sees it (hypercorn keeps using the real one)."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self.send_lock = _CountingLock(server.send_lock)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def _counted_of(cls: type[DirectBody], send: Any) -> DirectBody | None:
    found = _of(cls, send)
    COUNTS["none" if found is None else "found"] += 1
    if found is not None:
        found._server = _Server(found._server)
    return found


def _counted_write(self: DirectBody, data: bytes) -> memoryview | None:
    rest = _write(self, data)
    COUNTS["declined" if rest is None else "written"] += 1
    return rest


async def _counted_start(self: DirectBody, message: Any) -> bool:
    sent = await _start(self, message)
    COUNTS["heads"] += sent
    return sent


async def _counted_end(self: DirectBody, body: bytes) -> bool:
    ended = await _end(self, body)
    COUNTS["ends"] += ended
    return ended


DirectBody.of = classmethod(_counted_of)  # type: ignore[method-assign, assignment]
DirectBody.start = _counted_start  # type: ignore[method-assign]
DirectBody.write = _counted_write  # type: ignore[method-assign]
DirectBody.end = _counted_end  # type: ignore[method-assign]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == "/_probe/direct":
        body = orjson.dumps(COUNTS)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await crabtrio.app(scope, receive, send)
