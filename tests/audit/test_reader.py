"""The read side: replay exactly the valid records, follow appends, switch after rotation."""

from __future__ import annotations

import os

import orjson
import pytest
import trio

from crabtrio.audit import reader as reader_module
from crabtrio.audit.reader import AuditReader
from crabtrio.audit.record import IndexedFields, decode_fields
from crabtrio.audit.rotation import rotated_name, rotated_siblings, sidecar_path
from crabtrio.audit.store import AuditFile
from crabtrio.audit.sums import select

from .records import lines, record


def ids(reader: AuditReader, **query: object) -> list[str]:
    page = reader.index.query(limit=1000, **query)  # type: ignore[arg-type]
    return [orjson.loads(line)["request_id"] for line in reader.read_lines(page.locations)]


def test_replay_keeps_exactly_the_valid_records(tmp_path, caplog) -> None:
    path = tmp_path / "a.jsonl"
    good = [record(i).to_line() for i in range(8)]
    content = (
        good[0]
        + b"\x00\x00\x00\n"  # NUL bytes
        + good[1]
        + b"not json at all\n"  # mid-file garbage
        + good[2].replace(b"\n", b"\r\n")  # CRLF
        + b"\n\n   \n"  # blank lines
        + b'{"request_id": "\xff\xfe"}\n'  # invalid UTF-8
        + good[3]
        + b'["a", "list"]\n'  # valid JSON, wrong shape
        + b'{"request_id":"x","timestamp":"soon","status":200}\n'  # wrong field type
        + good[4]
        + b'{"x":"'
        + b"y" * (10 * 1024 * 1024)
        + b'"}\n'  # a 10 MB line
        + good[5]
        + b"z" * (17 * 1024 * 1024)
        + b"\n"  # longer than any line we index
        + good[6]
        + good[7]
    )
    path.write_bytes(content)
    reader = AuditReader(str(path))
    try:
        reader.replay()
        assert ids(reader) == [f"req-{i:06d}" for i in reversed(range(8))]
        assert reader.corrupt_lines == 7
        assert "skipped 7 corrupt line(s)" in caplog.text
        first_bad = len(good[0])
        assert f"first at byte offsets {first_bad}," in caplog.text
    finally:
        reader.close()


