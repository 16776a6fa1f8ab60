"""The built-in `mock` provider: deterministic OpenAI-shaped replies, with usage, in-process."""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import orjson
import trio

from .config import ProviderConfig
from .sse import DONE, event

_REPLY = (
    "crabtrio answers from its built-in mock provider with a deterministic reply so that "
    "clients dashboards and audit consumers can be tried without any upstream account"
)
_WORDS = _REPLY.split()


def _reply_words(body: dict[str, Any], provider: ProviderConfig) -> tuple[list[str], str]:
    count = provider.chunks
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    finish = "stop"
    if type(limit) is int and 0 < limit < count:
        count, finish = limit, "length"
    return [_WORDS[i % len(_WORDS)] for i in range(count)], finish


def _prompt_tokens(value: Any) -> int:
    """A rough, deterministic token count: whitespace-separated words of every string."""
    if isinstance(value, str):
        return max(1, len(value.split()))
    if isinstance(value, list):
        return sum(_prompt_tokens(item) for item in value)
    if isinstance(value, dict):
        return sum(_prompt_tokens(item) for item in value.values())
    return 0


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion_id(body: dict[str, Any]) -> str:
    digest = hashlib.blake2b(orjson.dumps(body.get("messages")), digest_size=8).hexdigest()
    return f"chatcmpl-mock-{digest}"


def chat(body: dict[str, Any], provider: ProviderConfig) -> bytes:
    """A whole (non-streaming) chat completion."""
    words, finish = _reply_words(body, provider)
    prompt = _prompt_tokens(body.get("messages"))
    return orjson.dumps(
        {
            "id": _completion_id(body),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words)},
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(prompt, len(words)),
        }
    )


async def chat_stream(body: dict[str, Any], provider: ProviderConfig) -> AsyncGenerator[bytes]:
    """SSE events of a streamed chat completion, one word per event, usage when asked."""
    words, finish = _reply_words(body, provider)
    base = {
        "id": _completion_id(body),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model"),
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return event({**base, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    for i, word in enumerate(words):
        if provider.delay_ms:
            await trio.sleep(provider.delay_ms / 1000)
        yield chunk({"content": word if i == 0 else " " + word})
    yield chunk({}, finish)
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        usage = _usage(_prompt_tokens(body.get("messages")), len(words))
        yield event({**base, "choices": [], "usage": usage})
    yield DONE


class MockTransport(httpx.AsyncBaseTransport):
    """The mock provider as an httpx transport: the gateway calls it like any upstream."""

    def __init__(self, provider: ProviderConfig) -> None:
        self._provider = provider

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            body = orjson.loads(request.content)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "the mock provider takes a JSON object")
        path = request.url.path
        if path.endswith("/chat/completions"):
            if body.get("stream") is True:
                return httpx.Response(
                    200,
                    headers=[(b"content-type", b"text/event-stream")],
                    stream=_Events(chat_stream(body, self._provider)),
                )
            return _json(chat(body, self._provider))
        if path.endswith("/embeddings"):
            return _json(embeddings(body, self._provider))
        return _error(404, "the mock provider serves chat and embeddings only")


class _Events(httpx.AsyncByteStream):
    """An iterator over the events, so a stream left mid-way is closed, not finalized."""

    def __init__(self, events: AsyncGenerator[bytes]) -> None:
        self._events = events

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self._events)

    async def aclose(self) -> None:
        await self._events.aclose()


def _json(content: bytes) -> httpx.Response:
    return httpx.Response(200, headers=[(b"content-type", b"application/json")], content=content)


def _error(status: int, message: str) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return httpx.Response(
        status, headers=[(b"content-type", b"application/json")], content=orjson.dumps(body)
    )


def embeddings(body: dict[str, Any], provider: ProviderConfig) -> bytes:
    """Deterministic unit-length-ish vectors derived from each input's hash."""
    inputs = body.get("input")
    items = (
        inputs
        if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
        else [inputs]
    )
    dims = body.get("dimensions")
    dims = dims if type(dims) is int and 0 < dims <= 4096 else 16
    data = []
    for i, item in enumerate(items):
        values = struct.unpack(f"<{dims}I", hashlib.shake_256(orjson.dumps(item)).digest(dims * 4))
        vector = [round(v / 0xFFFFFFFF * 2 - 1, 6) for v in values]
        data.append({"object": "embedding", "index": i, "embedding": vector})
    prompt = _prompt_tokens(items)
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    )
