"""A fast OpenAI- and Anthropic-compatible upstream for benchmarks and end-to-end tests
(loopback only): chat completions, embeddings, the Responses API and Anthropic's Messages API.

    python bench/mock_upstream.py --port 0 [--chunks 20] [--delay-ms 20] [--error-rate 0.1]
        [--delta-bytes 1024] [--tool-args] [--variant MODEL:CHUNKS[:DELTA_BYTES[:tool]] ...]

Chat streams are shaped like OpenAI's: every `chat.completion.chunk` carries id, object,
created, model, service_tier, system_fingerprint and choices (delta, logprobs, finish_reason),
and, when the request asked for `stream_options.include_usage`, `"usage":null`; then the usage
chunk with `choices: []`, then `data: [DONE]`. `--delta-bytes` pads each delta to that size,
`--tool-args` streams a tool call's arguments instead of text, and `--variant` serves another
shape to the requests whose body names MODEL (e.g. `gpt-4o-mini-long:500`).

Built on asyncio protocols and callbacks (uvloop when installed), with every reply encoded
once at startup, so it is never the bottleneck: no per-request task, no JSON parsing unless
a request carries a `"mock"` object. That object injects faults for tests:

    {"mock": {"status": 500, "fail_times": 2, "id": "t1", "delay_ms": 50, "drop_after": 3,
              "stall_after": 3, "no_usage": true, "chunks": 5, "chunk_delay_ms": 10,
              "echo_auth": true, "delta_bytes": 1024, "tool_args": true}}

`chunks`, the pacing, `drop_after` and `stall_after` apply to every kind of stream (they count
events); `no_usage` leaves the usage out of chat streams and sets `usage: null` in the Responses
API's `response.completed` (Anthropic always reports usage). Errors on `/messages` take
Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`.

`GET /_requests` lists the requests received (with --record); `GET /_stats` counts them.
Prints `listening on http://127.0.0.1:PORT` once ready; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

CREATED = int(time.time())
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
MODEL = "mock-upstream"
PROMPT_TOKENS = 12
RESPONSE_ID = "resp_mock"
OUTPUT_ITEM_ID = "msg_mock"
MESSAGE_ID = "msg_01Mock"
# The settings OpenAI echoes in every Responses API object (the request's, or defaults).
RESPONSE_SETTINGS: dict[str, Any] = {
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "model": MODEL,
}
RESPONSE_TAIL: dict[str, Any] = {
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None},
    "service_tier": "default",
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
}
ANTHROPIC_ERRORS = {  # the error `type` Anthropic gives each status; any other: api_error
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (
        status,
        b"OK" if status == 200 else b"Error",
        content_type,
        len(body),
    )
    return head + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _named(fields: dict[str, Any]) -> bytes:
    """One SSE event named by its `type`, as the Responses and Messages APIs send them."""
    return b"event: %s\ndata: %s\n\n" % (fields["type"].encode(), _json(fields))


def _words(chunks: int) -> list[str]:
    """The streamed pieces of the answer: joined, they are its text."""
    return [WORDS[i % len(WORDS)] if i == 0 else " " + WORDS[i % len(WORDS)] for i in range(chunks)]


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
SSE_END = b"0\r\n\r\n"


def responses_object(
    status: str, output: list[Any], usage: dict[str, Any] | None
) -> dict[str, Any]:
    """A Responses API `response` object, as the JSON answer and the stream's events carry it."""
    head = {"id": RESPONSE_ID, "object": "response", "created_at": CREATED, "status": status}
    tail = {"usage": usage, "user": None, "metadata": {}}
    return {**head, **RESPONSE_SETTINGS, "output": output, **RESPONSE_TAIL, **tail}


def responses_usage(chunks: int) -> dict[str, Any]:
    return {
        "input_tokens": PROMPT_TOKENS,
        # cache_write_tokens: required by the types of the openai SDK (3.57)
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": chunks,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": PROMPT_TOKENS + chunks,
    }


