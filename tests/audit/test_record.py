"""AuditRecord's JSONL encoding (unencodable fields, spoofing characters) and cost arithmetic."""

from __future__ import annotations

import dataclasses
import math
import time

import orjson
import pytest

from crabtrio.audit.record import (
    MAX_COST_MICROS,
    UNENCODABLE,
    cost_micros,
    decode_fields,
    decode_fields_lines,
    encode_batch,
)

from .records import record

SPOOFING = "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def test_a_batch_is_one_plain_orjson_line_per_record() -> None:
    batch = [record(i) for i in range(5)]
    data = encode_batch(batch)
    assert data == b"".join(
        orjson.dumps(r.to_dict(), option=orjson.OPT_APPEND_NEWLINE) for r in batch
    )
    assert b"".join(r.to_line() for r in batch) == data
    assert encode_batch([]) == b""


@pytest.mark.parametrize(
    "change",
    [
        {"model": "bad \ud800 surrogate"},
        {"request_id": "req-\udcff"},
        {"error": "upstream said \ud83d"},
        {"prompt_tokens": 2**64},
        {"cost_micros": 2**70},
        {"timestamp": -(2**64)},
        {"key_name": b"bytes"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_an_unencodable_record_is_still_one_indexable_line(change) -> None:
    bad = dataclasses.replace(record(1), **change)
    with pytest.raises(TypeError):
        orjson.dumps(bad.to_dict())
    data = encode_batch([record(0), bad, record(2)])
    lines = data.splitlines(keepends=True)
    assert len(lines) == 3 and data.endswith(b"\n")
    assert decode_fields_lines(data) is not None
    assert decode_fields(lines[1]) is not None
    written = orjson.loads(lines[1])
    (name,) = change
    assert written["error"].endswith(f"audit record could not be fully encoded ({name})")
    assert [orjson.loads(lines[i])["request_id"] for i in (0, 2)] == ["req-000000", "req-000002"]
    kept = {k: v for k, v in record(1).to_dict().items() if k != name}
    assert {k: v for k, v in written.items() if k not in (name, "error")} == kept
    alone = orjson.loads(bad.to_line())
    if name == "timestamp":  # replaced by the time of writing, so the two may differ by a ms
        now = time.time_ns() // 1_000_000
        assert now - 1000 < alone.pop("timestamp") <= now
        assert now - 1000 < written.pop("timestamp") <= now
    assert alone == written


def test_unencodable_fields_are_replaced_or_dropped() -> None:
    bad = dataclasses.replace(
        record(7),
        model="gpt\ud800",
        key_name=None,  # type: ignore[arg-type]
        prompt_tokens=2**64,
        cost_micros=2**64,
        error="boom",
    )
    written = orjson.loads(encode_batch([bad]))
    assert written["model"] == "gpt?"
    assert written["key_name"] == UNENCODABLE
    assert "prompt_tokens" not in written
    assert written["cost_micros"] == 0
    assert written["completion_tokens"] == 4
    assert written["error"] == (
        "boom; audit record could not be fully encoded (key_name, model, prompt_tokens,"
        " cost_micros)"
    )


@pytest.mark.parametrize("char", list(SPOOFING))
def test_separators_and_bidi_controls_are_escaped(char) -> None:
    rec = dataclasses.replace(record(0), model=f"gpt{char}4o", error=f"x{char}{char}")
    for data in (encode_batch([record(1), rec]), rec.to_line()):
        assert char.encode() not in data
        assert f"gpt\\u{ord(char):04x}4o".encode() in data
        assert orjson.loads(data.splitlines()[-1])["model"] == f"gpt{char}4o"
        assert orjson.loads(data.splitlines()[-1])["error"] == f"x{char}{char}"


def test_many_escapes_among_other_text_round_trip() -> None:
    text = "\u0627" + SPOOFING + "\u2026" + SPOOFING[::-1] + "\u0644\u061c"
    rec = dataclasses.replace(record(0), model=text, key_name=SPOOFING)
    data = encode_batch([rec, record(1), rec])
    assert not any(char.encode() in data for char in SPOOFING)
    assert [orjson.loads(line)["model"] for line in data.splitlines()] == [text, "m", text]
    assert orjson.loads(data.splitlines()[2])["key_name"] == SPOOFING


def test_other_non_ascii_text_is_written_as_is() -> None:
    text = "caf\u00e9 \u2026 \u2019 \u2014 \u2070 \u060c \u4e2d"  # shares lead bytes with some
    data = encode_batch([dataclasses.replace(record(0), model=text)])
    assert text.encode() in data


@pytest.mark.parametrize(
    ("prompt", "completion", "prompt_price", "completion_price", "cost"),
    [
        (12, 20, 1.0, 2.0, 52),
        (None, None, 5.0, 5.0, 0),
        (2**64 - 1, 0, 2.5, 10.0, MAX_COST_MICROS),
        (10**400, 0, 1.0, 1.0, MAX_COST_MICROS),
        (1, 1, 1e308, 1e308, MAX_COST_MICROS),
        (1, 0, math.inf, 0.0, MAX_COST_MICROS),
        (0, 0, math.inf, math.inf, 0),
        (5, 5, math.nan, 1.0, 0),
        (5, 5, -3.0, 1.0, 0),
        (2**62, 0, 2 - 2**-52, 0.0, 2**63 - 1024),  # the largest float below 2**63
    ],
)
def test_cost_is_a_non_negative_64_bit_integer(
    prompt, completion, prompt_price, completion_price, cost
) -> None:
    result = cost_micros(prompt, completion, prompt_price, completion_price)
    assert type(result) is int and result == cost
    assert 0 <= result < 2**63
