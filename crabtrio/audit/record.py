"""AuditRecord: one request's audit line, its JSONL encoding, validation and cost."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import orjson

log = logging.getLogger(__name__)

# Longest text we copy from a request or an error into a record, so one line stays small.
MAX_FIELD_CHARS = 256
# Largest cost a record holds: it must fit the signed 64-bit integers of JSON readers.
MAX_COST_MICROS = 2**63 - 1
# What a record that could not be encoded holds in place of a text field that is no string.
UNENCODABLE = "<unencodable>"

_dumps = orjson.dumps
_OPTIONS = orjson.OPT_APPEND_NEWLINE


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """Field names and types follow crabllm's audit records, plus stream, endpoint and error."""

    request_id: str
    timestamp: int
    key_name: str
    model: str
    provider: str
    cost_micros: int
    latency_ms: int
    status: int
    stream: bool
    endpoint: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    # Anthropic's prompt caching (Messages API only): input tokens not in prompt_tokens.
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "timestamp": self.timestamp,
            "key_name": self.key_name,
            "model": self.model,
            "provider": self.provider,
        }
        if self.prompt_tokens is not None:
            out["prompt_tokens"] = self.prompt_tokens
        if self.completion_tokens is not None:
            out["completion_tokens"] = self.completion_tokens
        if self.cache_read_tokens is not None:
            out["cache_read_tokens"] = self.cache_read_tokens
        if self.cache_creation_tokens is not None:
            out["cache_creation_tokens"] = self.cache_creation_tokens
        out["cost_micros"] = self.cost_micros
        out["latency_ms"] = self.latency_ms
        out["status"] = self.status
        out["stream"] = self.stream
        out["endpoint"] = self.endpoint
        if self.error is not None:
            out["error"] = self.error
        return out

    def to_line(self) -> bytes:
        """One JSONL line, exactly as `encode_batch` writes it."""
        return _escape_spoofing(_line(self))


def encode_batch(batch: Sequence[AuditRecord]) -> bytes:
    """The JSONL lines of `batch`: always exactly one line per record, each one a record.

    orjson escapes control characters, so no line holds a raw newline; line and paragraph
    separators and bidi controls are escaped too. A record orjson cannot encode (a lone
    surrogate in a string, an integer beyond 64 bits) is written with what can be encoded
    and an `error` that says so, instead of failing the whole batch.
    """
    try:
        data = b"".join([_dumps(record.to_dict(), option=_OPTIONS) for record in batch])
    except TypeError:  # orjson.JSONEncodeError is a TypeError: redo record by record
        data = b"".join([_line(record) for record in batch])
    return _escape_spoofing(data)


def _line(record: AuditRecord) -> bytes:
    try:
        return _dumps(record.to_dict(), option=_OPTIONS)
    except TypeError as exc:
        return _dumps(_salvaged(record, exc), option=_OPTIONS)


_TEXT_FIELDS = ("request_id", "key_name", "model", "provider", "endpoint", "error")
_INT_FIELDS = (
    "timestamp",
    "cost_micros",
    "latency_ms",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "cache_creation_tokens",
)
# Integers `decode_fields` needs, and what stands in for one that cannot be encoded.
_REQUIRED_INTS = {"cost_micros": 0, "latency_ms": 0, "status": 500}


def _salvaged(record: AuditRecord, exc: TypeError) -> dict[str, Any]:
    """The fields of `record` that can be encoded, so its line is still a record.

    Strings with unencodable characters (lone surrogates) get "?" for them; a text field
    that is not a string becomes UNENCODABLE; an integer outside signed 64 bits is dropped, or
    replaced when `decode_fields` needs it (the timestamp by the time of writing).
    """
    fields = record.to_dict()
    out: dict[str, Any] = {}
    bad: list[str] = []
    for name, value in fields.items():
        if name in _TEXT_FIELDS:
            if not isinstance(value, str):
                bad.append(name)
                value = UNENCODABLE
            elif not _encodes(value):
                bad.append(name)
                value = value.encode("utf-8", "replace").decode("utf-8")
        elif name in _INT_FIELDS:
            if type(value) is not int or not -(2**63) <= value < 2**63:
                bad.append(name)
                if name == "timestamp":
                    value = time.time_ns() // 1_000_000
                elif name in _REQUIRED_INTS:
                    value = _REQUIRED_INTS[name]
                else:
                    continue
        elif name == "stream" and type(value) is not bool:
            bad.append(name)
            continue
        out[name] = value
    note = "audit record could not be fully encoded"
    if bad:
        note += f" ({', '.join(bad)})"
    out["error"] = f"{out['error']}; {note}" if "error" in out else note
    log.warning("audit: record %s: %s: %s", out["request_id"], note, exc)
    return out


