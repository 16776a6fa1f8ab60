"""POST /v1/chat/completions, /v1/embeddings, /v1/responses and /v1/messages: the proxied
routes, served straight from ASGI (what differs between their APIs is in `apis`).

These two routes are the gateway's hot path. Quart's per-request machinery (request context,
signals, a nursery with two tasks, Response objects) cost 140 µs of CPU and 0.11 ms of
latency per request here, as much as everything crabtrio itself does; so they are served by
this module, inside the Quart app's ASGI layer, doing only what they need: read the body with
a size limit and a timeout, watch for a client leaving, answer in OpenAI's error shape.
Every other route is a Quart route.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import trio

from . import apis
from .apis import Api
from .audit import PendingRecord
from .audit.record import clip
from .config import KeyConfig, ProviderConfig
from .deadline import Deadline
from .dispatch import (
    REQUEST_ID,
    STARTED,
    Receive,
    Scope,
    Send,
    header,
    method_not_allowed,
    send_json,
)
from .errors import (
    Forbidden,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
)
from .services import Services
from .stream import ChatEvents, Events, TypedEvents, relay

log = logging.getLogger("crabtrio")

ROUTES = apis.ROUTES
# Like Quart's BODY_TIMEOUT: a client has this long to send its whole request body.
BODY_TIMEOUT_SECONDS = 60.0

_SSE = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


async def serve(svc: Services, api: Api, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one request to a proxied route. Its record is made here, whatever happens:
    by the step that answers, or at the end for a request cut off before it could answer."""
    if scope["method"] != "POST":
        await method_not_allowed(send, b"POST")
        return
    pending = PendingRecord(
        svc.audit, svc.config.pricing, scope[REQUEST_ID], api.endpoint, scope[STARTED]
    )
    client = _Client(receive)
    try:
        try:
            request = await _accept(svc, api, scope, client, pending)
        except GatewayError as exc:
            await _send_error(svc, api, send, pending, exc)
            return
        except _ClientGone:
            return
        # From here on a client that leaves cancels the work (and is recorded as 499).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.watch, nursery.cancel_scope)
            try:
                await _forward(svc, api, send, pending, request)
            except Exception:
                log.exception("crabtrio: unexpected error on %s", scope["path"])
                internal = GatewayError("internal error; see the log")
                await _send_error(svc, api, send, pending, internal)
            nursery.cancel_scope.cancel()
    finally:
        if not pending.done:
            status, reason = (
                (499, "client disconnected") if client.gone else (503, "cut by the server")
            )
            pending.finish(status, f"{reason} before the response was complete")


