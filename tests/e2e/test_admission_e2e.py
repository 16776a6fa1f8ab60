"""Budgets, rate limits and config reloads as users meet them: real gateway processes (two
workers where it matters), the built-in mock provider and the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .faults import worker_pids
from .processes import PYTHON, Gateway, Process, wait_until

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": "Bearer adm-e2e-token"}
HI = [{"role": "user", "content": "hi"}]
# The built-in mock answers HI with 2 prompt + 8 completion tokens: at $1000 per million
# tokens each way, one answer costs 10 x 1000 = 10,000 micro-USD, $0.01.
TOKENS = 10
COST = 10_000
RELOAD_REFUSED = "crabtrio: config reload refused, the running config stays: "


def gateway_config(audit: Path, keys: str) -> str:
    return f"""
admin_token = "adm-e2e-token"
[providers.m]
kind = "mock"
models = ["m"]
{keys}
[pricing.m]
prompt_cost_per_million = 1000.0
completion_cost_per_million = 1000.0
[audit]
path = "{audit}"
"""


def key(name: str, settings: str = "") -> str:
    return f'[[keys]]\nname = "{name}"\nkey = "sk-{name}"\n{settings}\n'


def records(path: Path, key_name: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    found = [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return [r for r in found if key_name is None or r["key_name"] == key_name]


@contextlib.contextmanager
def client(url: str, name: str) -> Iterator[openai.OpenAI]:
    # No keep-alive: every request opens its own connection, so the kernel spreads them
    # over the workers; and no retries, so each 429 reaches the test.
    http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=20)
    api = openai.OpenAI(base_url=f"{url}/v1", api_key=f"sk-{name}", max_retries=0, http_client=http)
    try:
        yield api
    finally:
        api.close()
        http.close()


def chat(api: openai.OpenAI) -> httpx.Headers:
    """One chat completion that must succeed; its response headers."""
    raw = api.chat.completions.with_raw_response.create(model="m", messages=HI)
    assert raw.parse().usage.total_tokens == TOKENS
    return raw.headers


def refusal(api: openai.OpenAI) -> openai.RateLimitError:
    """One chat completion that must be refused with a 429."""
    with pytest.raises(openai.RateLimitError) as refused:
        api.chat.completions.create(model="m", messages=HI)
    assert refused.value.status_code == 429
    return refused.value


def standing(api: openai.OpenAI) -> httpx.Headers:
    """Where the key stands, without spending its rate: an unknown model is a 404 that is
    never admitted, and carries the key's x-ratelimit-* headers all the same."""
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="no-such-model", messages=HI)
    return missing.value.response.headers


def seconds(duration: str) -> float:
    """OpenAI's reset durations: `250ms`, `59s`, `1m1s`."""
    match = re.fullmatch(r"(\d+)ms|(?:(\d+)m)?(\d+)s", duration)
    assert match, f"not a duration: {duration!r}"
    if match.group(1) is not None:
        return int(match.group(1)) / 1000
    return int(match.group(2) or 0) * 60 + int(match.group(3))


def indexed(gateway: Gateway, name: str) -> list[dict[str, Any]]:
    """The key's records as the (only) worker's index holds them."""
    logs = httpx.get(f"{gateway.url}/v1/admin/logs?key={name}", headers=ADMIN)
    assert logs.status_code == 200
    return logs.json()  # type: ignore[no-any-return]


def two_workers(gateway: Process) -> list[int]:
    wait_until(lambda: gateway.output.count("Running on") == 2, 20, "two workers serving")
    pids = worker_pids(gateway.proc.pid)
    assert len(pids) == 2
    return pids


def stop(gateway: Process) -> None:
    gateway.signal(signal.SIGTERM)
    assert gateway.wait(30) == 0
    assert "Traceback" not in gateway.output


