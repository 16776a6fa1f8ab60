"""Workarounds for hypercorn 0.17/0.18 bugs that let one client kill or desynchronise a worker.

`install()` patches these places, each checked for its expected shape at import:

1. HTTP/2: DATA for a stream whose response is complete raises `KeyError` in
   `hypercorn/protocol/h2.py` (0.18: line 259, `H2Protocol._handle_events`), so an early 401 or
   413 on an h2c request killed the connection. Upstream: pgjones/hypercorn#329 (fix PRs #312,
   #334, #365, unmerged as of 0.18). Such data is now discarded and its flow-control credit
   returned, as the `StreamEnded` branch beside it already does for the end of such a stream.
2. Under the trio worker an exception from a connection's protocol handling escapes
   `TCPServer.run` (`hypercorn/trio/tcp_server.py`: it catches only `OSError`) into the server
   nursery and ends the worker process; the asyncio worker only logs it, since each connection
   is its own task there. Upstream: pgjones/hypercorn#225 (an upgrade request with trailing
   bytes still does this in 0.18); PR #228 added a guard that 0.18 does not have. Such an
   error now closes that one connection and is logged with its traceback.
3. HTTP/1.1: h11 accepts a request with both Content-Length and Transfer-Encoding (T-E wins,
   `h11/_connection.py` `_body_framing`) and hypercorn keeps the connection, so bytes after the
   chunked body are served as a second request (smuggling). RFC 9112 §6.1: the server MUST close
   the connection after responding to such a request; it is now refused with a 400 and closed.
   hypercorn's own error responses (`H11Protocol._send_error_response`: 400 framing, 431
   headers too large, 501 transfer coding) get an OpenAI-shaped JSON body instead of none.

And one cost, in the trio worker (py-spy, bench/figures/stream-profile.md):

4. every keep-alive connection's idle timer (`TrioSingleTask`, stopped when a request arrives
   and restarted when its response ends) took a lock, a `nursery.start` and a cancellation on
   each request: about 7% of a paced stream's CPU. `_IdleTimer` is one task for the
   connection's life instead, under one cancel scope whose deadline a request sets to never
   and a response's end to `keep_alive_timeout` from now: no task, lock or cancellation per
   request. It ends when the connection's read loop does, so a connection the client closed no
   longer lingers until its idle timeout.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Iterable
from importlib.metadata import version
from typing import Any

import h2.events
import h11
import trio
from hypercorn.events import RawData
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import tcp_server
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import TrioSingleTask

from .errors import error_body

# pyproject's range for hypercorn; the patched code was read on 0.18.0.
SUPPORTED_HYPERCORN = ("0.17.", "0.18.")

# Everything these patches replace or call on hypercorn's classes, with its parameters.
_USED = (
    (H2Protocol, "_handle_events", ["self", "events"]),
    (H2Protocol, "_flush", ["self"]),
    (H11Protocol, "__init__", None),  # wrapped with *args, **kwargs: any signature will do
    (H11Protocol, "_send_error_response", ["self", "status_code"]),
    (TCPServer, "run", ["self"]),
    (TCPServer, "_read_data", ["self"]),
    (TCPServer, "_idle_timeout", ["self"]),
    (TCPServer, "_initiate_server_close", ["self"]),
    (TrioSingleTask, "restart", ["self", "task_group", "action"]),
    (TrioSingleTask, "stop", ["self"]),
)


def _check_shape() -> None:
    found = version("hypercorn")
    missing = [
        f"{cls.__name__}.{name}"
        for cls, name, params in _USED
        if not hasattr(cls, name)
        or (params is not None and list(inspect.signature(getattr(cls, name)).parameters) != params)
    ]
    if getattr(tcp_server, "TrioSingleTask", None) is not TrioSingleTask:
        missing.append("tcp_server.TrioSingleTask")
    if not found.startswith(SUPPORTED_HYPERCORN) or missing:
        raise RuntimeError(
            f"crabtrio.hypercorn_fixes is for hypercorn {'x or '.join(SUPPORTED_HYPERCORN)}x"
            f" and found {found} (changed: {', '.join(missing) or 'none'}); check whether the"
            " bugs it works around are fixed and update or remove the module"
        )


_check_shape()

_original_h2_handle_events = H2Protocol._handle_events
_original_h11_init = H11Protocol.__init__
_original_tcp_run = TCPServer.run
_original_read_data = TCPServer._read_data

# The answers hypercorn gives itself when h11 rejects a request (`error_status_hint`). Our own
# words: h11's messages quote the offending bytes.
_PROTOCOL_ERRORS = {
    400: ("the request is not valid HTTP/1.1 (headers or body framing)", "invalid_http_request"),
    431: ("the request headers are too large", "request_headers_too_large"),
    501: ("only Transfer-Encoding: chunked is supported", "unsupported_transfer_encoding"),
}


async def _h2_handle_events(self: Any, events: list[h2.events.Event]) -> None:
    """hypercorn's event loop, minus its `KeyError` on data for a stream already answered."""
    for event in events:
        if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
            # The app answered and the stream was dropped; nobody will read this body. Return
            # the credit, or the peer's connection window fills and every stream stalls.
            self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        else:
            # One event at a time: the lookup above and hypercorn's own happen with no await
            # between them, so the stream cannot vanish in between.
            await _original_h2_handle_events(self, [event])
    await self._flush()