class _Client:
    """The request's side of `receive`: its body, and whether it went away."""

    __slots__ = ("gone", "receive")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.gone = False

    async def watch(self, scope: trio.CancelScope) -> None:
        """Cancel `scope` (the request's own work) when the client disconnects."""
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        scope.cancel()

    async def read_body(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        try:
            with Deadline(BODY_TIMEOUT_SECONDS):
                while True:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        self.gone = True
                        raise _ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(parts)
        except trio.TooSlowError:
            raise RequestTimeout(
                f"the request body did not arrive within {BODY_TIMEOUT_SECONDS:g}s"
            ) from None


class _Request:
    __slots__ = ("body", "headers", "plan", "upstream_headers")

    def __init__(self, body: dict[str, Any], plan: list[ProviderConfig]) -> None:
        self.body, self.plan = body, plan
        self.headers: list[tuple[bytes, bytes]] = []  # for the response (x-ratelimit-*)
        self.upstream_headers: list[tuple[str, str]] = []  # the client's, passed on


async def _accept(
    svc: Services, api: Api, scope: Scope, client: _Client, pending: PendingRecord
) -> _Request:
    """Admit, authenticate, read and validate the request, and resolve its route."""
    if not svc.audit.admit():
        pending.done = True  # refused because nothing could be recorded: counted instead
        raise Unavailable(
            "the audit log cannot record requests right now; retry shortly", code="audit_backlog"
        )
    api_key = header(scope, b"x-api-key") if api.anthropic else None
    key = svc.keys.authenticate(header(scope, b"authorization"), api_key, x_api_key=api.anthropic)
    if key is None:
        return await _read_request(svc, api, scope, client, pending, None)
    pending.key_name = key.name
    try:
        request = await _read_request(svc, api, scope, client, pending, key)
    except GatewayError as exc:
        if key.limited and not exc.headers:  # where the key stands, on every answer
            exc.headers = svc.admission.headers(key)
        raise
    # Last, so that only a request that would go upstream counts against the key's rate.
    request.headers = svc.admission.check(key)
    pending.meter = svc.admission.meter(key)
    return request


async def _read_request(
    svc: Services,
    api: Api,
    scope: Scope,
    client: _Client,
    pending: PendingRecord,
    key: KeyConfig | None,
) -> _Request:
    """Read and validate the body, and resolve the model and its providers."""
    limit = svc.config.max_body_bytes
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    raw = await client.read_body(limit)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    pending.model = requested
    model = svc.router.resolve(requested)
    if model is None:
        raise NotFound(
            f"model {clip(requested)!r} is not served here; GET /v1/models lists the models",
            code="model_not_found",
            param="model",
        )
    pending.model = model
    if key is not None and not key.allows(model, requested):
        raise Forbidden(f"key {key.name!r} may not use model {clip(requested)!r}", param="model")
    body["model"] = model
    if api.streams:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be true or false", param="stream")
        pending.stream = stream
    plan = svc.router.plan(model, api.kinds)
    if not plan:
        raise NotFound(
            f"model {clip(requested)!r} is served by no provider that speaks the "
            f"{api.endpoint} API here",
            code="model_not_found",
            param="model",
        )
    request = _Request(body, plan)
    if api is apis.RESPONSES:
        previous = body.get("previous_response_id")
        if isinstance(previous, str) and len(plan) > 1:
            request.plan = _continuing(svc, previous, plan)
    elif api is apis.MESSAGES:
        version = header(scope, b"anthropic-version") or apis.ANTHROPIC_VERSION
        request.upstream_headers.append(("anthropic-version", version))
        beta = header(scope, b"anthropic-beta")
        if beta:
            request.upstream_headers.append(("anthropic-beta", beta))
    return request


def _continuing(svc: Services, previous: str, plan: list[ProviderConfig]) -> list[ProviderConfig]:
    """A request that continues a stored response goes to the provider that made it (no other
    can resolve its id), when the gateway relayed that response; else the normal plan."""
    name = svc.affinity.provider(previous)
    chosen = [provider for provider in plan if provider.name == name]
    return chosen or plan


async def _forward(
    svc: Services, api: Api, send: Send, pending: PendingRecord, request: _Request
) -> None:
    """Call the upstream and answer. The body goes upstream as parsed and re-encoded, never as
    the client's bytes: with duplicate keys (`{"model":"a","model":"b"}`) orjson keeps the
    last, other parsers the first, and the upstream must serve exactly what was authorized."""
    try:
        if pending.stream:
            await _stream(svc, api, send, pending, request)
            return
        content = await svc.upstream.call_json(
            request.plan,
            api.upstream_path,
            orjson.dumps(request.body),
            pending.set_provider,
            request.upstream_headers,
        )
        answer = _parsed(content)
        pending.set_usage(answer.get("usage"), api.usage)
        await svc.audit.settle(pending.finish(200))
        if api is apis.RESPONSES and isinstance(answer.get("id"), str):
            svc.affinity.remember(answer["id"], pending.provider)
        await send_json(send, 200, content, request.headers)
    except GatewayError as exc:
        await _send_error(svc, api, send, pending, exc, request.headers)


async def _stream(
    svc: Services, api: Api, send: Send, pending: PendingRecord, request: _Request
) -> None:
    body = request.body
    watcher: Events
    if api is apis.CHAT:
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if not wants_usage:
            # Ask for usage anyway, for the record; the usage-only chunk is not forwarded.
            body["stream_options"] = {**(options if isinstance(options, dict) else {})}
            body["stream_options"]["include_usage"] = True
        watcher = ChatEvents(pending, wants_usage)
    else:  # their streams carry usage unasked
        watcher = TypedEvents(pending, api)
    opened = await svc.upstream.open_stream(
        request.plan,
        api.upstream_path,
        orjson.dumps(body),
        pending.set_provider,
        request.upstream_headers,
    )

    async def send_part(data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    try:
        headers = [*_SSE, *request.headers]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await relay(
            opened,
            pending,
            watcher,
            api,
            send_part=send_part,
            wait_recorded=svc.audit.settle,
        )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await opened.aclose()  # shielded: also after a client left or the server cut us off
        if watcher.response_id is not None and pending.provider:
            svc.affinity.remember(watcher.response_id, pending.provider)


async def _send_error(
    svc: Services,
    api: Api,
    send: Send,
    pending: PendingRecord,
    exc: GatewayError,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Record the error, then answer it in the API's shape (with the request's headers, and
    the error's)."""
    try:
        await svc.audit.settle(pending.finish(exc.status, str(exc)))
    except GatewayError as durability:  # the error's own record could not be made durable
        exc = durability
    await send_json(send, exc.status, api.error_body(exc), [*(headers or ()), *exc.headers])


def _parsed(content: bytes) -> dict[str, Any]:
    """An upstream's JSON answer as an object ({} if it is none: relayed all the same)."""
    try:
        answer = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {}
    return answer if isinstance(answer, dict) else {}
