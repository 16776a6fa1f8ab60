"""Sidecar indexes of sealed segments: written once, loaded by the next reader, rebuilt (with
one warning) when damaged, written at rotation and deleted by retention; queries and rollups
always agree with a naive oracle over the records written."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from crabtrio.audit import sidecar
from crabtrio.audit.index import Segment
from crabtrio.audit.reader import AuditReader
from crabtrio.audit.record import AuditRecord
from crabtrio.audit.rollups import LATENCY_BOUNDS_MS, latency_bucket
from crabtrio.audit.rotation import rotated_name, sidecar_path
from crabtrio.audit.store import AuditFile
from crabtrio.audit.sums import select

from .records import record

HOUR = 3_600_000
BASE_TS = 1_760_000_000_000  # 13 digits for the whole span: every line has the same length
KEYS = ("ka", "kb", "kc")
MODELS = ("m1", "m2")
STATUSES = (200, 429, 500)
REBUILDING = "rebuilding the index of"
# Where each record field is, for the filter names of the index.
FIELD = {"key": "key_name", "model": "model", "provider": "provider", "status": "status"}

Query = tuple[dict[str, Any], int | None, int | None]  # (filters, since, until)


# --- building the files -------------------------------------------------------------------


def fixed_records(rng: random.Random, start: int, count: int) -> list[AuditRecord]:
    """`count` records whose lines all have the same length (ids 100..999, fixed-width
    fields), timestamps on a 10-minute grid over 50 hours (so with ties)."""
    assert start >= 100 and start + count <= 1000
    return [
        record(
            i,
            ts=BASE_TS + rng.randrange(300) * 600_000,
            key=rng.choice(KEYS),
            model=rng.choice(MODELS),
            status=rng.choice(STATUSES),
        )
        for i in range(start, start + count)
    ]


def write_records(path: Path | str, records: Iterable[AuditRecord], mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(b"".join(r.to_line() for r in records))


def segment_name(active: Path, n: int) -> Path:
    """The n-th rotated name of `active` (distinct, increasing times)."""
    return Path(rotated_name(str(active), 1_790_000_000.0 + 3600.0 * n + 0.123))


def idx(segment: Path | str) -> Path:
    return Path(sidecar_path(str(segment)))


def sealed_layout(
    tmp_path: Path, rng: random.Random, *, segments: int = 3, per_segment: int = 20
) -> tuple[Path, list[Path], list[list[AuditRecord]], list[AuditRecord]]:
    """`segments` rotated files of `per_segment` records each, and an active file."""
    active = tmp_path / "audit.jsonl"
    paths, contents = [], []
    for n in range(segments):
        records = fixed_records(rng, 100 + n * per_segment, per_segment)
        path = segment_name(active, n)
        write_records(path, records)
        paths.append(path)
        contents.append(records)
    current = fixed_records(rng, 100 + segments * per_segment, 7)
    write_records(active, current)
    return active, paths, contents, current


# --- the oracle -----------------------------------------------------------------------------


def matches(r: AuditRecord, filters: dict[str, Any]) -> bool:
    return all(getattr(r, FIELD[name]) == value for name, value in filters.items())


def expected_ids(
    records: Iterable[AuditRecord],
    filters: dict[str, Any],
    since: int | None,
    until: int | None,
) -> list[str]:
    chosen = [
        r
        for r in records
        if (since is None or r.timestamp >= since)
        and (until is None or r.timestamp <= until)
        and matches(r, filters)
    ]
    chosen.sort(key=lambda r: (r.timestamp, r.request_id), reverse=True)
    return [r.request_id for r in chosen]


def expected_rollups(
    records: Iterable[AuditRecord],
    *,
    since: int | None = None,
    until: int | None = None,
    filters: dict[str, Any] | None = None,
) -> dict[tuple[int, str, str, str, int], list[int]]:
    low = None if since is None else since - since % HOUR
    out: dict[tuple[int, str, str, str, int], list[int]] = {}
    for r in records:
        hour = r.timestamp - r.timestamp % HOUR
        if (low is not None and hour < low) or (until is not None and hour > until):
            continue
        if not matches(r, filters or {}):
            continue
        cell = out.setdefault((hour, r.key_name, r.model, r.provider, r.status), [0] * 20)
        cell[0] += 1
        cell[1] += r.prompt_tokens or 0
        cell[2] += r.completion_tokens or 0
        cell[3] += r.cost_micros
        cell[4 + latency_bucket(r.latency_ms)] += 1
    return out


# --- reading --------------------------------------------------------------------------------


def ids(
    reader: AuditReader, filters: dict[str, Any], since: int | None, until: int | None
) -> list[str]:
    page = reader.index.query(limit=1000, filters=filters, since=since, until=until)
    assert page.next_cursor is None
    return [orjson.loads(line)["request_id"] for line in reader.read_lines(page.locations)]


def queries(rng: random.Random) -> list[Query]:
    """Fixed edge cases, then random combinations of filters and time bounds."""
    out: list[Query] = [
        ({}, None, None),
        ({"key": "ka"}, None, None),
        ({"model": "m2", "status": 429}, None, None),
        ({"key": "nobody"}, None, None),
        ({"provider": "p"}, BASE_TS + 10 * HOUR, None),
        ({}, None, BASE_TS + 20 * HOUR),
        ({}, BASE_TS + 25 * HOUR, BASE_TS + 25 * HOUR),  # one grid point: ties
    ]
    for _ in range(25):
        filters: dict[str, Any] = {}
        if rng.random() < 0.5:
            filters["key"] = rng.choice(KEYS)
        if rng.random() < 0.5:
            filters["model"] = rng.choice(MODELS)
        if rng.random() < 0.4:
            filters["status"] = rng.choice(STATUSES)
        since = BASE_TS + rng.randrange(-HOUR, 50 * HOUR) if rng.random() < 0.7 else None
        until = (since or BASE_TS) + rng.randrange(0, 30 * HOUR) if rng.random() < 0.7 else None
        out.append((filters, since, until))
    return out


def answers(reader: AuditReader, cases: list[Query]) -> list[list[str]]:
    return [ids(reader, *case) for case in cases]


def rollup_answers(reader: AuditReader, cases: list[Query]) -> list[dict[Any, list[int]]]:
    return [
        select(reader.index.rollup_sources(), since=since, until=until, filters=filters)
        for filters, since, until in cases
    ]


def check_against_oracle(
    reader: AuditReader, records: list[AuditRecord], cases: list[Query]
) -> None:
    for (filters, since, until), got in zip(cases, answers(reader, cases), strict=True):
        assert got == expected_ids(records, filters, since, until), (filters, since, until)
    for (filters, since, until), cells in zip(cases, rollup_answers(reader, cases), strict=True):
        assert cells == expected_rollups(records, since=since, until=until, filters=filters), (
            filters,
            since,
            until,
        )


def rebuilding_warnings(caplog: pytest.LogCaptureFixture, segment: Path | None = None) -> int:
    return sum(
        1
        for r in caplog.records
        if REBUILDING in r.getMessage()
        and (segment is None or f"{REBUILDING} {segment.name} " in r.getMessage())
    )


def replayed(active: Path) -> AuditReader:
    reader = AuditReader(str(active))
    try:
        reader.replay()
    except BaseException:
        reader.close()
        raise
    return reader


def load_sidecar(segment: Path) -> Segment:
    fd = os.open(segment, os.O_RDONLY)
    try:
        return sidecar.load(str(segment), fd, os.fstat(fd).st_size, 0)[0]
    finally:
        os.close(fd)


# --- 1. round trip --------------------------------------------------------------------------


def test_round_trip_second_reader_loads_every_sidecar(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(11)
    active, segments, contents, current = sealed_layout(tmp_path, rng)
    everything = [r for records in contents for r in records] + current
    cases = queries(rng)
    assert not any(idx(s).exists() for s in segments)

    first = replayed(active)
    try:
        assert first.sidecars == {"loaded": 0, "rebuilt": 3}
        assert rebuilding_warnings(caplog) == 3
        for s in segments:
            assert rebuilding_warnings(caplog, s) == 1
            assert idx(s).is_file()
        first_ids = answers(first, cases)
        first_rollups = rollup_answers(first, cases)
        check_against_oracle(first, everything, cases)
    finally:
        first.close()

    caplog.clear()
    second = replayed(active)
    try:
        assert second.sidecars == {"loaded": 3, "rebuilt": 0}
        assert rebuilding_warnings(caplog) == 0
        assert answers(second, cases) == first_ids
        assert rollup_answers(second, cases) == first_rollups
        check_against_oracle(second, everything, cases)
        assert second.index.memory()["mapped_bytes"] > 0  # the sealed runs are mapped
    finally:
        second.close()


# --- 2. damaged sidecars --------------------------------------------------------------------


def flip_column_byte(target: Path, other: Path) -> None:
    """Flip one bit in the middle of the timestamp column (the first column, after the
    header and its padding), moving that entry's timestamp by 2**24 ms."""
    data = bytearray(target.read_bytes())
    header = sidecar._HEADER
    count = header.unpack_from(data, 0)[3]  # magic, version, flags, then the entry count
    assert count == 20
    first = header.size + -header.size % sidecar.ALIGN
    assert data[first : first + 8] != b"\x00" * 8  # an entry's timestamp, not padding
    data[first + (count // 2) * 8 + 3] ^= 0x01
    target.write_bytes(bytes(data))


def truncate_to_half(target: Path, other: Path) -> None:
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def next_version(target: Path, other: Path) -> None:
    data = bytearray(target.read_bytes())
    assert data[:8] == sidecar.MAGIC
    assert struct.unpack_from("<I", data, 8) == (sidecar.VERSION,)
    struct.pack_into("<I", data, 8, sidecar.VERSION + 1)
    target.write_bytes(bytes(data))


def copy_of_another_segments(target: Path, other: Path) -> None:
    shutil.copyfile(other, target)


def emptied(target: Path, other: Path) -> None:
    target.write_bytes(b"")


@pytest.mark.parametrize(
    "damage",
    [flip_column_byte, truncate_to_half, next_version, copy_of_another_segments, emptied],
    ids=lambda damage: damage.__name__,
)
def test_damaged_sidecar_is_rebuilt_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path, Path], None]
) -> None:
    rng = random.Random(22)
    active, segments, contents, current = sealed_layout(tmp_path, rng)
    everything = [r for records in contents for r in records] + current
    cases = queries(rng)
    victim, donor = segments[1], segments[2]
    # The donor's sidecar is of a segment of the same size with other records.
    assert victim.stat().st_size == donor.stat().st_size
    assert victim.read_bytes() != donor.read_bytes()

    replayed(active).close()  # writes the three sidecars
    before = idx(victim).read_bytes()
    damage(idx(victim), idx(donor))
    assert idx(victim).read_bytes() != before
    with pytest.raises(sidecar.SidecarError):
        load_sidecar(victim)

    caplog.clear()
    reader = replayed(active)
    try:
        assert rebuilding_warnings(caplog) == 1
        assert rebuilding_warnings(caplog, victim) == 1
        assert reader.sidecars == {"loaded": 2, "rebuilt": 1}
        check_against_oracle(reader, everything, cases)
    finally:
        reader.close()

    assert idx(victim).read_bytes() == before  # rewritten exactly as it was
    load_sidecar(victim)
    caplog.clear()
    again = replayed(active)
    try:
        assert again.sidecars == {"loaded": 3, "rebuilt": 0}
        assert rebuilding_warnings(caplog) == 0
        check_against_oracle(again, everything, cases)
    finally:
        again.close()


