"""Audit lines as fleet rows: the typed fast path, unknown fields, NUL, and lines skipped."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from crabtrio.audit import AuditRecord
from crabtrio.fleet import rows as rows_module
from crabtrio.fleet.rows import COLUMNS, record, rows

from ..audit.records import record as audit_record

INSTANCE = "gw-1"
BASE = {
    "request_id": "r-1",
    "timestamp": 1_700_000_000_000,
    "key_name": "team-a",
    "model": "gpt-4o",
    "provider": "openai",
    "prompt_tokens": 3,
    "completion_tokens": 4,
    "cost_micros": 70,
    "latency_ms": 12,
    "status": 200,
    "stream": False,
    "endpoint": "chat",
}


def line(**fields: Any) -> bytes:
    return orjson.dumps({**BASE, **fields}) + b"\n"


def raw_value(name: str, text: bytes) -> bytes:
    """A line whose field `name` holds `text` verbatim (JSON orjson would not write)."""
    return re.sub(rb'"%s":[^,}]*' % name.encode(), b'"%s":' % name.encode() + text, line())


def as_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    """A row as the mapping asyncpg hands `record()` (column name -> value)."""
    assert len(row) == len(COLUMNS)
    return dict(zip(COLUMNS, row, strict=True))


def test_ordinary_lines_take_the_typed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def line_by_line(*_: Any) -> None:
        raise AssertionError("ordinary lines must be decoded in one typed pass")

    monkeypatch.setattr(rows_module, "_row", line_by_line)
    records = [audit_record(i) for i in range(3)]
    found, skipped = rows(b"".join(r.to_line() for r in records), INSTANCE)
    assert skipped == 0
    assert found == [
        (
            f"req-00000{i}",
            1_700_000_000_000 + i,
            "k",
            "m",
            "p",
            3,
            4,
            i,
            1,
            200,
            False,
            "chat",
            None,
            *(None, None, None, None),  # cache tokens, seq and chain: absent here
            None,  # extra
            INSTANCE,
        )
        for i in range(3)
    ]


def test_unknown_fields_are_kept_in_extra_and_merged_back() -> None:
    newer = {"tenant": {"id": 7, "tags": ["a", "b"]}, "cache_hit": True}
    data = line(request_id="r-old") + line(request_id="r-new", **newer)
    found, skipped = rows(data, INSTANCE)
    assert skipped == 0
    old, new = (as_dict(row) for row in found)
    assert old["extra"] is None
    assert orjson.loads(new["extra"]) == newer
    assert {name: new[name] for name in BASE} == {**BASE, "request_id": "r-new"}
    assert record(new) == {**BASE, "request_id": "r-new", **newer, "instance": INSTANCE}
    assert record(old) == {**BASE, "request_id": "r-old", "instance": INSTANCE}


def test_nul_in_any_text_is_replaced() -> None:
    data = (
        line(request_id="r-1")
        + line(
            request_id="r\u00002", model="m\u0000", error="bad\u0000", note={"k\u0000": ["v\u0000"]}
        )
        + line(request_id="r-3")
    )
    assert b"\\u0000" in data
    found, skipped = rows(data, INSTANCE)
    assert skipped == 0
    assert [row[0] for row in found] == ["r-1", "r\ufffd2", "r-3"]
    nul = as_dict(found[1])
    assert (nul["model"], nul["error"]) == ("m\ufffd", "bad\ufffd")
    assert orjson.loads(nul["extra"]) == {"note": {"k\ufffd": ["v\ufffd"]}}
    for row in found:
        assert not any(isinstance(value, str) and "\x00" in value for value in row)


@pytest.mark.parametrize(
    "bad",
    [
        b"{not json\n",
        b"[1, 2, 3]\n",
        b'"just a string"\n',
        line(timestamp="1700000000000"),
        line(status="200"),
        line(status=True),
        line(timestamp=-1),
        line(status=70000),
        raw_value("cost_micros", b"18446744073709551616"),
        line(stream="yes"),
        orjson.dumps({k: v for k, v in BASE.items() if k != "status"}) + b"\n",
        orjson.dumps({k: v for k, v in BASE.items() if k != "request_id"}) + b"\n",
        line(model="caf\u00e9").replace("caf\u00e9".encode(), b"caf\xe9"),  # invalid UTF-8
        raw_value("timestamp", b"1e400"),
        raw_value("latency_ms", b"12.0"),
    ],
)
def test_lines_that_are_no_record_are_skipped_and_counted(bad: bytes) -> None:
    data = line(request_id="before") + bad + b"\n  \n" + line(request_id="after")
    found, skipped = rows(data, INSTANCE)
    assert [row[0] for row in found] == ["before", "after"]
    assert skipped == 1  # blank lines are not records, nor counted as skipped


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"prompt_tokens": None, "completion_tokens": None},
        {"prompt_tokens": 0, "completion_tokens": None, "error": "upstream timed out"},
        {"status": 499, "stream": True, "error": "client disconnected"},
    ],
)
def test_record_has_the_jsonl_records_shape(fields: dict[str, Any]) -> None:
    base = audit_record(5)
    written = AuditRecord(**{**{f: getattr(base, f) for f in base.__slots__}, **fields})
    (row,), _ = rows(written.to_line(), INSTANCE)
    out = record(as_dict(row))
    assert out.pop("instance") == INSTANCE
    # The same fields in the same order: a fleet answer reads like a local one.
    assert list(out.items()) == list(written.to_dict().items())
    assert orjson.dumps(out) + b"\n" == written.to_line()


@pytest.mark.parametrize(
    "unknown",
    [
        b"123456789012345678901234567890",
        b"[" * 300 + b"]" * 300,
        b"[" * 5000 + b"]" * 5000,
    ],
    ids=["bigint", "nested-300", "nested-5000"],
)
def test_an_unknown_field_that_cannot_be_stored_costs_one_line_at_most(unknown: bytes) -> None:
    odd = line(request_id="odd")[:-2] + b', "later": ' + unknown + b"}\n"
    found, skipped = rows(line(request_id="a") + odd + line(request_id="b"), INSTANCE)
    assert {"a", "b"} <= {row[0] for row in found}
    assert len(found) + skipped == 3
