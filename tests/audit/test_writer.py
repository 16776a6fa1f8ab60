"""AuditLogger: batching, ordering, the drain on exit, sync modes, bounds and disk errors."""

from __future__ import annotations

import os

import pytest
import trio

from crabtrio.audit import AuditLogger, store
from crabtrio.audit.reader import AuditReader
from crabtrio.config import AuditConfig

from .records import record


def request_ids(path) -> list[str]:
    reader = AuditReader(str(path))
    try:
        reader.replay()
        page = reader.index.query(limit=1000)
        return [
            line.split(b'"request_id":"')[1].split(b'"')[0].decode()
            for line in reader.read_lines(page.locations)
        ][::-1]
    finally:
        reader.close()


async def test_records_are_all_written_in_order_on_exit(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    async with AuditLogger.open(AuditConfig(path=str(path))) as logger:
        for i in range(100):
            logger.record(record(i))
    assert request_ids(path) == [f"req-{i:06d}" for i in range(100)]
    assert len(path.read_bytes().splitlines()) == 100
    stats = logger.statistics()
    assert (stats.written, stats.pending, stats.state) == (100, 0, "ok")


async def test_a_record_reaches_the_file_within_a_second(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    async with AuditLogger.open(AuditConfig(path=str(path))) as logger:
        logger.record(record(1))
        with trio.fail_after(1):
            while b"req-000001" not in path.read_bytes():
                await trio.sleep(0.005)


async def test_cancellation_still_flushes_what_was_queued(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    with trio.CancelScope() as scope:
        async with AuditLogger.open(AuditConfig(path=str(path))) as logger:
            for i in range(50):
                logger.record(record(i))
            scope.cancel()
            await trio.sleep_forever()
    assert len(request_ids(path)) == 50


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(store.os, "fsync", counting)
    return calls


async def test_always_mode_fsyncs_each_sequential_request(tmp_path, fsyncs) -> None:
    path = tmp_path / "a.jsonl"
    async with AuditLogger.open(AuditConfig(path=str(path), sync="always")) as logger:
        before = len(fsyncs)
        for i in range(20):
            await logger.wait_durable(logger.record(record(i)))
        assert len(fsyncs) - before >= 20
        assert logger.statistics().fsyncs >= 20


async def test_always_mode_group_commits_concurrent_requests(tmp_path, fsyncs) -> None:
    path = tmp_path / "a.jsonl"
    async with AuditLogger.open(AuditConfig(path=str(path), sync="always")) as logger:
        before = logger.statistics().fsyncs

        async def request(i: int) -> None:
            await logger.wait_durable(logger.record(record(i)))

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(request, i)
        assert 1 <= logger.statistics().fsyncs - before < 32
    assert len(request_ids(path)) == 32


async def test_interval_mode_fsyncs_on_its_interval(tmp_path, fsyncs) -> None:
    path = tmp_path / "a.jsonl"
    config = AuditConfig(path=str(path), sync="interval", sync_interval_ms=50)
    async with AuditLogger.open(config) as logger:
        logger.record(record(1))
        with trio.fail_after(2):
            while logger.statistics().fsyncs == 0:
                await trio.sleep(0.01)


async def test_never_mode_does_not_fsync_records(tmp_path, fsyncs) -> None:
    path = tmp_path / "a.jsonl"
    async with AuditLogger.open(AuditConfig(path=str(path), sync="never")) as logger:
        before = len(fsyncs)
        for i in range(10):
            logger.record(record(i))
    assert len(fsyncs) == before
    assert len(request_ids(path)) == 10


async def test_failed_writes_keep_records_and_recover(tmp_path, monkeypatch) -> None:
    path = tmp_path / "a.jsonl"
    failing = trio.Event()
    real_append = store.AuditFile.append
    state = {"fail": True}

    def append(self, data: bytes):
        if state["fail"] and data:
            trio.from_thread.run_sync(failing.set)
            raise OSError(28, "No space left on device")
        return real_append(self, data)

    monkeypatch.setattr(store.AuditFile, "append", append)
    async with AuditLogger.open(AuditConfig(path=str(path), queue_max=5)) as logger:
        for i in range(5):
            logger.record(record(i))
        with trio.fail_after(2):
            await failing.wait()
            while logger.statistics().state != "degraded":
                await trio.sleep(0.01)
        stats = logger.statistics()
        assert stats.failed_writes >= 1 and "No space left" in (stats.reason or "")
        assert not logger.admit()  # the backlog is at its bound: new requests are refused
        assert logger.statistics().refused == 1
        state["fail"] = False
        with trio.fail_after(1):
            while logger.statistics().written < 5:
                await trio.sleep(0.01)
        assert logger.statistics().state == "ok"
        assert logger.admit()
    assert request_ids(path) == [f"req-{i:06d}" for i in range(5)]


async def test_disabled_logger_records_nothing(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    async with AuditLogger.open(AuditConfig(path=str(path), enabled=False)) as logger:
        assert logger.record(record(1)) == 0
        assert not logger.enabled
    assert not path.exists()
