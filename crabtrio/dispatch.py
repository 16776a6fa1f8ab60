"""RequestDispatch: the ASGI layer in front of every route (request ids, CORS, OPTIONS, and
keeping `http.disconnect` from cancelling the server's own work)."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Literal

import trio

from .body_writer import DirectBody
from .errors import GatewayError, error_body

log = logging.getLogger("crabtrio")

# Keys this layer puts in the ASGI scope for the routes.
REQUEST_ID = "crabtrio.request_id"
STARTED = "crabtrio.started"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Browsers may call these (with `cors_origins`); admin routes and /health never answer CORS.
CORS_PATHS = (
    *("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"),
    "/v1/models",
)
_CORS_ALLOW_HEADERS = b"authorization, content-type, x-api-key, anthropic-version, anthropic-beta"
_CORS_MAX_AGE = b"600"
_HEADER_LIST = re.compile(rb"[A-Za-z0-9\-]+(?:\s*,\s*[A-Za-z0-9\-]+){0,63}")


def new_request_id() -> str:
    return f"{random.getrandbits(128):032x}"


class Exchange:
    """One request's `receive` and `send`, kept from cancelling what the server owns.

    hypercorn delivers `http.disconnect` from inside the app's final `send()`, before its own
    close and keep-alive steps run. A watcher that cancels on that message (quart-trio's, or
    a proxied route's) cancels those steps too, and the connection is never closed. So a
    disconnect is handed to the app only between sends, and never once the final body part
    is on its way: the response is complete and the connection is hypercorn's again.
    """

    __slots__ = (
        "_direct",
        "_receive",
        "_send",
        "_sending",
        "_sent",
        "_start_headers",
        "disconnected",
        "final",
    )

    def __init__(
        self, receive: Receive, send: Send, start_headers: list[tuple[bytes, bytes]]
    ) -> None:
        self._receive = receive
        self._send = send
        self._start_headers = start_headers
        self._sending = False
        # Made only when a disconnect waits for a send to end: a send is once per relayed
        # event, a disconnect once per request at most.
        self._sent: trio.Event | None = None
        self.disconnected = False  # the client went away before the response ended
        self.final = False  # the last body part was handed to the server
        self._direct: DirectBody | Literal[False] | None = None  # None: not looked for yet

    async def send(self, message: Message) -> None:
        kind = message["type"]
        direct = self._direct  # the path straight to the socket (body_writer.py)
        if direct is None:  # looked for once, at the first send
            direct = self._direct = DirectBody.of(self._send) or False
        rest: memoryview | None = None  # what a direct write of a middle part left to finish
        if kind == "http.response.start":
            message["headers"] = [*message["headers"], *self._start_headers]
        elif kind == "http.response.body":
            if not message.get("more_body", False):
                self.final = True
            elif direct and message.get("body"):
                rest = direct.write(message["body"])
                if rest is not None and not rest:
                    return  # all written, nothing awaited: no disconnect to hold back
        self._sending = True
        try:
            if rest:
                assert direct
                await direct.finish(rest)
            elif not direct or not await _direct_send(direct, kind, message, self.final):
                await self._send(message)
        finally:
            self._sending = False
            if self._sent is not None:
                self._sent.set()
                self._sent = None

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            if not self.final:
                self.disconnected = True
            while self._sending:
                if self._sent is None:
                    self._sent = trio.Event()
                await self._sent.wait()
            if self.final:
                await trio.sleep_forever()  # the caller is cancelled when its work ends
        return message


async def _direct_send(direct: DirectBody, kind: str, message: Message, final: bool) -> bool:
    """A response's head, or its last part and end, sent by the direct path; False where it
    cannot (nothing was sent)."""
    if kind == "http.response.start":
        return await direct.start(message)
    if kind == "http.response.body" and final:
        return await direct.end(message.get("body", b""))
    return False


class RequestDispatch:
    """Wraps the app: ids every request, answers OPTIONS and CORS, and routes the proxied
    paths to their handlers (every other path to `app`) through an `Exchange`."""

    def __init__(
        self,
        app: ASGIApp,
        handlers: Mapping[str, ASGIApp],
        cors_origins: Callable[[], tuple[str, ...]],
    ) -> None:
        self.app = app
        self.handlers = handlers
        self.cors_origins = cors_origins  # read per request: the config loads at startup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope[REQUEST_ID] = request_id
        scope[STARTED] = time.perf_counter()
        extra = [(b"x-request-id", request_id.encode())]
        path = scope["path"]
        origin = self._cors_origin(scope) if path in CORS_PATHS else None
        if origin is not None:
            extra += [
                (b"access-control-allow-origin", origin),
                (b"access-control-expose-headers", b"x-request-id"),
                (b"vary", b"origin"),
            ]
        exchange = Exchange(receive, send, extra)
        if "//" in path:  # werkzeug would serve `//v1/models` as /v1/models, or redirect
            body = error_body(404, "no such route", "invalid_request_error", "not_found")
            await send_json(exchange.send, 404, body)
            return
        if scope["method"] == "OPTIONS":
            await _options(exchange, scope, origin is not None)
            return
        handler = self.handlers.get(path, self.app)
        await handler(scope, exchange.receive, exchange.send)

    def _cors_origin(self, scope: Scope) -> bytes | None:
        """The value for `access-control-allow-origin`, if this request's origin may call."""
        allowed = self.cors_origins()
        if not allowed:
            return None
        origin = next((v for k, v in scope["headers"] if k == b"origin"), None)
        if origin is None:
            return None
        if "*" in allowed:
            return b"*"
        return origin if origin.decode("latin-1") in allowed else None


async def _options(exchange: Exchange, scope: Scope, cors: bool) -> None:
    """A CORS preflight for an allowed origin gets a 204; any other OPTIONS a 405."""
    if cors:
        methods = b"GET" if scope["path"] == "/v1/models" else b"POST"
        # SDKs send headers of their own (x-stainless-*, openai-beta): allow what is asked
        # for when it is a plain list of header names.
        asked = next(
            (v for k, v in scope["headers"] if k == b"access-control-request-headers"), b""
        )
        allowed = asked if _HEADER_LIST.fullmatch(asked) else _CORS_ALLOW_HEADERS
        headers = [
            (b"access-control-allow-methods", methods),
            (b"access-control-allow-headers", allowed),
            (b"access-control-max-age", _CORS_MAX_AGE),
            (b"content-length", b"0"),
        ]
        await exchange.send({"type": "http.response.start", "status": 204, "headers": headers})
        await exchange.send({"type": "http.response.body", "body": b""})
        return
    body = error_body(
        405, "OPTIONS is not served here", "invalid_request_error", "method_not_allowed"
    )
    await send_json(exchange.send, 405, body)


async def send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A whole response, for the routes served straight from ASGI: JSON unless `extra`
    names another content-type."""
    extra = extra or []
    headers = [(b"content-length", b"%d" % len(body))]
    if not any(name == b"content-type" for name, _ in extra):
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body})


async def method_not_allowed(send: Send, allow: bytes) -> None:
    message = f"use {allow.decode()}"
    body = error_body(405, message, "invalid_request_error", "method_not_allowed")
    await send_json(send, 405, body, [(b"allow", allow)])


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (the first, when repeated)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


# A GET route's body (JSON unless a content-type is among the headers) and extra headers.
Answer = tuple[bytes, list[tuple[bytes, bytes]]]


async def serve_get(
    scope: Scope, send: Send, route: str, answer: Callable[[], Awaitable[Answer]]
) -> None:
    """Serve a GET (or HEAD) route from ASGI: its answer, or its GatewayError in OpenAI's
    shape, or a 500 that says to look at the log."""
    if scope["method"] not in ("GET", "HEAD"):
        await method_not_allowed(send, b"GET, HEAD")
        return
    try:
        body, extra = await answer()
    except GatewayError as exc:
        await send_json(send, exc.status, exc.body_bytes())
        return
    except Exception:
        log.exception("crabtrio: unexpected error on %s", route)
        await send_json(
            send, 500, GatewayError("internal error; see the gateway's log").body_bytes()
        )
        return
    await send_json(send, 200, b"" if scope["method"] == "HEAD" else body, extra)
