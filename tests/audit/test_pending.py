"""PendingRecord: token counts from upstream are validated before cost and encoding see them."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from crabtrio.audit.pending import MAX_TOKENS, PendingRecord
from crabtrio.audit.record import AuditRecord, decode_fields, encode_batch
from crabtrio.config import Pricing


class FakeLogger:
    """Keeps what `record()` is given, as the writer would encode it."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def record(self, rec: AuditRecord) -> int:
        self.records.append(rec)
        return len(self.records)


def finished(*usages: Any, endpoint: str = "chat", error: str | None = None) -> dict[str, Any]:
    """The written record of a priced request that saw `usages`, decoded from its line."""
    logger = FakeLogger()
    pending = PendingRecord(
        logger,  # type: ignore[arg-type]
        {"gpt-4o": Pricing(2.5, 10.0)},
        "req-1",
        endpoint,
        time.perf_counter(),
    )
    pending.model = "gpt-4o"
    for usage in usages:
        pending.set_usage(usage)
    assert pending.finish(200 if error is None else 502, error) == 1
    line = encode_batch(logger.records)
    assert decode_fields(line) is not None
    written: dict[str, Any] = orjson.loads(line)
    return written


def test_valid_counts_are_kept_and_priced() -> None:
    written = finished({"prompt_tokens": 1000, "completion_tokens": 200})
    assert (written["prompt_tokens"], written["completion_tokens"]) == (1000, 200)
    assert written["cost_micros"] == 4500 and "error" not in written
    top = finished({"prompt_tokens": MAX_TOKENS, "completion_tokens": 0})
    assert top["prompt_tokens"] == MAX_TOKENS and "error" not in top


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (18446744073709551615, "out of range"),
        (2**100, "out of range"),
        (MAX_TOKENS + 1, "out of range"),
        (-1, "out of range"),
        (12.0, "not an integer"),
        ("12", "not an integer"),
        (True, "not an integer"),
        ([1], "not an integer"),
    ],
)
def test_an_invalid_count_is_unknown_and_noted(value, problem) -> None:
    written = finished({"prompt_tokens": value, "completion_tokens": 200})
    assert "prompt_tokens" not in written and written["completion_tokens"] == 200
    assert written["cost_micros"] == 2000  # the completion only
    assert written["error"] == f"upstream usage invalid: prompt_tokens {problem}"


def test_both_counts_invalid_are_both_noted() -> None:
    written = finished({"prompt_tokens": -5, "completion_tokens": "many"})
    assert "prompt_tokens" not in written and "completion_tokens" not in written
    assert written["cost_micros"] == 0
    assert written["error"] == (
        "upstream usage invalid: prompt_tokens out of range, completion_tokens not an integer"
    )


def test_a_real_error_comes_first_and_is_kept() -> None:
    written = finished({"prompt_tokens": 2**64}, error="upstream 502: bad gateway")
    assert written["error"] == (
        "upstream 502: bad gateway; upstream usage invalid: prompt_tokens out of range"
    )
    long = finished({"completion_tokens": -1}, error="x" * 1000)
    assert long["error"].startswith("x" * 255 + "…; ")
    assert long["error"].endswith("completion_tokens out of range")


def test_absent_or_null_usage_is_unknown_without_a_note() -> None:
    for usage in (None, {}, {"prompt_tokens": None, "completion_tokens": None}):
        written = finished(usage)
        assert "prompt_tokens" not in written and "error" not in written
    assert finished("garbage")["error"] == "upstream usage invalid: usage not an object"


def test_the_last_usage_of_a_stream_decides() -> None:
    fixed = finished({"prompt_tokens": -1}, {"prompt_tokens": 7, "completion_tokens": 3})
    assert fixed["prompt_tokens"] == 7 and "error" not in fixed
    broken = finished({"prompt_tokens": 7}, {"prompt_tokens": 10**12})
    assert "prompt_tokens" not in broken
    assert broken["error"] == "upstream usage invalid: prompt_tokens out of range"
    assert "error" not in finished([1], {"prompt_tokens": 7})
    kept = finished({"prompt_tokens": 7, "completion_tokens": 3}, {"completion_tokens": 4})
    assert (kept["prompt_tokens"], kept["completion_tokens"]) == (7, 4)


def test_embeddings_without_completion_tokens_count_zero() -> None:
    written = finished({"prompt_tokens": 8}, endpoint="embeddings")
    assert (written["prompt_tokens"], written["completion_tokens"]) == (8, 0)
    bad = finished({"prompt_tokens": 8, "completion_tokens": -3}, endpoint="embeddings")
    assert "completion_tokens" not in bad and "completion_tokens" in bad["error"]
