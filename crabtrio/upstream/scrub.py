"""Scrubber: keeps configured secrets out of upstream text that we relay or record.

An upstream may echo a key back in an error body, raw or JSON-escaped (`sk\\u002d...`), and a
client decodes the escapes. So a body that is JSON is decoded, every string in it scrubbed,
and re-encoded (no escaped form survives); one that is not JSON is scrubbed as text. A
string that still spells a secret once its own `\\uXXXX` escapes are read is withheld whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

REDACTED = "[redacted]"
_ESCAPE = re.compile(r"\\+u([0-9a-fA-F]{4})")


class Scrubber:
    def __init__(self, secrets: Iterable[str | None]) -> None:
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def add(self, secrets: Iterable[str | None]) -> None:
        """Keep these out too (keys added by a config reload; removed ones stay secret)."""
        self._secrets = sorted({*self._secrets, *(s for s in secrets if s)}, key=len, reverse=True)

    def text(self, text: str) -> str:
        """A decoded string with every secret replaced; withheld whole if its own `\\uXXXX`
        escapes spell one (an upstream error wrapped as a JSON string inside a string)."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if "\\u" in text:
            unescaped = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
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
            return self.text(body.decode("utf-8", "replace")).encode()
        return orjson.dumps(self._walk(parsed))

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self._walk(item) for item in value]
        if isinstance(value, dict):
            return {self.text(k): self._walk(v) for k, v in value.items()}
        return value
