"""A one-connection HTTP client for what wrk cannot see: readiness and time to first event."""

from __future__ import annotations

import contextlib
import http.client
import time
from collections.abc import Callable
from dataclasses import dataclass

# How long a target may answer the readiness probe with errors before we give up on it.
WRONG_ANSWERS_S = 10.0


@dataclass(frozen=True, slots=True)
class Request:
    port: int
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes


def send(request: Request, timeout: float = 10.0) -> Reply:
    """One POST on a new connection; the whole reply."""
    conn = http.client.HTTPConnection("127.0.0.1", request.port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", **request.headers}
        conn.request("POST", request.path, body=request.body, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, response.read())
    finally:
        conn.close()


def wait_ready(
    request: Request, started: float, timeout: float, alive: Callable[[], bool]
) -> float:
    """Seconds from `started` (perf_counter) to the first 200 answer to `request`.

    `alive` tells whether the process still runs: one that died fails at once.
    """
    deadline = started + timeout
    last = "no answer"
    first_answer = None
    while time.perf_counter() < deadline:
        if not alive():
            raise RuntimeError("exited before answering")
        with contextlib.suppress(OSError, http.client.HTTPException):
            reply = send(request, timeout=5.0)
            if reply.status == 200:
                return time.perf_counter() - started
            last = f"status {reply.status}: {reply.body[:200]!r}"
            first_answer = first_answer or time.perf_counter()
            if time.perf_counter() - first_answer > WRONG_ANSWERS_S:
                break  # it serves, but not this request: waiting longer will not help
        time.sleep(0.02)
    waited = time.perf_counter() - started
    raise RuntimeError(f"not ready after {waited:.0f}s ({last})")


@dataclass(frozen=True, slots=True)
class StreamTiming:
    first_event: float  # seconds from sending the request to the first `data:` line
    total: float  # to the end of the stream
    ok: bool  # a 200 that ended with [DONE]


def chat_ended(last_data: bytes) -> bool:
    """Whether a chat stream's last `data:` line is its end."""
    return b"[DONE]" in last_data


def time_stream(
    conn: http.client.HTTPConnection,
    request: Request,
    ended: Callable[[bytes], bool] = chat_ended,
) -> StreamTiming:
    """Send one streaming request on a kept-alive connection and time its events; it is good
    when it answered 200 and `ended` says its last `data:` line ends it."""
    headers = {"Content-Type": "application/json", **request.headers}
    start = time.perf_counter()
    conn.request("POST", request.path, body=request.body, headers=headers)
    response = conn.getresponse()
    first = None
    seen = b""
    while line := response.readline():
        if line.startswith(b"data:"):
            first = time.perf_counter() - start if first is None else first
            seen = line
    end = time.perf_counter() - start
    ok = response.status == 200 and ended(seen)
    return StreamTiming(end if first is None else first, end, ok)


def probe_streams(
    request: Request,
    *,
    count: int,
    until: float | None = None,
    timeout: float = 30.0,
    ended: Callable[[bytes], bool] = chat_ended,
) -> list[StreamTiming]:
    """Up to `count` streams one after another (stopping at perf_counter `until`, if given)."""
    timings: list[StreamTiming] = []
    conn = http.client.HTTPConnection("127.0.0.1", request.port, timeout=timeout)
    try:
        while len(timings) < count and (until is None or time.perf_counter() < until):
            try:
                timings.append(time_stream(conn, request, ended))
            except (OSError, http.client.HTTPException):
                timings.append(StreamTiming(timeout, timeout, False))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", request.port, timeout=timeout)
    finally:
        conn.close()
    return timings
