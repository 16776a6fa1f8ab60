"""The Responses API and Anthropic's Messages API routes: what goes upstream (path, headers,
body), what comes back (in each API's shape), and what each request leaves in the record."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from crabtrio.config import EMBEDDED_DEFAULT

from .harness import TEAM_A, gateway

API = """
admin_token = "admin-secret"
[providers.oai]
kind = "openai"
base_url = "http://oai.test/v1"
api_key = "sk-upstream-oai"
models = ["gpt-4o", "resp-model"]
weight = 10
max_retries = 0
timeout = 5
[providers.oai2]
kind = "openai"
base_url = "http://oai2.test/v1"
api_key = "sk-upstream-oai2"
models = ["resp-model"]
weight = 1
max_retries = 0
timeout = 5
[providers.claude]
kind = "anthropic"
base_url = "http://claude.test/v1"
api_key = "sk-ant-upstream-secret"
models = ["claude-x"]
max_retries = 0
timeout = 5
[providers.mock]
kind = "mock"
models = ["mock-chat"]
[providers.slow]
kind = "mock"
models = ["slow-model"]
chunks = 50
delay_ms = 20
[[keys]]
name = "team-a"
key = "sk-team-a"
[[keys]]
name = "team-b"
key = "sk-team-b"
models = ["mock-chat"]
[aliases]
gpt4 = "gpt-4o"
claude = "claude-x"
[pricing.gpt-4o]
prompt_cost_per_million = 2.5
completion_cost_per_million = 10.0
[pricing.resp-model]
prompt_cost_per_million = 1.0
completion_cost_per_million = 2.0
[pricing.claude-x]
prompt_cost_per_million = 3.0
completion_cost_per_million = 15.0
cache_read_cost_per_million = 0.3
cache_creation_cost_per_million = 3.75
"""

TEAM_A_X = {"x-api-key": "sk-team-a"}
SECRETS = ("sk-team-a", "sk-team-b", "sk-upstream-oai", "sk-ant-upstream-secret", "admin-secret")

# --- what the upstreams answer ---------------------------------------------------------------

RESPONSE_USAGE = {
    "input_tokens": 1000,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 200,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 1200,
}
RESPONSE_COST = 1000 * 2.5 + 200 * 10  # micro-USD at the gpt-4o prices: 4500
MESSAGE_USAGE = {
    "input_tokens": 1000,
    "output_tokens": 200,
    "cache_read_input_tokens": 3000,
    "cache_creation_input_tokens": 400,
}
# 1000 x $3 + 200 x $15 + 3000 x $0.30 + 400 x $3.75 (per million) = 8400 micro-USD
MESSAGE_COST = 8400


def response_object(rid: str = "resp_1", *, status: str = "completed", usage: Any = None) -> dict:
    output = [
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "hi there", "annotations": []}],
        }
    ]
    return {
        "id": rid,
        "object": "response",
        "created_at": 1,
        "status": status,
        "model": "gpt-4o",
        "output": output if status == "completed" else [],
        "usage": RESPONSE_USAGE if usage is None and status == "completed" else usage,
    }


def message_object() -> dict:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "hi there"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": MESSAGE_USAGE,
    }


def typed(kind: str, **data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def response_events(rid: str = "resp_1", *, end: bool = True) -> list[bytes]:
    started = response_object(rid, status="in_progress")
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events = [
        typed("response.created", response=started, sequence_number=0),
        typed("response.in_progress", response=started, sequence_number=1),
        typed("response.output_text.delta", **at, delta="hi", sequence_number=2),
        typed("response.output_text.delta", **at, delta=" there", sequence_number=3),
        typed("response.output_text.done", **at, text="hi there", sequence_number=4),
    ]
    if end:
        events.append(typed("response.completed", response=response_object(rid), sequence_number=5))
    return events


def message_events(*, end: bool = True) -> list[bytes]:
    start = {**message_object(), "content": [], "stop_reason": None}
    start["usage"] = {**MESSAGE_USAGE, "output_tokens": 1}
    delta = {"type": "text_delta", "text": "hi"}
    events = [
        typed("message_start", message=start),
        typed("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        typed("ping"),
        typed("content_block_delta", index=0, delta=delta),
        typed("content_block_delta", index=0, delta={"type": "text_delta", "text": " there"}),
        typed("content_block_stop", index=0),
        # Older API versions report only output tokens here: the rest must survive.
        typed("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 200}),
    ]
    if end:
        events.append(typed("message_stop"))
    return events


def streaming(events: list[bytes], *, fail_after: int | None = None) -> httpx.Response:
    """A 200 SSE answer; with `fail_after`, the connection breaks after that many events."""

    async def chunks() -> AsyncIterator[bytes]:
        for i, event in enumerate(events):
            if i == fail_after:
                raise httpx.ReadError("connection reset")
            yield event
        if fail_after is not None and fail_after >= len(events):
            raise httpx.ReadError("connection reset")

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunks())


def sse_events(body: bytes) -> list[tuple[str | None, dict]]:
    """(event name, parsed data) of every event of a typed stream."""
    out = []
    for part in body.split(b"\n\n"):
        if not part.strip():
            continue
        name, data = None, b""
        for line in part.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((name, orjson.loads(data)))
    return out


class Upstream:
    """Records every request the fake upstreams received."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.calls: Counter[str] = Counter()

    def note(self, request: httpx.Request) -> dict:
        self.requests.append(request)
        self.calls[request.url.host] += 1
        return orjson.loads(request.content)


