"""The local side of shipping: file ids, whole-line batches, lag, and what retention may delete."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from crabtrio.audit.rotation import rotated_name
from crabtrio.fleet import local
from crabtrio.fleet.local import Checkpoint, LocalFiles, shipped_only, write_status

from ..audit.records import lines, record

STAMPS = ("20260101T000000.000Z", "20260101T000001.000Z", "20260101T000002.000Z")


def rotated(path: Path, n: int) -> Path:
    """The name rotation gives the n-th rotated file (names sort by age)."""
    return path.with_name(f"{path.stem}-{STAMPS[n]}{path.suffix}")


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as out:
        out.write(data)


def rotate(path: Path, n: int) -> Path:
    """Rename the active file as rotation does; the next append creates a new one."""
    target = rotated(path, n)
    os.rename(path, target)
    return target


def digest(first_line: bytes) -> str:
    return hashlib.sha256(first_line).hexdigest()[:32]


def after(batch: local.Batch) -> Checkpoint:
    assert batch.segment.file_id is not None
    return Checkpoint(batch.segment.file_id, os.path.basename(batch.segment.path), batch.end)


def drain(files: LocalFiles, checkpoint: Checkpoint | None, max_lines: int) -> list[local.Batch]:
    batches = []
    while (batch := files.next_batch(checkpoint, max_lines)) is not None:
        batches.append(batch)
        checkpoint = after(batch)
        assert len(batches) < 100
    return batches


def test_a_file_keeps_its_id_when_rotation_renames_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, b'{"request_id": "partial')  # no whole line yet: no id
    files = LocalFiles(str(path))
    (segment,) = files.segments()
    assert segment.file_id is None
    append(path, b'"}\n' + lines(2))
    (segment,) = files.segments()
    first_id = segment.file_id
    assert first_id == digest(b'{"request_id": "partial"}\n')

    rotate(path, 0)
    append(path, lines(3, start=10))
    for reader in (files, LocalFiles(str(path))):  # the same reader, and a new process's
        old, new = reader.segments()
        assert (old.path, old.file_id) == (str(rotated(path, 0)), first_id)
        assert (new.path, new.file_id) == (str(path), digest(record(10).to_line()))


def test_batches_hold_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    whole = lines(3)
    torn = record(3).to_line()
    append(path, whole + torn[:20])
    files = LocalFiles(str(path))
    batch = files.next_batch(None, 100)
    assert batch is not None
    assert (batch.start, batch.end, batch.lines, batch.data) == (0, len(whole), 3, whole)
    assert files.next_batch(after(batch), 100) is None  # the torn line waits for its end
    append(path, torn[20:])
    rest = files.next_batch(after(batch), 100)
    assert rest is not None
    assert (rest.start, rest.data, rest.lines) == (len(whole), torn, 1)
    assert files.next_batch(after(rest), 100) is None


def test_batches_hold_at_most_max_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, lines(10))
    batches = drain(LocalFiles(str(path)), None, 4)
    assert [b.lines for b in batches] == [4, 4, 2]
    assert b"".join(b.data for b in batches) == lines(10)
    assert [b.data.count(b"\n") for b in batches] == [4, 4, 2]


def test_a_rotated_file_is_read_to_its_end_then_the_next(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, lines(5))
    rotate(path, 0)
    append(path, lines(4, start=5))
    rotate(path, 1)
    append(path, lines(3, start=9))
    files = LocalFiles(str(path))
    batches = drain(files, None, 100)
    # One file per batch, oldest first, never a line twice or missed.
    assert [(os.path.basename(b.segment.path), b.lines) for b in batches] == [
        (rotated(path, 0).name, 5),
        (rotated(path, 1).name, 4),
        (path.name, 3),
    ]
    assert b"".join(b.data for b in batches) == lines(12)
    # Resuming at the end of a rotated file goes on with the next one.
    end_of_first = after(batches[0])
    assert files.next_batch(end_of_first, 100).data == lines(4, start=5)  # type: ignore[union-attr]
    # A checkpoint whose file is gone starts over at the oldest file (re-sends are no-ops).
    gone = Checkpoint("0" * 32, "deleted.jsonl", 10)
    assert files.next_batch(gone, 100).data == lines(5)  # type: ignore[union-attr]


def test_lag_counts_unshipped_records_and_follows_growth(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    files = LocalFiles(str(path))
    assert files.lag(None) == (0, None)  # no file yet
    append(path, lines(5))
    assert files.lag(None) == (5, record(0).timestamp)
    first = files.next_batch(None, 2)
    assert first is not None
    assert files.lag(after(first)) == (3, record(2).timestamp)
    append(path, lines(4, start=5))
    assert files.lag(after(first)) == (7, record(2).timestamp)
    rotate(path, 0)
    append(path, lines(2, start=9) + record(11).to_line()[:10])  # and a torn line
    assert files.lag(after(first)) == (9, record(2).timestamp)
    assert LocalFiles(str(path)).lag(after(first)) == (9, record(2).timestamp)
    batches = drain(files, after(first), 100)
    assert files.lag(after(batches[-1])) == (0, None)
    # The end of the rotated file: only the active file's records are behind.
    assert files.lag(after(batches[0])) == (2, record(9).timestamp)


def test_retention_deletes_only_files_before_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, lines(3))
    one = rotate(path, 0)
    append(path, lines(3, start=3))
    two = rotate(path, 1)
    append(path, lines(3, start=6))
    doomed = [str(one), str(two)]
    assert shipped_only(str(path), doomed) == []  # no status file: nothing is known shipped

    def shipped_to(file: Path, offset: int) -> list[str]:
        (segment,) = [s for s in LocalFiles(str(path)).segments() if s.path == str(file)]
        assert segment.file_id is not None
        write_status(
            str(path), {"file_id": segment.file_id, "file_name": file.name, "offset": offset}
        )
        return shipped_only(str(path), doomed)

    size = len(lines(3))
    assert shipped_to(one, 0) == []
    assert shipped_to(one, size - 1) == []
    assert shipped_to(one, size) == [str(one)]
    assert shipped_to(two, 10) == [str(one)]
    assert shipped_to(two, size) == doomed
    assert shipped_to(path, 0) == doomed
    write_status(str(path), {"file_id": "f" * 32, "file_name": "gone.jsonl", "offset": 5})
    assert shipped_only(str(path), doomed) == []  # the checkpoint's file is unknown here
    write_status(str(path), {"state": "down", "file_id": None})
    assert shipped_only(str(path), doomed) == []


def test_a_new_file_on_a_reused_inode_is_not_taken_for_the_deleted_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, lines(3))
    files = LocalFiles(str(path))
    shipped = files.next_batch(None, 100)
    assert shipped is not None
    checkpoint = after(shipped)  # all of the first file is shipped
    first = rotate(path, 0)
    inode = os.stat(first).st_ino
    append(path, lines(3, start=3))  # the next file, not shipped yet
    files.lag(checkpoint)  # the shipper surveys the files meanwhile
    rotate(path, 1)
    os.unlink(first)  # retention: its records are all shipped
    append(path, lines(2, start=6))  # rotation creates a new active file
    if os.stat(path).st_ino != inode:
        pytest.skip("this file system did not reuse the inode")
    batch = files.next_batch(checkpoint, 100)
    assert batch is not None and batch.data == lines(3, start=3)


def test_a_rotation_while_listing_files_does_not_restart_shipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, lines(3))
    rotate(path, 0)
    append(path, lines(3, start=3))
    files = LocalFiles(str(path))
    batches = drain(files, None, 100)
    caught_up = after(batches[-1])  # at the end of the active file
    listed = local.rotated_siblings

    def rotation_right_after_listing(p: str) -> list[str]:
        found = listed(p)
        rotate(path, 1)  # another worker's writer rotates the active file now
        append(path, lines(1, start=6))
        return found

    monkeypatch.setattr(local, "rotated_siblings", rotation_right_after_listing)
    batch = files.next_batch(caught_up, 100)
    assert batch is None or batch.data == lines(1, start=6)


def test_a_file_with_a_very_long_first_line_has_an_id_and_is_read(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = b'{"padding": "' + b"x" * (3 * local.FIRST_LINE_STEP) + b'"}\n'
    append(path, first + lines(2))
    batch = LocalFiles(str(path)).next_batch(None, 100)
    assert batch is not None and batch.segment.file_id is not None
    assert batch.data == first + lines(2)


def test_two_rotations_in_one_millisecond_are_read_in_age_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, lines(3))
    files = LocalFiles(str(path))
    first = files.next_batch(None, 1)
    assert first is not None
    now = 1_767_225_600.0
    os.rename(path, rotated_name(str(path), now))
    append(path, lines(3, start=3))
    os.rename(path, rotated_name(str(path), now))  # the same millisecond: a "-1" suffix
    append(path, lines(3, start=6))
    batches = drain(files, after(first), 100)
    assert b"".join(b.data for b in batches) == lines(8, start=1)
