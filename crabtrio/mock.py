"""The built-in `mock` provider: deterministic replies with usage, in-process, in the shapes of
OpenAI's chat completions, embeddings and Responses API and of Anthropic's Messages API."""

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
    """The reply's words, and "length" when a token limit cut it short (else "stop")."""
    count = provider.chunks
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    limit = limit or body.get("max_output_tokens")
    finish = "stop"
    if type(limit) is int and 0 < limit < count:
        count, finish = limit, "length"
    return [_WORDS[i % len(_WORDS)] for i in range(count)], finish


def _texts(words: list[str]) -> list[str]:
    """The words as streamed deltas: a space before each but the first."""
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def _id(prefix: str, value: Any) -> str:
    return prefix + hashlib.blake2b(orjson.dumps(value), digest_size=8).hexdigest()


def _typed(kind: str, data: dict[str, Any]) -> bytes:
    """One event of a typed stream (Responses, Messages): its type as the SSE event name."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


async def _paced(provider: ProviderConfig) -> None:
    if provider.delay_ms:
        await trio.sleep(provider.delay_ms / 1000)


def _response(body: dict[str, Any], words: list[str], finish: str, *, done: bool) -> dict[str, Any]:
    """A Responses API response object: in progress (no output yet) or complete."""
    prompt = _prompt_tokens([body.get("input"), body.get("instructions")])
    rid = _id("resp_mock_", [body.get("input"), body.get("previous_response_id")])
    message = {
        "type": "message",
        "id": "msg_" + rid.removeprefix("resp_"),
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": " ".join(words), "annotations": []}],
    }
    incomplete = finish == "length"
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
        "model": body.get("model"),
        "output": [message] if done else [],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(words),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + len(words),
        }
        if done
        else None,
        "incomplete_details": {"reason": "max_output_tokens"} if done and incomplete else None,
        "previous_response_id": body.get("previous_response_id"),
        "instructions": body.get("instructions"),
        "error": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "text": {"format": {"type": "text"}},
    }


def responses(body: dict[str, Any], provider: ProviderConfig) -> bytes:
    """A whole (non-streaming) Responses API response."""
    words, finish = _reply_words(body, provider)
    return orjson.dumps(_response(body, words, finish, done=True))


async def responses_stream(body: dict[str, Any], provider: ProviderConfig) -> AsyncGenerator[bytes]:
    """The Responses API's typed events: lifecycle, one text delta per word, completed."""
    words, finish = _reply_words(body, provider)
    started = _response(body, words, finish, done=False)
    done = _response(body, words, finish, done=True)
    item = done["output"][0]
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    sequence = iter(range(1 << 30))

    def typed(kind: str, data: dict[str, Any]) -> bytes:
        return _typed(kind, {"sequence_number": next(sequence), **data})

    yield typed("response.created", {"response": started})
    yield typed("response.in_progress", {"response": started})
    yield typed(
        "response.output_item.added",
        {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
    )
    part = {"type": "output_text", "text": "", "annotations": []}
    yield typed("response.content_part.added", {**where, "part": part})
    for text in _texts(words):
        await _paced(provider)
        yield typed("response.output_text.delta", {**where, "delta": text})
    full = item["content"][0]
    yield typed("response.output_text.done", {**where, "text": full["text"]})
    yield typed("response.content_part.done", {**where, "part": full})
    yield typed("response.output_item.done", {"output_index": 0, "item": item})
    final = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
    yield typed(final, {"response": done})


def _message(body: dict[str, Any], words: list[str], finish: str) -> dict[str, Any]:
    return {
        "id": _id("msg_mock_", body.get("messages")),
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [{"type": "text", "text": " ".join(words)}],
        "stop_reason": "max_tokens" if finish == "length" else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": _prompt_tokens([body.get("messages"), body.get("system")]),
            "output_tokens": len(words),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def messages(body: dict[str, Any], provider: ProviderConfig) -> bytes:
    """A whole (non-streaming) Anthropic Messages API message."""
    words, finish = _reply_words(body, provider)
    return orjson.dumps(_message(body, words, finish))


async def messages_stream(body: dict[str, Any], provider: ProviderConfig) -> AsyncGenerator[bytes]:
    """The Messages API's events: message_start (input tokens), one text delta per word,
    message_delta (output tokens), message_stop."""
    words, finish = _reply_words(body, provider)
    message = _message(body, words, finish)
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    yield _typed("message_start", {"message": start})
    yield _typed("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    yield _typed("ping", {})
    for text in _texts(words):
        await _paced(provider)
        yield _typed(
            "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}}
        )
    yield _typed("content_block_stop", {"index": 0})
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    yield _typed("message_delta", {"delta": delta, "usage": {"output_tokens": len(words)}})
    yield _typed("message_stop", {})


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
    return _id("chatcmpl-mock-", body.get("messages"))


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
    for text in _texts(words):
        await _paced(provider)
        yield chunk({"content": text})
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
                return _sse(chat_stream(body, self._provider))
            return _json(chat(body, self._provider))
        if path.endswith("/embeddings"):
            return _json(embeddings(body, self._provider))
        for suffix, whole, streamed in (
            ("/responses", responses, responses_stream),
            ("/messages", messages, messages_stream),
        ):
            if path.endswith(suffix):
                if body.get("stream") is True:
                    return _sse(streamed(body, self._provider))
                return _json(whole(body, self._provider))
        return _error(404, "the mock provider serves chat, embeddings, responses and messages")


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


def _sse(events: AsyncGenerator[bytes]) -> httpx.Response:
    return httpx.Response(
        200, headers=[(b"content-type", b"text/event-stream")], stream=_Events(events)
    )


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
