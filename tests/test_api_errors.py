"""Every rejection is OpenAI-shaped, carries x-request-id, and leaves an audit record."""

from __future__ import annotations

import orjson
import pytest
import trio

from crabtrio import proxy

from .harness import TEAM_A, gateway


def error_of(body: bytes) -> dict:
    parsed = orjson.loads(body)
    assert set(parsed) == {"error"}
    assert {"message", "type", "code"} <= set(parsed["error"])
    return parsed["error"]


@pytest.mark.parametrize(
    ("headers", "raw", "status", "code", "key_name"),
    [
        ({}, b'{"model":"gpt-4o"}', 401, "missing_api_key", ""),
        ({"authorization": "Bearer sk-wrong"}, b'{"model":"gpt-4o"}', 401, "invalid_api_key", ""),
        ({"authorization": "Basic sk-team-a"}, b'{"model":"gpt-4o"}', 401, "missing_api_key", ""),
        (TEAM_A, b'{"model": ', 400, "invalid_json", "team-a"),
        (TEAM_A, b"[1, 2]", 400, "invalid_json", "team-a"),
        (TEAM_A, b'{"messages": []}', 400, "invalid_request", "team-a"),
        (TEAM_A, b'{"model": 42}', 400, "invalid_request", "team-a"),
        (TEAM_A, b'{"model": "gpt-4o", "stream": "yes"}', 400, "invalid_request", "team-a"),
        (TEAM_A, b'{"model": "no-such-model"}', 404, "model_not_found", "team-a"),
        (
            {"authorization": "Bearer sk-team-b"},
            b'{"model": "gpt4"}',
            403,
            "model_not_allowed",
            "team-b",
        ),
        (
            TEAM_A,
            b'{"model": "gpt-4o", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            400,
            "invalid_json",
            "team-a",
        ),
        (TEAM_A, b'{"model": "gpt-4o", "x": "\\ud800"}', 400, "invalid_json", "team-a"),
    ],
)
async def test_rejections(tmp_path, headers, raw, status, code, key_name) -> None:
    async with gateway(tmp_path) as gw:
        response = await gw.post("/v1/chat/completions", headers=headers, raw=raw)
        body = await response.get_data()
        assert response.status_code == status
        assert response.content_type == "application/json"
        assert error_of(body)["code"] == code
        request_id = response.headers["x-request-id"]
    (record,) = gw.records()
    assert record["request_id"] == request_id
    assert record["status"] == status
    assert record["key_name"] == key_name
    assert record["endpoint"] == "chat"
    assert record["error"]
    assert "sk-" not in orjson.dumps(record).decode()


async def test_body_over_the_limit_is_413_and_recorded(tmp_path) -> None:
    async with gateway(tmp_path, top="max_body_mb = 0.001\n") as gw:
        big = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"x" * 5000 + b'"}]}'
        response = await gw.post("/v1/chat/completions", headers=TEAM_A, raw=big)
        assert response.status_code == 413
        assert error_of(await response.get_data())["code"] == "request_too_large"
    (record,) = gw.records()
    assert record["status"] == 413


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ],
)
async def test_framework_errors_are_json_too(tmp_path, method, path, status, code) -> None:
    async with gateway(tmp_path) as gw:
        response = await gw.client.open(path, method=method)
        assert response.status_code == status
        assert error_of(await response.get_data())["code"] == code
        assert response.headers["x-request-id"]
    assert gw.records() == []


async def test_models_needs_a_key_and_lists_what_it_allows(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        assert (await gw.client.get("/v1/models")).status_code == 401
        everything = orjson.loads(
            await (await gw.client.get("/v1/models", headers=TEAM_A)).get_data()
        )
        assert everything["object"] == "list"
        assert {m["id"] for m in everything["data"]} == {
            "gpt-4o",
            "text-embedding-3-small",
            "mock-chat",
            "gpt4",
        }
        limited = await gw.client.get("/v1/models", headers={"authorization": "Bearer sk-team-b"})
        assert [m["id"] for m in orjson.loads(await limited.get_data())["data"]] == ["mock-chat"]


async def test_health_needs_no_key(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        response = await gw.client.get("/health")
        body = orjson.loads(await response.get_data())
        assert response.status_code == 200
        assert body["status"] == "ok"
        assert body["audit"]["state"] == "ok"
        assert {"written", "fsyncs", "pending", "failed_writes", "corrupt_lines_skipped"} <= set(
            body["audit"]
        )


async def send_raw(gw, chunks: list[bytes], *, complete: bool, headers: dict[str, str]):
    """Send a body in pieces (optionally never finishing it) and read the answer."""
    async with gw.client.request(
        "/v1/chat/completions", method="POST", headers=headers
    ) as connection:
        for chunk in chunks:
            await connection.send(chunk)
        if complete:
            await connection.send_complete()
        body = b""
        try:
            while True:
                body += await connection.receive()
        except trio.EndOfChannel:
            pass
        return connection.status_code, body


async def test_a_body_in_several_pieces_is_read_whole(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        pieces = [b'{"model": "mock-', b'chat", "messages"', b": []}"]
        status, body = await send_raw(gw, pieces, complete=True, headers=TEAM_A)
        assert status == 200 and orjson.loads(body)["object"] == "chat.completion"


async def test_a_body_that_never_finishes_is_408(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(proxy, "BODY_TIMEOUT_SECONDS", 0.3)  # 60 s in production
    async with gateway(tmp_path) as gw:
        status, body = await send_raw(gw, [b'{"model": '], complete=False, headers=TEAM_A)
        assert status == 408 and error_of(body)["code"] == "request_timeout"
    (record,) = gw.records()
    assert record["status"] == 408


async def test_a_declared_length_over_the_limit_is_refused_before_reading(tmp_path) -> None:
    async with gateway(tmp_path, top="max_body_mb = 0.001\n") as gw:
        headers = {**TEAM_A, "content-length": "50000"}
        status, body = await send_raw(gw, [], complete=False, headers=headers)
        assert status == 413 and error_of(body)["code"] == "request_too_large"
