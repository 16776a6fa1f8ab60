"""AuditRecord: one request's audit line, its JSONL encoding, validation and cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

# Longest text we copy from a request or an error into a record, so one line stays small.
MAX_FIELD_CHARS = 256


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
        out["cost_micros"] = self.cost_micros
        out["latency_ms"] = self.latency_ms
        out["status"] = self.status
        out["stream"] = self.stream
        out["endpoint"] = self.endpoint
        if self.error is not None:
            out["error"] = self.error
        return out

    def to_line(self) -> bytes:
        """One JSONL line. orjson escapes control characters, so the line holds no raw newline."""
        return orjson.dumps(self.to_dict(), option=orjson.OPT_APPEND_NEWLINE)


class IndexedFields(msgspec.Struct):
    """What a line must hold to be an audit record, and what the index keeps of it.

    Decoded by msgspec, which checks the types in C: a record of the wrong shape (a missing
    field, a string timestamp, `true` for a status) fails to decode and is skipped.
    """

    request_id: str
    timestamp: int
    key_name: str
    model: str
    provider: str
    status: int
    latency_ms: int
    cost_micros: int


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
) -> int:
    """Cost in micro-USD, rounded: (tokens x USD per million tokens) needs no further scaling."""
    return round(
        (prompt_tokens or 0) * prompt_per_million
        + (completion_tokens or 0) * completion_per_million
    )


def clip(text: str) -> str:
    return text if len(text) <= MAX_FIELD_CHARS else text[: MAX_FIELD_CHARS - 1] + "…"
