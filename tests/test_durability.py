"""Durability through the API: group commit, messy files, a clock stepping back, backpressure."""

from __future__ import annotations

import orjson
import trio

from crabtrio.audit import pending as pending_module

from .audit.records import record
from .harness import TEAM_A, gateway

ADMIN = {"authorization": "Bearer admin-secret"}
CHAT = {"model": "mock-chat", "messages": []}


async def health(gw) -> dict:
    return orjson.loads(await (await gw.client.get("/health")).get_data())["audit"]


async def test_always_mode_fsyncs_each_sequential_request(tmp_path) -> None:
    async with gateway(tmp_path, audit='sync = "always"') as gw:
        before = (await health(gw))["fsyncs"]
        for _ in range(10):
            assert (await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)).status_code == 200
        assert (await health(gw))["fsyncs"] - before >= 10


async def test_always_mode_group_commits_concurrent_requests(tmp_path) -> None:
    async with gateway(tmp_path, audit='sync = "always"') as gw:
        before = (await health(gw))["fsyncs"]

        async def one() -> None:
            assert (await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)).status_code == 200

        async with trio.open_nursery() as nursery:
            for _ in range(32):
                nursery.start_soon(one)
        fsyncs = (await health(gw))["fsyncs"] - before
        assert 1 <= fsyncs < 32
    assert len(gw.records()) == 32


async def test_startup_survives_a_messy_file_and_indexes_exactly_the_valid_records(
    tmp_path, caplog
) -> None:
    path = tmp_path / "audit.jsonl"
    good = [record(i).to_line() for i in range(5)]
    path.write_bytes(
        good[0]
        + b"\x00" * 64
        + b"\n"
        + good[1]
        + b"{oops\n"
        + good[2].replace(b"\n", b"\r\n")
        + b"\n\n"
        + b'{"valid": "json", "wrong": "shape"}\n'
        + b"\xc3\x28\n"
        + good[3]
        + b'{"x": "'
        + b"a" * (10 * 1024 * 1024)
        + b'"}\n'
        + good[4]
        + b'{"request_id": "torn'
    )
    async with gateway(tmp_path) as gw:
        listed = orjson.loads(
            await (await gw.client.get("/v1/admin/logs", headers=ADMIN)).get_data()
        )
        assert [r["request_id"] for r in listed] == [f"req-{i:06d}" for i in reversed(range(5))]
        assert (await health(gw))["corrupt_lines_skipped"] == 5
        await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)
    assert "cut a torn trailing line of 20 bytes" in caplog.text
    assert "skipped 5 corrupt line(s)" in caplog.text
    assert path.read_bytes().endswith(b"\n")
    assert orjson.loads(path.read_bytes().splitlines()[-1])["model"] == "mock-chat"


async def test_clock_stepping_back_loses_nothing_in_queries_or_pages(tmp_path, monkeypatch) -> None:
    clock = {"now": 1_800_000_000_000}

    def fake_time_ns() -> int:
        clock["now"] += 1
        return clock["now"] * 1_000_000

    monkeypatch.setattr(pending_module.time, "time_ns", fake_time_ns)
    async with gateway(tmp_path) as gw:
        ids = []
        for i in range(40):
            if i == 20:
                clock["now"] -= 3_600_000  # NTP steps the clock back an hour
            ids.append(
                (await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)).headers[
                    "x-request-id"
                ]
            )
        seen: list[str] = []
        query = "?limit=7"
        while True:
            response = await gw.client.get(f"/v1/admin/logs{query}", headers=ADMIN)
            seen += [r["request_id"] for r in orjson.loads(await response.get_data())]
            cursor = response.headers.get("x-next-cursor")
            if cursor is None:
                break
            query = f"?limit=7&before={cursor}"
        assert sorted(seen) == sorted(ids) and len(seen) == 40
        assert seen[:20] == ids[:20][::-1]  # the earlier hour is newer by the clock
        late = orjson.loads(
            await (
                await gw.client.get(
                    "/v1/admin/logs?since=1799990000000&until=1799999999999&limit=1000",
                    headers=ADMIN,
                )
            ).get_data()
        )
        assert sorted(r["request_id"] for r in late) == sorted(ids[20:])


async def test_backlog_at_its_bound_refuses_requests_and_health_says_why(
    tmp_path, full_disk
) -> None:
    async with gateway(tmp_path, audit="queue_max = 3") as gw:
        statuses = [
            (await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)).status_code
            for _ in range(5)
        ]
        assert statuses == [200, 200, 200, 503, 503]
        refused = await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)
        assert orjson.loads(await refused.get_data())["error"]["code"] == "audit_backlog"
        with trio.fail_after(2):
            while (await health(gw))["state"] != "degraded":
                await trio.sleep(0.01)
        state = await health(gw)
        assert (
            "No space left" in state["reason"] and state["pending"] == 3 and state["refused"] == 3
        )
        full_disk.full = False
        await gw.audit_written(timeout=1)
        assert (await health(gw))["written"] >= 3
        assert (await gw.post("/v1/chat/completions", CHAT, headers=TEAM_A)).status_code == 200
    assert len(gw.records()) == 4
