"""The OpenAI-compatible routes: chat completions, embeddings, models, health."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any, cast

import orjson
from quart import Blueprint, Request, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from .asgi import PENDING, REQUEST_ID, STARTED, aborted_status
from .audit import PendingRecord
from .errors import (
    Forbidden,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UpstreamRejected,
)
from .providers import call_json, open_stream
from .services import Services, current_services
from .stream import relay

bp = Blueprint("api", __name__)

JSON = "application/json"


def error_response(exc: GatewayError) -> Response:
    return Response(exc.body_bytes(), exc.status, content_type=JSON)


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response:
    return await _proxy("chat")


@bp.post("/v1/embeddings")
async def embeddings() -> Response:
    return await _proxy("embeddings")


async def _proxy(endpoint: str) -> Response:
    """Authenticate, validate, route and forward one request; record it whatever happens."""
    svc = current_services()
    scope = cast("MutableMapping[str, Any]", request.scope)
    pending = PendingRecord(
        svc.audit, svc.config.pricing, scope[REQUEST_ID], endpoint, scope[STARTED]
    )
    scope[PENDING] = pending
    try:
        if not svc.audit.admit():
            pending.done = True  # refused for lack of room in the audit queue: counted instead
            raise Unavailable(
                "the audit log is not keeping up; retry shortly", code="audit_backlog"
            )
        key = svc.keys.authenticate(request.headers.get("authorization"))
        if key is not None:
            pending.key_name = key.name
        body, raw = await _read_object(request)
        payload: bytes | None = raw
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            raise InvalidRequest("'model' is required and must be a string", param="model")
        pending.model = requested
        model = svc.router.resolve(requested)
        if model is None:
            raise NotFound(
                f"model {requested!r} is not served here; GET /v1/models lists the models",
                code="model_not_found",
                param="model",
            )
        pending.model = model
        if key is not None and not key.allows(model, requested):
            raise Forbidden(f"key {key.name!r} may not use model {requested!r}", param="model")
        if model != requested:
            body["model"] = model
            payload = None
        plan = svc.router.plan(model)
        if endpoint == "chat":
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise InvalidRequest("'stream' must be true or false", param="stream")
            if stream:
                return await _start_stream(svc, pending, body, plan)
        content = await call_json(
            svc.upstream, plan, endpoint, body, payload or orjson.dumps(body), pending.set_provider
        )
        pending.set_usage(_usage_of(content))
        await _recorded(svc, pending.finish(200))
        return Response(content, 200, content_type=JSON)
    except GatewayError as exc:
        await _recorded(svc, pending.finish(exc.status, str(exc)))
        return error_response(exc)
    except UpstreamRejected as exc:
        await _recorded(svc, pending.finish(exc.status, str(exc)))
        return Response(exc.body, exc.status, content_type=JSON)


async def _start_stream(
    svc: Services, pending: PendingRecord, body: dict[str, Any], plan: list[Any]
) -> Response:
    pending.stream = True
    options = body.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    if not wants_usage:
        # Ask for usage anyway, for the record; the usage-only chunk is not forwarded.
        body["stream_options"] = {**(options if isinstance(options, dict) else {})}
        body["stream_options"]["include_usage"] = True
    opened = await open_stream(svc.upstream, plan, body, orjson.dumps(body), pending.set_provider)
    scope = cast("MutableMapping[str, Any]", request.scope)
    events = relay(
        opened,
        pending,
        wants_usage=wants_usage,
        aborted_status=lambda: aborted_status(scope),
        wait_recorded=lambda sequence: _recorded(svc, sequence),
    )
    response = Response(
        events,
        200,
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        content_type="text/event-stream",
    )
    response.timeout = None  # Quart's RESPONSE_TIMEOUT would cut long streams
    return response


async def _recorded(svc: Services, sequence: int) -> None:
    """In `sync = "always"` mode, hold the response until its record is fsynced."""
    if svc.config.audit.sync == "always" and sequence:
        await svc.audit.wait_durable(sequence)


async def _read_object(req: Request) -> tuple[dict[str, Any], bytes]:
    try:
        payload = await req.get_data(cache=False)
    except RequestEntityTooLarge:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        raise PayloadTooLarge(f"request body is larger than {limit} bytes") from None
    assert isinstance(payload, bytes)
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return body, payload


def _usage_of(content: bytes) -> Any:
    try:
        answer = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return answer.get("usage") if isinstance(answer, dict) else None


@bp.get("/v1/models")
async def list_models() -> Response:
    svc = current_services()
    key = svc.keys.authenticate(request.headers.get("authorization"))
    config = svc.config
    created = int(time.time())
    data = []
    names = [(model, model) for model in config.models] + list(config.aliases.items())
    for name, model in names:
        if key is not None and not key.allows(model, name):
            continue
        owner = svc.router.providers(model)[0].name
        data.append({"id": name, "object": "model", "created": created, "owned_by": owner})
    return Response(orjson.dumps({"object": "list", "data": data}), 200, content_type=JSON)


@bp.get("/health")
async def health() -> Response:
    svc = current_services()
    audit = svc.audit_statistics().to_dict() if svc.audit.enabled else {"state": "disabled"}
    body = {"status": "ok", "audit": audit}
    return Response(orjson.dumps(body), 200, content_type=JSON)
