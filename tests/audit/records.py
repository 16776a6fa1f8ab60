"""Helpers: build audit record lines for tests."""

from __future__ import annotations

from crabtrio.audit import AuditRecord


def record(
    i: int, *, ts: int | None = None, key: str = "k", model: str = "m", status: int = 200
) -> AuditRecord:
    return AuditRecord(
        request_id=f"req-{i:06d}",
        timestamp=1_700_000_000_000 + i if ts is None else ts,
        key_name=key,
        model=model,
        provider="p",
        cost_micros=i,
        latency_ms=1,
        status=status,
        stream=False,
        endpoint="chat",
        prompt_tokens=3,
        completion_tokens=4,
    )


def lines(n: int, start: int = 0) -> bytes:
    return b"".join(record(i).to_line() for i in range(start, start + n))
