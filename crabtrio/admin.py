"""GET /v1/admin/logs: filtered, paginated audit records (admin token), from this host's
index, or with `scope=fleet` from every replica's records in PostgreSQL; and GET
/v1/admin/chain: the hash chain's head, for an external system to pin."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

import orjson

from .audit.columns import Cursor
from .auth import check_admin
from .dispatch import Answer, Receive, Scope, Send, header, serve_get
from .errors import InvalidRequest
from .params import (
    SELECTION_PARAMS,
    filter_params,
    integer_param,
    query_args,
    scope_params,
    time_params,
)
from .services import Services

MAX_LIMIT = 1000
# Cursor bounds: timestamps are ms, so 2**53 (the largest safe integer in JavaScript) is
# far past any real one; the tie-breaker is the hex of a request id's first 16 bytes.
MAX_CURSOR_TIMESTAMP = 2**53 - 1
MAX_CURSOR_ID_CHARS = 32
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_KNOWN = {*SELECTION_PARAMS, "limit", "before"}
# Unpadded base64url; the longest valid cursor is 70 characters.
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,100}")
_BAD_CURSOR = "'before' must be a cursor from a previous x-next-cursor header"


def encode_cursor(cursor: Cursor) -> str:
    ts, tie = cursor
    return base64.urlsafe_b64encode(orjson.dumps([ts, tie.hex()])).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    """The cursor `encode_cursor` made: unpadded base64url of `[timestamp, tie-breaker]`
    (the tie-breaker in hex)."""
    if _CURSOR.fullmatch(text) is None:
        raise InvalidRequest(_BAD_CURSOR, param="before")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):  # orjson.JSONDecodeError is a ValueError
        raise InvalidRequest(_BAD_CURSOR, param="before") from None
    if not (type(value) is list and len(value) == 2):
        raise InvalidRequest(_BAD_CURSOR, param="before")
    ts, tie = value
    if not (
        type(ts) is int
        and 0 <= ts <= MAX_CURSOR_TIMESTAMP
        and type(tie) is str
        and 0 < len(tie) <= MAX_CURSOR_ID_CHARS
        and _HEX.fullmatch(tie)
    ):
        raise InvalidRequest(_BAD_CURSOR, param="before")
    return ts, bytes.fromhex(tie)


def parse_query(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Validate /v1/admin/logs' query string (name, value) pairs, in order and repeats
    included. An unknown, repeated or bad parameter is a 400 that names it."""
    args = query_args(pairs, _KNOWN)
    query: dict[str, Any] = {"filters": filter_params(args), **time_params(args)}
    query["limit"] = integer_param("limit", args["limit"], 1, MAX_LIMIT) if "limit" in args else 100
    if "before" in args:
        query["before"] = decode_cursor(args["before"])
    fleet, instance = scope_params(args)
    if fleet:
        query["scope"] = "fleet"
    if instance is not None:
        query["instance"] = instance
    return query


LOGS = "/v1/admin/logs"


async def serve_logs(svc: Services, scope: Scope, receive: Receive, send: Send) -> None:
    """GET /v1/admin/logs: matching records, newest first; `x-next-cursor` when more match
    (pass it as `before`). Served straight from ASGI, like the proxied routes: Quart's
    per-request machinery costs more than the query itself."""

    async def answer() -> Answer:
        check_admin(svc.config.admin_token, header(scope, b"authorization"), scope.get("client"))
        text = scope["query_string"].decode("latin-1")
        query = parse_query(parse_qsl(text, keep_blank_values=True, errors="replace"))
        if query.pop("scope", "local") == "fleet":
            records, next_cursor = await svc.audit.fleet_query(**query)
            lines = [orjson.dumps(record) for record in records]
        else:
            lines, next_cursor = await svc.audit.query(**query)
        extra = (
            [] if next_cursor is None else [(b"x-next-cursor", encode_cursor(next_cursor).encode())]
        )
        return b"[" + b",".join(lines) + b"]", extra

    await serve_get(scope, send, LOGS, answer)


CHAIN = "/v1/admin/chain"


async def serve_chain(svc: Services, scope: Scope, receive: Receive, send: Send) -> None:
    """GET /v1/admin/chain: `{"head": <the last record's chain>, "seq": <its seq>,
    "records": <every retained record>}`. Records this process accepted are in it."""

    async def answer() -> Answer:
        check_admin(svc.config.admin_token, header(scope, b"authorization"), scope.get("client"))
        if scope["query_string"]:
            raise InvalidRequest("this route takes no parameters")
        head, records = await svc.audit.chain()
        return orjson.dumps({"head": head.chain, "seq": head.seq, "records": records}), []

    await serve_get(scope, send, CHAIN, answer)
