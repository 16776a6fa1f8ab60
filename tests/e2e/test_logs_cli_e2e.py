"""`python -m crabtrio logs` as a process, against a real gateway: its CSV holds the admin
API's records (from the file and through --url), --url pages through every match, and --follow
sees a new record within a second, across rotations (the gateway's, and by hand) and through
the API."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from crabtrio import logs_cli, logs_output
from crabtrio.audit.record import AuditRecord
from crabtrio.audit.rotation import rotated_name, rotated_siblings

from ..test_logs_cli import make, write
from ..test_usage_cli import ADMIN_TOKEN, CONFIG, TRAFFIC, run as run_command
from .processes import ROOT, Gateway, Process, wait_until

pytestmark = pytest.mark.e2e


def config(audit: Path, audit_extra: str = "") -> str:
    """Two keys and a priced mock model; `audit_extra` goes into the closing [audit] table."""
    return CONFIG.format(token=ADMIN_TOKEN, audit=audit) + audit_extra + "\n"


def chat(gateway: Gateway, key: str = "sk-team-a", model: str = "mock-chat") -> str:
    """One request through the gateway; its request id."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}]}
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    return response.headers["x-request-id"]


def api_records(url: str, **params: str) -> list[dict[str, Any]]:
    """GET /v1/admin/logs: every match, newest first."""
    response = httpx.get(
        f"{url}/v1/admin/logs",
        params={"limit": "1000", **params},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert "x-next-cursor" not in response.headers  # one page holds them all
    records: list[dict[str, Any]] = response.json()
    return records


def stored_lines(audit: Path) -> list[bytes]:
    """Every line of the audit file's segments, oldest first."""
    paths = [*rotated_siblings(str(audit)), str(audit)]
    return [line for path in paths for line in Path(path).read_bytes().splitlines()]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Path]]:
    """A real gateway after TRAFFIC, and one record a newer gateway wrote (extra fields)."""
    tmp = tmp_path_factory.mktemp("logs-cli")
    audit = tmp / "audit.jsonl"
    gateway = Gateway(tmp, config(audit))
    try:
        for key, model in TRAFFIC:
            chat(gateway, key, model)
        wait_until(lambda: len(api_records(gateway.url)) == len(TRAFFIC), 10, "the records")
        newest = api_records(gateway.url)[0]
        newer = {**newest, "request_id": "req-newer", "timestamp": newest["timestamp"] + 1}
        with audit.open("ab") as file:  # the gateway follows its file: it serves this one too
            file.write(orjson.dumps({**newer, "zone": {"az": 2}, "attempt": 2}) + b"\n")
        wait_until(lambda: len(api_records(gateway.url)) == len(TRAFFIC) + 1, 10, "the newer one")
        yield gateway, audit
    finally:
        gateway.stop()


