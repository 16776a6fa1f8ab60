"""The ASGI layer around the Quart app: request ids, disconnect notice, last-resort records."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

# Keys this layer puts in the ASGI scope for the routes.
REQUEST_ID = "crabtrio.request_id"
STARTED = "crabtrio.started"
PENDING = "crabtrio.pending"  # the route's PendingRecord, if it records one
DISCONNECTED = "crabtrio.disconnected"  # the client went away before the response ended

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


def new_request_id() -> str:
    return f"{random.getrandbits(128):032x}"


def aborted_status(scope: Scope) -> int:
    """The status to record for a request cut off: 499 if the client left, else 503."""
    return 499 if scope.get(DISCONNECTED) else 503


class RequestScope:
    """Wraps the app: every response gets `x-request-id`; no audited request goes unrecorded.

    Paths in `handlers` are served by those handlers, every other request by `app`. A request
    cancelled before its handler could record (a client that left, a server cutting requests
    at the end of its graceful window) is recorded here, after it returns or is cancelled.
    """

    def __init__(self, app: ASGIApp, handlers: Mapping[str, ASGIApp]) -> None:
        self.app = app
        self.handlers = handlers

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope[REQUEST_ID] = request_id
        scope[STARTED] = time.perf_counter()
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], header]
            await send(message)

        async def receive_noting_disconnect() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope[DISCONNECTED] = True
            return message

        handler = self.handlers.get(scope["path"], self.app)
        try:
            await handler(scope, receive_noting_disconnect, send_with_id)
        finally:
            pending = scope.get(PENDING)
            if pending is not None and not pending.done:
                status = aborted_status(scope)
                reason = "client disconnected" if status == 499 else "cut by the server"
                pending.finish(status, f"{reason} before the response was complete")
