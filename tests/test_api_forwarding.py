"""Forwarding: bodies, keys, retries, fallback, streams and what each leaves in the record."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
import trio

from .harness import BASE, TEAM_A, chat_answer, gateway, stream_chunks

CHAT = {
    "model": "gpt4",
    "messages": [{"role": "user", "content": "hi"}],
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "x_vendor_field": {"a": 1},
}


class Upstream:
    """A fake upstream that records what it received."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.calls: Counter[str] = Counter()

    def note(self, request: httpx.Request) -> dict:
        self.requests.append(request)
        self.calls[request.url.host] += 1
        return orjson.loads(request.content)


async def test_chat_is_forwarded_with_the_upstream_key_and_recorded(tmp_path) -> None:
    upstream = Upstream()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        return httpx.Response(200, json=chat_answer())

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)
        assert response.status_code == 200
        assert orjson.loads(await response.get_data()) == chat_answer()
        request_id = response.headers["x-request-id"]
    (sent,) = upstream.requests
    assert sent.url == "http://upstream.test/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-upstream-primary"
    assert "sk-team-a" not in repr(sent.headers) and b"sk-team-a" not in sent.content
    assert orjson.loads(sent.content) == {**CHAT, "model": "gpt-4o"}
    (record,) = gw.records()
    assert record == {
        "request_id": request_id,
        "timestamp": record["timestamp"],
        "key_name": "team-a",
        "model": "gpt-4o",
        "provider": "primary",
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "cost_micros": 4500,
        "latency_ms": record["latency_ms"],
        "status": 200,
        "stream": False,
        "endpoint": "chat",
        "seq": 1,  # the first link of the file's hash chain
        "chain": record["chain"],
    }


async def test_upstream_receives_exactly_the_authorized_body(tmp_path) -> None:
    """Duplicate keys: orjson keeps the last, an upstream parser may keep the first. The
    body goes upstream re-encoded from what was checked, so no reading can differ."""
    seen: list[bytes] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200, json=chat_answer(usage=False))

    # The second key is "model" too, escaped: a first-wins upstream would serve mock-chat.
    raw = b'{"model": "mock-chat", "messages": [], "mod\\u0065l": "gpt-4o", "temperature": 0.70}'
    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", headers=TEAM_A, raw=raw)
        assert response.status_code == 200
    assert len(seen) == 1
    assert orjson.loads(seen[0]) == {"model": "gpt-4o", "messages": [], "temperature": 0.7}
    assert seen[0].count(b'"model"') == 1 and b"\\u" not in seen[0]
    (record,) = gw.records()
    assert "prompt_tokens" not in record and record["cost_micros"] == 0


async def test_duplicate_keys_cannot_smuggle_a_model_past_the_key_acl(tmp_path) -> None:
    seen: list[bytes] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200, json=chat_answer())

    raw = b'{"model":"gpt-4o","stream":true,"model":"mock-chat","stream":false,"messages":[]}'
    async with gateway(tmp_path, handler) as gw:
        headers = {"authorization": "Bearer sk-team-b"}
        response = await gw.post("/v1/chat/completions", headers=headers, raw=raw)
        assert response.status_code == 200  # authorized and served as mock-chat, not streamed
        assert orjson.loads(await response.get_data())["object"] == "chat.completion"
    assert seen == []  # mock-chat is the built-in mock: nothing reached the gpt-4o upstream
    (record,) = gw.records()
    assert (record["model"], record["stream"]) == ("mock-chat", False)


async def test_upstream_4xx_is_relayed_without_retry_and_secrets_scrubbed(tmp_path) -> None:
    upstream = Upstream()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        message = f"bad key {request.headers['authorization']}"
        return httpx.Response(
            400, json={"error": {"message": message, "type": "invalid_request_error", "code": "x"}}
        )

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)
        body = await response.get_data()
        assert response.status_code == 400
        assert orjson.loads(body)["error"]["code"] == "x"
        assert b"sk-upstream-primary" not in body and b"[redacted]" in body
    assert upstream.calls == {"upstream.test": 1}
    assert gw.records()[0]["status"] == 400


async def test_429_retries_then_falls_back_to_the_next_provider(tmp_path) -> None:
    upstream = Upstream()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        if request.url.host == "upstream.test":
            return httpx.Response(429, json={"error": {"message": "slow down"}})
        return httpx.Response(200, json=chat_answer())

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)
        assert response.status_code == 200
    assert upstream.calls == {
        "upstream.test": 2,
        "backup.test": 1,
    }  # 1 + max_retries, then fallback
    (record,) = gw.records()
    assert (record["provider"], record["status"]) == ("backup", 200)


