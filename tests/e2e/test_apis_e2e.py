"""The Responses API and Anthropic's Messages API as users call them: the official `openai` and
`anthropic` clients, a real hypercorn gateway, and fake upstreams of each kind as processes
(tests/e2e/api_upstream.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from .processes import PYTHON, ROOT, Gateway, Process, wait_until

pytestmark = pytest.mark.e2e

KEY = "sk-team-e2e"
WORDS = "crabs walk sideways on warm sand"
# The fake upstreams' usage (tests/e2e/api_upstream.py), and what it costs at the prices below.
RESPONSES_USAGE = (31, 6)
RESPONSES_COST = 31 * 1 + 6 * 2  # micro-USD: $1 and $2 per million tokens
MESSAGES_USAGE = (21, 6, 300, 40)  # input, output, cache read, cache creation
MESSAGES_COST = 21 * 3 + 6 * 15 + 300 * 0.3 + 40 * 3.75  # 393 micro-USD
SLOW = {"words": 40, "delay_ms": 100}  # a 4-second stream


class ApiUpstream(Process):
    def __init__(self, tmp: Path, name: str) -> None:
        script = str(ROOT / "tests" / "e2e" / "api_upstream.py")
        super().__init__([PYTHON, script, "--name", name, "--port", "0"], cwd=tmp)
        self.name = name
        self.url = self.wait_for_line(r"listening on (http://\S+)").group(1)

    def requests(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/_requests", timeout=5).json())


def config(east: str, west: str, claude: str, audit: Path) -> str:
    return f"""
admin_token = "adm-e2e-token"
[providers.east]
kind = "openai"
base_url = "{east}/v1"
api_key = "sk-upstream-east"
models = ["resp-e2e"]
weight = 9
max_retries = 0
timeout = 5
[providers.west]
kind = "openai"
base_url = "{west}/v1"
api_key = "sk-upstream-west"
models = ["resp-e2e"]
weight = 1
max_retries = 0
timeout = 5
[providers.claude]
kind = "anthropic"
base_url = "{claude}/v1"
api_key = "sk-ant-upstream-e2e"
models = ["claude-e2e"]
max_retries = 0
timeout = 5
[[keys]]
name = "team-e2e"
key = "{KEY}"
[[keys]]
name = "resp-only"
key = "sk-resp-only"
models = ["resp-e2e"]
[[keys]]
name = "claude-only"
key = "sk-claude-only"
models = ["claude-e2e"]
[aliases]
claude = "claude-e2e"
[pricing.resp-e2e]
prompt_cost_per_million = 1.0
completion_cost_per_million = 2.0
[pricing.claude-e2e]
prompt_cost_per_million = 3.0
completion_cost_per_million = 15.0
cache_read_cost_per_million = 0.3
cache_creation_cost_per_million = 3.75
[audit]
path = "{audit}"
"""


def http_client() -> httpx.Client:
    # No idle pooled connections: a socket the garbage collector finds open is a
    # ResourceWarning (an error here); and each request a new connection, so that with
    # two workers either may take it.
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=20)


@dataclass
class Stack:
    gateway: Gateway
    audit: Path
    east: ApiUpstream
    west: ApiUpstream
    claude: ApiUpstream

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.gateway.base_url, api_key=key, max_retries=0, http_client=http_client()
        )

    def anthropic(self, key: str = KEY, *, bearer: bool = False) -> anthropic.Anthropic:
        """The client as users configure it: `api_key` (x-api-key), or `auth_token` (Bearer)."""
        auth: dict[str, Any] = {"auth_token": key} if bearer else {"api_key": key}
        return anthropic.Anthropic(
            base_url=self.gateway.url, max_retries=0, http_client=http_client(), **auth
        )

    def records(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        lines = self.audit.read_bytes().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def record(self, request_id: str) -> dict[str, Any]:
        """The request's record, once it is in the file (at most 5 s from now)."""
        found: list[dict[str, Any]] = []

        def written() -> bool:
            found[:] = [r for r in self.records() if r["request_id"] == request_id]
            return bool(found)

        wait_until(written, 5, f"the record of {request_id}")
        (record,) = found
        return record

    def openai_requests(self) -> list[dict[str, Any]]:
        return self.east.requests() + self.west.requests()


