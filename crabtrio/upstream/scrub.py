"""Scrubber: keeps configured secrets out of upstream text that we relay or record.

An upstream may echo a key back in an error body, raw or JSON-escaped (`sk\\u002d...`), and a
client decodes the escapes. So a body that is JSON is decoded, every string in it scrubbed,
and re-encoded (no escaped form survives); one that is not JSON is scrubbed raw and, if its
text still spells a secret once `\\uXXXX` escapes are read, withheld whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

REDACTED = "[redacted]"
WITHHELD = b"[upstream text withheld: it contained a secret]"
_ESCAPE = re.compile(rb"\\+u([0-9a-fA-F]{4})")
_TEXT_ESCAPE = re.compile(r"\\+u([0-9a-fA-F]{4})")


class Scrubber:
    def __init__(self, secrets: Iterable[str | None]) -> None:
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._raw = [s.encode() for s in self._secrets]

    def text(self, text: str) -> str:
        """A decoded string with every secret replaced; withheld whole if its own `\\uXXXX`
        escapes spell one (an upstream error wrapped as a JSON string inside a string)."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if "\\u" in text:
            unescaped = _TEXT_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
            if any(secret in unescaped for secret in self._secrets):
                return REDACTED
        return text

    def body(self, body: bytes) -> bytes:
        """An upstream body (an error body: success bodies are relayed untouched)."""
        if not self._secrets:
            return body
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = _NOT_JSON
        if parsed is not _NOT_JSON:
            return orjson.dumps(self._walk(parsed))
        for raw in self._raw:
            body = body.replace(raw, REDACTED.encode())
        if b"\\u" in body:
            unescaped = _ESCAPE.sub(
                lambda m: chr(int(m.group(1), 16)).encode("utf-8", "replace"), body
            )
            if any(raw in unescaped for raw in self._raw):
                return WITHHELD
        return body

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self._walk(item) for item in value]
        if isinstance(value, dict):
            return {self.text(k): self._walk(v) for k, v in value.items()}
        return value


_NOT_JSON = object()