async def test_5xx_everywhere_returns_the_upstream_status(tmp_path) -> None:
    upstream = Upstream()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        return httpx.Response(503, json={"error": {"message": "overloaded"}})

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)
        error = orjson.loads(await response.get_data())["error"]
        assert response.status_code == 503
        assert "overloaded" in error["message"] and error["type"] == "upstream_error"
    assert upstream.calls == {"upstream.test": 2, "backup.test": 1}
    record = gw.records()[0]
    assert (record["status"], record["provider"]) == (503, "backup")


async def test_unreachable_upstreams_give_502(tmp_path) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)
        assert response.status_code == 502
        assert (
            "cannot reach upstream" in orjson.loads(await response.get_data())["error"]["message"]
        )
    assert gw.records()[0]["status"] == 502


async def test_a_timeout_moves_on_to_the_next_provider_without_retrying(
    tmp_path, idle_jump_clock
) -> None:
    """The upstream that timed out may still be generating (and billing) the answer."""
    attempts = []

    async def handler(request: httpx.Request) -> httpx.Response:
        attempts.append((request.url.host, trio.current_time()))
        await trio.sleep(60)
        return httpx.Response(200, json=chat_answer())

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)
        assert response.status_code == 504
        assert orjson.loads(await response.get_data())["error"]["type"] == "timeout_error"
    # primary allows 1 retry, but a timeout is not retried: primary once, then backup once.
    assert [host for host, _ in attempts] == ["upstream.test", "backup.test"]
    assert attempts[1][1] - attempts[0][1] >= 5  # each attempt waited its 5 s timeout
    assert gw.records()[0]["status"] == 504


async def test_retry_on_timeout_retries_the_same_provider(tmp_path, idle_jump_clock) -> None:
    attempts = []

    async def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.host)
        await trio.sleep(60)
        return httpx.Response(200, json=chat_answer())

    base = BASE.replace("max_retries = 1\n", "max_retries = 1\nretry_on_timeout = true\n", 1)
    async with gateway(tmp_path, handler, base=base) as gw:
        response = await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)
        assert response.status_code == 504
    assert attempts == ["upstream.test", "upstream.test", "backup.test"]


async def test_embeddings_are_routed_and_recorded(tmp_path) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/embeddings"
        return httpx.Response(
            200,
            json={
                "object": "list",
                "data": [{"embedding": [0.1]}],
                "usage": {"prompt_tokens": 5, "total_tokens": 5},
            },
        )

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post(
            "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}, headers=TEAM_A
        )
        assert response.status_code == 200
    (record,) = gw.records()
    assert (record["endpoint"], record["prompt_tokens"], record["completion_tokens"]) == (
        "embeddings",
        5,
        0,
    )


def streaming(body: bytes, *, pause: float = 0.0, fail_after: int | None = None):
    async def chunks() -> AsyncIterator[bytes]:
        for i, event in enumerate(body.split(b"\n\n")[:-1]):
            if fail_after is not None and i == fail_after:
                raise httpx.ReadError("connection reset")
            if pause:
                await trio.sleep(pause)
            yield event + b"\n\n"

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunks())


def events_of(body: bytes) -> list[bytes]:
    return [part[6:] for part in body.split(b"\n\n") if part.startswith(b"data: ")]


@pytest.mark.parametrize("client_wants_usage", [False, True])
async def test_stream_relays_events_and_records_usage(tmp_path, client_wants_usage) -> None:
    sent: list[dict] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(orjson.loads(request.content))
        return streaming(stream_chunks(["a", "b", "c"]))

    body = {**CHAT, "stream": True}
    if client_wants_usage:
        body["stream_options"] = {"include_usage": True}
    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", body, headers=TEAM_A)
        assert response.status_code == 200
        assert response.content_type.startswith("text/event-stream")
        events = events_of(await response.get_data())
        request_id = response.headers["x-request-id"]
    assert sent[0]["stream_options"] == {"include_usage": True}
    assert events[-1] == b"[DONE]"
    contents = [
        orjson.loads(e)["choices"][0]["delta"]["content"]
        for e in events[:-1]
        if orjson.loads(e)["choices"]
    ]
    assert contents == ["a", "b", "c"]
    usage_chunks = [e for e in events[:-1] if orjson.loads(e)["choices"] == []]
    assert len(usage_chunks) == (1 if client_wants_usage else 0)
    (record,) = gw.records()
    assert record["request_id"] == request_id
    assert (
        record["stream"],
        record["status"],
        record["prompt_tokens"],
        record["completion_tokens"],
    ) == (True, 200, 7, 3)


