"""`python -m crabtrio usage`: the table, CSV and chart of a real gateway's usage, and its
one-line failures (API errors, an unreachable gateway, bad arguments, no matplotlib)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import matplotlib.image
import pytest

from crabtrio import cli, usage_cli

from .e2e.processes import ROOT, Gateway, wait_until

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "adm-usage-cli-token"
CONFIG = """
admin_token = "{token}"
[providers.mock]
kind = "mock"
models = ["mock-chat"]
[[keys]]
name = "team-a"
key = "sk-team-a"
[[keys]]
name = "team-b"
key = "sk-team-b"
[pricing.mock-chat]
prompt_cost_per_million = 1000.0
completion_cost_per_million = 2000.0
[audit]
path = "{audit}"
"""
# team-a: 3 answered; team-b: 2 answered and 1 refused (an unknown model: an error, no cost).
TRAFFIC = [("sk-team-a", "mock-chat")] * 3 + [("sk-team-b", "mock-chat")] * 2
TRAFFIC += [("sk-team-b", "no-such-model")]
NOW = 1_773_150_000_000  # 2026-03-10T13:40:00Z


class Served:
    def __init__(self, gateway: Gateway, records: list[dict[str, Any]]) -> None:
        self.url = gateway.url
        self.records = records

    def expected(self, key: str) -> dict[str, int]:
        """Requests, errors and cost of `key`, summed from the audit file itself."""
        mine = [r for r in self.records if r["key_name"] == key]
        return {
            "requests": len(mine),
            "errors": sum(r["status"] >= 400 for r in mine),
            "cost_micros": sum(r["cost_micros"] for r in mine),
        }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A real gateway (hypercorn, one worker) after the TRAFFIC went through it."""
    tmp = tmp_path_factory.mktemp("usage-cli")
    audit = tmp / "audit.jsonl"
    gateway = Gateway(tmp, CONFIG.format(token=ADMIN_TOKEN, audit=audit))
    try:
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            for key, model in TRAFFIC:
                body = {"model": model, "messages": [{"role": "user", "content": "hi there"}]}
                client.post(
                    "/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
                )

        def records() -> list[dict[str, Any]]:
            lines = audit.read_bytes().splitlines() if audit.exists() else []
            return [json.loads(line) for line in lines if line.strip()]

        wait_until(lambda: len(records()) == len(TRAFFIC), 10, "the traffic's audit records")
        yield Served(gateway, records())
    finally:
        gateway.stop()


