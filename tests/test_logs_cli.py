"""`python -m crabtrio logs` over audit files: the records the admin API would return for the
same filters (the gateway's own index is the reference), oldest first, across rotated
segments; the stored bytes, the table, CSV. (Following: tests/e2e/test_logs_cli_e2e.py.)"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import orjson
import pytest

from crabtrio import cli, logs_cli, logs_output
from crabtrio.audit import segments
from crabtrio.audit.reader import AuditReader
from crabtrio.audit.record import AuditRecord
from crabtrio.audit.rotation import rotated_name

T0 = 1_773_150_000_000  # 2026-03-10T13:40:00Z


def make(i: int, **fields: Any) -> AuditRecord:
    """Record `i`, one ms after record i - 1, its fields varied by i unless given."""
    values: dict[str, Any] = {
        "request_id": f"req-{i:04d}",
        "timestamp": T0 + i,
        "key_name": ("team-a", "team-b", "team-c")[i % 3],
        "model": ("m1", "m2")[i % 2],
        "provider": ("p1", "p2", "p3", "p4")[i % 4],
        "cost_micros": 1000 * i,
        "latency_ms": 10 + i,
        "status": 500 if i % 5 == 4 else 200,
        "stream": i % 2 == 0,
        "endpoint": "chat",
        "prompt_tokens": 3 * i,
        "completion_tokens": i,
    }
    values.update(fields)
    return AuditRecord(**values)


def write(path: Path, records: list[AuditRecord], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(record.to_line() for record in records) + tail)


@pytest.fixture
def audit(tmp_path: Path) -> Path:
    """Two rotated segments and the active file: records 0-59 in time order, with lines that
    are not records among them and a line still being written at the end."""
    path = tmp_path / "audit.jsonl"
    write(Path(rotated_name(str(path), T0 / 1000 + 1)), [make(i) for i in range(20)])
    write(
        Path(rotated_name(str(path), T0 / 1000 + 2)),
        [make(i) for i in range(20, 40)],
        tail=b"not json\n\n",
    )
    write(path, [make(i) for i in range(40, 60)], tail=b'["a", "list"]\n{"request_id": "req-99')
    (tmp_path / "unrelated.jsonl").write_bytes(make(77).to_line())
    return path


def api_answer(path: Path, limit: int = 1000, **query: Any) -> list[bytes]:
    """What GET /v1/admin/logs answers for `query` (newest first): the gateway's own index
    of the same files."""
    reader = AuditReader(str(path))
    try:
        reader.replay()
        page = reader.index.query(limit=limit, **query)
        return reader.read_lines(page.locations)
    finally:
        reader.close()


def run(capsysbinary: pytest.CaptureFixture[bytes], *args: str) -> tuple[int, bytes, str]:
    try:
        code = logs_cli.main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def iso(ms: int) -> str:
    return logs_output._shown_time(ms)


@pytest.mark.parametrize(
    ("args", "query"),
    [
        ([], {}),
        (["--key", "team-a"], {"filters": {"key": "team-a"}}),
        (["--model", "m2", "--status", "500"], {"filters": {"model": "m2", "status": 500}}),
        (["--provider", "p3", "--key", "team-c"], {"filters": {"provider": "p3", "key": "team-c"}}),
        (["--key", "nobody"], {"filters": {"key": "nobody"}}),
        # Both bounds inclusive, to the millisecond; records 15-45 span all three files.
        (["--since", iso(T0 + 15), "--until", iso(T0 + 45)], {"since": T0 + 15, "until": T0 + 45}),
        (["--since", "2026-03-10T15:40:00.030+02:00"], {"since": T0 + 30}),
    ],
)
def test_filters_select_what_the_admin_api_selects(
    audit: Path, capsysbinary: pytest.CaptureFixture[bytes], args: list[str], query: Any
) -> None:
    code, out, err = run(capsysbinary, str(audit), "--json", "--limit", "1000", *args)
    assert (code, err) == (0, "")
    expected = api_answer(audit, **query)[::-1]  # oldest first
    assert out.splitlines() == expected
    assert len(expected) >= (0 if "nobody" in args else 3)


def test_all_segments_are_read_oldest_first(
    audit: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, out, _ = run(capsysbinary, str(audit), "--export", "ndjson")
    assert code == 0
    ids = [orjson.loads(line)["request_id"] for line in out.splitlines()]
    assert ids == [f"req-{i:04d}" for i in range(60)]  # not the partial line, nor unrelated


@pytest.mark.parametrize("block", [segments.BLOCK, 64, 7])
@pytest.mark.parametrize("limit", [0, 1, 5, 25, 45, 1000])
def test_limit_is_the_last_n_matches_read_from_the_end(
    audit: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
    block: int,
    limit: int,
) -> None:
    monkeypatch.setattr(segments, "BLOCK", block)  # lines cut across blocks every which way
    code, out, _ = run(capsysbinary, str(audit), "--json", "--key", "team-b", "-n", str(limit))
    assert code == 0
    everything = api_answer(audit, filters={"key": "team-b"})[::-1]
    assert out.splitlines() == (everything[-limit:] if limit else [])


def test_default_limits(audit: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    write(audit, [make(i) for i in range(40, 200)])
    _, out, _ = run(capsysbinary, str(audit), "--json")
    assert out.splitlines() == api_answer(audit, limit=100)[::-1]
    _, out, _ = run(capsysbinary, str(audit), "--export", "ndjson")
    assert len(out.splitlines()) == 40 + 160


def test_json_is_each_line_exactly_as_stored(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    path = tmp_path / "audit.jsonl"
    lines = [
        make(1).to_line(),
        make(2, model="m\u2028\u202eodd", error="upstream said \x1b[31mno").to_line(),
        make(3).to_line().replace(b"\n", b"\r\n"),  # CRLF: the index takes it, so do we
        orjson.dumps({**make(4).to_dict(), "chain": "ab12", "seq": 4}) + b"\n",
    ]
    path.write_bytes(b"".join(lines))
    code, out, _ = run(capsysbinary, str(path), "--json")
    assert code == 0
    assert out == b"".join(lines)
    assert b"\\u2028" in out  # the writer's escapes, kept


def test_since_skips_segments_rotated_before_it(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """A segment renamed long before --since is not read: its records are all older. (A
    record that claims otherwise is the proof that the file was skipped.)"""
    path = tmp_path / "audit.jsonl"
    write(Path(rotated_name(str(path), T0 / 1000 - 3600)), [make(1, timestamp=T0 + 1)])
    write(Path(rotated_name(str(path), T0 / 1000 + 10)), [make(2)])
    write(path, [make(3)])
    _, out, _ = run(capsysbinary, str(path), "--json", "--since", iso(T0))
    assert [orjson.loads(line)["request_id"] for line in out.splitlines()] == [
        "req-0002",
        "req-0003",
    ]
    _, out, _ = run(capsysbinary, str(path), "--json")
    assert len(out.splitlines()) == 3


def test_table_has_the_columns_that_matter(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    path = tmp_path / "audit.jsonl"
    write(
        path,
        [
            make(1, key_name="team-\x1b]0;pwned\x07a", cost_micros=19_000),
            make(2, status=502, error="upstream timed out", prompt_tokens=None),
            make(3, prompt_tokens=None, completion_tokens=None, stream=True),
        ],
    )
    code, out, _ = run(capsysbinary, str(path), "--table")
    assert code == 0
    header, *rows = out.decode().splitlines()
    assert header.split() == [
        "time",
        "key",
        "model",
        "provider",
        "status",
        "tokens",
        "cost_usd",
        "latency_ms",
        "endpoint",
        "stream",
        "error",
    ]
    assert rows[0].split() == [
        "2026-03-10T13:40:00.001Z",
        "team-?]0;pwned?a",  # control characters never reach the terminal
        "m2",
        "p2",
        "200",
        "3/1",
        "0.019000",
        "11",
        "chat",
        "no",
    ]
    assert rows[1].split()[4:] == [
        "502",
        "-/2",
        "0.002000",
        "12",
        "chat",
        "yes",
        "upstream",
        "timed",
        "out",
    ]
    assert rows[2].split()[5] == "-"
    assert "\x1b" not in out.decode()
    # Without an error among the rows shown, no error column.
    _, out, _ = run(capsysbinary, str(path), "--table", "--status", "200")
    assert out.decode().splitlines()[0].split()[-1] == "stream"
    _, out, _ = run(capsysbinary, str(path), "--table", "--key", "nobody")
    assert out == b"no matching records\n"


def test_csv_has_the_known_fields_then_the_others_sorted(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    path = tmp_path / "audit.jsonl"
    extended = {**make(2, error='said "no", twice').to_dict(), "zone": {"az": 2}, "attempt": 2}
    path.write_bytes(make(1).to_line() + orjson.dumps(extended) + b"\n" + make(3).to_line())
    code, out, _ = run(capsysbinary, str(path), "--export", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out.decode(), newline="")))
    known = list(logs_output.CSV_FIELDS)  # every field a record can have, in the writer's order
    assert [name for name in known if name in extended] == list(make(2, error="x").to_dict())
    assert {"error", "cache_read_tokens"} <= set(known)
    assert list(rows[0]) == [*known, "attempt", "zone"]
    assert [row["request_id"] for row in rows] == ["req-0001", "req-0002", "req-0003"]
    assert rows[1] == {
        **{name: "" for name in known},
        "request_id": "req-0002",
        "timestamp": str(T0 + 2),
        "key_name": "team-c",
        "model": "m1",
        "provider": "p3",
        "prompt_tokens": "6",
        "completion_tokens": "2",
        "cost_micros": "2000",
        "latency_ms": "12",
        "status": "200",
        "stream": "true",
        "endpoint": "chat",
        "error": 'said "no", twice',
        "zone": '{"az":2}',
        "attempt": "2",
    }
    assert rows[0]["attempt"] == rows[0]["zone"] == ""


def test_csv_of_many_records_is_every_match(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    path = tmp_path / "audit.jsonl"
    write(Path(rotated_name(str(path), T0 / 1000 + 5)), [make(i) for i in range(1500)])
    write(path, [make(i) for i in range(1500, 2600)])
    code, out, _ = run(capsysbinary, str(path), "--export", "csv", "--status", "500")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out.decode(), newline="")))
    expected = api_answer(path, limit=1000, filters={"status": 500})  # 520 match
    assert len(rows) == len(expected) == 520
    assert [row["request_id"] for row in rows] == [
        orjson.loads(line)["request_id"] for line in reversed(expected)
    ]


@pytest.mark.parametrize("reverse", [False, True])
def test_the_spool_gives_every_line_back_across_its_pages(
    monkeypatch: pytest.MonkeyPatch, reverse: bool
) -> None:
    monkeypatch.setattr(logs_output, "CHUNK", 2)
    lines = [make(i).to_line().rstrip(b"\n") for i in range(7)]
    spool = logs_output.Spool(reverse=reverse)
    try:
        spool.extend(lines[:3])  # the API's pages: newest first when reversed
        spool.extend(lines[3:])
        assert list(spool) == (lines[::-1] if reverse else lines)
        assert list(spool) == list(spool)  # read again (CSV reads twice)
    finally:
        spool.close()


def test_a_record_only_the_gateway_can_decode_is_still_shown(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """The index takes a line with a number beyond a float in a field it does not read;
    orjson does not. Its filter fields are shown, and nothing fails."""
    path = tmp_path / "audit.jsonl"
    odd = make(1).to_line()[:-2] + b',"drift":1e400}\n'
    path.write_bytes(make(0).to_line() + odd)
    assert api_answer(path)[0] == odd.rstrip(b"\n")
    code, out, _ = run(capsysbinary, str(path), "--table")
    assert code == 0
    assert out.decode().splitlines()[2].split()[:5] == [iso(T0 + 1), "team-b", "m2", "p2", "200"]
    code, out, _ = run(capsysbinary, str(path), "--export", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out.decode(), newline="")))
    assert (rows[1]["request_id"], rows[1]["cost_micros"], rows[1]["endpoint"]) == (
        "req-0001",
        "1000",
        "",
    )


def test_an_api_answer_is_checked_and_each_record_kept_on_one_line() -> None:
    line = make(1).to_line().rstrip(b"\n")
    pretty = b"[\n  " + line.replace(b',"', b',\r\n    "') + b"\n]"
    found = logs_cli._records(pretty)
    assert len(found) == 1 and b"\n" not in found[0][0] and b"\r" not in found[0][0]
    assert orjson.loads(found[0][0]) == orjson.loads(line)
    for body in (b'{"error": {"message": "no"}}', b"[1, 2]", b"[{}]", b"not json"):
        with pytest.raises(cli.CliError, match="not a list of audit records"):
            logs_cli._records(body)


@pytest.mark.parametrize(
    "args",
    [
        [],  # neither a path nor --url
        ["audit.jsonl", "--url", "http://127.0.0.1:9"],
        ["audit.jsonl", "--since", "yesterday"],
        ["audit.jsonl", "--until", "1969-12-31"],
        ["audit.jsonl", "--status", "42"],
        ["audit.jsonl", "--limit", "-1"],
        ["audit.jsonl", "--json", "--table"],
        ["audit.jsonl", "--export", "xlsx"],
        ["audit.jsonl", "--follow", "--export", "csv"],
        ["audit.jsonl", "--follow", "--until", "1h"],
        ["audit.jsonl", "--scope", "fleet"],
        ["--url", "ftp://example.com"],
    ],
)
def test_bad_arguments_exit_2(
    args: list[str], capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CRABTRIO_URL", raising=False)
    code, out, err = run(capsysbinary, *args)
    assert code == 2
    assert out == b""
    assert "crabtrio logs: error:" in err


def test_an_unreadable_path_is_one_line_and_exit_1(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    missing = tmp_path / "missing.jsonl"
    assert run(capsysbinary, str(missing)) == (
        1,
        b"",
        f"crabtrio logs: cannot read {missing}: no such file\n",
    )
    assert run(capsysbinary, str(tmp_path)) == (
        1,
        b"",
        f"crabtrio logs: cannot read {tmp_path}: not a file\n",
    )


def test_only_rotated_segments_are_enough(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    path = tmp_path / "audit.jsonl"
    write(Path(rotated_name(str(path), T0 / 1000)), [make(1)])
    code, out, _ = run(capsysbinary, str(path), "--json")
    assert (code, out) == (0, make(1).to_line())
