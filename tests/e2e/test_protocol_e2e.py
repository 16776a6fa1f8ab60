"""Protocol abuse against a real `hypercorn crabtrio:app --worker-class trio`: h2c requests
answered before their body arrived, ambiguous HTTP/1.1 framing, errors inside hypercorn's
protocol handling (see crabtrio/hypercorn_fixes.py)."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from .conftest import gateway_config

pytestmark = pytest.mark.e2e

KEY = "sk-team-e2e"
TIMEOUT = 10.0  # seconds any single exchange may take before the test fails
LIMIT = 10 * 1024  # max_body_mb below, in bytes


def config(tmp_path: Path) -> str:
    # Nothing here reaches the upstream: its address only has to parse.
    return "max_body_mb = 0.009765625\n" + gateway_config(
        "http://127.0.0.1:9", tmp_path / "a.jsonl"
    )


def port_of(gateway) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


class H2Client:
    """HTTP/2 with prior knowledge over one socket, driven frame by frame."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()  # the preface and our SETTINGS
        self._flush()
        self.status: dict[int, int] = {}
        self.body: dict[int, bytes] = {}
        self.ended: set[int] = set()

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def open(self, method: str, path: str, headers: dict[str, str], *, end: bool = False) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "http")]
        fields += [(":authority", "127.0.0.1"), *headers.items()]
        encoded = [(name.encode(), value.encode()) for name, value in fields]
        self.conn.send_headers(stream_id, encoded, end_stream=end)
        self._flush()
        return stream_id

    def send_body(self, stream_id: int, body: bytes, *, frames: int, end: bool = True) -> None:
        size = -(-len(body) // frames)
        for start in range(0, len(body), size):
            last = end and start + size >= len(body)
            self.conn.send_data(stream_id, body[start : start + size], end_stream=last)
        self._flush()

    def wait_response(self, stream_id: int) -> tuple[int, bytes]:
        """Read frames until `stream_id`'s response has ended; fail after TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        while stream_id not in self.ended:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no complete response on stream {stream_id}") from None
            if not data:
                raise AssertionError(f"server closed the connection before stream {stream_id}")
            for event in self.conn.receive_data(data):
                self._on(event)
            self._flush()
        return self.status[stream_id], self.body.get(stream_id, b"")

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.status[event.stream_id] = int(dict(event.headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.body[event.stream_id] = self.body.get(event.stream_id, b"") + event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.ended.add(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            raise AssertionError(f"server reset stream {event.stream_id}")
        elif isinstance(event, h2.events.ConnectionTerminated):
            raise AssertionError(f"server sent GOAWAY: {event}")


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes; return everything the server sends until it closes the connection."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + TIMEOUT
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(
                    f"server kept the connection open after sending {received!r}"
                ) from None
            except ConnectionResetError:
                return received  # closed with our unread bytes still in its buffer
            if not chunk:
                return received
            received += chunk


def only_response(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", raw)) == 1, f"not one response: {raw!r}"
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(b" ")[1]), headers, body


def models_over_http11(gateway) -> list[str]:
    answer = httpx.get(
        f"{gateway.base_url}/models", headers={"authorization": f"Bearer {KEY}"}, timeout=TIMEOUT
    )
    assert answer.status_code == 200
    return [model["id"] for model in answer.json()["data"]]


def test_h2c_answers_sent_before_the_body_leave_connection_and_worker_serving(
    tmp_path, start_gateway
) -> None:
    gateway = start_gateway(config(tmp_path))
    client = H2Client(port_of(gateway))
    json_headers = {"content-type": "application/json"}
    authorized = {**json_headers, "authorization": f"Bearer {KEY}"}
    chat = json.dumps({"model": "gpt-e2e", "messages": [], "pad": "x" * 20_000}).encode()
    try:
        # No key: 401 before the body is read. The DATA frames then reach a stream hypercorn
        # has dropped, which raised KeyError and ended the worker.
        unauthorized = client.open("POST", "/v1/chat/completions", json_headers)
        status, body = client.wait_response(unauthorized)
        assert status == 401
        assert json.loads(body)["error"]["type"] == "authentication_error"
        client.send_body(unauthorized, chat, frames=4)

        # A declared length over the limit: 413 before the body is read.
        declared = client.open(
            "POST", "/v1/chat/completions", {**authorized, "content-length": str(len(chat))}
        )
        status, body = client.wait_response(declared)
        assert (status, json.loads(body)["error"]["code"]) == (413, "request_too_large")
        client.send_body(declared, chat, frames=4)

        # No declared length: 413 once the body read so far is over the limit, the rest after.
        streamed = client.open("POST", "/v1/chat/completions", authorized)
        client.send_body(streamed, chat[: LIMIT + 100], frames=3, end=False)
        status, _ = client.wait_response(streamed)
        assert status == 413
        client.send_body(streamed, chat[LIMIT + 100 :], frames=3)

        # The same connection still serves requests, and so does the worker over HTTP/1.1.
        models = client.open("GET", "/v1/models", {"authorization": f"Bearer {KEY}"}, end=True)
        status, body = client.wait_response(models)
        assert status == 200
        assert [model["id"] for model in json.loads(body)["data"]] == [
            "gpt-e2e",
            "embed-e2e",
            "fast",
        ]
    finally:
        client.close()
    assert models_over_http11(gateway) == ["gpt-e2e", "embed-e2e", "fast"]
    assert gateway.proc.poll() is None
    assert "Traceback" not in gateway.output


def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(
    tmp_path, start_gateway
) -> None:
    gateway = start_gateway(config(tmp_path))
    smuggled = (
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
    )
    raw = exchange(
        port_of(gateway),
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + smuggled + b"\r\n\r\n",
    )
    status, headers, body = only_response(raw)  # the smuggled request got no answer
    assert status == 400
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {
        "error": {
            "message": "the request is not valid HTTP/1.1 (headers or body framing)",
            "type": "invalid_request_error",
            "code": "invalid_http_request",
        }
    }
    assert models_over_http11(gateway) == ["gpt-e2e", "embed-e2e", "fast"]


NEXT = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        pytest.param(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
            b"Content-Length: 40\r\n\r\n{}{}" + NEXT,
            400,
            "invalid_http_request",
            id="two-content-lengths",
        ),
        pytest.param(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n{}\r\n0\r\n\r\n" + NEXT,
            400,
            "invalid_http_request",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"GET /health HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n" + NEXT,
            400,
            "invalid_http_request",
            id="malformed-header-line",
        ),
        pytest.param(
            # h11 refuses a head still incomplete past 16 KiB (all of it at once is accepted)
            b"GET /health HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20_000,
            431,
            "request_headers_too_large",
            id="headers-too-large",
        ),
        pytest.param(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"0\r\n\r\n" + NEXT,
            501,
            "unsupported_transfer_encoding",
            id="unknown-transfer-coding",
        ),
    ],
)
def test_requests_hypercorn_rejects_get_a_json_error_and_a_closed_connection(
    tmp_path, start_gateway, request_bytes: bytes, status: int, code: str
) -> None:
    gateway = start_gateway(config(tmp_path))
    answer, headers, body = only_response(exchange(port_of(gateway), request_bytes))
    assert (answer, headers[b"connection"]) == (status, b"close")
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", code)
    assert b"no colon" not in body and b"aaaa" not in body  # never echo the client's bytes


def test_an_error_inside_hypercorn_closes_that_connection_only(tmp_path, start_gateway) -> None:
    gateway = start_gateway(config(tmp_path))
    # A WebSocket upgrade with a byte after it (pgjones/hypercorn#225): hypercorn answers 400,
    # then fails to send a second answer for the same request and raises LocalProtocolError.
    raw = exchange(
        port_of(gateway),
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: bKdPyn3u98cTfZJSh4TNeQ==\r\n\r\nx",
    )
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert models_over_http11(gateway) == ["gpt-e2e", "embed-e2e", "fast"]
    gateway.wait_for_line("closed a connection after an error in hypercorn's protocol handling")
    assert gateway.proc.poll() is None