def test_follow_indexes_appends_and_waits_for_whole_lines(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(lines(3))
    reader = AuditReader(str(path))
    try:
        reader.replay()
        assert len(reader.index) == 3
        more = lines(2, start=3)
        with open(path, "ab") as f:
            f.write(more[:10])
            f.flush()
            reader.catch_up()
            assert len(reader.index) == 3  # a partial line waits
            f.write(more[10:])
        reader.catch_up()
        assert ids(reader)[:2] == ["req-000004", "req-000003"]
    finally:
        reader.close()


def test_rotation_then_retention(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(lines(3))
    reader = AuditReader(str(path))
    try:
        reader.replay()
        with open(path, "ab") as f:
            f.write(lines(1, start=3))  # written just before the rotation
        rotated = tmp_path / "a-20260101T000000.000Z.jsonl"
        os.rename(path, rotated)
        path.write_bytes(lines(2, start=10))
        reader.catch_up()
        assert sorted(ids(reader)) == [f"req-{i:06d}" for i in (0, 1, 2, 3, 10, 11)]
        os.unlink(rotated)
        reader.catch_up()
        assert sorted(ids(reader)) == ["req-000010", "req-000011"]
    finally:
        reader.close()


@pytest.mark.parametrize("budget", [None, 300])
def test_two_rotations_between_two_looks_index_the_file_in_between(
    tmp_path, budget: int | None
) -> None:
    """Another worker can write a whole file between two looks (a small max_file_mb): the
    file rotated in between is read after the one this reader had open and before the new
    one, each record indexed and told to `on_indexed` once, and then sealed."""
    path = tmp_path / "a.jsonl"
    audit = AuditFile(str(path))
    reader = AuditReader(str(path))
    told: list[str] = []

    def observe(records: list[IndexedFields]) -> None:
        told.extend(fields.request_id for fields in records)

    try:
        audit.append(lines(3))
        reader.replay()
        reader.on_indexed = observe
        audit.append(lines(2, start=3), rotate_at=1)  # the file the reader has open, rotated
        audit.append(lines(4, start=5), rotate_at=1)  # a whole file, rotated
        audit.append(lines(2, start=9))  # the new active file
        rotated = rotated_siblings(str(path))
        assert len(rotated) == 2
        while reader.catch_up(budget=budget):
            pass
        assert sorted(ids(reader)) == [f"req-{i:06d}" for i in range(11)]
        assert told == [f"req-{i:06d}" for i in range(3, 11)]  # in order, once each
        reader.seal_rotated()
        assert all(os.path.isfile(sidecar_path(segment)) for segment in rotated)
        audit.append(lines(1, start=11))
        reader.catch_up()
        assert sorted(ids(reader)) == [f"req-{i:06d}" for i in range(12)]
        assert told == [f"req-{i:06d}" for i in range(3, 12)]
    finally:
        reader.close()
        audit.close()
    restarted = AuditReader(str(path))
    try:
        restarted.replay()
        assert restarted.sidecars == {"loaded": 2, "rebuilt": 0}
        assert sorted(ids(restarted)) == [f"req-{i:06d}" for i in range(12)]
    finally:
        restarted.close()


def test_restart_replays_rotated_siblings_first(tmp_path) -> None:
    (tmp_path / "a-20260101T000000.000Z.jsonl").write_bytes(lines(2))
    (tmp_path / "a-20260102T000000.000Z.jsonl").write_bytes(lines(2, start=2))
    (tmp_path / "unrelated.jsonl").write_bytes(lines(2, start=50))
    (tmp_path / "a.jsonl").write_bytes(lines(2, start=4))
    reader = AuditReader(str(tmp_path / "a.jsonl"))
    try:
        reader.replay()
        assert sorted(ids(reader)) == [f"req-{i:06d}" for i in range(6)]
    finally:
        reader.close()


async def test_open_follows_in_the_background(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"")
    async with AuditReader.open(str(path)) as reader:
        with open(path, "ab") as f:
            f.write(lines(5))
        with trio.fail_after(5):
            while len(reader.index) < 5:
                await trio.sleep(0.01)


async def test_the_follower_seals_a_rotated_file_in_a_thread(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(lines(5))
    rotated = rotated_name(str(path), 1_790_000_000.0)
    async with AuditReader.open(str(path)) as reader:
        os.rename(path, rotated)
        path.write_bytes(lines(3, start=5))
        reader.nudge()
        with trio.fail_after(5):
            while not os.path.exists(rotated + ".idx") or len(reader.index) < 8:
                await trio.sleep(0.01)
            while reader.index.memory()["mapped_bytes"] == 0:  # swapped for the mapped run
                await trio.sleep(0.01)
        assert sorted(ids(reader)) == [f"req-{i:06d}" for i in range(8)]
    reader = AuditReader(str(path))
    try:
        reader.replay()
        assert reader.sidecars == {"loaded": 1, "rebuilt": 0}
    finally:
        reader.close()


async def test_the_active_file_is_checkpointed_and_a_restart_reads_only_the_tail(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(reader_module, "CHECKPOINT_RECORDS", 10)
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"")
    async with AuditReader.open(str(path)) as reader:
        with open(path, "ab") as f:
            f.write(lines(25))
        reader.nudge()
        with trio.fail_after(5):
            while reader.checkpoints["written"] < 1:
                await trio.sleep(0.01)
    with open(path, "ab") as f:
        f.write(lines(5, start=25))  # after the checkpoint
    restarted = AuditReader(str(path))
    try:
        restarted.replay()
        assert restarted.checkpoints["loaded"] == 1
        assert restarted.index.memory()["mapped_bytes"] > 0
        assert ids(restarted) == [f"req-{i:06d}" for i in reversed(range(30))]
        # The checkpoint's cells (mapped) and the tail's (its own) are counted once each.
        fields = decode_fields(record(30).to_line())
        assert fields is not None
        restarted.index.segment(restarted._active.number).add([fields], [10**6], [100])
        assert sum(cell[0] for cell in select(restarted.index.rollup_sources()).values()) == 31
        costs = sum(cell[3] for cell in select(restarted.index.rollup_sources()).values())
        assert costs == sum(range(31))  # record(i) costs i micro-USD
    finally:
        restarted.close()
    # A damaged checkpoint, or one of the file as it was before being replaced, is simply
    # not used.
    checkpoint = tmp_path / "a.jsonl.idx"
    good = checkpoint.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(damaged))
    replaced = tmp_path / "b.jsonl"
    replaced.write_bytes(lines(40, start=100))
    for expected in (list(range(30)), list(range(100, 140))):
        again = AuditReader(str(path))
        try:
            again.replay()
            assert again.checkpoints["loaded"] == 0
            assert ids(again) == [f"req-{i:06d}" for i in reversed(expected)]
        finally:
            again.close()
        if replaced.exists():  # then: a valid checkpoint, of the file before it was replaced
            checkpoint.write_bytes(good)
            os.replace(replaced, path)


def test_a_backlog_is_indexed_in_bounded_steps(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"")
    reader = AuditReader(str(path))
    try:
        reader.replay()
        with open(path, "ab") as f:
            f.write(lines(100))
        line = len(record(0).to_line())  # the shortest of them
        steps, indexed = 0, 0
        while reader.catch_up(budget=10 * line):
            steps += 1
            assert 1 <= len(reader.index) - indexed <= 10  # no more than the budget holds
            indexed = len(reader.index)
        assert len(reader.index) == 100 and steps >= 9
        assert ids(reader) == [f"req-{i:06d}" for i in reversed(range(100))]
    finally:
        reader.close()


def test_read_lines_returns_each_line_in_the_order_asked(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    filler = b"x" * 100_000 + b"\n"  # not a record: a gap in the file
    path.write_bytes(lines(3) + filler + lines(2, start=3))
    reader = AuditReader(str(path))
    try:
        reader.replay()  # (the filler is counted as a corrupt line)
        page = reader.index.query(limit=10)
        shuffled = [page.locations[i] for i in (4, 0, 2, 1, 3)]
        got = [orjson.loads(line)["request_id"] for line in reader.read_lines(shuffled)]
        assert got == [f"req-{i:06d}" for i in (0, 4, 2, 3, 1)]
        gone = (99, 0, 10)  # a file no longer open: skipped
        assert len(reader.read_lines([gone, *shuffled])) == 5
    finally:
        reader.close()