def assert_no_client_secret(request: httpx.Request) -> None:
    text = repr(request.headers.raw) + request.content.decode()
    assert "sk-team-a" not in text and "sk-team-b" not in text


def anthropic_error(body: bytes) -> dict:
    """The `error` of an Anthropic-shaped error body (and nothing else in it)."""
    parsed = orjson.loads(body)
    assert set(parsed) == {"type", "error"} and parsed["type"] == "error"
    assert set(parsed["error"]) == {"type", "message"}
    assert isinstance(parsed["error"]["message"], str)
    return parsed["error"]


def openai_error(body: bytes) -> dict:
    parsed = orjson.loads(body)
    assert set(parsed) == {"error"} and {"message", "type", "code"} <= set(parsed["error"])
    return parsed["error"]


def fields(record: dict, expected: dict) -> dict:
    """The record's values of the expected fields (None for one it lacks), to compare with
    `expected`: records may gain fields of other features."""
    return {name: record.get(name) for name in expected}


def one_record(gw: Any, request_id: str) -> dict:
    (record,) = [r for r in gw.records() if r["request_id"] == request_id]
    return record


async def relayed_once(
    tmp_path: Path, path: str, body: dict, headers: dict[str, str], answer: bytes
) -> tuple[httpx.Request, str, dict]:
    """One request relayed to a fake upstream answering `answer` (which the client must get
    as it is): what the upstream received, the request id, and the record."""
    upstream = Upstream()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        return httpx.Response(200, headers={"content-type": "application/json"}, content=answer)

    async with gateway(tmp_path, handler, base=API) as gw:
        response = await gw.post(path, body, headers=headers)
        assert response.status_code == 200
        assert await response.get_data() == answer
        request_id = response.headers["x-request-id"]
    (sent,) = upstream.requests
    return sent, request_id, one_record(gw, request_id)


# --- the Responses API -----------------------------------------------------------------------

RESPONSES_BODY = {
    "model": "gpt4",
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
    "instructions": "be brief",
    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    "reasoning": {"effort": "low"},
    "store": True,
    "metadata": {"ticket": "42"},
    "max_output_tokens": 300,
    "x_vendor_field": {"a": [1, 2.5, None]},
}


async def test_responses_go_upstream_untouched_but_the_model_and_are_recorded(
    tmp_path: Path,
) -> None:
    answer = orjson.dumps(response_object())
    sent, request_id, record = await relayed_once(
        tmp_path, "/v1/responses", RESPONSES_BODY, TEAM_A, answer
    )
    assert sent.url == "http://oai.test/v1/responses"
    assert orjson.loads(sent.content) == {**RESPONSES_BODY, "model": "gpt-4o"}
    assert sent.headers["authorization"] == "Bearer sk-upstream-oai"
    assert "x-api-key" not in sent.headers and "anthropic-version" not in sent.headers
    assert_no_client_secret(sent)
    expected = {
        "request_id": request_id,
        "key_name": "team-a",
        "model": "gpt-4o",
        "provider": "oai",
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "cost_micros": RESPONSE_COST,
        "status": 200,
        "stream": False,
        "endpoint": "responses",
        "error": None,
    }
    assert fields(record, expected) == expected


async def test_responses_stream_is_relayed_byte_for_byte_without_done(tmp_path: Path) -> None:
    upstream = Upstream()
    events = response_events()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        return streaming(events)

    body = {**RESPONSES_BODY, "stream": True}
    async with gateway(tmp_path, handler, base=API) as gw:
        response = await gw.post("/v1/responses", body, headers=TEAM_A)
        assert response.status_code == 200
        assert response.content_type.startswith("text/event-stream")
        assert await response.get_data() == b"".join(events)  # no [DONE], nothing added
        request_id = response.headers["x-request-id"]
    (sent,) = upstream.requests
    assert sent.url == "http://oai.test/v1/responses"
    sent_body = orjson.loads(sent.content)
    assert "stream_options" not in sent_body  # a chat-only option
    assert sent_body == {**body, "model": "gpt-4o"}
    record = one_record(gw, request_id)
    assert (record["status"], record["stream"], record["endpoint"]) == (200, True, "responses")
    assert (record["prompt_tokens"], record["completion_tokens"]) == (1000, 200)
    assert record["cost_micros"] == RESPONSE_COST
    assert "error" not in record