@pytest.fixture
def stack(tmp_path: Path, start_gateway: Callable[..., Gateway]) -> Iterator[Callable[..., Stack]]:
    upstreams: list[ApiUpstream] = []

    def start(**options: Any) -> Stack:
        for name in ("east", "west", "claude"):
            upstreams.append(ApiUpstream(tmp_path, name))
        east, west, claude = upstreams[-3:]
        audit = tmp_path / "audit.jsonl"
        gateway = start_gateway(config(east.url, west.url, claude.url, audit), **options)
        return Stack(gateway, audit, east, west, claude)

    try:
        yield start
    finally:
        for upstream in upstreams:
            upstream.stop()


def assert_no_client_key(sent: list[dict[str, Any]]) -> None:
    assert sent and all(KEY not in json.dumps(request) for request in sent)


# --- the Responses API with the openai client ------------------------------------------------


def test_responses_plain_and_streamed_through_the_openai_client(stack) -> None:
    s = stack()
    api = s.openai()

    raw = api.responses.with_raw_response.create(
        model="resp-e2e", input="hello", instructions="be brief", metadata={"t": "1"}
    )
    response = raw.parse()
    assert response.output_text == WORDS
    assert (response.usage.input_tokens, response.usage.output_tokens) == RESPONSES_USAGE
    record = s.record(raw.headers["x-request-id"])
    assert (record["prompt_tokens"], record["completion_tokens"]) == RESPONSES_USAGE
    assert record["cost_micros"] == RESPONSES_COST
    assert (record["endpoint"], record["stream"], record["status"]) == ("responses", False, 200)
    assert response.id.startswith(f"resp_{record['provider']}_")

    stream = api.responses.create(model="resp-e2e", input="hello", stream=True)
    request_id = stream.response.headers["x-request-id"]
    events = list(stream)
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == WORDS
    usage = events[-1].response.usage
    record = s.record(request_id)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        usage.input_tokens,
        usage.output_tokens,
    )
    assert record["cost_micros"] == RESPONSES_COST
    assert (record["endpoint"], record["stream"], record["status"]) == ("responses", True, 200)

    sent = s.openai_requests()
    assert [r["path"] for r in sent] == ["/v1/responses"] * 2
    bodies = [json.loads(r["body"]) for r in sent]
    (plain,) = [body for body in bodies if "stream" not in body]
    (streamed,) = [body for body in bodies if "stream" in body]
    assert plain == {
        "model": "resp-e2e",
        "input": "hello",
        "instructions": "be brief",
        "metadata": {"t": "1"},
    }
    assert streamed == {"model": "resp-e2e", "input": "hello", "stream": True}  # no stream_options
    for upstream in (s.east, s.west):
        for r in upstream.requests():
            assert r["headers"]["authorization"] == f"Bearer sk-upstream-{upstream.name}"
            assert "x-api-key" not in r["headers"]
    assert_no_client_key(sent)
    assert s.claude.requests() == []


# --- the Messages API with the anthropic client ----------------------------------------------


