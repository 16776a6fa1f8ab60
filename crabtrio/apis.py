"""The four client APIs the gateway relays, and what differs between them: where they go
upstream, which provider kinds speak them, where their usage is, and their error shape.

OpenAI's chat completions, embeddings and Responses API answer errors as
`{"error": {"message", "type", "code"}}`; Anthropic's Messages API as
`{"type": "error", "error": {"type", "message"}}`, with its own type names, so that each
official SDK raises its own typed exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .errors import GatewayError, UpstreamRejected

# Anthropic requires a version header; clients send theirs, this is the one for those that don't.
ANTHROPIC_VERSION = "2023-06-01"

# Where a record's token counts come from in each API's `usage` object.
OPENAI_USAGE = (("prompt_tokens", "prompt_tokens"), ("completion_tokens", "completion_tokens"))
RESPONSES_USAGE = (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens"))
# Anthropic's `input_tokens` excludes what was read from or written to the prompt cache.
MESSAGES_USAGE = (
    ("input_tokens", "prompt_tokens"),
    ("output_tokens", "completion_tokens"),
    ("cache_read_input_tokens", "cache_read_tokens"),
    ("cache_creation_input_tokens", "cache_creation_tokens"),
)


@dataclass(frozen=True, slots=True)
class Api:
    endpoint: str  # the records' `endpoint`
    upstream_path: str  # after the provider's base_url
    kinds: tuple[str, ...]  # provider kinds that serve it
    usage: tuple[tuple[str, str], ...]  # (upstream usage field, record field)
    streams: bool = True  # takes `"stream": true`
    anthropic: bool = False  # errors in Anthropic's shape; x-api-key accepted

    def error_body(self, exc: GatewayError) -> bytes:
        """The error as this API's clients expect it."""
        if not self.anthropic:
            return exc.body_bytes()
        if isinstance(exc, UpstreamRejected) and _anthropic_shaped(exc.relayed):
            return exc.relayed  # an Anthropic upstream's own error, scrubbed
        return orjson.dumps(anthropic_error(exc.status, str(exc)))

    def error_event(self, exc: GatewayError) -> bytes:
        """The error as the last event of a stream that failed midway."""
        if self.anthropic:
            return b"event: error\ndata: " + self.error_body(exc) + b"\n\n"
        if self.endpoint == "responses":
            event = {"type": "error", "code": exc.code, "message": str(exc), "param": None}
            return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
        return b"data: " + exc.body_bytes() + b"\n\n"


CHAT = Api("chat", "/chat/completions", ("openai", "mock"), OPENAI_USAGE)
EMBEDDINGS = Api("embeddings", "/embeddings", ("openai", "mock"), OPENAI_USAGE, streams=False)
RESPONSES = Api("responses", "/responses", ("openai", "mock"), RESPONSES_USAGE)
MESSAGES = Api("messages", "/messages", ("anthropic", "mock"), MESSAGES_USAGE, anthropic=True)

ROUTES = {
    "/v1/chat/completions": CHAT,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/responses": RESPONSES,
    "/v1/messages": MESSAGES,
}

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(status)
    if kind is None:
        kind = "invalid_request_error" if status < 500 else "api_error"
    return {"type": "error", "error": {"type": kind, "message": message}}


def _anthropic_shaped(body: bytes) -> bool:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(parsed, dict)
        and parsed.get("type") == "error"
        and isinstance(parsed.get("error"), dict)
    )
