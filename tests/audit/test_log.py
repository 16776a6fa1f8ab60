"""AuditLog, the one face of the audit package: record, settle, query, rollups, statistics."""

from __future__ import annotations

import orjson
import pytest
import trio

from crabtrio.audit import AuditLog
from crabtrio.config import AuditConfig
from crabtrio.errors import Unavailable

from .records import record


async def test_what_was_recorded_is_queryable_and_counted_at_once(tmp_path) -> None:
    config = AuditConfig(path=str(tmp_path / "a.jsonl"), sync="always")
    async with AuditLog.open(config) as audit:
        assert audit.enabled and audit.admit()
        with trio.fail_after(5):
            for i in range(3):
                await audit.settle(audit.record(record(i, key=f"k{i % 2}")))
            assert audit.statistics().fsyncs >= 1  # settled in "always" mode: fsynced
            # No wait for the follower's poll: a query reads this process's writes.
            lines, cursor = await audit.query(filters={"key": "k0"})
            assert [orjson.loads(line)["request_id"] for line in lines] == [
                "req-000002",
                "req-000000",
            ]
            assert cursor is None
            lines, cursor = await audit.query(limit=1)
            assert len(lines) == 1 and cursor is not None
            totals = await audit.summed(group_by=("key",), interval=None)
        assert dict(zip(totals.column("key"), totals.values[0].tolist(), strict=True)) == {
            "k0": 2,
            "k1": 1,
        }
        assert audit.statistics().indexed_records == 3


async def test_a_failed_log_refuses_to_settle_and_a_disabled_one_to_query(tmp_path) -> None:
    async with AuditLog.open(AuditConfig(path=str(tmp_path / "a.jsonl"))) as audit:
        audit.fail("test")
        with pytest.raises(Unavailable) as failed:
            await audit.settle(audit.record(record(1)))
        assert failed.value.code == "audit_failed"
        assert not audit.admit()
    async with AuditLog.open(AuditConfig(enabled=False)) as audit:
        assert not audit.enabled
        with pytest.raises(Unavailable) as disabled:
            await audit.query()
        assert disabled.value.code == "audit_disabled"
