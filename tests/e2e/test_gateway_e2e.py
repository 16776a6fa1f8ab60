"""The gateway as users run it: hypercorn, a real upstream process, the official client."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import gateway_config
from .processes import wait_until

pytestmark = pytest.mark.e2e

KEY = "sk-team-e2e"
ADMIN = {"authorization": "Bearer adm-e2e-token"}


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def client(gateway, key: str = KEY) -> openai.OpenAI:
    # No idle pooled connections: these clients are never closed, and a socket left open
    # when the garbage collector finds one is a ResourceWarning (an error here).
    http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=20)
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, http_client=http)


def test_chat_stream_and_embeddings_through_the_openai_client(
    tmp_path, upstream, start_gateway
) -> None:
    audit = tmp_path / "audit.jsonl"
    gateway = start_gateway(gateway_config(upstream.url, audit))
    api = client(gateway)

    raw = api.chat.completions.with_raw_response.create(
        model="fast",
        messages=[{"role": "user", "content": "hello"}],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
    )
    chat = raw.parse()
    assert chat.choices[0].message.content.startswith("the quick brown fox")
    assert chat.usage.completion_tokens == 20
    chat_id = raw.headers["x-request-id"]

    words, usage = [], None
    for chunk in api.chat.completions.create(
        model="gpt-e2e", messages=[{"role": "user", "content": "hi"}], stream=True
    ):
        assert chunk.usage is None  # we did not ask for usage: the usage-only chunk is held back
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content)
    assert "".join(words).split() == [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
    ] * 2 + [
        "the",
        "quick",
    ]

    for chunk in api.chat.completions.create(
        model="gpt-e2e", messages=[], stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 20

    embedding = api.embeddings.create(model="embed-e2e", input="hello")
    assert len(embedding.data[0].embedding) == 256
    assert [m.id for m in api.models.list()] == ["gpt-e2e", "embed-e2e", "fast"]

    sent = upstream.requests()
    assert all(r["headers"]["authorization"] == "Bearer sk-upstream-e2e" for r in sent)
    assert all(KEY not in json.dumps(r) for r in sent)
    assert json.loads(sent[0]["body"])["model"] == "gpt-e2e"
    assert json.loads(sent[0]["body"])["tools"][0]["function"]["name"] == "f"
    assert json.loads(sent[1]["body"])["stream_options"] == {"include_usage": True}

    wait_until(lambda: len(records(audit)) == 4, 2, "four records in the file")
    chat_record, plain_stream, usage_stream, embed = records(audit)
    assert chat_record["request_id"] == chat_id
    assert (
        chat_record["model"],
        chat_record["prompt_tokens"],
        chat_record["completion_tokens"],
    ) == ("gpt-e2e", 12, 20)
    assert chat_record["cost_micros"] == 52  # 12 x $1/M + 20 x $2/M = 52 micro-USD
    assert (plain_stream["stream"], plain_stream["completion_tokens"]) == (True, 20)
    assert usage_stream["completion_tokens"] == 20
    assert (embed["endpoint"], embed["prompt_tokens"]) == ("embeddings", 8)
    assert {r["key_name"] for r in records(audit)} == {"team-e2e"}

    logs = httpx.get(f"{gateway.url}/v1/admin/logs?limit=2", headers=ADMIN)
    assert [r["request_id"] for r in logs.json()] == [
        embed["request_id"],
        usage_stream["request_id"],
    ]
    assert logs.headers["x-next-cursor"]


def test_errors_reach_the_client_in_openai_shape_and_are_recorded(
    tmp_path, upstream, start_gateway
) -> None:
    audit = tmp_path / "audit.jsonl"
    extra = '[providers.narrow]\nkind = "mock"\nmodels = ["mock-only"]\n'
    config = gateway_config(upstream.url, audit, extra="").replace(
        "[[keys]]", extra + "[[keys]]", 1
    )
    config += '\n[[keys]]\nname = "narrow"\nkey = "sk-narrow"\nmodels = ["mock-only"]\n'
    gateway = start_gateway(config)
    api = client(gateway)
    with pytest.raises(openai.AuthenticationError):
        client(gateway, key="sk-wrong").chat.completions.create(model="gpt-e2e", messages=[])
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, key="sk-narrow").chat.completions.create(model="gpt-e2e", messages=[])
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="gpt-9", messages=[])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as upstream_400:
        api.chat.completions.create(
            model="gpt-e2e", messages=[], extra_body={"mock": {"status": 400, "echo_auth": True}}
        )
    assert "sk-upstream-e2e" not in str(upstream_400.value.body)
    with pytest.raises(openai.InternalServerError) as failing:
        api.chat.completions.create(
            model="gpt-e2e", messages=[], extra_body={"mock": {"status": 500}}
        )
    assert failing.value.status_code == 500
    recovered = api.chat.completions.create(
        model="gpt-e2e",
        messages=[],
        extra_body={"mock": {"status": 503, "fail_times": 1, "id": "flaky"}},
    )
    assert recovered.usage.completion_tokens == 20
    with pytest.raises(openai.APIStatusError) as slow:
        api.chat.completions.create(
            model="gpt-e2e", messages=[], extra_body={"mock": {"delay_ms": 3000}}
        )
    assert slow.value.status_code == 504
    bad = httpx.post(
        f"{gateway.base_url}/chat/completions",
        content=b"{oops",
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert httpx.get(f"{gateway.url}/nowhere").json()["error"]["code"] == "not_found"

    wait_until(lambda: len(records(audit)) == 8, 3, "eight records")
    statuses = [r["status"] for r in records(audit)]
    assert statuses == [401, 403, 404, 400, 500, 200, 504, 400]
    assert not any(
        secret in audit.read_text()
        for secret in ("sk-upstream-e2e", KEY, "sk-narrow", "sk-wrong", "adm-e2e-token")
    )
    assert not any(secret in gateway.output for secret in ("sk-upstream-e2e", KEY, "adm-e2e-token"))


def test_streams_broken_stalled_or_abandoned_mid_way_are_recorded(
    tmp_path, upstream, start_gateway
) -> None:
    audit = tmp_path / "audit.jsonl"
    gateway = start_gateway(gateway_config(upstream.url, audit))
    api = client(gateway)

    def consume(mock: dict) -> list:
        stream = api.chat.completions.create(
            model="gpt-e2e", messages=[], stream=True, extra_body={"mock": mock}
        )
        return [chunk for chunk in stream]

    with pytest.raises(openai.APIError):
        consume({"drop_after": 3})
    with pytest.raises(openai.APIError):
        consume({"stall_after": 3})
    with httpx.stream(
        "POST",
        f"{gateway.base_url}/chat/completions",
        json={
            "model": "gpt-e2e",
            "messages": [],
            "stream": True,
            "mock": {"chunks": 200, "chunk_delay_ms": 20},
        },
        headers={"authorization": f"Bearer {KEY}"},
    ) as response:
        first = next(response.iter_bytes())
        assert first.startswith(b"data: ")
    wait_until(lambda: len(records(audit)) == 3, 5, "three records")
    broken, stalled, abandoned = records(audit)
    assert (broken["status"], stalled["status"], abandoned["status"]) == (502, 504, 499)
    assert all(r["stream"] for r in (broken, stalled, abandoned))


def test_default_config_serves_out_of_the_box(tmp_path, start_gateway) -> None:
    gateway = start_gateway(None)
    reply = client(gateway, key="anything").chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.usage.total_tokens > 0
    assert "auth off" in gateway.output and "loopback clients only" in gateway.output
    wait_until(
        lambda: len(records(tmp_path / "crabtrio-audit.jsonl")) == 1,
        2,
        "the record in ./crabtrio-audit.jsonl",
    )
    logs = httpx.get(f"{gateway.url}/v1/admin/logs")
    assert logs.status_code == 200 and logs.json()[0]["model"] == "mock-chat"


def test_bad_config_stops_startup_with_one_line(tmp_path, start_gateway) -> None:
    gateway = start_gateway("[providers.x]\nkind = 'bedrock'\nmodels = ['a']\n", wait=False)
    gateway.wait(20)
    assert "config error" in gateway.output
    assert "providers.x.kind: unknown provider kind 'bedrock'" in gateway.output
    assert "Traceback" not in gateway.output
    assert "Running on" not in gateway.output


def test_restart_replays_the_log_and_cuts_a_torn_tail(tmp_path, upstream, start_gateway) -> None:
    audit = tmp_path / "audit.jsonl"
    config = gateway_config(upstream.url, audit)
    first = start_gateway(config)
    ids = [
        client(first)
        .chat.completions.with_raw_response.create(model="gpt-e2e", messages=[])
        .headers["x-request-id"]
        for _ in range(5)
    ]
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    with open(audit, "ab") as f:
        f.write(b'{"request_id": "torn-by-a-crash", "timest')
    second = start_gateway(config)
    second.wait_for_line(r"cut a torn trailing line of 41 bytes")
    logs = httpx.get(f"{second.url}/v1/admin/logs", headers=ADMIN).json()
    assert sorted(r["request_id"] for r in logs) == sorted(ids)
    client(second).chat.completions.create(model="gpt-e2e", messages=[])
    wait_until(lambda: len(records(audit)) == 6, 2, "the sixth record")  # every line parses