def test_a_key_is_refused_once_its_daily_budget_is_spent(tmp_path, start_gateway) -> None:
    audit = tmp_path / "audit.jsonl"
    budgeted = key("budgeted", 'max_budget_usd = 0.025\nbudget_period = "day"')
    gateway = start_gateway(gateway_config(audit, budgeted + key("free")))
    accepted = 0
    with client(gateway.url, "budgeted") as api:
        for n in range(1, 8):  # $0.01 each: the 4th finds $0.03 spent of its $0.025
            try:
                api.chat.completions.create(model="m", messages=HI)
            except openai.RateLimitError as exc:
                refused = exc
                break
            accepted += 1
            wait_until(lambda n=n: len(records(audit, "budgeted")) == n, 5, f"record {n} written")
            # The spend follows the worker's index of the file (~0.2 s behind it); the admin
            # API reads that same index, so once it lists the record the spend counts it.
            wait_until(lambda n=n: len(indexed(gateway, "budgeted")) == n, 5, f"record {n} indexed")
        else:
            pytest.fail("the budget never refused a request")
        assert accepted == 3
        assert [r["cost_micros"] for r in records(audit, "budgeted")] == [COST] * 3
        assert (refused.status_code, refused.type, refused.code) == (
            429,
            "insufficient_quota",
            "budget_exceeded",
        )
        assert refused.body == refused.response.json()["error"]
        assert (
            "$0.030000 of its $0.025000 day budget" in refused.response.json()["error"]["message"]
        )
        again = refusal(api)  # a refusal costs nothing, and frees nothing
        assert again.code == "budget_exceeded"
    with client(gateway.url, "free") as api:
        chat(api)  # another key is not affected
    wait_until(lambda: len(records(audit, "budgeted")) == 5, 5, "the refusals' records")
    spent = records(audit, "budgeted")
    assert [r["status"] for r in spent] == [200, 200, 200, 429, 429]
    assert sum(r["cost_micros"] for r in spent) == 3 * COST
    assert all(r["provider"] == "" and r["cost_micros"] == 0 for r in spent[3:])


def test_rpm_holds_for_the_whole_gateway_across_two_workers(tmp_path, start_gateway) -> None:
    audit = tmp_path / "audit.jsonl"
    gateway = start_gateway(gateway_config(audit, key("burst", "rpm = 60")), workers=2)
    two_workers(gateway)

    def one(_: int) -> tuple[int, httpx.Headers, openai.RateLimitError | None]:
        with client(gateway.url, "burst") as api:
            try:
                return 200, chat(api), None
            except openai.RateLimitError as exc:
                return 429, exc.response.headers, exc

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(100)))
    # Within one minute, a minute's window admits exactly its rpm, on whichever worker.
    assert time.monotonic() - started < 30
    accepted = [headers for status, headers, _ in outcomes if status == 200]
    refused = [(headers, exc) for status, headers, exc in outcomes if status == 429]
    assert (len(accepted), len(refused)) == (60, 40)
    # Each admission saw the counts of all the earlier ones, whichever worker made them:
    # the remaining counts are 59 down to 0, each exactly once.
    remaining = sorted(int(h["x-ratelimit-remaining-requests"]) for h in accepted)
    assert remaining == list(range(60))
    for headers in accepted:
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert 0 < seconds(headers["x-ratelimit-reset-requests"]) <= 61
        assert "x-ratelimit-limit-tokens" not in headers  # no tpm on this key
    for headers, exc in refused:
        assert exc is not None
        assert (exc.type, exc.code) == ("rate_limit_exceeded", "rate_limit_exceeded")
        assert re.fullmatch(r"\d+", headers["retry-after"])
        assert 1 <= int(headers["retry-after"]) <= 61
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert 0 < seconds(headers["x-ratelimit-reset-requests"]) <= 61
    wait_until(lambda: len(records(audit, "burst")) == 100, 10, "100 records")
    statuses = [r["status"] for r in records(audit, "burst")]
    assert (statuses.count(200), statuses.count(429)) == (60, 40)
    # Which worker served a request is not in its record, so that both served some of the
    # burst is not checked; the kernel spreads the fresh connections over them (with a
    # window per worker instead of the shared file, all 100 were admitted when tried).


def test_the_minute_windows_survive_a_restart_and_a_lost_limits_file(
    tmp_path, start_gateway
) -> None:
    audit = tmp_path / "audit.jsonl"
    limits = Path(f"{audit}.limits")
    config = gateway_config(audit, key("burst", "rpm = 5") + key("metered", "tpm = 1000"))
    gateway = start_gateway(config, workers=2)
    two_workers(gateway)
    started = time.monotonic()
    with client(gateway.url, "burst") as api:
        remaining = [chat(api)["x-ratelimit-remaining-requests"] for _ in range(5)]
        assert remaining == ["4", "3", "2", "1", "0"]
        assert refusal(api).code == "rate_limit_exceeded"
    with client(gateway.url, "metered") as api:
        for _ in range(3):
            chat(api)  # tokens count when the record is made, before the answer is sent
        assert standing(api)["x-ratelimit-remaining-tokens"] == "970"
    assert limits.exists()
    stop(gateway)

    for lost in (False, True):
        if lost:
            limits.unlink()
        restarted = start_gateway(config, workers=2)
        two_workers(restarted)
        rebuilt = re.search(
            r"windows rebuilt from the audit trail's last minute \((\d+) records\)",
            restarted.output,
        )
        if lost:  # every record of the file is from the last minute: the admitted ones count
            admitted = [r for r in records(audit) if r["provider"]]
            assert rebuilt is not None and int(rebuilt.group(1)) == len(admitted)
        else:
            assert rebuilt is None
        with client(restarted.url, "burst") as api:
            refused = refusal(api)
            assert refused.code == "rate_limit_exceeded"
            assert refused.response.headers["x-ratelimit-remaining-requests"] == "0"
        with client(restarted.url, "metered") as api:
            assert standing(api)["x-ratelimit-remaining-tokens"] == "970"
        stop(restarted)
    # All of it within the minute of the first requests, or the 429s above proved nothing.
    assert time.monotonic() - started < 50