def output_message(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Responses API's finished output item, and its one text part."""
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item = {"id": OUTPUT_ITEM_ID, "type": "message", "status": "completed", "content": [part]}
    return {**item, "role": "assistant"}, part


def responses_events(chunks: int, *, usage: bool = True) -> list[bytes]:
    """A Responses API stream: no `[DONE]`, it ends with `response.completed`."""
    pieces = _words(chunks)
    item, part = output_message("".join(pieces))
    at = {"item_id": OUTPUT_ITEM_ID, "output_index": 0, "content_index": 0}
    started = responses_object("in_progress", [], None)
    completed = responses_object("completed", [item], responses_usage(chunks) if usage else None)
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
        *({"type": "response.output_text.delta", **at, "delta": p, "logprobs": []} for p in pieces),
        {"type": "response.output_text.done", **at, "text": part["text"], "logprobs": []},
        {"type": "response.content_part.done", **at, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": completed},
    ]
    return [_named({"type": e["type"], "sequence_number": k, **e}) for k, e in enumerate(events)]


def message_usage(output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": PROMPT_TOKENS,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def message_object(
    content: list[dict[str, Any]], stop_reason: str | None, usage: dict[str, Any]
) -> dict[str, Any]:
    """An Anthropic Messages API `message`, as the JSON answer and `message_start` carry it."""
    head = {"id": MESSAGE_ID, "type": "message", "role": "assistant", "model": MODEL}
    end = {"stop_reason": stop_reason, "stop_sequence": None, "usage": usage}
    return {**head, "content": content, **end}


def messages_events(chunks: int) -> list[bytes]:
    """An Anthropic Messages stream: usage in `message_start` and `message_delta`, then
    `message_stop`."""
    pieces = _words(chunks)
    deltas = ({"type": "text_delta", "text": p} for p in pieces)
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": message_object([], None, message_usage(1))},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0, "delta": d} for d in deltas),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": chunks},
        },
        {"type": "message_stop"},
    ]
    return [_named(e) for e in events]


def _wire(events: list[bytes]) -> bytes:
    """A whole unpaced stream as written: head, every event a chunk, the last chunk."""
    return SSE_HEAD + b"".join(_chunk(e) for e in events) + SSE_END


CHUNK_ID = "chatcmpl-BmockUpstream0000000000000000"  # as long as OpenAI's ids (38)
FINGERPRINT = "fp_0000mock00"
TOOL_CALL_ID = "call_mock0000000000000000"
TOOL_NAME = "lookup_0"


@dataclass(frozen=True, slots=True)
class Shape:
    """What a chat stream carries: how many content events, how big, text or tool arguments."""

    chunks: int = 20
    delta_bytes: int = 0  # 0: one word a delta; else each delta padded to this many bytes
    tool_args: bool = False  # deltas of a tool call's `arguments` instead of text


def parse_shape(spec: str) -> tuple[str, Shape]:
    """`MODEL:CHUNKS[:DELTA_BYTES[:tool]]` (the --variant option) as a model and its Shape."""
    name, *fields = spec.split(":")
    if not name or not 1 <= len(fields) <= 3 or (len(fields) == 3 and fields[2] != "tool"):
        raise ValueError(f"not MODEL:CHUNKS[:DELTA_BYTES[:tool]]: {spec!r}")
    delta = int(fields[1]) if len(fields) > 1 else 0
    return name, Shape(int(fields[0]), delta, len(fields) == 3)