def test_messages_plain_and_streamed_through_the_anthropic_client(stack) -> None:
    s = stack()
    beta = "prompt-caching-2024-07-31"

    raw = s.anthropic().messages.with_raw_response.create(
        model="claude",
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": "hello"}],
        extra_headers={"anthropic-beta": beta},
    )
    message = raw.parse()
    assert message.content[0].text == WORDS
    usage = message.usage
    assert (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
    ) == MESSAGES_USAGE
    record = s.record(raw.headers["x-request-id"])
    assert (
        record["prompt_tokens"],
        record["completion_tokens"],
        record["cache_read_tokens"],
        record["cache_creation_tokens"],
    ) == MESSAGES_USAGE
    assert record["cost_micros"] == round(MESSAGES_COST)
    assert (record["endpoint"], record["stream"], record["status"]) == ("messages", False, 200)
    assert (record["key_name"], record["provider"]) == ("team-e2e", "claude")

    # Authenticated with a Bearer token this time (the client's `auth_token`).
    with s.anthropic(bearer=True).messages.stream(
        model="claude", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert text == WORDS
    usage = final.usage
    record = s.record(request_id)
    assert (
        record["prompt_tokens"],
        record["completion_tokens"],
        record["cache_read_tokens"],
        record["cache_creation_tokens"],
    ) == (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
    )
    assert record["cost_micros"] == round(MESSAGES_COST)
    assert (record["endpoint"], record["stream"], record["status"]) == ("messages", True, 200)

    sent = s.claude.requests()
    assert [r["path"] for r in sent] == ["/v1/messages"] * 2
    for r in sent:
        assert r["headers"]["x-api-key"] == "sk-ant-upstream-e2e"
        assert "authorization" not in r["headers"]
        assert r["headers"]["anthropic-version"] == "2023-06-01"  # the client's
        assert json.loads(r["body"])["model"] == "claude-e2e"
    assert sent[0]["headers"]["anthropic-beta"] == beta
    assert "anthropic-beta" not in sent[1]["headers"]
    assert json.loads(sent[0]["body"])["system"] == "be brief"
    assert json.loads(sent[1]["body"])["stream"] is True
    assert_no_client_key(sent)
    assert s.openai_requests() == []


# --- streams that end early ------------------------------------------------------------------


def test_a_client_that_leaves_mid_stream_is_recorded_499(stack) -> None:
    s = stack()
    stream = s.openai().responses.create(
        model="resp-e2e", input="hi", stream=True, extra_body={"fake": SLOW}
    )
    responses_id = stream.response.headers["x-request-id"]
    assert next(iter(stream)).type == "response.created"
    stream.close()

    with s.anthropic().messages.stream(
        model="claude", max_tokens=64, messages=[], extra_body={"fake": SLOW}
    ) as events:
        messages_id = events.response.headers["x-request-id"]
        assert next(iter(events)).type == "message_start"
    # Leaving the block closed the connection.

    for request_id in (responses_id, messages_id):
        record = s.record(request_id)
        assert (record["status"], record["stream"]) == (499, True)
    # ... and the gateway let go of each upstream stream, long before its 4 s were over.
    for upstream in (s.claude, s.east if s.east.requests() else s.west):
        wait_until(
            lambda u=upstream: u.requests()[-1]["outcome"] == "client_gone",
            3,
            f"{upstream.name} to see its stream abandoned",
        )


def test_an_upstream_cut_mid_stream_is_502_and_an_error_for_the_client(stack) -> None:
    s = stack()
    cut = {"fake": {"cut_after": 4}}
    stream = s.openai().responses.create(model="resp-e2e", input="hi", stream=True, extra_body=cut)
    responses_id = stream.response.headers["x-request-id"]
    events = list(stream)
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-1] == "error" and "response.completed" not in types

    with (
        pytest.raises(anthropic.APIStatusError) as raised,
        s.anthropic().messages.stream(
            model="claude", max_tokens=64, messages=[], extra_body=cut
        ) as message_stream,
    ):
        messages_id = message_stream.response.headers["x-request-id"]
        for _ in message_stream:
            pass
    assert raised.value.body["type"] == "error"  # type: ignore[index]
    assert raised.value.body["error"]["type"] == "api_error"  # type: ignore[index]

    for request_id in (responses_id, messages_id):
        record = s.record(request_id)
        assert (record["status"], record["stream"]) == (502, True)
    assert s.claude.requests()[-1]["outcome"] == "cut"
    assert len(s.claude.requests()) == 1 and len(s.openai_requests()) == 1  # no retry


# --- errors as each client's own exceptions --------------------------------------------------


def call_messages(client: anthropic.Anthropic, model: str, *, stream: bool) -> None:
    if not stream:
        client.messages.create(model=model, max_tokens=8, messages=[])
        return
    with client.messages.stream(model=model, max_tokens=8, messages=[]) as events:
        for _ in events:
            pass