async def test_responses_stream_completed_without_usage_is_recorded_200(tmp_path: Path) -> None:
    """Usage is optional for the record (as for chat): a stream that ends with its
    `response.completed` is complete, whatever that event carries."""
    completed = {k: v for k, v in response_object().items() if k != "usage"}
    events = [*response_events(end=False), typed("response.completed", response=completed)]

    async def handler(request: httpx.Request) -> httpx.Response:
        return streaming(events)

    async with gateway(tmp_path, handler, base=API) as gw:
        body = {**RESPONSES_BODY, "stream": True}
        response = await gw.post("/v1/responses", body, headers=TEAM_A)
        assert await response.get_data() == b"".join(events)
        request_id = response.headers["x-request-id"]
    record = one_record(gw, request_id)
    assert record["status"] == 200 and "prompt_tokens" not in record


# --- Anthropic's Messages API ----------------------------------------------------------------

MESSAGES_BODY = {
    "model": "claude",
    "max_tokens": 256,
    "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "hi"}],
    "metadata": {"user_id": "u-1"},
    "temperature": 0.25,
    "x_vendor_field": {"a": [1, None]},
}


@pytest.mark.parametrize("auth", [TEAM_A_X, TEAM_A], ids=["x-api-key", "bearer"])
async def test_messages_go_upstream_with_the_providers_x_api_key(tmp_path: Path, auth) -> None:
    answer = orjson.dumps(message_object())
    sent, request_id, record = await relayed_once(
        tmp_path, "/v1/messages", MESSAGES_BODY, auth, answer
    )
    assert sent.url == "http://claude.test/v1/messages"
    assert orjson.loads(sent.content) == {**MESSAGES_BODY, "model": "claude-x"}
    assert sent.headers["x-api-key"] == "sk-ant-upstream-secret"
    assert sent.headers.get_list("x-api-key") == ["sk-ant-upstream-secret"]
    assert "authorization" not in sent.headers
    assert sent.headers["anthropic-version"] == "2023-06-01"  # the default
    assert "anthropic-beta" not in sent.headers
    assert_no_client_secret(sent)
    expected = {
        "request_id": request_id,
        "key_name": "team-a",
        "model": "claude-x",
        "provider": "claude",
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "cache_read_tokens": 3000,
        "cache_creation_tokens": 400,
        "cost_micros": MESSAGE_COST,
        "status": 200,
        "stream": False,
        "endpoint": "messages",
        "error": None,
    }
    assert fields(record, expected) == expected


async def test_messages_pass_on_the_clients_anthropic_version_and_beta(tmp_path: Path) -> None:
    upstream = Upstream()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        return httpx.Response(200, json=message_object())

    beta = "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19"
    headers = {**TEAM_A_X, "anthropic-version": "2024-10-22", "anthropic-beta": beta}
    async with gateway(tmp_path, handler, base=API) as gw:
        response = await gw.post("/v1/messages", MESSAGES_BODY, headers=headers)
        assert response.status_code == 200
        # Other client headers stay with the gateway.
        stray = {**headers, "x-stray-header": "no"}
        assert (await gw.post("/v1/messages", MESSAGES_BODY, headers=stray)).status_code == 200
    for sent in upstream.requests:
        assert sent.headers["anthropic-version"] == "2024-10-22"
        assert sent.headers["anthropic-beta"] == beta
        assert sent.headers["x-api-key"] == "sk-ant-upstream-secret"
        assert "x-stray-header" not in sent.headers
    assert len(upstream.requests) == 2


async def test_messages_stream_is_relayed_and_records_cache_usage(tmp_path: Path) -> None:
    upstream = Upstream()
    events = message_events()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        return streaming(events)

    body = {**MESSAGES_BODY, "stream": True}
    async with gateway(tmp_path, handler, base=API) as gw:
        response = await gw.post("/v1/messages", body, headers=TEAM_A_X)
        assert response.status_code == 200
        assert response.content_type.startswith("text/event-stream")
        assert await response.get_data() == b"".join(events)
        request_id = response.headers["x-request-id"]
    (sent,) = upstream.requests
    assert orjson.loads(sent.content) == {**body, "model": "claude-x"}
    assert sent.headers["x-api-key"] == "sk-ant-upstream-secret"
    record = one_record(gw, request_id)
    assert (record["status"], record["stream"], record["endpoint"]) == (200, True, "messages")
    assert (record["prompt_tokens"], record["completion_tokens"]) == (1000, 200)
    assert (record["cache_read_tokens"], record["cache_creation_tokens"]) == (3000, 400)
    assert record["cost_micros"] == MESSAGE_COST