# --- 3. rotation while following -------------------------------------------------------------


def test_rotation_while_following_seals_the_old_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(33)
    active = tmp_path / "audit.jsonl"
    old = fixed_records(rng, 100, 30)
    write_records(active, old[:25])
    cases = queries(rng)
    reader = replayed(active)
    try:
        assert reader.sidecars == {"loaded": 0, "rebuilt": 0}
        check_against_oracle(reader, old[:25], cases)
        write_records(active, old[25:], mode="ab")  # appended just before the rotation
        rotated = segment_name(active, 0)
        os.rename(active, rotated)
        new = fixed_records(rng, 200, 12)
        write_records(active, new)
        assert not idx(rotated).exists()

        reader.catch_up()
        check_against_oracle(reader, old + new, cases)  # queryable before it is sealed
        assert not idx(rotated).exists()  # sealing is the follower's, off the event loop
        reader.seal_rotated()
        assert idx(rotated).is_file()
        load_sidecar(rotated)  # valid, and describes the file as it is
        check_against_oracle(reader, old + new, cases)
        assert reader.index.memory()["mapped_bytes"] > 0  # the sealed run is mapped

        more = fixed_records(rng, 300, 5)  # the new active file is followed
        write_records(active, more, mode="ab")
        reader.catch_up()
        check_against_oracle(reader, old + new + more, cases)
    finally:
        reader.close()

    caplog.clear()
    fresh = replayed(active)
    try:
        assert fresh.sidecars == {"loaded": 1, "rebuilt": 0}
        assert rebuilding_warnings(caplog) == 0
        check_against_oracle(fresh, old + new + more, cases)
    finally:
        fresh.close()


