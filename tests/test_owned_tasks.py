"""Owned tasks that fail while serving: the writer dies, the index cannot read, the audit
directory vanishes. Never a request answered without its record; /health tells the truth."""

from __future__ import annotations

import errno
import shutil
from typing import Any

import httpx
import orjson
import trio

from crabtrio.audit import AuditReader
from crabtrio.audit.store import AuditFile

from .harness import TEAM_A, Gateway, chat_answer, gateway

CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}


async def health(gw: Gateway) -> tuple[int, dict[str, Any]]:
    response = await gw.client.get("/health")
    return response.status_code, orjson.loads(await response.get_data())


async def wait_health(gw: Gateway, status: int, timeout: float = 5) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            code, body = await health(gw)
            if code == status:
                return body
            await trio.sleep(0.02)


async def chat(gw: Gateway, body: Any = CHAT) -> tuple[int, str, dict[str, Any]]:
    response = await gw.post("/v1/chat/completions", body, headers=TEAM_A)
    return (
        response.status_code,
        response.headers["x-request-id"],
        orjson.loads(await response.get_data()),
    )


def assert_every_answer_recorded(gw: Gateway, answered: list[str]) -> None:
    recorded = {record["request_id"] for record in gw.records()}
    missing = [rid for rid in answered if rid not in recorded]
    assert not missing, f"{len(missing)} answered request(s) have no record"


async def test_a_dead_writer_refuses_work_and_says_so(tmp_path, monkeypatch) -> None:
    real_append = AuditFile.append
    calls = 0

    def append_then_break(self: AuditFile, data: bytes, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # a bug, not an OSError: the writer task dies
            raise RuntimeError("injected writer bug")
        return real_append(self, data, **kwargs)

    monkeypatch.setattr(AuditFile, "append", append_then_break)
    answered: list[str] = []
    async with gateway(tmp_path) as gw:
        status, rid, _ = await chat(gw)
        assert status == 200
        answered.append(rid)
        with trio.fail_after(5):
            while calls < 2:
                status, rid, body = await chat(gw)
                if status == 200:
                    answered.append(rid)
                await gw.audit_written()  # its record reached an append (or the writer died)
        body = await wait_health(gw, 503)
        assert body["status"] == "degraded" and body["audit"]["state"] == "failed"
        assert "writer died" in body["audit"]["reason"]
        for _ in range(3):
            status, rid, error = await chat(gw)
            assert status == 503 and error["error"]["code"] in {"audit_backlog", "audit_failed"}
    # The batch that met the bug was written by the final flush: nothing answered is lost.
    assert_every_answer_recorded(gw, answered)


async def test_an_index_that_cannot_read_degrades_and_recovers(tmp_path, monkeypatch) -> None:
    real_catch_up = AuditReader.catch_up
    broken = True

    def flaky_catch_up(self: AuditReader, budget: int | None = None) -> bool:
        if broken:
            raise OSError(errno.EIO, "Input/output error")
        return real_catch_up(self, budget)

    async with gateway(tmp_path) as gw:
        monkeypatch.setattr(AuditReader, "catch_up", flaky_catch_up)
        body = await wait_health(gw, 503)
        assert body["audit"]["index_state"] == "degraded"
        assert "Input/output error" in body["audit"]["index_reason"]
        status, rid, _ = await chat(gw)  # records are still written: chat is served
        assert status == 200
        logs = await gw.client.get(
            "/v1/admin/logs", headers={"authorization": "Bearer admin-secret"}
        )
        assert logs.status_code == 503
        assert orjson.loads(await logs.get_data())["error"]["type"] == "server_error"
        broken = False
        body = await wait_health(gw, 200)
        assert body["status"] == "ok" and body["audit"]["index_state"] == "ok"
        logs = await gw.client.get(
            "/v1/admin/logs", headers={"authorization": "Bearer admin-secret"}
        )
        assert rid in [record["request_id"] for record in orjson.loads(await logs.get_data())]
    assert_every_answer_recorded(gw, [rid])


async def test_a_vanished_audit_directory_refuses_work_until_it_returns(tmp_path) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    answered: list[str] = []
    async with gateway(directory) as gw:
        status, rid, _ = await chat(gw)
        assert status == 200
        answered.append(rid)
        shutil.rmtree(directory)
        # The writer finds the path gone, cannot recreate it, and degrades.
        body = await wait_health(gw, 503)
        assert body["audit"]["state"] == "degraded"
        status, rid, error = await chat(gw)
        assert status == 503 and error["error"]["code"] == "audit_backlog"
        directory.mkdir()
        await wait_health(gw, 200)
        status, rid, _ = await chat(gw)
        assert status == 200
        answered.append(rid)
        await gw.audit_written()
        assert rid in {r["request_id"] for r in gw.records()}
    assert_every_answer_recorded(gw, answered[1:])  # the first went down with the directory


async def test_a_huge_upstream_token_count_cannot_stop_the_log(tmp_path) -> None:
    """2**64 - 1 prompt tokens on a priced model used to overflow the writer's encoder."""

    async def handler(request: httpx.Request) -> httpx.Response:
        answer = chat_answer()
        answer["usage"] = {"prompt_tokens": 2**64 - 1, "completion_tokens": 5}
        return httpx.Response(200, json=answer)

    async with gateway(tmp_path, handler) as gw:
        first = await gw.post(
            "/v1/chat/completions", {"model": "gpt-4o", "messages": []}, headers=TEAM_A
        )
        second = await gw.post(
            "/v1/chat/completions", {"model": "gpt-4o", "messages": []}, headers=TEAM_A
        )
        assert first.status_code == second.status_code == 200
        code, body = await health(gw)
        assert code == 200 and body["audit"]["state"] == "ok"
        await gw.audit_written()
        assert len(gw.records()) >= 2
    for record in gw.records():
        assert "prompt_tokens" not in record and record["completion_tokens"] == 5
        assert record["cost_micros"] == 50  # 5 completion tokens at $10 per million
        assert "usage invalid" in record["error"]