def test_a_rebuilt_window_counts_only_admitted_requests(tmp_path, start_gateway) -> None:
    audit = tmp_path / "audit.jsonl"
    config = gateway_config(audit, key("counted", "rpm = 10"))
    gateway = start_gateway(config)
    with client(gateway.url, "counted") as api:
        for _ in range(3):
            chat(api)
        before = [standing(api)["x-ratelimit-remaining-requests"] for _ in range(2)]
    assert before == ["7", "7"]  # the 404s were not admitted: they took none of the rate
    stop(gateway)
    Path(f"{audit}.limits").unlink()
    restarted = start_gateway(config)
    with client(restarted.url, "counted") as api:
        assert standing(api)["x-ratelimit-remaining-requests"] == "7"


@contextlib.contextmanager
def launcher(tmp_path: Path, config: Path) -> Iterator[Process]:
    """`python -m crabtrio --workers 2`, as a user starts it."""
    command = [PYTHON, "-m", "crabtrio", "--bind", "127.0.0.1:0", "--workers", "2"]
    command += ["--graceful-timeout", "3"]
    process = Process(command, cwd=tmp_path, env={"CRABTRIO_CONFIG": str(config)})
    try:
        yield process
    finally:
        process.stop()


def test_sighup_reloads_the_keys_in_every_worker_and_refuses_a_bad_file(tmp_path) -> None:
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "gw.toml"
    steady = key("steady", "rpm = 100")
    config.write_text(gateway_config(audit, steady + key("spender", "max_budget_usd = 0")))
    with launcher(tmp_path, config) as gateway:
        url = gateway.wait_for_line(r"Running on (http://[\d.:]+)").group(1)
        workers = two_workers(gateway)
        with client(url, "spender") as api:
            assert refusal(api).code == "budget_exceeded"
        with client(url, "fresh") as api, pytest.raises(openai.AuthenticationError):
            api.chat.completions.create(model="m", messages=HI)

        spender = key("spender", "max_budget_usd = 1")
        config.write_text(gateway_config(audit, steady + spender + key("fresh", "rpm = 1")))
        gateway.signal(signal.SIGHUP)
        lines = [
            f"[{pid}] [INFO] crabtrio: config reloaded from {config}: 3 keys (3 with limits or budgets)"
            for pid in workers
        ]
        wait_until(
            lambda: (
                all(line in gateway.output for line in lines)
                or worker_pids(gateway.proc.pid) != workers
                or gateway.proc.poll() is not None
            ),
            10,
            "both workers' reload lines (or a worker restart)",
        )
        assert gateway.proc.poll() is None
        assert worker_pids(gateway.proc.pid) == workers, "a worker was restarted"
        assert all(line in gateway.output for line in lines), gateway.output
        # Fresh connections spread over both workers (both reloaded, as logged above); the
        # new key's one request a minute is shared: one 200 with the rate headers, then
        # 429s, never a 401.
        with client(url, "fresh") as api:
            headers = chat(api)
            assert headers["x-ratelimit-limit-requests"] == "1"
            assert headers["x-ratelimit-remaining-requests"] == "0"
            for _ in range(5):
                assert refusal(api).code == "rate_limit_exceeded"
        with client(url, "spender") as api:
            for _ in range(4):
                chat(api)  # its budget was raised from $0 to $1

        broken = spender + key("fresh", "rpm = 0")
        config.write_text(gateway_config(audit, steady + broken))
        gateway.signal(signal.SIGHUP)
        refused = gateway.wait_for_line(re.escape(RELOAD_REFUSED) + ".*", 10).group(0)
        assert f"{config}: keys[2].rpm: must be at least 1, got 0" in refused
        # The previous keys still serve, in the same two workers.
        with client(url, "fresh") as api:
            assert refusal(api).code == "rate_limit_exceeded"
        with client(url, "spender") as api:
            chat(api)
        with client(url, "steady") as api:
            chat(api)
        assert gateway.proc.poll() is None
        assert worker_pids(gateway.proc.pid) == workers
        assert gateway.output.count("Running on") == 2
        assert gateway.output.count(RELOAD_REFUSED) == 1
        stop(gateway)
