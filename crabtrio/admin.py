"""GET /v1/admin/logs: filtered, paginated audit records from the index (admin token)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson
from quart import Blueprint, Response, request

from .audit.index import Cursor
from .auth import check_admin
from .errors import InvalidRequest, Unavailable
from .services import current_services

bp = Blueprint("admin", __name__)

MAX_LIMIT = 1000
READ_YOUR_WRITES_SECONDS = 1.0
_INT_PARAMS = {"since": (0, 2**63 - 1), "until": (0, 2**63 - 1), "status": (100, 599)}
_TEXT_PARAMS = ("key", "model", "provider")
_KNOWN = {*_INT_PARAMS, *_TEXT_PARAMS, "limit", "before"}


def encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(cursor))).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        ts, rid = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError, TypeError):
        raise InvalidRequest(
            "'before' must be a cursor from a previous x-next-cursor header", param="before"
        ) from None
    if type(ts) is not int or not isinstance(rid, str):
        raise InvalidRequest(
            "'before' must be a cursor from a previous x-next-cursor header", param="before"
        )
    return ts, rid


def _integer(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an integer", param=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}", param=name)
    return value


def parse_query(args: Mapping[str, str]) -> dict[str, Any]:
    """Validate the query string; a bad or unknown parameter is a 400 that names it."""
    for name in args:
        if name not in _KNOWN:
            raise InvalidRequest(f"unknown query parameter '{name}'", param=name)
    filters: dict[str, Any] = {name: args[name] for name in _TEXT_PARAMS if name in args}
    if "status" in args:
        filters["status"] = _integer("status", args["status"], *_INT_PARAMS["status"])
    query: dict[str, Any] = {"filters": filters}
    for name in ("since", "until"):
        if name in args:
            query[name] = _integer(name, args[name], *_INT_PARAMS[name])
    query["limit"] = _integer("limit", args["limit"], 1, MAX_LIMIT) if "limit" in args else 100
    if "before" in args:
        query["before"] = decode_cursor(args["before"])
    return query


@bp.get("/v1/admin/logs")
async def logs() -> Response:
    """Matching records, newest first; `x-next-cursor` when more match (pass it as `before`)."""
    svc = current_services()
    check_admin(
        svc.config.admin_token, request.headers.get("authorization"), request.scope.get("client")
    )
    query = parse_query(request.args)
    reader = svc.reader
    if reader is None:
        raise Unavailable("the audit log is disabled in this configuration", code="audit_disabled")
    # Read your writes: what this process accepted is written and indexed before the query.
    await svc.audit.wait_written(timeout=READ_YOUR_WRITES_SECONDS)
    reader.catch_up()
    page = reader.index.query(**query)
    body = b"[" + b",".join(reader.read_lines(page.locations)) + b"]"
    response = Response(body, 200, content_type="application/json")
    if page.next_cursor is not None:
        response.headers["x-next-cursor"] = encode_cursor(page.next_cursor)
    return response
