"""A hostile HTTP/1.1 upstream for end-to-end tests: a threaded socket server on 127.0.0.1
whose every answer is picked by the first segment of the request's path
(`POST /<behaviour>/v1/chat/completions`), so one provider's `base_url` names one behaviour.

Each connection serves one request and closes (`connection: close`). Every socket operation
is bounded by `IO_TIMEOUT`; `close()` stops the server and joins its threads.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

IO_TIMEOUT = 10.0
MB = 1024 * 1024
HUGE_BYTES = 200 * MB
BOMB_BYTES = 300 * MB
SSE_BYTES = 40 * MB

CHAT = {
    "id": "chatcmpl-hostile",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-e2e",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def chunk_event(content: str) -> bytes:
    """One OpenAI-shaped SSE chunk event carrying `content`."""
    chunk = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-e2e",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@cache
def gzip_bomb() -> bytes:
    """BOMB_BYTES of zeros, gzip-compressed (about 300 KB), built once per test process."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MB)
    parts = [compressor.compress(zeros) for _ in range(BOMB_BYTES // MB)]
    return b"".join(parts) + compressor.flush()


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when its head was in

    @property
    def behaviour(self) -> str:
        return self.target.split("/")[1] if self.target.startswith("/") else ""

    @property
    def bearer(self) -> str:
        return self.headers.get("authorization", "").removeprefix("Bearer ")


def read_request(conn: socket.socket) -> Request | None:
    """One request (head and Content-Length body), or None if the peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return None
        data += piece
        if len(data) > 65536:
            raise ValueError("request head too long")
    at = time.monotonic()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = conn.recv(65536)
        if not piece:
            return None
        body += piece
    return Request(method, target, headers, body, at)


def head(status: int, headers: list[tuple[str, str]], reason: str = "Hostile") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def respond(
    conn: socket.socket,
    status: int,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
) -> None:
    fields = [("content-type", "application/json"), *(headers or [])]
    fields.append(("content-length", str(len(body))))
    conn.sendall(head(status, fields) + body)


def send_chunk(conn: socket.socket, data: bytes) -> None:
    conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))


class ThreadedServer:
    """Accepts on 127.0.0.1:0; runs `handle(conn)` in a thread per connection."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._handle = handle
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed by close()
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with self._open_lock:
            self._open.add(conn)
        with conn:
            conn.settimeout(IO_TIMEOUT)
            # The gateway closing on us mid-body is the expected end of the hostile answers.
            with contextlib.suppress(OSError, ValueError):
                self._handle(conn)
            with self._open_lock:
                self._open.discard(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._listener.close()
        self._acceptor.join(IO_TIMEOUT)
        with self._open_lock:  # wake handlers still waiting on a peer (a proxy's tunnel)
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(IO_TIMEOUT)


class HostileUpstream(ThreadedServer):
    """Records every request; answers as its path's first segment says (see `_answer`)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        super().__init__(self._handle_one)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self, behaviour: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.behaviour == behaviour]

    def _handle_one(self, conn: socket.socket) -> None:
        request = read_request(conn)
        if request is None:
            return
        with self._lock:
            self.requests.append(request)
            count = sum(r.behaviour == request.behaviour for r in self.requests)
        self._answer(conn, request, count)

    def _answer(self, conn: socket.socket, request: Request, count: int) -> None:
        behaviour = request.behaviour
        key = request.bearer  # the provider's own api key, echoed back by the secret cases
        escaped = key.replace("-", "\\u002d")  # as JSON may spell it: `sk\u002dupstream...`
        if behaviour in ("ok", "target"):
            respond(conn, 200, json.dumps(CHAT).encode())
        elif behaviour == "huge":
            conn.sendall(
                head(
                    200, [("content-type", "application/json"), ("content-length", str(HUGE_BYTES))]
                )
            )
            block = b"x" * MB
            for _ in range(HUGE_BYTES // MB):
                conn.sendall(block)
        elif behaviour == "gzip-bomb":
            respond(conn, 200, gzip_bomb(), [("content-encoding", "gzip")])
        elif behaviour == "gzip-bomb-sse":
            fields = [("content-type", "text/event-stream"), ("content-encoding", "gzip")]
            respond(conn, 200, gzip_bomb(), fields)
        elif behaviour in ("sse-unbounded", "sse-unbounded-after-event"):
            fields = [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]
            conn.sendall(head(200, fields))
            if behaviour == "sse-unbounded-after-event":
                send_chunk(conn, chunk_event("first"))
            send_chunk(conn, b"data: ")
            block = b"x" * (64 * 1024)
            for _ in range(SSE_BYTES // len(block)):
                send_chunk(conn, block)
            conn.sendall(b"0\r\n\r\n")
        elif behaviour in ("sse-gzip-header-alone", "sse-gzip-split-event"):
            self._gzip_stream(conn, split_first=behaviour == "sse-gzip-header-alone")
        elif behaviour.startswith("retry-after-"):
            if count == 1:
                error = {"error": {"message": "slow down", "type": "rate_limit", "code": None}}
                seconds = behaviour.removeprefix("retry-after-")
                respond(conn, 429, json.dumps(error).encode(), [("retry-after", seconds)])
            else:
                respond(conn, 200, json.dumps(CHAT).encode())
        elif behaviour == "redirect":
            location = f"{self.url}/target/v1/chat/completions"
            respond(conn, 302, b"", [("location", location)])
        elif behaviour == "secret-429-raw":
            body = {"error": {"message": f"quota exceeded for key {key}", "type": "rate_limit"}}
            respond(conn, 429, json.dumps(body).encode())
        elif behaviour == "secret-429-escaped":
            body = {"error": {"message": f"quota exceeded for key {key}", "type": "x"}}
            respond(conn, 429, json.dumps(body).replace(key, escaped).encode())
        elif behaviour == "secret-500-json-escaped":
            body = {"error": {"message": f"boom {key}", key: key}}
            respond(conn, 500, json.dumps(body).replace(key, escaped).encode())
        elif behaviour == "secret-500-text":
            respond(conn, 500, f"Traceback: auth={key}\n".encode(), [("x-key", key)])
        elif behaviour == "secret-400-json-raw":
            body = {"error": {"message": f"invalid key {key}", "type": "invalid_request_error"}}
            respond(conn, 400, json.dumps(body).encode())
        elif behaviour == "secret-400-json-escaped":
            body = {"error": {"message": f"invalid key {key}", "param": key}}
            respond(conn, 400, json.dumps(body).replace(key, escaped).encode())
        elif behaviour in ("secret-400-json-nested", "secret-429-json-nested"):
            # An error message that is itself JSON (as gateways wrap a provider's error),
            # spelling the key with escapes: one more decoding gives the key.
            inner = json.dumps({"detail": f"invalid key {key}"}).replace(key, escaped)
            body = {"error": {"message": inner, "type": "invalid_request_error"}}
            respond(conn, int(behaviour[7:10]), json.dumps(body).encode())
        elif behaviour == "secret-400-text-raw":
            respond(conn, 400, f"bad key {key}".encode(), [("content-type", "text/plain")])
        elif behaviour == "secret-400-text-escaped":
            respond(conn, 400, f"bad key {escaped}".encode(), [("content-type", "text/plain")])
        elif behaviour == "secret-400-gzip":
            body = {"error": {"message": f"invalid key {key}", "type": "invalid_request_error"}}
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
            data = compressor.compress(json.dumps(body).encode()) + compressor.flush()
            respond(conn, 400, data, [("content-encoding", "gzip")])
        elif behaviour == "secret-status-line":
            conn.sendall(f"HTTP/1.1 5x0 {key}\r\ncontent-length: 0\r\n\r\n".encode())
        elif behaviour == "secret-header-line":
            conn.sendall(f"HTTP/1.1 500 Oops\r\n{key}\r\ncontent-length: 0\r\n\r\n".encode())
        else:
            respond(conn, 404, b'{"error": {"message": "unknown behaviour"}}')

    def _gzip_stream(self, conn: socket.socket, *, split_first: bool) -> None:
        """A gzip-encoded SSE stream whose network reads do not line up with its events:
        the 10-byte gzip header alone first, or the second event's bytes split after one."""
        fields = [
            ("content-type", "text/event-stream"),
            ("content-encoding", "gzip"),
            ("transfer-encoding", "chunked"),
        ]
        conn.sendall(head(200, fields))
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)

        def compressed(data: bytes) -> bytes:
            return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)

        first = compressed(chunk_event("one"))
        # A gzip header alone inflates to no bytes at all.
        pieces = [first[:10], first[10:]] if split_first else [first]
        second = compressed(chunk_event("two"))
        pieces += [second[:1], second[1:]]  # one byte of a deflate block inflates to nothing
        pieces.append(compressed(b"data: [DONE]\n\n") + compressor.flush())
        for piece in pieces:
            send_chunk(conn, piece)
            time.sleep(0.05)  # separate reads on the gateway's side
        conn.sendall(b"0\r\n\r\n")