# --- which API serves which model, and who may call it ---------------------------------------


async def test_a_model_of_the_other_api_is_not_found_in_each_apis_shape(tmp_path: Path) -> None:
    upstream = Upstream()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        return httpx.Response(500)

    async with gateway(tmp_path, handler, base=API) as gw:
        on_messages = await gw.post(
            "/v1/messages", {**MESSAGES_BODY, "model": "gpt4"}, headers=TEAM_A_X
        )
        assert on_messages.status_code == 404
        assert anthropic_error(await on_messages.get_data())["type"] == "not_found_error"
        on_responses = await gw.post(
            "/v1/responses", {"model": "claude", "input": "hi"}, headers=TEAM_A
        )
        assert on_responses.status_code == 404
        assert openai_error(await on_responses.get_data())["code"] == "model_not_found"
        on_chat = await gw.post(
            "/v1/chat/completions", {"model": "claude-x", "messages": []}, headers=TEAM_A
        )
        assert on_chat.status_code == 404
        ids = [r.headers["x-request-id"] for r in (on_messages, on_responses, on_chat)]
    assert upstream.requests == []
    records = [one_record(gw, request_id) for request_id in ids]
    assert [(r["endpoint"], r["status"], r["model"]) for r in records] == [
        ("messages", 404, "gpt-4o"),
        ("responses", 404, "claude-x"),
        ("chat", 404, "claude-x"),
    ]


async def test_x_api_key_authenticates_on_messages_only(tmp_path: Path) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/messages"):
            return httpx.Response(200, json=message_object())
        return httpx.Response(200, json=response_object())

    async with gateway(tmp_path, handler, base=API) as gw:
        responses = await gw.post("/v1/responses", RESPONSES_BODY, headers=TEAM_A_X)
        chat = await gw.post(
            "/v1/chat/completions", {"model": "gpt-4o", "messages": []}, headers=TEAM_A_X
        )
        messages = await gw.post("/v1/messages", MESSAGES_BODY, headers=TEAM_A_X)
        wrong_bearer = await gw.post(
            "/v1/messages", MESSAGES_BODY, headers={"authorization": "Bearer sk-wrong"}
        )
        assert (responses.status_code, chat.status_code, messages.status_code) == (401, 401, 200)
        assert openai_error(await responses.get_data())["code"] == "missing_api_key"
        assert openai_error(await chat.get_data())["code"] == "missing_api_key"
        assert wrong_bearer.status_code == 401
        assert anthropic_error(await wrong_bearer.get_data())["type"] == "authentication_error"
        await gw.audit_written()
        statuses = [(r["endpoint"], r["status"], r["key_name"]) for r in gw.records()]
    assert statuses == [
        ("responses", 401, ""),
        ("chat", 401, ""),
        ("messages", 200, "team-a"),
        ("messages", 401, ""),
    ]


REJECTIONS = [
    # (headers, raw body, status, Anthropic error type, OpenAI error code, key_name)
    ({}, b'{"model":"claude-x"}', 401, "authentication_error", "missing_api_key", ""),
    # not read on the Responses API: missing there
    (
        {"x-api-key": "sk-wrong"},
        b'{"model":"claude-x"}',
        401,
        "authentication_error",
        "missing_api_key",
        "",
    ),
    (
        {"authorization": "Bearer sk-wrong"},
        b'{"model":"x"}',
        401,
        "authentication_error",
        "invalid_api_key",
        "",
    ),
    (
        {"authorization": "Bearer sk-team-b"},
        b'{"model":"MODEL"}',
        403,
        "permission_error",
        "model_not_allowed",
        "team-b",
    ),
    (TEAM_A, b'{"model":"no-such-model"}', 404, "not_found_error", "model_not_found", "team-a"),
    (TEAM_A, b'{"model": ', 400, "invalid_request_error", "invalid_json", "team-a"),
    (
        TEAM_A,
        b'{"model":"MODEL","stream":"yes"}',
        400,
        "invalid_request_error",
        "invalid_request",
        "team-a",
    ),
    (
        TEAM_A,
        b'{"model":"MODEL","stream":1}',
        400,
        "invalid_request_error",
        "invalid_request",
        "team-a",
    ),
]


