"""Budgets and rate limits through the app: the 429s and their records, the x-ratelimit-*
headers, the next period or window admitting again (an injected clock), and reloads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from crabtrio.audit.rollups import DAY_MS
from crabtrio.budgets import month_start
from crabtrio.config import ConfigError, load_config, parse_config
from crabtrio.reload import reload

from .harness import BASE, chat_answer, gateway, stream_chunks

DAY0 = 1_793_491_200.0  # 2026-11-01T00:00:00Z: the clock's start in these tests
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
# chat_answer's usage (1000 prompt + 200 completion tokens) at gpt-4o's prices in BASE.
ANSWER_COST = 1000 * 2.5 + 200 * 10.0  # micro-USD
LIMITED = """
[[keys]]
name = "metered"
key = "sk-metered"
{settings}
"""
METERED = {"authorization": "Bearer sk-metered"}


class Clock:
    """What budgets and limits read as the time; moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def answer(request: httpx.Request) -> httpx.Response:
    if orjson.loads(request.content).get("stream"):
        return httpx.Response(
            200, content=stream_chunks(["a", "b"]), headers={"content-type": "text/event-stream"}
        )
    return httpx.Response(200, json=chat_answer())


async def wait_for(condition: Any, what: str, timeout: float = 5.0) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


def limited(settings: str) -> str:
    return LIMITED.format(settings=settings)


def spend(gw: Any, name: str) -> int:
    svc = gw.app.extensions["crabtrio"]
    key = next(k for k in svc.keys.configured if k.name == name)
    return svc.admission.spend.spent(key)


async def error_of(response: Any) -> dict[str, Any]:
    return orjson.loads(await response.get_data())["error"]  # type: ignore[no-any-return]


async def test_a_key_over_its_daily_budget_is_refused_until_the_next_day(tmp_path: Path) -> None:
    clock = Clock(time.time())
    config = limited('max_budget_usd = 0.01\nbudget_period = "day"')
    async with gateway(tmp_path, answer, extra=config, clock=clock) as gw:
        for n in range(1, 4):  # 0, 4500, 9000 micro-USD spent before each: under 10000
            response = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
            assert response.status_code == 200
            await gw.audit_written()
            await wait_for(lambda n=n: spend(gw, "metered") == n * ANSWER_COST, "the spend")
        refused = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
        assert refused.status_code == 429
        error = await error_of(refused)
        assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
        assert "$0.013500 of its $0.010000 day budget" in error["message"]
        # Another key is not affected, nor a streamed request of it counted twice.
        other = await gw.post(
            "/v1/chat/completions", CHAT, headers={"authorization": "Bearer sk-team-a"}
        )
        assert other.status_code == 200
        clock.now += 86_400  # the next UTC day: a new budget period
        again = await gw.post("/v1/chat/completions", {**CHAT, "stream": True}, headers=METERED)
        assert again.status_code == 200
        await gw.audit_written()
        records = gw.records()
    metered = [r for r in records if r["key_name"] == "metered"]
    assert [r["status"] for r in metered] == [200, 200, 200, 429, 200]
    assert metered[3]["provider"] == ""  # refused before anything went upstream
    assert "budget" in metered[3]["error"]


async def test_monthly_and_total_budgets_sum_the_trail_from_before_a_restart(
    tmp_path: Path,
) -> None:
    clock = Clock(time.time())
    config = limited("max_budget_usd = 0.005")  # default period: the month
    async with gateway(tmp_path, answer, extra=config, clock=clock) as gw:
        assert (await gw.post("/v1/chat/completions", CHAT, headers=METERED)).status_code == 200
    # A restart sums the spend again from the audit trail.
    async with gateway(tmp_path, answer, extra=config, clock=clock) as gw:
        assert spend(gw, "metered") == ANSWER_COST  # 4500 < 5000: one more is admitted
        assert (await gw.post("/v1/chat/completions", CHAT, headers=METERED)).status_code == 200
        await gw.audit_written()
        await wait_for(lambda: spend(gw, "metered") == 2 * ANSWER_COST, "the spend")
    async with gateway(tmp_path, answer, extra=config, clock=clock) as gw:
        assert spend(gw, "metered") == 2 * ANSWER_COST
        refused = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
        assert (await error_of(refused))["code"] == "budget_exceeded"
        now_ms = int(clock.now * 1000)
        clock.now = (month_start(now_ms) + 32 * DAY_MS) / 1000  # some day of the next month
        assert (await gw.post("/v1/chat/completions", CHAT, headers=METERED)).status_code == 200
    total = limited('max_budget_usd = 0.009\nbudget_period = "total"')
    async with gateway(tmp_path, answer, extra=total, clock=clock) as gw:
        assert spend(gw, "metered") == 3 * ANSWER_COST  # every month of the trail
        refused = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
        assert (await error_of(refused))["code"] == "budget_exceeded"


async def test_a_zero_budget_refuses_every_request(tmp_path: Path) -> None:
    async with gateway(tmp_path, answer, extra=limited("max_budget_usd = 0")) as gw:
        refused = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
        assert refused.status_code == 429
        assert (await error_of(refused))["code"] == "budget_exceeded"


