"""Query-string parameters of the admin and usage routes: strict, and a 400 that names the
parameter for anything unknown, repeated or malformed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import InvalidRequest

# Longest key, model, provider or instance filter. Longer ones are rejected, not clipped: a
# clipped filter would quietly match other values (and a record's model is clipped to 256).
MAX_FILTER_CHARS = 256
_INT_PARAMS = {"since": (0, 2**63 - 1), "until": (0, 2**63 - 1), "status": (100, 599)}
_TEXT_PARAMS = ("key", "model", "provider")
SCOPES = ("local", "fleet")
# What selects records on every such route: filters, a time range, and where to look.
SELECTION_PARAMS = {*_INT_PARAMS, *_TEXT_PARAMS, "scope", "instance"}


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


def scope_params(args: dict[str, str]) -> tuple[bool, str | None]:
    """Whether `scope=fleet` (every replica's records, from PostgreSQL), and the `instance`
    filter, which only a fleet scope takes."""
    scope = args.get("scope", "local")
    if scope not in SCOPES:
        raise InvalidRequest("'scope' must be 'local' or 'fleet'", param="scope")
    if "instance" not in args:
        return scope == "fleet", None
    if scope != "fleet":
        raise InvalidRequest("'instance' needs scope=fleet", param="instance")
    return True, text_param(args, "instance")