async def _tcp_run(self: Any) -> None:
    """hypercorn's connection handler; an error in it ends this connection, not the worker."""
    try:
        await _original_tcp_run(self)
    except* Exception as errors:  # Cancelled and KeyboardInterrupt still propagate
        # hypercorn's `finally` has already closed the socket.
        await self.config.log.error(
            "closed a connection after an error in hypercorn's protocol handling", exc_info=errors
        )


class _StrictFraming(h11.Connection):
    """h11's server side, refusing requests with both Content-Length and Transfer-Encoding."""

    def next_event(self) -> Any:
        event = super().next_event()
        if type(event) is h11.Request and _has_both_lengths(event.headers):
            # hypercorn answers a RemoteProtocolError with its error response and then closes
            # the connection (`H11Protocol._handle_events`), so the body is never parsed.
            raise h11.RemoteProtocolError(
                "both Content-Length and Transfer-Encoding", error_status_hint=400
            )
        return event


def _has_both_lengths(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    names = {name for name, _ in headers}  # h11 lower-cases header names
    return b"content-length" in names and b"transfer-encoding" in names


def _h11_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _original_h11_init(self, *args, **kwargs)
    self.connection = _StrictFraming(
        h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
    )


async def _h11_send_error_response(self: Any, status_code: int) -> None:
    """hypercorn's answer to a request h11 rejected, with a JSON body; then it closes."""
    message, code = _PROTOCOL_ERRORS.get(status_code, ("the request was rejected", None))
    body = error_body(status_code, message, "invalid_request_error", code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),
    ]
    # One write, with no await between the events: the app may already be answering the same
    # request (h11 parsed its head, the body was broken), and its h11 event in between would
    # put our side in ERROR and cut this body.
    data = b""
    response = h11.Response(status_code=status_code, headers=headers)
    try:
        for event in (response, h11.Data(data=body), h11.EndOfMessage()):
            data += self.connection.send(event) or b""
    except h11.LocalProtocolError:
        pass  # a HEAD request's answer has no body; hypercorn closes the connection next
    if data:
        await self.send(RawData(data=data))


class _IdleTimer:
    """hypercorn's idle timer (`TrioSingleTask` running `TCPServer._idle_timeout`): the
    connection is closed once it has been idle for `keep_alive_timeout`, or at once when the
    server shuts down while it is idle. One task per connection, started by the first
    `restart`; `stop` (a request arrived) and `restart` (its response ended) only move the
    deadline of the task's cancel scope."""

    __slots__ = ("_scope", "ended")

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        self.ended = False  # the connection's read loop is over: nothing left to close

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        server = action.__self__  # type: ignore[attr-defined]  # TCPServer._idle_timeout
        # Idle after the server began shutting down: closed at once, as hypercorn's does.
        idle_for = 0 if server.context.terminated.is_set() else server.config.keep_alive_timeout
        deadline = trio.current_time() + idle_for
        if self._scope is None:
            self._scope = trio.CancelScope(deadline=deadline)
            task_group._nursery.start_soon(_close_when_idle, self, self._scope, server)
        else:
            self._scope.deadline = deadline

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.deadline = math.inf

    def end(self) -> None:
        self.ended = True
        if self._scope is not None:
            self._scope.cancel()


async def _close_when_idle(timer: _IdleTimer, scope: trio.CancelScope, server: Any) -> None:
    with scope:
        await server.context.terminated.wait()
        if scope.deadline == math.inf:
            # Shut down mid-request: HTTP/1.1 closes after the response (`_maybe_recycle`),
            # which ends the read loop and so this task; HTTP/2 restarts the timer when its
            # last stream ends, and the deadline it sets then is now.
            await trio.sleep_forever()
    if not timer.ended:
        with trio.CancelScope(shield=True):
            await server._initiate_server_close()


async def _read_data(self: Any) -> None:
    try:
        await _original_read_data(self)
    finally:
        self.idle_task.end()


_installed = False


def install() -> None:
    """Patch hypercorn's classes in this process; calling it again changes nothing."""
    global _installed
    if _installed:
        return
    # setattr: mypy rightly refuses assignments to methods; these are the point of the module.
    setattr(H2Protocol, "_handle_events", _h2_handle_events)  # noqa: B010
    setattr(TCPServer, "run", _tcp_run)  # noqa: B010
    setattr(H11Protocol, "__init__", _h11_init)  # noqa: B010
    setattr(H11Protocol, "_send_error_response", _h11_send_error_response)  # noqa: B010
    setattr(TCPServer, "_read_data", _read_data)  # noqa: B010
    setattr(tcp_server, "TrioSingleTask", _IdleTimer)  # noqa: B010
    _installed = True