async def test_rpm_refuses_past_the_limit_with_headers_and_admits_after_the_window(
    tmp_path: Path,
) -> None:
    clock = Clock(DAY0)
    async with gateway(tmp_path, answer, extra=limited("rpm = 3"), clock=clock) as gw:
        remaining = []
        for _ in range(3):
            response = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-requests"] == "3"
            assert response.headers["x-ratelimit-reset-requests"] == "1m1s"
            assert "x-ratelimit-limit-tokens" not in response.headers
            remaining.append(response.headers["x-ratelimit-remaining-requests"])
            clock.now += 10
        assert remaining == ["2", "1", "0"]
        refused = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
        assert refused.status_code == 429
        error = await error_of(refused)
        assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
        # The first request's second leaves the window 61 s after it: 31 s from now.
        assert refused.headers["retry-after"] == "31"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        # A bad request of a limited key carries the headers too, and counts nothing.
        bad = await gw.post("/v1/chat/completions", raw=b"{", headers=METERED)
        assert bad.status_code == 400
        assert bad.headers["x-ratelimit-remaining-requests"] == "0"
        clock.now += 31
        response = await gw.post("/v1/chat/completions", {**CHAT, "stream": True}, headers=METERED)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining-requests"] == "0"  # 2 left + this one
        models = await gw.client.get("/v1/models", headers=METERED)
        assert models.status_code == 200
        assert models.headers["x-ratelimit-remaining-requests"] == "0"
        unlimited = await gw.post(
            "/v1/chat/completions", CHAT, headers={"authorization": "Bearer sk-team-a"}
        )
        assert "x-ratelimit-limit-requests" not in unlimited.headers
        await gw.audit_written()
        statuses = [r["status"] for r in gw.records() if r["key_name"] == "metered"]
    assert statuses == [200, 200, 200, 429, 400, 200]


async def test_tpm_counts_recorded_tokens(tmp_path: Path) -> None:
    clock = Clock(DAY0)
    async with gateway(tmp_path, answer, extra=limited("tpm = 2000"), clock=clock) as gw:
        first = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
        assert first.headers["x-ratelimit-remaining-tokens"] == "2000"  # none counted yet
        second = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
        assert second.headers["x-ratelimit-remaining-tokens"] == "800"  # 1200 recorded
        refused = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
        assert refused.status_code == 429
        assert "2000 tokens per minute" in (await error_of(refused))["message"]
        assert refused.headers["x-ratelimit-limit-tokens"] == "2000"
        assert refused.headers["retry-after"] == "61"  # all in this second
        clock.now += 61
        assert (await gw.post("/v1/chat/completions", CHAT, headers=METERED)).status_code == 200


async def test_limits_survive_a_restart_and_are_rebuilt_from_the_trail(tmp_path: Path) -> None:
    config = limited("rpm = 2\ntpm = 100000")
    async with gateway(tmp_path, answer, extra=config) as gw:
        for _ in range(2):
            assert (await gw.post("/v1/chat/completions", CHAT, headers=METERED)).status_code == 200
    async with gateway(tmp_path, answer, extra=config) as gw:  # the windows' file kept them
        refused = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
        assert refused.status_code == 429
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(100000 - 2400)
    (tmp_path / "audit.jsonl.limits").unlink()
    async with gateway(tmp_path, answer, extra=config) as gw:  # rebuilt from the audit trail
        refused = await gw.post("/v1/chat/completions", CHAT, headers=METERED)
        assert refused.status_code == 429
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(100000 - 2400)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("rpm = 0", "keys[2].rpm: must be at least 1, got 0"),
        ('tpm = "1k"', "keys[2].tpm: expected an integer, got a string"),
        ("max_budget_usd = -1", "keys[2].max_budget_usd: must be at least 0"),
        ('budget_period = "week"', "keys[2].budget_period: unknown period 'week'"),
    ],
)
def test_bad_limits_stop_startup_naming_the_field(settings: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(BASE + limited(settings), "test.toml")


def test_limits_need_the_audit_trail() -> None:
    text = BASE + limited("rpm = 5") + "\n[audit]\nenabled = false\n"
    with pytest.raises(ConfigError, match=r"keys\[2\]\.rpm: counts from the audit trail"):
        parse_config(text, "test.toml")


async def test_reload_takes_new_keys_and_limits_and_refuses_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "crabtrio.toml"
    audit = f'\n[audit]\npath = "{tmp_path / "audit.jsonl"}"\n'
    path.write_text(BASE + audit)
    from crabtrio import create_app

    from .fake_upstream import FakeUpstream

    app = create_app(load_config(path), transport=FakeUpstream(answer))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        svc = app.extensions["crabtrio"]
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=METERED)
        assert refused.status_code == 401
        path.write_text(BASE + limited("rpm = 1") + audit)
        assert reload(svc)
        first = await client.post("/v1/chat/completions", json=CHAT, headers=METERED)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "1"
        second = await client.post("/v1/chat/completions", json=CHAT, headers=METERED)
        assert second.status_code == 429
        path.write_text(BASE + limited("rpm = 0") + audit)
        assert not reload(svc)
        assert "config reload refused, the running config stays" in caplog.text
        assert "keys[2].rpm" in caplog.text
        again = await client.post("/v1/chat/completions", json=CHAT, headers=METERED)
        assert again.status_code == 429  # the old limit holds
        # Raising the limit applies at once; a changed provider section is only warned about.
        path.write_text(BASE.replace("weight = 10", "weight = 5") + limited("rpm = 5") + audit)
        assert reload(svc)
        assert "providers changed" in caplog.text
        third = await client.post("/v1/chat/completions", json=CHAT, headers=METERED)
        assert third.status_code == 200
        assert third.headers["x-ratelimit-remaining-requests"] == "3"
