"""GET /v1/admin/logs: filtered, paginated audit records (admin token), from this host's
index, or with `scope=fleet` from every replica's records in PostgreSQL."""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl

import orjson

from .audit.columns import Cursor
from .auth import check_admin
from .dispatch import Receive, Scope, Send, header, method_not_allowed, send_json
from .errors import GatewayError, InvalidRequest
from .services import Services

MAX_LIMIT = 1000
# Longest key, model or provider filter. Longer ones are rejected, not clipped: a clipped
# filter would quietly match other values (and a record's model is clipped to 256 chars).
MAX_FILTER_CHARS = 256
# Cursor bounds: timestamps are ms, so 2**53 (the largest safe integer in JavaScript) is
# far past any real one; the tie-breaker is the hex of a request id's first 16 bytes.
MAX_CURSOR_TIMESTAMP = 2**53 - 1
MAX_CURSOR_ID_CHARS = 32
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_INT_PARAMS = {"since": (0, 2**63 - 1), "until": (0, 2**63 - 1), "status": (100, 599)}
_TEXT_PARAMS = ("key", "model", "provider")
_KNOWN = {*_INT_PARAMS, *_TEXT_PARAMS, "limit", "before", "scope", "instance"}
SCOPES = ("local", "fleet")
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


def integer_param(name: str, text: str, low: int, high: int) -> int:
    """ASCII digits only: int() would also take "+5", " 5", "1_000" and other scripts' digits."""
    # 19 digits hold any bound here, and int() is never handed thousands of digits.
    if not (0 < len(text) <= 19 and text.isascii() and text.isdigit()):
        raise InvalidRequest(f"'{name}' must be a non-negative integer", param=name)
    value = int(text)
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}", param=name)
    return value


def query_args(pairs: Iterable[tuple[str, str]], known: set[str]) -> dict[str, str]:
    """The query string's (name, value) pairs as a dict: an unknown or repeated parameter
    is a 400 that names it."""
    args: dict[str, str] = {}
    for name, value in pairs:
        if name not in known:
            raise InvalidRequest(f"unknown query parameter '{name}'", param=name)
        if name in args:
            raise InvalidRequest(f"query parameter '{name}' is given more than once", param=name)
        args[name] = value
    return args


def text_param(args: dict[str, str], name: str) -> str:
    if len(args[name]) > MAX_FILTER_CHARS:
        raise InvalidRequest(f"'{name}' must be at most {MAX_FILTER_CHARS} characters", param=name)
    return args[name]


def filter_params(args: dict[str, str]) -> dict[str, Any]:
    """The `key`, `model`, `provider` and `status` filters given."""
    filters: dict[str, Any] = {
        name: text_param(args, name) for name in _TEXT_PARAMS if name in args
    }
    if "status" in args:
        filters["status"] = integer_param("status", args["status"], *_INT_PARAMS["status"])
    return filters


def time_params(args: dict[str, str]) -> dict[str, int]:
    """`since` and `until` (ms since the epoch), when given."""
    return {
        name: integer_param(name, args[name], *_INT_PARAMS[name])
        for name in ("since", "until")
        if name in args
    }


def parse_query(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Validate /v1/admin/logs' query string (name, value) pairs, in order and repeats
    included. An unknown, repeated or bad parameter is a 400 that names it."""
    args = query_args(pairs, _KNOWN)
    filters = filter_params(args)
    query: dict[str, Any] = {"filters": filters, **time_params(args)}
    query["limit"] = integer_param("limit", args["limit"], 1, MAX_LIMIT) if "limit" in args else 100
    if "before" in args:
        query["before"] = decode_cursor(args["before"])
    scope = args.get("scope", "local")
    if scope not in SCOPES:
        raise InvalidRequest("'scope' must be 'local' or 'fleet'", param="scope")
    if scope == "fleet":
        query["scope"] = scope
    if "instance" in args:
        if scope != "fleet":
            raise InvalidRequest("'instance' needs scope=fleet", param="instance")
        query["instance"] = text_param(args, "instance")
    return query


LOGS = "/v1/admin/logs"
log = logging.getLogger("crabtrio")


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
