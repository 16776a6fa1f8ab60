"""The Quart routes beside the proxied ones: GET /v1/models and GET /health."""

from __future__ import annotations

import time

import orjson
from quart import Blueprint, Response, request

from .services import current_services

bp = Blueprint("api", __name__)

JSON = "application/json"


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
    response = Response(orjson.dumps({"object": "list", "data": data}), 200, content_type=JSON)
    if key is not None and key.limited:  # where the key stands; listing counts nothing
        for header, value in svc.admission.headers(key):
            response.headers[header.decode()] = value.decode()
    return response


@bp.get("/health")
async def health() -> Response:
    """200 `ok` while every owned task works; 503 `degraded` while the audit log cannot be
    written (chat is refused meanwhile) or its index cannot follow the file. With shipping
    to PostgreSQL on, `shipping` says how far behind it is."""
    svc = current_services()
    if svc.audit.enabled:
        stats = svc.audit.statistics()
        healthy, audit = stats.healthy, stats.to_dict()
    else:
        healthy, audit = True, {"state": "disabled"}
    body = {"status": "ok" if healthy else "degraded", "audit": audit}
    shipping = svc.audit.shipping()
    if shipping is not None:  # shipping's state never makes the gateway unhealthy: its
        body["shipping"] = shipping  # records wait in the files meanwhile
    return Response(orjson.dumps(body), 200 if healthy else 503, content_type=JSON)
