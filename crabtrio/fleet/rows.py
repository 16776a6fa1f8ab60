"""Audit lines as the rows the fleet table holds (see sql/001_initial.sql and the
migrations after it)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import orjson

from ..audit.record import Status, Timestamp

# The table's columns in COPY order: a record's fields, `extra`, then `instance`.
COLUMNS = (
    "request_id",
    "timestamp",
    "key_name",
    "model",
    "provider",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "latency_ms",
    "status",
    "stream",
    "endpoint",
    "error",
    "cache_read_tokens",
    "cache_creation_tokens",
    "seq",
    "chain",
    "extra",
    "instance",
)
RECORD_FIELDS = COLUMNS[:-2]
_INT64 = msgspec.Meta(ge=-(2**63), le=2**63 - 1)
# What `extra` holds for unknown fields whose values cannot be stored: their names.
UNSTORABLE = "crabtrio_unstorable_fields"


class ShippedFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every field a record of this version has, in column order. The types are the index's
    (see `audit.record.IndexedFields`): a line that is no record is skipped by both."""

    request_id: str
    timestamp: Timestamp
    key_name: str
    model: str
    provider: str
    prompt_tokens: Annotated[int, _INT64] | None = None
    completion_tokens: Annotated[int, _INT64] | None = None
    cost_micros: Annotated[int, _INT64]
    latency_ms: Annotated[int, _INT64]
    status: Status
    stream: bool | None = None
    endpoint: str | None = None
    error: str | None = None
    cache_read_tokens: Annotated[int, _INT64] | None = None
    cache_creation_tokens: Annotated[int, _INT64] | None = None
    seq: Annotated[int, _INT64] | None = None
    chain: str | None = None


_DECODER = msgspec.json.Decoder(ShippedFields)
_LOOSE = msgspec.json.Decoder(dict[str, Any])
_astuple = msgspec.structs.astuple


def rows(data: bytes, instance: str) -> tuple[list[tuple[Any, ...]], int]:
    """The rows of `data` (whole JSONL lines), and how many lines were skipped as no record.

    The common case decodes in C, typed; a line with fields this version has no column for
    (written by a newer gateway) keeps them in `extra`, and text PostgreSQL cannot store
    (NUL) is replaced, so one line never stops shipping.
    """
    tail = (None, instance)
    if b"\\u0000" not in data:
        try:
            decoded = _DECODER.decode_lines(data)
        except (msgspec.MsgspecError, ValueError, RecursionError):
            pass  # some line is unusual: go line by line
        else:
            return [_astuple(fields) + tail for fields in decoded], 0
    out, skipped = [], 0
    for line in data.splitlines():
        if not line.strip():
            continue  # as decode_lines does
        row = _row(line, instance)
        if row is None:
            skipped += 1
        else:
            out.append(row)
    return out, skipped


def _row(line: bytes, instance: str) -> tuple[Any, ...] | None:
    try:
        raw = _LOOSE.decode(line)
    except (msgspec.MsgspecError, ValueError, RecursionError):  # deep nesting: no record
        return None
    known = {name: raw.pop(name) for name in RECORD_FIELDS if name in raw}
    try:
        fields = msgspec.convert(known, ShippedFields)
    except msgspec.ValidationError:
        return None
    values = tuple(_text(value) for value in _astuple(fields))
    extra = None
    if raw:
        try:
            extra = orjson.dumps(_text(raw)).decode()
        except (TypeError, RecursionError):  # a huge integer, deep nesting: named, not kept
            extra = orjson.dumps({UNSTORABLE: sorted(_text(name) for name in raw)}).decode()
    return (*values, extra, instance)


def _text(value: Any) -> Any:
    """`value` without NUL characters (PostgreSQL's text and jsonb cannot hold them)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


def record(row: Any) -> dict[str, Any]:
    """A fleet row (an asyncpg Record) in the JSONL record's shape, plus `instance`."""
    out: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        value = row[name]
        if value is not None or name in _ALWAYS:
            out[name] = value
    extra = row["extra"]
    if extra:
        out.update(orjson.loads(extra))
    out["instance"] = row["instance"]
    return out


# Fields every record has; the others appear only when set (as `AuditRecord.to_dict`).
_OPTIONAL = ("prompt_tokens", "completion_tokens", "error", "cache_read_tokens")
_ALWAYS = frozenset(RECORD_FIELDS) - {*_OPTIONAL, "cache_creation_tokens", "seq", "chain"}