# --- 4. retention ---------------------------------------------------------------------------


def test_retention_deletes_segment_and_sidecar_and_the_reader_forgets_it(
    tmp_path: Path,
) -> None:
    rng = random.Random(44)
    active = tmp_path / "audit.jsonl"
    doomed_records = fixed_records(rng, 100, 20)
    doomed = segment_name(active, 0)
    write_records(doomed, doomed_records)
    first_active = fixed_records(rng, 200, 15)
    write_records(active, first_active)
    cases = queries(rng)

    reader = replayed(active)
    try:
        assert reader.sidecars == {"loaded": 0, "rebuilt": 1}
        assert idx(doomed).is_file()
        # Rotate while following: the second segment is sealed by catch_up.
        kept = segment_name(active, 1)
        os.rename(active, kept)
        current = fixed_records(rng, 300, 10)
        write_records(active, current)
        reader.catch_up()
        reader.seal_rotated()
        assert idx(kept).is_file()
        check_against_oracle(reader, doomed_records + first_active + current, cases)

        now = time.time()
        os.utime(doomed, (now - 86400, now - 86400))
        os.utime(kept, (now + 86400, now + 86400))  # young whatever the test's pace
        audit = AuditFile(str(active))
        try:
            deleted = audit.prune(retention_days=0.0000001, max_total_bytes=None)
        finally:
            audit.close()
        assert deleted == [str(doomed)]
        assert not doomed.exists()
        assert not idx(doomed).exists()
        assert kept.exists() and idx(kept).exists()

        reader.catch_up()
        remaining = first_active + current
        check_against_oracle(reader, remaining, cases)
        total = sum(cell[0] for cell in select(reader.index.rollup_sources()).values())
        assert total == len(remaining)
        gone = {r.request_id for r in doomed_records}
        assert not gone & set(ids(reader, {}, None, None))
    finally:
        reader.close()

    fresh = replayed(active)
    try:
        assert fresh.sidecars == {"loaded": 1, "rebuilt": 0}
        check_against_oracle(fresh, remaining, cases)
    finally:
        fresh.close()