def test_401_403_404_raise_each_clients_typed_errors_and_are_recorded(stack) -> None:
    s = stack()
    cases_openai: list[tuple[type[openai.APIStatusError], str, str]] = [
        (openai.AuthenticationError, "sk-wrong", "resp-e2e"),
        (openai.PermissionDeniedError, "sk-claude-only", "resp-e2e"),
        (openai.NotFoundError, KEY, "no-such-model"),
        (openai.NotFoundError, KEY, "claude"),  # served by an Anthropic provider only
    ]
    seen: list[tuple[str, int]] = []
    for openai_error, key, model in cases_openai:
        with pytest.raises(openai_error) as raised_openai:
            s.openai(key).responses.create(model=model, input="hi")
        error = raised_openai.value
        assert isinstance(error.body, dict) and {"message", "type", "code"} <= set(error.body)
        seen.append((error.response.headers["x-request-id"], error.status_code))

    cases_anthropic: list[tuple[type[anthropic.APIStatusError], str, str, str]] = [
        (anthropic.AuthenticationError, "sk-wrong", "claude", "authentication_error"),
        (anthropic.PermissionDeniedError, "sk-resp-only", "claude", "permission_error"),
        (anthropic.NotFoundError, KEY, "no-such-model", "not_found_error"),
        (anthropic.NotFoundError, KEY, "resp-e2e", "not_found_error"),  # an OpenAI model
    ]
    for anthropic_error, key, model, kind in cases_anthropic:
        for stream in (False, True):
            with pytest.raises(anthropic_error) as raised:
                call_messages(s.anthropic(key), model, stream=stream)
            body = raised.value.body
            assert isinstance(body, dict) and body["type"] == "error"
            assert body["error"]["type"] == kind
            seen.append((raised.value.response.headers["x-request-id"], raised.value.status_code))

    for request_id, status in seen:
        assert s.record(request_id)["status"] == status
    assert [status for _, status in seen] == [401, 403, 404, 404] + [401] * 2 + [403] * 2 + [
        404
    ] * 4
    assert s.openai_requests() == [] and s.claude.requests() == []


# --- previous_response_id across workers -----------------------------------------------------


def workers_running(gateway: Gateway) -> int:
    return sum("Running on" in line for line in gateway.lines)


def worker_pids(gateway: Gateway) -> set[str]:
    """The workers that answered POST /v1/responses, from hypercorn's access log."""
    return {
        match.group(1)
        for line in gateway.lines
        if (match := re.search(r"<(\d+)> POST /v1/responses ", line)) is not None
    }


def test_previous_response_id_lands_on_the_provider_that_served_it(stack) -> None:
    """east (weight 9) is down for the first turn, so west serves it; every later turn must
    go to west (east does not know west's ids: a 404), whichever worker takes it."""
    access_log = ("--access-logfile", "-", "--access-logformat", "%(p)s %(r)s %(s)s")
    s = stack(workers=2, extra_args=access_log)
    # The gateway is up once one worker is; the test needs both.
    wait_until(lambda: workers_running(s.gateway) == 2, 20, "both workers to serve")
    api = s.openai()
    first = api.responses.create(
        model="resp-e2e", input="turn 0", extra_body={"fake": {"status": 503, "fail_on": ["east"]}}
    )
    assert first.id.startswith("resp_west_")
    chain = [first.id]
    turns = 0
    # At least 8 turns, and until both workers have taken some (bounded).
    while turns < 8 or len(worker_pids(s.gateway)) < 2:
        assert turns < 40, f"one worker took every request: {worker_pids(s.gateway)}"
        if turns % 2:
            events = list(
                api.responses.create(
                    model="resp-e2e",
                    input=f"turn {turns}",
                    previous_response_id=chain[-1],
                    stream=True,
                )
            )
            assert events[-1].type == "response.completed"
            chain.append(events[-1].response.id)
        else:
            answer = api.responses.create(
                model="resp-e2e", input=f"turn {turns}", previous_response_id=chain[-1]
            )
            chain.append(answer.id)
        turns += 1
    assert all(rid.startswith("resp_west_") for rid in chain)
    east, west = s.east.requests(), s.west.requests()
    # At most the first turn, which it refused (unless the weighted pick chose west first).
    assert len(east) <= 1 and all("previous_response_id" not in r["body"] for r in east)
    previous = [json.loads(r["body"]).get("previous_response_id") for r in west]
    assert previous == [None, *chain[:-1]]
    wait_until(lambda: len(s.records()) == turns + 1, 5, "every turn's record")
    assert [r["provider"] for r in s.records()] == ["west"] * (turns + 1)
    assert (s.audit.parent / "audit.jsonl.responses").exists()  # the table workers share