def run(*args: str, token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    return run_command(*args, token=token, command="logs")


def csv_rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def as_row(record: dict[str, Any], columns: list[str]) -> dict[str, str]:
    """A record as CSV cells: integers in digits, booleans as true/false, objects as JSON,
    missing empty."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dict | list):
            return orjson.dumps(value).decode()
        return str(value)

    return {name: cell(record.get(name)) for name in columns}


@pytest.mark.parametrize("filters", [[], ["--key", "team-b"], ["--status", "200"]])
def test_csv_rows_are_the_records_the_admin_api_returns(
    served: tuple[Gateway, Path], filters: list[str]
) -> None:
    gateway, audit = served
    params = dict(zip(filters[::2], filters[1::2], strict=True))
    records = api_records(gateway.url, **{name[2:]: value for name, value in params.items()})
    assert len(records) >= 2
    for source in (["--url", gateway.url], [str(audit)]):
        result = run(*source, "--export", "csv", *filters)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        columns, rows = csv_rows(result.stdout)
        assert columns[:5] == ["request_id", "timestamp", "key_name", "model", "provider"]
        # Every known field, then the others (the hand-written record's, say) sorted.
        others = {name for record in records for name in record} - set(logs_output.CSV_FIELDS)
        assert columns == [*logs_output.CSV_FIELDS, *sorted(others)]
        assert "error" in columns
        assert ("zone" in columns) == (not filters or "team-b" in filters)  # req-newer's
        # Oldest first: the API's order reversed (by timestamp, then request id).
        expected = [as_row(record, columns) for record in reversed(records)]
        if source[0] == "--url":
            assert rows == expected
        else:  # the file's order, which only a shared millisecond can make differ
            by_time: Callable[[dict[str, str]], Any] = lambda r: (  # noqa: E731
                int(r["timestamp"]),
                r["request_id"],
            )
            assert sorted(rows, key=by_time) == sorted(expected, key=by_time)
    assert all(bool(row["error"]) == (row["status"] != "200") for row in rows)


def test_url_pages_through_every_match(
    served: tuple[Gateway, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    gateway, _ = served
    monkeypatch.setattr(logs_cli, "PAGE", 2)  # 7 records: 4 pages
    monkeypatch.setenv("CRABTRIO_ADMIN_TOKEN", ADMIN_TOKEN)
    records = api_records(gateway.url)
    assert logs_cli.main(["--url", gateway.url, "--export", "ndjson"]) == 0
    printed = [orjson.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    assert printed == records[::-1]
    assert logs_cli.main(["--url", gateway.url, "--json", "-n", "5", "--key", "team-a"]) == 0
    printed = [orjson.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    assert printed == [record for record in records if record["key_name"] == "team-a"][::-1]
    assert logs_cli.main(["--url", gateway.url, "--json", "-n", "3"]) == 0
    printed = [orjson.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
    assert printed == records[:3][::-1]


def test_url_and_file_print_the_same_lines(served: tuple[Gateway, Path]) -> None:
    gateway, audit = served
    by_url = run("--url", gateway.url, "--json", "--since", "1h")
    by_file = run(str(audit), "--json", "--since", "1h")
    assert by_url.returncode == by_file.returncode == 0
    assert sorted(by_url.stdout.splitlines()) == sorted(by_file.stdout.splitlines())
    assert len(by_url.stdout.splitlines()) == len(TRAFFIC) + 1


def test_a_wrong_token_is_the_apis_message_on_one_line(served: tuple[Gateway, Path]) -> None:
    gateway, _ = served
    result = run("--url", gateway.url, token="wrong-secret-123")
    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        result.stderr
        == "crabtrio logs: 401 admin routes need 'Authorization: Bearer <admin_token>'\n"
    )


def follow(*args: str) -> Process:
    environment = {"CRABTRIO_ADMIN_TOKEN": ADMIN_TOKEN, "CRABTRIO_URL": ""}
    return Process(
        [sys.executable, "-m", "crabtrio", "logs", "--follow", "--json", *args],
        cwd=ROOT,
        env=environment,
    )


def stop(process: Process) -> int:
    """Ctrl-C: a follower exits 0, quietly."""
    process.signal(signal.SIGINT)
    try:
        code = process.wait(10)
    finally:
        process.stop()
    assert "Traceback" not in process.output
    return code


def test_follow_sees_the_gateways_records_within_a_second_and_across_rotations(
    start_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    # A record of this traffic is 250 to 350 bytes: a new file every few records.
    gateway = start_gateway(config(audit, f"max_file_mb = {700 / 2**20}"))
    first = chat(gateway)
    wait_until(lambda: audit.exists() and first.encode() in audit.read_bytes(), 10, "a record")
    tail = follow(str(audit), "-n", "1")
    try:
        tail.wait_for_line(first, timeout=30)  # started: the last record, then new ones
        started = time.monotonic()
        second = chat(gateway)
        tail.wait_for_line(second, timeout=1.0)
        assert time.monotonic() - started < 1.0
        more = [chat(gateway, key) for key in ("sk-team-a", "sk-team-b") * 4]
        for request_id in more:
            tail.wait_for_line(request_id, timeout=5)
        assert len(rotated_siblings(str(audit))) >= 2
        # Exactly the stored lines from the first one on: none lost, none twice.
        stored = stored_lines(audit)
        assert tail.lines == [line.decode() for line in stored[-(len(more) + 2) :]]
        assert first in tail.lines[0]
    finally:
        code = stop(tail)
    assert code == 0


def test_follow_through_the_api_shows_each_new_record_once(
    start_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    gateway = start_gateway(config(tmp_path / "audit.jsonl"))
    for key, model in TRAFFIC:
        chat(gateway, key, model)
    wait_until(lambda: len(api_records(gateway.url)) == len(TRAFFIC), 10, "the records")
    before = api_records(gateway.url)
    tail = follow("--url", gateway.url, "-n", "2")
    try:
        tail.wait_for_line(before[0]["request_id"], timeout=30)
        assert [orjson.loads(line) for line in tail.lines] == before[:2][::-1]
        new = [chat(gateway, key) for key in ("sk-team-a", "sk-team-b", "sk-team-a")]
        for request_id in new:
            tail.wait_for_line(request_id, timeout=5)
        # A record after them: by the time it shows, each poll has asked again for the others.
        last = chat(gateway, "sk-team-b")
        tail.wait_for_line(last, timeout=5)
        ids = [orjson.loads(line)["request_id"] for line in tail.lines]
        assert ids == [record["request_id"] for record in before[:2][::-1]] + [*new, last]
    finally:
        code = stop(tail)
    assert code == 0


def appended(path: Path, *records: AuditRecord) -> None:
    with path.open("ab") as file:
        file.write(b"".join(record.to_line() for record in records))


def bytes_read(process: Process) -> int:
    """What the process has read from files so far (Linux counts it in /proc/PID/io)."""
    for line in Path(f"/proc/{process.proc.pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/PID/io")


def test_follow_a_file_another_process_appends_to_within_a_second_and_through_rotations(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    write(path, [make(i) for i in range(5)])
    tail = follow(str(path), "-n", "2", "--key", "team-b")
    try:
        tail.wait_for_line("req-0004", timeout=30)  # the last 2 of team-b: 1 and 4; started
        assert [orjson.loads(line)["request_id"] for line in tail.lines] == ["req-0001", "req-0004"]
        appended(path, make(6), make(7))  # team-a, team-b
        started = time.monotonic()
        tail.wait_for_line("req-0007", timeout=1.0)
        assert time.monotonic() - started < 1.0
        # A line written in two parts is printed once, whole, after its second part.
        line = make(10).to_line()
        with path.open("ab") as file:
            file.write(line[:40])
            file.flush()
            read = bytes_read(tail)
            wait_until(lambda: bytes_read(tail) > read, 5, "the follower to read the part")
            file.write(line[40:])
        tail.wait_for_line("req-0010", timeout=5)
        # Rotated: what is still written to the renamed file is printed before the new file.
        with path.open("ab") as old:
            os.rename(path, rotated_name(str(path), time.time()))
            old.write(make(13).to_line())
        write(path, [make(15), make(16)])
        tail.wait_for_line("req-0016", timeout=5)
        # Rotated twice between two looks: the segment in between is read too.
        for i in (19, 22):
            os.rename(path, rotated_name(str(path), time.time()))
            write(path, [make(i)])
        tail.wait_for_line("req-0022", timeout=5)
        ids = [orjson.loads(line)["request_id"] for line in tail.lines]
        assert ids == [f"req-{i:04d}" for i in (1, 4, 7, 10, 13, 16, 19, 22)]
    finally:
        code = stop(tail)
    assert code == 0