def _encodes(text: str) -> bool:
    try:
        _dumps(text)
    except TypeError:
        return False
    return True


# orjson writes U+2028, U+2029 and the bidi controls (U+061C, U+200E, U+200F, U+202A-U+202E,
# U+2066-U+2069) raw; in a terminal that tails the file they break or reorder what is shown.
_ESCAPES = {
    char.encode(): b"\\u%04x" % ord(char)
    for char in "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
    "\u2066\u2067\u2068\u2069"
}
# The same characters as UTF-8, factored by their lead bytes.
_SPOOFING = re.compile(rb"\xd8\x9c|\xe2(?:\x80[\x8e\x8f\xa8-\xae]|\x81[\xa6-\xa9])")


def _escape_spoofing(data: bytes) -> bytes:
    """`data` (orjson's output) with those characters as JSON escapes (they only occur
    inside strings). All-ASCII batches, nearly all of them, cost one `isascii` (14 ns per
    record); the regex runs over the others only (2.3 µs per 250-byte record, in the
    writer's thread)."""
    if data.isascii():
        return data
    return _SPOOFING.sub(lambda found: _ESCAPES[found.group()], data)


# The checked types of a record's timestamp (an int64 column) and status (a uint16 column).
Timestamp = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Status = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class IndexedFields(msgspec.Struct):
    """What a line must hold to be an audit record, and what the index keeps of it.

    Decoded by msgspec, which checks the types in C: a record of the wrong shape (a missing
    field, a string timestamp, `true` for a status) fails to decode and is skipped.
    """

    request_id: str
    timestamp: Timestamp
    key_name: str
    model: str
    provider: str
    status: Status
    latency_ms: int
    cost_micros: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


_FIELDS_DECODER = msgspec.json.Decoder(IndexedFields)


def decode_fields(line: bytes) -> IndexedFields | None:
    """One JSONL line as an audit record; None when it is not one (skip and count)."""
    try:
        return _FIELDS_DECODER.decode(line)
    except (msgspec.MsgspecError, ValueError):  # ValueError: invalid UTF-8 in a string
        return None


def decode_fields_lines(data: bytes) -> list[IndexedFields] | None:
    """Every line of `data` (whole lines) at once; None if any is not a record."""
    try:
        return _FIELDS_DECODER.decode_lines(data)
    except (msgspec.MsgspecError, ValueError):  # ValueError: invalid UTF-8 in a string
        return None


def cost_micros(
    prompt_tokens: int | None,
    completion_tokens: int | None,
    prompt_per_million: float,
    completion_per_million: float,
    *cached: tuple[int | None, float],
) -> int:
    """Cost in micro-USD, rounded once: (tokens x USD per million tokens) needs no further
    scaling; `cached` adds (tokens, price) pairs (Anthropic's prompt-cache reads and writes).

    Never negative, never above MAX_COST_MICROS, whatever the prices: a cost too large to
    hold (an infinite price, or a float overflow) saturates at MAX_COST_MICROS so it stays
    visible in sums, and NaN (an infinite price times zero tokens, or a NaN price) is 0,
    as for a model without a price.
    """
    try:
        total = (prompt_tokens or 0) * prompt_per_million + (
            completion_tokens or 0
        ) * completion_per_million
        for tokens, price in cached:
            total += (tokens or 0) * price
    except OverflowError:  # an integer too large to convert to float
        return MAX_COST_MICROS
    if not total > 0:  # also NaN
        return 0
    if total >= MAX_COST_MICROS:  # exact comparison; the next float up is 2**63 itself
        return MAX_COST_MICROS
    return round(total)


def clip(text: str) -> str:
    return text if len(text) <= MAX_FIELD_CHARS else text[: MAX_FIELD_CHARS - 1] + "…"
