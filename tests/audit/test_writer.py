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


async def test_failed_writes_keep_records_and_recover(tmp_path, full_disk) -> None:
    path = tmp_path / "a.jsonl"
    async with AuditLogger.open(AuditConfig(path=str(path), queue_max=5)) as logger:
        for i in range(5):
            logger.record(record(i))
        with trio.fail_after(2):
            await full_disk.failed.wait()
            while logger.statistics().state != "degraded":
                await trio.sleep(0.01)
        stats = logger.statistics()
        assert stats.failed_writes >= 1 and "No space left" in (stats.reason or "")
        assert not logger.admit()  # the backlog is at its bound: new requests are refused
        assert logger.statistics().refused == 1
        full_disk.full = False
        await logger.wait_written(timeout=1)
        assert logger.statistics().written >= 5
        assert logger.statistics().state == "ok"
        assert logger.admit()
    assert request_ids(path) == [f"req-{i:06d}" for i in range(5)]


async def test_disabled_logger_records_nothing(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    async with AuditLogger.open(AuditConfig(path=str(path), enabled=False)) as logger:
        assert logger.record(record(1)) == 0
        assert not logger.enabled
    assert not path.exists()


async def test_always_mode_refuses_new_requests_while_the_disk_fails(tmp_path, full_disk) -> None:
    path = tmp_path / "a.jsonl"
    async with AuditLogger.open(AuditConfig(path=str(path), sync="always")) as logger:
        assert logger.admit()
        sequence = logger.record(record(1))
        with trio.fail_after(2):
            while logger.statistics().state == "ok":
                await trio.sleep(0.01)
        assert not logger.admit()  # nothing could be acknowledged: refuse new work
        full_disk.full = False
        with trio.fail_after(2):
            await logger.wait_durable(sequence)  # the in-flight request completes
        assert logger.admit()


async def test_a_failed_fsync_is_never_taken_for_durability(tmp_path, monkeypatch) -> None:
    from crabtrio.errors import Unavailable

    path = tmp_path / "a.jsonl"
    real_fsync = os.fsync
    failures = {"left": 1}

    def flaky_fsync(fd: int) -> None:
        is_log = path.exists() and os.path.samestat(os.fstat(fd), path.stat())
        if failures["left"] and is_log and os.fstat(fd).st_size > 0:
            failures["left"] -= 1
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", flaky_fsync)
    async with AuditLogger.open(AuditConfig(path=str(path), sync="always")) as logger:
        first = logger.record(record(1))
        with pytest.raises(Unavailable), trio.fail_after(2):
            await logger.wait_durable(first)
        stats = logger.statistics()
        assert (
            stats.failed_syncs == 1
            and stats.state == "degraded"
            and "fsync" in (stats.reason or "")
        )
        second = logger.record(record(2))
        with trio.fail_after(2):
            await logger.wait_durable(second)
        assert logger.statistics().state == "ok"


async def test_rotation_and_retention(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    line = len(record(0).to_line())
    config = AuditConfig(
        path=str(path), sync="never", max_file_mb=20 * line / 2**20, max_total_mb=70 * line / 2**20
    )
    async with AuditLogger.open(config) as logger:
        for i in range(200):
            logger.record(record(i))
            if i % 10 == 9:
                await logger.wait_written(timeout=2)
                assert logger.statistics().written >= i + 1
    rotated = sorted(
        p for p in tmp_path.iterdir() if p.name.startswith("a-") and p.suffix == ".jsonl"
    )
    assert rotated, "nothing was rotated"
    assert all(20 * line <= p.stat().st_size < 40 * line for p in rotated)
    total = sum(p.stat().st_size for p in rotated) + path.stat().st_size
    assert total <= 70 * line
    kept = request_ids(path)  # replays the retained rotated files, then the active one
    assert kept == [f"req-{i:06d}" for i in range(200 - len(kept), 200)]


async def test_a_reader_does_not_wait_out_the_linger(tmp_path, idle_jump_clock) -> None:
    path = tmp_path / "a.jsonl"
    async with AuditLogger.open(AuditConfig(path=str(path))) as logger:
        await trio.sleep(1)  # the writer is idle
        logger.record(record(1))
        await trio.sleep(0)  # the writer wakes and starts its linger
        start = trio.current_time()
        await logger.wait_written(timeout=5)
        assert logger.statistics().written == 1
        assert trio.current_time() - start < 0.01  # not the 50 ms linger