async def test_stream_without_usage_still_gets_its_record(tmp_path) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return streaming(stream_chunks(["a"], usage=False))

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", {**CHAT, "stream": True}, headers=TEAM_A)
        assert events_of(await response.get_data())[-1] == b"[DONE]"
    (record,) = gw.records()
    assert (
        record["status"] == 200
        and "prompt_tokens" not in record
        and "completion_tokens" not in record
    )


async def test_stream_retries_before_the_first_event_then_falls_back(tmp_path) -> None:
    upstream = Upstream()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        if request.url.host == "upstream.test":
            return streaming(stream_chunks(["x"]), fail_after=0)  # breaks before any event
        return streaming(stream_chunks(["ok"]))

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", {**CHAT, "stream": True}, headers=TEAM_A)
        assert response.status_code == 200
        assert events_of(await response.get_data())[-1] == b"[DONE]"
    assert upstream.calls == {"upstream.test": 2, "backup.test": 1}
    assert gw.records()[0]["provider"] == "backup"


async def test_stream_broken_mid_way_ends_with_an_error_event_and_502(tmp_path) -> None:
    upstream = Upstream()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        return streaming(stream_chunks(["a", "b", "c", "d"]), fail_after=2)

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", {**CHAT, "stream": True}, headers=TEAM_A)
        events = events_of(await response.get_data())
    assert upstream.calls == {"upstream.test": 1}  # no retry after the client got bytes
    assert b"[DONE]" not in events
    assert orjson.loads(events[-1])["error"]["type"] == "upstream_error"
    (record,) = gw.records()
    assert record["status"] == 502 and "broke off" in record["error"]


async def test_stream_upstream_4xx_is_relayed_as_json(tmp_path) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            422,
            json={"error": {"message": "bad tools", "type": "invalid_request_error", "code": None}},
        )

    async with gateway(tmp_path, handler) as gw:
        response = await gw.post("/v1/chat/completions", {**CHAT, "stream": True}, headers=TEAM_A)
        assert response.status_code == 422
        assert orjson.loads(await response.get_data())["error"]["message"] == "bad tools"
    assert gw.records()[0]["status"] == 422


async def test_long_stream_outlives_quarts_response_timeout(tmp_path) -> None:
    extra = '[providers.slow]\nkind = "mock"\nmodels = ["slow-chat"]\nchunks = 6\ndelay_ms = 100\n'
    async with gateway(tmp_path, extra=extra, app_config={"RESPONSE_TIMEOUT": 0.2}) as gw:
        response = await gw.post(
            "/v1/chat/completions",
            {"model": "slow-chat", "messages": [], "stream": True},
            headers=TEAM_A,
        )
        events = events_of(await response.get_data())
    assert events[-1] == b"[DONE]"
    assert len(events) == 1 + 6 + 1 + 1  # role, 6 words, finish, [DONE]
    assert gw.records()[0]["status"] == 200


async def test_mock_provider_answers_every_endpoint(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        body = {"model": "mock-chat", "messages": [{"role": "user", "content": "a b c"}]}

        async def chat_once() -> dict:
            response = await gw.post("/v1/chat/completions", body, headers=TEAM_A)
            return orjson.loads(await response.get_data())

        chat = await chat_once()
        assert chat["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}
        assert (await chat_once())["choices"] == chat["choices"]  # deterministic
        streamed = events_of(
            await (
                await gw.post(
                    "/v1/chat/completions",
                    {
                        "model": "mock-chat",
                        "messages": [],
                        "stream": True,
                        "stream_options": {"include_usage": True},
                        "max_tokens": 3,
                    },
                    headers=TEAM_A,
                )
            ).get_data()
        )
        assert orjson.loads(streamed[-2])["usage"]["completion_tokens"] == 3
    records = gw.records()
    assert [r["completion_tokens"] for r in records] == [8, 8, 3]


async def test_every_chat_response_carries_the_records_request_id(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        ids = []
        for body in (
            {"model": "mock-chat", "messages": []},
            {"model": "nope"},
            {"model": "mock-chat", "stream": True, "messages": []},
        ):
            ids.append(
                (await gw.post("/v1/chat/completions", body, headers=TEAM_A)).headers[
                    "x-request-id"
                ]
            )
    assert [r["request_id"] for r in gw.records()] == ids
    assert len(set(ids)) == 3