@pytest.mark.parametrize(("headers", "raw", "status", "kind", "code", "key_name"), REJECTIONS)
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
async def test_rejections_in_each_apis_shape_are_recorded(
    tmp_path: Path, path, headers, raw, status, kind, code, key_name
) -> None:
    anthropic = path == "/v1/messages"
    raw = raw.replace(b"MODEL", b"claude-x" if anthropic else b"gpt-4o")
    async with gateway(tmp_path, base=API) as gw:
        response = await gw.post(path, headers=headers, raw=raw)
        assert response.status_code == status
        assert response.content_type == "application/json"
        body = await response.get_data()
        if anthropic:
            assert anthropic_error(body)["type"] == kind
        else:
            assert openai_error(body)["code"] == code
        assert all(secret.encode() not in body for secret in SECRETS)
        request_id = response.headers["x-request-id"]
    record = one_record(gw, request_id)
    assert (record["status"], record["key_name"]) == (status, key_name)
    assert record["endpoint"] == path.removeprefix("/v1/")


async def test_rate_limits_apply_with_headers_and_anthropic_shaped_429(tmp_path: Path) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=message_object())

    limited = '[[keys]]\nname = "limited"\nkey = "sk-limited"\nrpm = 1\n'
    async with gateway(tmp_path, handler, base=API, extra=limited) as gw:
        first = await gw.post("/v1/messages", MESSAGES_BODY, headers={"x-api-key": "sk-limited"})
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "1"
        assert first.headers["x-ratelimit-remaining-requests"] == "0"
        refused = await gw.post("/v1/messages", MESSAGES_BODY, headers={"x-api-key": "sk-limited"})
        assert refused.status_code == 429
        assert anthropic_error(await refused.get_data())["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) > 0
        on_responses = await gw.post(
            "/v1/responses", RESPONSES_BODY, headers={"authorization": "Bearer sk-limited"}
        )
        assert on_responses.status_code == 429
        assert openai_error(await on_responses.get_data())["code"] == "rate_limit_exceeded"
        await gw.audit_written()
        statuses = [
            (r["endpoint"], r["status"]) for r in gw.records() if r["key_name"] == "limited"
        ]
    assert statuses == [("messages", 200), ("messages", 429), ("responses", 429)]


async def test_a_budget_counts_the_cost_of_cache_tokens(tmp_path: Path) -> None:
    """One message costs 6000 micro-USD without its cache tokens, 8400 with them: a $0.007
    budget is spent by one."""

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/messages"):
            return httpx.Response(200, json=message_object())
        return httpx.Response(200, json=response_object())

    budgeted = '[[keys]]\nname = "budgeted"\nkey = "sk-budgeted"\nmax_budget_usd = 0.007\n'
    async with gateway(tmp_path, handler, base=API, extra=budgeted) as gw:
        first = await gw.post("/v1/messages", MESSAGES_BODY, headers={"x-api-key": "sk-budgeted"})
        assert first.status_code == 200
        await gw.audit_written()
        svc = gw.app.extensions["crabtrio"]
        (key,) = [k for k in svc.keys.configured if k.name == "budgeted"]
        with trio.fail_after(5):  # the index follower counts the record within one poll
            while svc.admission.spend.spent(key) == 0:
                await trio.sleep(0.01)
        assert svc.admission.spend.spent(key) == MESSAGE_COST
        refused = await gw.post("/v1/messages", MESSAGES_BODY, headers={"x-api-key": "sk-budgeted"})
        assert refused.status_code == 429
        assert anthropic_error(await refused.get_data())["type"] == "rate_limit_error"
        on_responses = await gw.post(
            "/v1/responses", RESPONSES_BODY, headers={"authorization": "Bearer sk-budgeted"}
        )
        assert on_responses.status_code == 429
        assert openai_error(await on_responses.get_data())["code"] == "budget_exceeded"
        await gw.audit_written()
        statuses = [
            (r["endpoint"], r["status"]) for r in gw.records() if r["key_name"] == "budgeted"
        ]
    assert statuses == [("messages", 200), ("messages", 429), ("responses", 429)]


# --- upstream errors -------------------------------------------------------------------------


async def test_anthropic_upstream_4xx_is_relayed_in_its_shape_with_secrets_scrubbed(
    tmp_path: Path,
) -> None:
    upstream = Upstream()

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        message = f"max_tokens too large for key {request.headers['x-api-key']}"
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        return httpx.Response(400, json=error)

    async with gateway(tmp_path, handler, base=API) as gw:
        for stream in (False, True):
            body = {**MESSAGES_BODY, "stream": stream}
            response = await gw.post("/v1/messages", body, headers=TEAM_A_X)
            assert response.status_code == 400
            assert response.content_type == "application/json"
            error = anthropic_error(await response.get_data())
            assert error == {
                "type": "invalid_request_error",
                "message": "max_tokens too large for key [redacted]",
            }
        await gw.audit_written()
        records = gw.records()
    assert len(upstream.requests) == 2  # a 400 is not retried
    assert [(r["status"], r["stream"]) for r in records] == [(400, False), (400, True)]


async def test_responses_upstream_4xx_is_relayed_untouched(tmp_path: Path) -> None:
    error = {
        "error": {
            "message": "Previous response with id 'resp_x' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
    }

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json=error)

    async with gateway(tmp_path, handler, base=API) as gw:
        body = {**RESPONSES_BODY, "previous_response_id": "resp_x"}
        response = await gw.post("/v1/responses", body, headers=TEAM_A)
        assert response.status_code == 404
        assert orjson.loads(await response.get_data()) == error
    assert [r["status"] for r in gw.records()] == [404]


@pytest.mark.parametrize(
    ("upstream_status", "status", "kind"), [(500, 500, "api_error"), (529, 529, "overloaded_error")]
)
async def test_anthropic_upstream_5xx_is_answered_in_anthropic_shape(
    tmp_path: Path, upstream_status, status, kind
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        message = f"overloaded {request.headers['x-api-key']}"
        return httpx.Response(
            upstream_status, json={"type": "error", "error": {"type": kind, "message": message}}
        )

    async with gateway(tmp_path, handler, base=API) as gw:
        response = await gw.post("/v1/messages", MESSAGES_BODY, headers=TEAM_A_X)
        assert response.status_code == status
        body = await response.get_data()
        assert anthropic_error(body)["type"] == kind
        assert b"sk-ant-upstream-secret" not in body
    assert [r["status"] for r in gw.records()] == [status]


# --- streams that end badly ------------------------------------------------------------------


def last_error_event(body: bytes, *, anthropic: bool) -> dict:
    name, data = sse_events(body)[-1]
    assert name == "error"
    if anthropic:
        return {"type": data["type"], **anthropic_error(orjson.dumps(data))}
    assert data["type"] == "error" and isinstance(data["message"], str)
    return data


@pytest.mark.parametrize("how", ["reset", "clean end"])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
async def test_a_stream_cut_before_its_end_event_is_502_with_an_error_event(
    tmp_path: Path, path, how
) -> None:
    anthropic = path == "/v1/messages"
    upstream = Upstream()
    full = message_events() if anthropic else response_events()
    sent_events = full[:4]

    async def handler(request: httpx.Request) -> httpx.Response:
        upstream.note(request)
        if how == "reset":
            return streaming(full, fail_after=4)
        return streaming(sent_events)  # the body ends cleanly, before the end event

    body = {**(MESSAGES_BODY if anthropic else RESPONSES_BODY), "stream": True}
    async with gateway(tmp_path, handler, base=API) as gw:
        response = await gw.post(path, body, headers=TEAM_A)
        assert response.status_code == 200
        data = await response.get_data()
        request_id = response.headers["x-request-id"]
    assert data.startswith(b"".join(sent_events))
    error = last_error_event(data, anthropic=anthropic)
    if anthropic:
        assert error["type"] == "api_error"
    else:
        assert error["code"] == "upstream_error"
    assert len(sse_events(data)) == len(sent_events) + 1
    assert len(upstream.requests) == 1  # no retry once the client got events
    record = one_record(gw, request_id)
    assert (record["status"], record["stream"]) == (502, True)
    assert record["error"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
async def test_an_upstream_error_event_is_relayed_and_recorded_502(tmp_path: Path, path) -> None:
    anthropic = path == "/v1/messages"
    if anthropic:
        error = typed("error", error={"type": "overloaded_error", "message": "Overloaded"})
        events = [*message_events(end=False)[:4], error]
    else:
        error = typed(
            "error", code="server_error", message="Overloaded", param=None, sequence_number=3
        )
        events = [*response_events(end=False)[:3], error]

    async def handler(request: httpx.Request) -> httpx.Response:
        return streaming(events)

    body = {**(MESSAGES_BODY if anthropic else RESPONSES_BODY), "stream": True}
    async with gateway(tmp_path, handler, base=API) as gw:
        response = await gw.post(path, body, headers=TEAM_A)
        assert await response.get_data() == b"".join(events)  # the upstream's own error event
        request_id = response.headers["x-request-id"]
    record = one_record(gw, request_id)
    assert record["status"] == 502 and "Overloaded" in record["error"]


async def test_response_failed_is_recorded_502(tmp_path: Path) -> None:
    failed = response_object(status="failed", usage={"input_tokens": 10, "output_tokens": 0})
    failed["error"] = {"code": "server_error", "message": "the model crashed"}
    events = [*response_events(end=False)[:2], typed("response.failed", response=failed)]

    async def handler(request: httpx.Request) -> httpx.Response:
        return streaming(events)

    async with gateway(tmp_path, handler, base=API) as gw:
        body = {**RESPONSES_BODY, "stream": True}
        response = await gw.post("/v1/responses", body, headers=TEAM_A)
        assert await response.get_data() == b"".join(events)
        request_id = response.headers["x-request-id"]
    record = one_record(gw, request_id)
    assert record["status"] == 502 and "the model crashed" in record["error"]
    assert record["prompt_tokens"] == 10


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
async def test_a_client_leaving_mid_stream_is_recorded_499(tmp_path: Path, path) -> None:
    body: dict[str, Any] = {"model": "slow-model", "stream": True}
    body |= {"messages": [], "max_tokens": 100} if path == "/v1/messages" else {"input": "hi"}
    async with gateway(tmp_path, base=API) as gw:
        response = await gw.post(path, body, headers=TEAM_A, disconnect_after=3)
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
    record = one_record(gw, request_id)
    assert (record["status"], record["stream"]) == (499, True)
    assert record["endpoint"] == path.removeprefix("/v1/")


# --- previous_response_id --------------------------------------------------------------------


class Affinity:
    """Two openai providers of resp-model: `oai` (weight 10, tried first) and `oai2`. Each
    knows only the responses it made, as OpenAI does."""

    def __init__(self) -> None:
        self.made: dict[str, set[str]] = {"oai.test": set(), "oai2.test": set()}
        self.down: set[str] = set()
        self.served: list[str] = []
        self.count = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        body = orjson.loads(request.content)
        if host in self.down:
            return httpx.Response(503, json={"error": {"message": "down", "type": "server_error"}})
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.made[host]:
            return httpx.Response(
                404,
                json={
                    "error": {
                        "message": "not found",
                        "type": "invalid_request_error",
                        "code": "previous_response_not_found",
                    }
                },
            )
        self.count += 1
        rid = f"resp_{host.split('.')[0]}_{self.count}"
        self.made[host].add(rid)
        self.served.append(host)
        if body.get("stream"):
            return streaming(response_events(rid))
        return httpx.Response(200, json=response_object(rid))


def response_id(body: bytes, stream: bool) -> str:
    if not stream:
        return str(orjson.loads(body)["id"])
    name, data = sse_events(body)[-1]
    assert name == "response.completed"
    return str(data["response"]["id"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_previous_response_id_goes_to_the_provider_that_served_it(
    tmp_path: Path, stream: bool
) -> None:
    fake = Affinity()
    body = {"model": "resp-model", "input": "hi", "stream": stream}
    async with gateway(tmp_path, fake.handler, base=API) as gw:
        fake.down = {"oai.test"}  # the first turn falls back to oai2
        first = await gw.post("/v1/responses", body, headers=TEAM_A)
        assert first.status_code == 200
        previous = response_id(await first.get_data(), stream)
        assert fake.served == ["oai2.test"]
        fake.down = set()  # oai is back, and is the heavier: a new conversation goes there
        fresh = await gw.post("/v1/responses", body, headers=TEAM_A)
        assert fresh.status_code == 200
        fresh_id = response_id(await fresh.get_data(), stream)
        for _ in range(3):  # each turn continues the one before
            turn = await gw.post(
                "/v1/responses", {**body, "previous_response_id": previous}, headers=TEAM_A
            )
            assert turn.status_code == 200
            previous = response_id(await turn.get_data(), stream)
        other = await gw.post(
            "/v1/responses", {**body, "previous_response_id": fresh_id}, headers=TEAM_A
        )
        assert other.status_code == 200
        unknown = await gw.post(
            "/v1/responses", {**body, "previous_response_id": "resp_elsewhere"}, headers=TEAM_A
        )
        assert unknown.status_code == 404  # the normal plan: oai, which does not know it
        await gw.audit_written()
        providers = [r["provider"] for r in gw.records()]
    assert fake.served == [
        "oai2.test",
        "oai.test",
        "oai2.test",
        "oai2.test",
        "oai2.test",
        "oai.test",
    ]
    assert providers == ["oai2", "oai", "oai2", "oai2", "oai2", "oai", "oai"]
    assert (tmp_path / "audit.jsonl.responses").stat().st_size > 0  # the table workers share


# --- the built-in mock provider --------------------------------------------------------------

DEFAULT = EMBEDDED_DEFAULT.split("[audit]")[0]  # the harness adds its own [audit]


async def test_mock_provider_answers_the_responses_api(tmp_path: Path) -> None:
    body = {"model": "mock", "input": "one two three four"}
    async with gateway(tmp_path, base=DEFAULT) as gw:
        first = orjson.loads(await (await gw.post("/v1/responses", body)).get_data())
        again = orjson.loads(await (await gw.post("/v1/responses", body)).get_data())
        streamed = await (await gw.post("/v1/responses", {**body, "stream": True})).get_data()
        short = await gw.post("/v1/responses", {**body, "max_output_tokens": 3})
        short_answer = orjson.loads(await short.get_data())
    assert first["object"] == "response" and first["status"] == "completed"
    assert first["model"] == "mock-chat"
    text = first["output"][0]["content"][0]["text"]
    assert len(text.split()) == 8
    assert first["usage"]["input_tokens"] == 4 and first["usage"]["output_tokens"] == 8
    assert (again["id"], again["output"]) == (first["id"], first["output"])  # deterministic
    events = sse_events(streamed)
    assert [name for name, _ in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1][0] == "response.completed"
    assert all(name == data["type"] for name, data in events)
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    assert "".join(deltas) == text
    assert events[-1][1]["response"]["usage"] == first["usage"]
    assert short_answer["status"] == "incomplete"
    assert short_answer["usage"]["output_tokens"] == 3
    records = gw.records()
    assert [(r["endpoint"], r["stream"], r["status"]) for r in records] == [
        ("responses", False, 200),
        ("responses", False, 200),
        ("responses", True, 200),
        ("responses", False, 200),
    ]
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in records] == [(4, 8)] * 3 + [
        (4, 3)
    ]
    # 4 x $0.15 + 8 x $0.60 per million = 5.4 micro-USD
    assert [r["cost_micros"] for r in records[:3]] == [5, 5, 5]


async def test_mock_provider_answers_the_messages_api(tmp_path: Path) -> None:
    body = {
        "model": "mock",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "one two"}],
    }
    async with gateway(tmp_path, base=DEFAULT) as gw:
        first = await gw.post("/v1/messages", body, headers={"x-api-key": "anything"})
        assert first.status_code == 200
        message = orjson.loads(await first.get_data())
        streamed = await (await gw.post("/v1/messages", {**body, "stream": True})).get_data()
        short = orjson.loads(
            await (await gw.post("/v1/messages", {**body, "max_tokens": 2})).get_data()
        )
    assert (message["type"], message["role"], message["model"]) == (
        "message",
        "assistant",
        "mock-chat",
    )
    text = message["content"][0]["text"]
    assert len(text.split()) == 8 and message["stop_reason"] == "end_turn"
    assert message["usage"]["input_tokens"] == 3 and message["usage"]["output_tokens"] == 8
    events = sse_events(streamed)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert all(name == data["type"] for name, data in events)
    deltas = [d["delta"]["text"] for name, d in events if name == "content_block_delta"]
    assert "".join(deltas) == text
    assert events[-2][1]["usage"]["output_tokens"] == 8
    assert (short["stop_reason"], short["usage"]["output_tokens"]) == ("max_tokens", 2)
    records = gw.records()
    assert [(r["endpoint"], r["stream"], r["status"]) for r in records] == [
        ("messages", False, 200),
        ("messages", True, 200),
        ("messages", False, 200),
    ]
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in records] == [
        (3, 8),
        (3, 8),
        (3, 2),
    ]
    assert all(r["cache_read_tokens"] == 0 for r in records)


async def test_streams_outlive_quarts_response_timeout(tmp_path: Path) -> None:
    """Like chat streams: Quart's RESPONSE_TIMEOUT (here 0.2 s) must not cut them."""
    extra = {"RESPONSE_TIMEOUT": 0.2}
    async with gateway(tmp_path, base=API, app_config=extra) as gw:
        with trio.fail_after(10):
            body = {"model": "slow-model", "stream": True, "max_tokens": 15, "messages": []}
            messages = await (await gw.post("/v1/messages", body, headers=TEAM_A)).get_data()
            body = {"model": "slow-model", "stream": True, "max_output_tokens": 15, "input": "x"}
            responses = await (await gw.post("/v1/responses", body, headers=TEAM_A)).get_data()
    assert sse_events(messages)[-1][0] == "message_stop"
    assert sse_events(responses)[-1][0] == "response.incomplete"
    assert [r["status"] for r in gw.records()] == [200, 200]
