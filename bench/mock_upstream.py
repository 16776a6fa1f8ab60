"""A fast OpenAI-compatible upstream for benchmarks and end-to-end tests (loopback only).

    python bench/mock_upstream.py --port 0 [--chunks 20] [--delay-ms 20] [--error-rate 0.1]

Built on asyncio protocols and callbacks (uvloop when installed), with every reply encoded
once at startup, so it is never the bottleneck: no per-request task, no JSON parsing unless
a request carries a `"mock"` object. That object injects faults for tests:

    {"mock": {"status": 500, "fail_times": 2, "id": "t1", "delay_ms": 50, "drop_after": 3,
              "stall_after": 3, "no_usage": true, "chunks": 5, "chunk_delay_ms": 10,
              "echo_auth": true}}

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
from typing import Any

CREATED = int(time.time())
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]


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


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
SSE_END = b"0\r\n\r\n"


class Replies:
    """Every reply, encoded once."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        words = [WORDS[i % len(WORDS)] for i in range(chunks)]
        usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
        self.usage = usage
        message = {"role": "assistant", "content": " ".join(words)}
        self.chat = _response(
            200,
            _json(
                {
                    "id": "chatcmpl-mock",
                    "object": "chat.completion",
                    "created": CREATED,
                    "model": "mock-upstream",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                }
            ),
        )
        self.events = self.stream_events(chunks)
        self.usage_event = self.event({"choices": [], "usage": usage})
        self.done_event = b"data: [DONE]\n\n"
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
        self.error = _response(
            500, _json({"error": {"message": "mock upstream error", "type": "server_error"}})
        )
        self.not_found = _response(404, _json({"error": {"message": "no such route"}}))

    @staticmethod
    def event(fields: dict[str, Any]) -> bytes:
        base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED}
        return b"data: " + _json({**base, "model": "mock-upstream", **fields}) + b"\n\n"

    def stream_events(self, chunks: int) -> list[bytes]:
        events = [self.event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})]
        for i in range(chunks):
            word = WORDS[i % len(WORDS)]
            delta = {"content": word if i == 0 else " " + word}
            events.append(self.event({"choices": [{"index": 0, "delta": delta}]}))
        events.append(self.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        return events


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.replies = Replies(args.chunks)
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
        if self.fault(options, headers):
            return
        if path.endswith("/embeddings"):
            self.answer(replies.embeddings, options)
        elif not path.endswith("/chat/completions"):
            self.write(replies.not_found)
        elif b'"stream":true' in body or b'"stream": true' in body:
            self.stream(body, options)
        else:
            self.answer(replies.chat, options)

    def fault(self, options: dict[str, Any], headers: dict[str, str]) -> bool:
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
            message += f" (got authorization {headers.get('authorization', '')})"
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

    def stream(self, body: bytes, options: dict[str, Any]) -> None:
        state = self.state
        replies = state.replies
        chunks = options.get("chunks")
        events = list(replies.events if chunks is None else replies.stream_events(chunks))
        wants_usage = b'"include_usage":true' in body or b'"include_usage": true' in body
        if wants_usage and not options.get("no_usage"):
            events.append(replies.usage_event)
        events.append(replies.done_event)
        pace = options.get("chunk_delay_ms", state.delay * 1000) / 1000
        drop = options.get("drop_after")
        stall = options.get("stall_after")
        head_delay = options.get("delay_ms", 0) / 1000
        if not pace and drop is None and stall is None and not head_delay:
            self.write(SSE_HEAD + b"".join(_chunk(e) for e in events) + SSE_END)
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
