"""A fake upstream for the Responses and Messages API end-to-end tests, run as its own process
on 127.0.0.1 (trio and h11, HTTP/1.1 keep-alive):

    python tests/e2e/api_upstream.py --name east [--port 0]

`POST .../responses` answers as OpenAI's Responses API and `POST .../messages` as Anthropic's
Messages API, as JSON or (with `"stream": true`) as their typed SSE events, with known usage
(see the constants; Anthropic's includes prompt-cache tokens). Response and message ids name
the server (`resp_east_1`), and a `previous_response_id` this server did not make is a 404, as
OpenAI answers it. A request's `"fake"` object changes the answer:

    {"fake": {"status": 503, "fail_on": ["east"], "words": 40, "delay_ms": 50, "cut_after": 3}}

`status`: answer that error status (in the API's error shape), on the servers named in
`fail_on` (all when it is absent); `words`: the answer's length (and output tokens);
`delay_ms`: the pause before each streamed event; `cut_after`: send that many events, then
drop the connection mid-body.

`GET /_requests` lists what was received (path, headers, body) and how each answer ended
(`outcome`: complete, cut, or client_gone when the peer left mid-stream). Prints
`listening on http://127.0.0.1:PORT` once ready.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import h11
import trio

WORDS = ["crabs", "walk", "sideways", "on", "warm", "sand"]
RESPONSES_INPUT_TOKENS = 31
MESSAGES_INPUT_TOKENS = 21
CACHE_READ_TOKENS = 300
CACHE_CREATION_TOKENS = 40
ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}
MAX_BODY = 1 << 20


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _event(fields: dict[str, Any]) -> bytes:
    return b"event: " + fields["type"].encode() + b"\ndata: " + _json(fields) + b"\n\n"


def _pieces(count: int) -> list[str]:
    return [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(count)]


class Server:
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.made: set[str] = set()  # the response ids this server made
        self.requests: list[dict[str, Any]] = []

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
        try:
            while True:
                received = await self._read(conn, stream)
                if received is None:
                    return
                request, body = received
                if not await self._answer(conn, stream, request, body):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def _read(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, body
            else:  # ConnectionClosed
                return None

    async def _answer(
        self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, body: bytes
    ) -> bool:
        """Answer one request; False when the connection is to be dropped."""
        path = request.target.decode()
        if request.method == b"GET" and path == "/_requests":
            await self._send(conn, stream, 200, _json(self.requests))
            return True
        headers = {k.decode(): v.decode() for k, v in request.headers}
        entry: dict[str, Any] = {
            "path": path,
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
            "outcome": "pending",
        }
        self.requests.append(entry)
        anthropic = path.endswith("/messages")
        if request.method != b"POST" or not (anthropic or path.endswith("/responses")):
            entry["outcome"] = "complete"
            await self._send(conn, stream, 404, _json({"error": {"message": "no such route"}}))
            return True
        parsed = json.loads(body)
        fake = parsed.get("fake") or {}
        words = _pieces(int(fake.get("words", len(WORDS))))
        status = fake.get("status")
        if status is not None and self.name in fake.get("fail_on", [self.name]):
            entry["outcome"] = "complete"
            await self._send(conn, stream, status, self._error(anthropic, status, "fake failure"))
            return True
        self.count += 1
        previous = parsed.get("previous_response_id")
        if not anthropic and previous is not None and previous not in self.made:
            entry["outcome"] = "complete"
            error = {
                "message": f"Previous response with id '{previous}' not found.",
                "type": "invalid_request_error",
                "param": "previous_response_id",
                "code": "previous_response_not_found",
            }
            await self._send(conn, stream, 404, _json({"error": error}))
            return True
        if anthropic:
            message = self._message(parsed, words)
            whole = message
            events = self._message_events(message, words)
        else:
            response = self._response(parsed, words)
            self.made.add(response["id"])
            whole = response
            events = self._response_events(response, words)
        if parsed.get("stream") is not True:
            entry["outcome"] = "complete"
            await self._send(conn, stream, 200, _json(whole))
            return True
        return await self._stream(conn, stream, entry, events, fake)

    async def _stream(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        entry: dict[str, Any],
        events: list[bytes],
        fake: dict[str, Any],
    ) -> bool:
        pause = float(fake.get("delay_ms", 0)) / 1000
        cut_after = fake.get("cut_after")
        head = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        try:
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=head)))
            for i, event in enumerate(events):
                if cut_after is not None and i >= cut_after:
                    entry["outcome"] = "cut"
                    return False  # mid-body: no last chunk, the connection just closes
                if pause:
                    await trio.sleep(pause)
                await stream.send_all(conn.send(h11.Data(data=event)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            entry["outcome"] = "client_gone"
            return False
        entry["outcome"] = "complete"
        return True

    @staticmethod
    async def _send(
        conn: h11.Connection, stream: trio.SocketStream, status: int, body: bytes
    ) -> None:
        head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        data = conn.send(h11.Response(status_code=status, headers=head))
        await stream.send_all(data + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))

    @staticmethod
    def _error(anthropic: bool, status: int, message: str) -> bytes:
        if anthropic:
            kind = ANTHROPIC_ERRORS.get(status, "api_error")
            return _json({"type": "error", "error": {"type": kind, "message": message}})
        return _json({"error": {"message": message, "type": "server_error", "code": None}})

    def _response(self, body: dict[str, Any], words: list[str]) -> dict[str, Any]:
        rid = f"resp_{self.name}_{self.count}"
        text = "".join(words)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {
            "id": f"msg_{self.name}_{self.count}",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": body.get("model"),
            "output": [item],
            "previous_response_id": body.get("previous_response_id"),
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": RESPONSES_INPUT_TOKENS,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": len(words),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": RESPONSES_INPUT_TOKENS + len(words),
            },
        }

    @staticmethod
    def _response_events(response: dict[str, Any], words: list[str]) -> list[bytes]:
        started = {**response, "status": "in_progress", "output": [], "usage": None}
        item = response["output"][0]
        part = item["content"][0]
        at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "status": "in_progress", "content": []},
            },
            {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
            *(
                {"type": "response.output_text.delta", **at, "delta": w, "logprobs": []}
                for w in words
            ),
            {"type": "response.output_text.done", **at, "text": part["text"], "logprobs": []},
            {"type": "response.content_part.done", **at, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": response},
        ]
        return [_event({**e, "sequence_number": n}) for n, e in enumerate(events)]

    def _message(self, body: dict[str, Any], words: list[str]) -> dict[str, Any]:
        return {
            "id": f"msg_{self.name}_{self.count}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": [{"type": "text", "text": "".join(words)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": MESSAGES_INPUT_TOKENS,
                "cache_creation_input_tokens": CACHE_CREATION_TOKENS,
                "cache_read_input_tokens": CACHE_READ_TOKENS,
                "output_tokens": len(words),
            },
        }

    @staticmethod
    def _message_events(message: dict[str, Any], words: list[str]) -> list[bytes]:
        usage = message["usage"]
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {**usage, "output_tokens": 1},
        }
        events: list[dict[str, Any]] = [
            {"type": "message_start", "message": start},
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            {"type": "ping"},
            *(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                }
                for w in words
            ),
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": usage,  # cumulative, as Anthropic sends it today
            },
            {"type": "message_stop"},
        ]
        return [_event(e) for e in events]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = Server(args.name)
    listeners = await trio.open_tcp_listeners(args.port, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, server.serve, listeners)
        print(f"listening on http://127.0.0.1:{port}", flush=True)


if __name__ == "__main__":
    trio.run(main)