def run(
    *args: str, token: str | None = ADMIN_TOKEN, command: str = "usage", **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m crabtrio <command> args` (default `usage`), without the caller's CRABTRIO_*."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CRABTRIO_")}
    if token is not None:
        environment["CRABTRIO_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "crabtrio", command, *args],
        cwd=ROOT,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def parse_table(text: str) -> tuple[list[str], list[dict[str, str]]]:
    header, *lines = text.splitlines()
    names = header.split()
    return names, [dict(zip(names, line.split(), strict=True)) for line in lines]


def test_table_has_each_keys_requests_errors_and_cost(served: Served) -> None:
    result = run("--url", served.url)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    names, table = parse_table(result.stdout)
    assert names == [
        "key",
        "bucket",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "p50_ms",
        "p95_ms",
    ]
    assert {row["key"] for row in table} == {"team-a", "team-b"}
    for key in ("team-a", "team-b"):
        rows = [row for row in table if row["key"] == key]  # one per hour the traffic touched
        expected = served.expected(key)
        assert sum(int(row["requests"]) for row in rows) == expected["requests"]
        assert sum(int(row["errors"]) for row in rows) == expected["errors"]
        cost = sum(round(float(row["cost_usd"]) * 1_000_000) for row in rows)
        assert cost == expected["cost_micros"]
    # The traffic is what this test means it to be: every answered request costs the same.
    a, b = served.expected("team-a"), served.expected("team-b")
    assert (a["requests"], a["errors"], b["requests"], b["errors"]) == (3, 0, 3, 1)
    assert a["cost_micros"] > 0 and 2 * a["cost_micros"] == 3 * b["cost_micros"]
    # Text columns are aligned left, figures right, under their header.
    header, *lines = result.stdout.splitlines()
    for line in lines:
        cells = [(m.start(), m.end()) for m in re.finditer(r"\S+", line)]
        for i, m in enumerate(re.finditer(r"\S+", header)):
            edge = 0 if i < 2 else 1
            assert cells[i][edge] == (m.start(), m.end())[edge], (header, line)


def test_totals_without_interval_and_the_apis_csv(served: Served) -> None:
    totals = run("--url", served.url, "--interval", "none", "--group-by", "key,model")
    assert totals.returncode == 0, totals.stderr
    names, table = parse_table(totals.stdout)
    assert names[:3] == ["key", "model", "requests"]
    by_group = {(row["key"], row["model"]): row for row in table}
    assert set(by_group) == {
        ("team-a", "mock-chat"),
        ("team-b", "mock-chat"),
        ("team-b", "no-such-model"),
    }
    assert by_group["team-a", "mock-chat"]["requests"] == "3"
    assert by_group["team-b", "no-such-model"]["errors"] == "1"

    csv = run("--url", served.url, "--csv", "--interval", "day")
    assert csv.returncode == 0, csv.stderr
    header, *lines = csv.stdout.splitlines()
    assert (
        header
        == "bucket,key,requests,errors,prompt_tokens,completion_tokens,cost_micros,latency_ms_p50,latency_ms_p95"
    )
    costs = {line.split(",")[1]: int(line.split(",")[6]) for line in lines}
    assert costs == {key: served.expected(key)["cost_micros"] for key in ("team-a", "team-b")}


def test_png_draws_each_keys_spend(served: Served, tmp_path: Path) -> None:
    chart = tmp_path / "spend.png"
    result = run("--url", served.url, "--png", str(chart), "--since", "3h")
    assert result.returncode == 0, result.stderr
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(chart)
    height, width = pixels.shape[:2]
    assert width >= 600 and height >= 300
    # Both keys' bars: matplotlib's first two series colours (C0, C1) fill some pixels each.
    rgb = (pixels[:, :, :3] * 255).round().astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (rgb == colour).all(axis=2).sum() > 50, colour


def test_a_wrong_token_is_the_apis_message_on_one_line(served: Served) -> None:
    result = run("--url", served.url, token="wrong-secret-123")
    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        result.stderr
        == "crabtrio usage: 401 admin routes need 'Authorization: Bearer <admin_token>'\n"
    )
    assert "wrong-secret-123" not in result.stdout + result.stderr


def test_a_bad_since_exits_2() -> None:
    result = run("--since", "yesterday")
    assert result.returncode == 2
    assert "--since: 'yesterday' is neither ISO 8601" in result.stderr
    assert "Traceback" not in result.stderr


def test_connection_refused_is_one_line() -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        result = run("--url", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"crabtrio usage: cannot connect to http://127.0.0.1:{port}")
    assert "Connection refused" in lines[0]


def test_png_without_matplotlib_says_what_to_install(tmp_path: Path) -> None:
    shadow = tmp_path / "matplotlib"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = run(
        "--png", str(tmp_path / "x.png"), "--url", "http://127.0.0.1:9", PYTHONPATH=str(tmp_path)
    )
    assert result.returncode == 1
    assert result.stderr == "crabtrio usage: --png needs matplotlib: pip install matplotlib\n"
    assert not (tmp_path / "x.png").exists()


def test_the_gateway_does_not_import_matplotlib() -> None:
    code = "import sys, crabtrio.__main__; print('matplotlib' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.stdout == "False\n", result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--group-by", "team"],
        ["--group-by", "key,key"],
        ["--png", "x.png", "--csv"],
        ["--png", "x.png", "--interval", "none"],
        ["--url", "ftp://example.com"],
        ["--url", "http://127.0.0.1:99999"],
        ["--until", "1969-12-31"],
        ["--interval", "week"],
    ],
)
def test_bad_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        usage_cli.main(args)
    assert exited.value.code == 2
    assert "crabtrio usage: error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90m", NOW - 90 * 60_000),
        ("24h", NOW - 24 * 3_600_000),
        ("7d", NOW - 7 * 86_400_000),
        ("2w", NOW - 14 * 86_400_000),
        ("2026-03-10T12:00:00Z", 1_773_144_000_000),
        ("2026-03-10T12:00", 1_773_144_000_000),  # naive: UTC
        ("2026-03-10T14:00+02:00", 1_773_144_000_000),
        ("2026-03-10", 1_773_100_800_000),
    ],
)
def test_times_are_iso_or_a_time_ago(text: str, expected: int) -> None:
    assert cli.epoch_ms(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "-5h", "5y", "1e3", "1969-12-31T23:59Z"])
def test_other_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        cli.epoch_ms(text, NOW)


def test_chart_series_keep_the_biggest_spenders_and_sum_the_rest() -> None:
    buckets = ["2026-03-10T12:00:00Z", "2026-03-10T13:00:00Z"]
    found = [
        {"bucket": bucket, "key": f"k{i:02d}", "cost_micros": (i + 1) * 1_000_000 + j}
        for i in range(usage_cli.MAX_SERIES + 2)
        for j, bucket in enumerate(buckets)
    ]
    # No key: "" (refused before its key was known) and null, one "(none)" group.
    found.append({"bucket": buckets[1], "key": "", "cost_micros": 1})
    found.append({"bucket": buckets[1], "key": None, "cost_micros": 2})
    got_buckets, spend = usage_cli.series(found, ["key"])
    assert got_buckets == buckets
    shown = usage_cli.MAX_SERIES - 1
    assert list(spend) == [f"k{i:02d}" for i in range(usage_cli.MAX_SERIES + 1, 2, -1)] + ["other"]
    assert len(spend) == shown + 1
    assert spend["k11"] == [12.0, 12.000001]
    # k00, k01, k02 and the key-less requests.
    assert spend["other"] == [6.0, 6.000006]
    total = sum(map(sum, spend.values()))
    assert total == pytest.approx(sum(r["cost_micros"] for r in found) / 1e6)


def test_usd_is_exact() -> None:
    assert cli.usd(19_000) == "0.019000"
    assert cli.usd(12_345_678_901) == "12345.678901"
    assert cli.usd(0) == "0.000000"