# --- 5. rollups against a naive computation -------------------------------------------------


def random_record(rng: random.Random, i: int) -> AuditRecord:
    latency = (
        rng.choice([int(b) for b in LATENCY_BOUNDS_MS if b <= 100_000] + [0, 100_000])
        if rng.random() < 0.2
        else rng.randrange(0, 100_001)
    )
    base = record(
        i,
        ts=BASE_TS + rng.randrange(50 * HOUR),
        key=rng.choice(KEYS),
        model=rng.choice(MODELS),
        status=rng.choice(STATUSES),
    )
    return dataclasses.replace(
        base,
        provider=rng.choice(["p", "q"]),
        prompt_tokens=rng.choice([None, rng.randrange(0, 5000)]),
        completion_tokens=rng.choice([None, rng.randrange(0, 5000)]),
        cost_micros=rng.randrange(0, 10**9),
        latency_ms=latency,
    )


def test_rollups_equal_a_naive_computation(tmp_path: Path) -> None:
    rng = random.Random(55)
    active = tmp_path / "audit.jsonl"
    records = [random_record(rng, i) for i in range(1500)]
    write_records(segment_name(active, 0), records[:600])
    write_records(segment_name(active, 1), records[600:1200])
    write_records(active, records[1200:1400])
    appended = records[1400:]

    cases: list[Query] = [
        ({}, None, None),
        ({"provider": "q"}, None, None),
        ({}, BASE_TS + 7 * HOUR, BASE_TS + 9 * HOUR),  # hour-aligned: `until`'s hour counts
        ({}, BASE_TS + 7 * HOUR + 1, BASE_TS + 9 * HOUR - 1),
        ({"key": "nobody"}, None, None),
    ]
    for _ in range(20):
        since = BASE_TS + rng.randrange(-2 * HOUR, 52 * HOUR) if rng.random() < 0.8 else None
        until = (since or BASE_TS) + rng.randrange(0, 30 * HOUR) if rng.random() < 0.8 else None
        filters: dict[str, Any] = {}
        for name, values in (
            ("key", KEYS),
            ("model", MODELS),
            ("provider", ("p", "q")),
            ("status", STATUSES),
        ):
            if rng.random() < 0.35:
                filters[name] = rng.choice(values)
        cases.append((filters, since, until))

    def check(reader: AuditReader, written: list[AuditRecord]) -> None:
        for filters, since, until in cases:
            got = select(reader.index.rollup_sources(), since=since, until=until, filters=filters)
            want = expected_rollups(written, since=since, until=until, filters=filters)
            assert got == want, (filters, since, until)
        assert sum(c[0] for c in select(reader.index.rollup_sources()).values()) == len(written)

    reader = replayed(active)
    try:
        assert reader.sidecars == {"loaded": 0, "rebuilt": 2}
        check(reader, records[:1400])
        write_records(active, appended, mode="ab")
        reader.catch_up()
        check(reader, records)
    finally:
        reader.close()

    fresh = replayed(active)
    try:
        assert fresh.sidecars == {"loaded": 2, "rebuilt": 0}
        check(fresh, records)
    finally:
        fresh.close()