def _pieces(shape: Shape) -> list[str]:
    """The streamed deltas: joined, they are the answer's text (or the tool call's arguments,
    a JSON object)."""
    if shape.tool_args:
        size = max(shape.delta_bytes, 8)
        filler = " ".join(WORDS) + " "
        note = filler * (shape.chunks * size // len(filler) + 1)
        text = json.dumps({"id": "rec-0001", "note": note[: shape.chunks * size - 30]})
        return [text[i * size : (i + 1) * size] for i in range(shape.chunks - 1)] + [
            text[(shape.chunks - 1) * size :]
        ]
    words = _words(shape.chunks)
    if not shape.delta_bytes:
        return words
    return [(w * (shape.delta_bytes // len(w) + 1))[: shape.delta_bytes] for w in words]


def chat_chunk(choices: list[Any], usage: Any, with_usage: bool) -> bytes:
    """One `chat.completion.chunk` event as OpenAI sends it; `"usage"` (null but in the
    last) only when the request asked for usage."""
    fields: dict[str, Any] = {
        "id": CHUNK_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
    }
    if with_usage:
        fields["usage"] = usage
    return b"data: " + _json(fields) + b"\n\n"


def _choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


class ChatStream:
    """One shape of chat stream, encoded once: with usage (`"usage":null` on every chunk,
    then the usage chunk with `choices: []`) and without, as events and as unpaced wire."""

    def __init__(self, shape: Shape) -> None:
        pieces = _pieces(shape)
        tokens = sum(max(1, len(p) // 4) for p in pieces)
        self.usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": tokens,
            "total_tokens": PROMPT_TOKENS + tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        if shape.tool_args:
            call = {"index": 0, "id": TOOL_CALL_ID, "type": "function"}
            first = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call, "function": {"name": TOOL_NAME, "arguments": ""}}],
                "refusal": None,
            }
            deltas = [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces]
            finish = "tool_calls"
        else:
            first = {"role": "assistant", "content": "", "refusal": None}
            deltas = [{"content": p} for p in pieces]
            finish = "stop"
        choices = [[_choice(first)], *([_choice(d)] for d in deltas), [_choice({}, finish)]]
        done = b"data: [DONE]\n\n"
        self.plain = [chat_chunk(c, None, False) for c in choices] + [done]
        usage_event = chat_chunk([], self.usage, True)
        self.with_usage = [chat_chunk(c, None, True) for c in choices] + [usage_event, done]
        self.plain_wire = _wire(self.plain)
        self.with_usage_wire = _wire(self.with_usage)
        text = "".join(pieces)
        if shape.tool_args:
            call = {"id": TOOL_CALL_ID, "type": "function"}
            call["function"] = {"name": TOOL_NAME, "arguments": text}  # type: ignore[assignment]
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
        else:
            message = {"role": "assistant", "content": text, "refusal": None}
        self.answer = _response(
            200,
            _json(
                {
                    "id": CHUNK_ID,
                    "object": "chat.completion",
                    "created": CREATED,
                    "model": MODEL,
                    "choices": [
                        {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                    ],
                    "usage": self.usage,
                    "service_tier": "default",
                    "system_fingerprint": FINGERPRINT,
                }
            ),
        )


class Replies:
    """Every reply, encoded once."""

    def __init__(self, shape: Shape, variants: dict[str, Shape] | None = None) -> None:
        chunks = shape.chunks
        self.chunks = chunks
        self.chat_stream = ChatStream(shape)
        # Other chat shapes, picked by the request's model (the quoted name in its body).
        self.variants = [(b'"%s"' % m.encode(), ChatStream(s)) for m, s in (variants or {}).items()]
        self.chat = self.chat_stream.answer
        vector = [round(((i * 7919) % 1000) / 1000 - 0.5, 4) for i in range(256)]
        self.embeddings = _response(
            200,
            _json(
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                    "model": "mock-upstream",
                    "usage": {"prompt_tokens": 8, "total_tokens": 8},
                }
            ),
        )
        text = "".join(_words(chunks))
        item, _ = output_message(text)
        self.responses = _response(
            200, _json(responses_object("completed", [item], responses_usage(chunks)))
        )
        self.responses_events = responses_events(chunks)
        self.responses_wire = _wire(self.responses_events)
        content = [{"type": "text", "text": text}]
        self.messages = _response(
            200, _json(message_object(content, "end_turn", message_usage(chunks)))
        )
        self.messages_events = messages_events(chunks)
        self.messages_wire = _wire(self.messages_events)
        self.error = _response(
            500, _json({"error": {"message": "mock upstream error", "type": "server_error"}})
        )
        self.not_found = _response(404, _json({"error": {"message": "no such route"}}))

    def chat_for(self, body: bytes) -> ChatStream:
        for model, stream in self.variants:
            if model in body:
                return stream
        return self.chat_stream


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        shape = Shape(args.chunks, args.delta_bytes, args.tool_args)
        self.replies = Replies(shape, dict(parse_shape(v) for v in args.variant))
        self.delay = args.delay_ms / 1000
        self.error_rate = args.error_rate
        self.record = args.record
        self.requests: deque[dict[str, Any]] = deque(maxlen=1000)
        self.failures: dict[str, int] = {}
        self.count = 0


class Upstream(asyncio.Protocol):
    """One connection: parse HTTP/1.1 requests (keep-alive, pipelining) and answer them."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timers: list[asyncio.TimerHandle] = []
        self.busy = False  # a streamed or delayed answer is still being written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.process()

    def process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            headers: dict[str, str] = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path = head[0].split(" ")[:2]
            self.handle(method, path, headers, body)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def later(self, delay: float, callback: Any, *args: Any) -> None:
        loop = asyncio.get_running_loop()
        self.timers = [t for t in self.timers if not t.cancelled()]
        self.timers.append(loop.call_later(delay, callback, *args))

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        state = self.state
        state.count += 1
        replies = state.replies
        if method == "GET":
            if path == "/_requests":
                self.write(_response(200, _json(list(state.requests))))
            elif path == "/_stats":
                self.write(_response(200, _json({"requests": state.count})))
            else:
                self.write(replies.not_found)
            return
        if state.record:
            state.requests.append(
                {"path": path, "headers": headers, "body": body.decode("utf-8", "replace")}
            )
        options: dict[str, Any] = {}
        if b'"mock"' in body:
            parsed = json.loads(body).get("mock")
            options = parsed if isinstance(parsed, dict) else {}
        anthropic = path.endswith("/messages")
        if self.fault(options, headers, anthropic):
            return
        streaming = b'"stream":true' in body or b'"stream": true' in body
        chunks = options.get("chunks", replies.chunks)
        if path.endswith("/embeddings"):
            self.answer(replies.embeddings, options)
        elif path.endswith("/chat/completions"):
            if streaming:
                self.stream_chat(body, options)
            else:
                self.answer(replies.chat_for(body).answer, options)
        elif path.endswith("/responses"):
            if not streaming:
                self.answer(replies.responses, options)
            elif not options:
                self.stream(replies.responses_events, options, replies.responses_wire)
            else:
                self.stream(responses_events(chunks, usage=not options.get("no_usage")), options)
        elif anthropic:
            if not streaming:
                self.answer(replies.messages, options)
            elif not options:
                self.stream(replies.messages_events, options, replies.messages_wire)
            else:
                self.stream(messages_events(chunks), options)
        else:
            self.write(replies.not_found)

    def fault(self, options: dict[str, Any], headers: dict[str, str], anthropic: bool) -> bool:
        """Answer with an injected error status; True if it did."""
        state = self.state
        status = options.get("status")
        if status is not None:
            key = options.get("id")
            times = options.get("fail_times")
            if key is not None and times is not None:
                done = state.failures.get(key, 0)
                if done >= times:
                    status = None
                else:
                    state.failures[key] = done + 1
        elif state.error_rate and random.random() < state.error_rate:
            status = 500
        if status is None:
            return False
        message = f"mock failure {status}"
        if options.get("echo_auth"):
            header = "x-api-key" if anthropic else "authorization"
            message += f" (got {header} {headers.get(header, '')})"
        if anthropic:
            kind = ANTHROPIC_ERRORS.get(int(status), "api_error")
            body = _json({"type": "error", "error": {"type": kind, "message": message}})
        else:
            body = _json({"error": {"message": message, "type": "mock_error", "code": status}})
        self.answer(_response(int(status), body), options)
        return True

    def answer(self, data: bytes, options: dict[str, Any]) -> None:
        delay = options.get("delay_ms", 0) / 1000
        if not delay:
            self.write(data)
            return
        self.busy = True
        self.later(delay, self.finish_delayed, data)

    def finish_delayed(self, data: bytes) -> None:
        self.write(data)
        self.busy = False
        self.process()

    def stream_chat(self, body: bytes, options: dict[str, Any]) -> None:
        replies = self.state.replies
        stream = replies.chat_for(body)
        if any(k in options for k in ("chunks", "delta_bytes", "tool_args")):
            shape = Shape(
                options.get("chunks", replies.chunks),
                options.get("delta_bytes", 0),
                bool(options.get("tool_args")),
            )
            stream = ChatStream(shape)
        wants_usage = b'"include_usage":true' in body or b'"include_usage": true' in body
        if wants_usage and not options.get("no_usage"):
            self.stream(stream.with_usage, options, stream.with_usage_wire)
        else:
            self.stream(stream.plain, options, stream.plain_wire)

    def stream(self, events: list[bytes], options: dict[str, Any], wire: bytes = b"") -> None:
        """Send `events` (unpaced: at once, `wire` when given); else one event per `pace`."""
        state = self.state
        pace = options.get("chunk_delay_ms", state.delay * 1000) / 1000
        drop = options.get("drop_after")
        stall = options.get("stall_after")
        head_delay = options.get("delay_ms", 0) / 1000
        if not pace and drop is None and stall is None and not head_delay:
            self.write(wire or _wire(events))
            return
        self.busy = True
        self.later(head_delay, self.send_event, events, 0, pace, drop, stall)

    def send_event(
        self, events: list[bytes], i: int, pace: float, drop: int | None, stall: int | None
    ) -> None:
        if self.transport is None:
            return
        if i == 0:
            self.write(SSE_HEAD)
        if drop is not None and i >= drop:
            self.transport.abort()  # break the stream mid-body
            return
        if stall is not None and i >= stall:
            return  # keep the connection open and silent
        self.write(_chunk(events[i]))
        if i + 1 == len(events):
            self.write(SSE_END)
            self.busy = False
            self.process()
            return
        self.later(pace, self.send_event, events, i + 1, pace, drop, stall)


def serve(sock: socket.socket, args: argparse.Namespace) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        state = State(args)
        server = await loop.create_server(lambda: Upstream(state), sock=sock, backlog=4096)
        async with server:
            await stop.wait()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=20, help="content events per stream")
    parser.add_argument("--delta-bytes", type=int, default=0, help="pad each delta to this")
    parser.add_argument("--tool-args", action="store_true", help="stream tool-call arguments")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="MODEL:CHUNKS[:DELTA_BYTES[:tool]]",
        help="another chat stream shape, for requests naming MODEL (repeatable)",
    )
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause between events")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction answered 500")
    parser.add_argument("--procs", type=int, default=1, help="processes sharing the socket")
    parser.add_argument("--record", action="store_true", help="keep requests for /_requests")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the mock upstream listens on loopback only")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(4096)
    sock.setblocking(False)
    children = []
    for _ in range(args.procs - 1):
        pid = os.fork()
        if pid == 0:
            serve(sock, args)
            os._exit(0)
        children.append(pid)
    print(f"listening on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    try:
        serve(sock, args)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    sys.exit(0)


if __name__ == "__main__":
    main()
