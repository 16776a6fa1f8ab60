"""The columnar index against a naive oracle: filters, time bounds, newest-first order with
ties on the timestamp, gapless cursor pages, several files and out-of-order appends."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from crabtrio.audit.index import BUFFER_ENTRIES, AuditIndex
from crabtrio.audit.record import IndexedFields
from crabtrio.audit.rollups import (
    BUCKETS,
    COMPLETION,
    COST,
    ERRORS,
    HISTOGRAM,
    PROMPT,
    REQUESTS,
    WIDTH,
)
from crabtrio.audit.sums import grouped, select, summed

Row = tuple[int, bytes, int, int, IndexedFields]  # (ts, rid key, offset, source, fields)


def fields(rng: random.Random, ts: int) -> IndexedFields:
    return IndexedFields(
        request_id=f"{rng.getrandbits(128):032x}",
        timestamp=ts,
        key_name=f"k{rng.randrange(3)}",
        model=f"m{rng.randrange(4)}",
        provider=rng.choice(["p", "q"]),
        status=rng.choice([200, 200, 200, 429, 500]),
        latency_ms=rng.randrange(10_000),
        cost_micros=rng.randrange(1000),
        prompt_tokens=rng.choice([None, rng.randrange(500)]),
        completion_tokens=rng.randrange(500),
    )


def fill(index: AuditIndex, n: int, *, sources: int = 1, seed: int = 3) -> list[Row]:
    """`n` entries over `sources` files, timestamps in random order with many ties."""
    rng = random.Random(seed)
    rows: list[Row] = []
    offsets = [0] * sources
    for _ in range(n):
        source = rng.randrange(sources)
        f = fields(rng, 1_000 + rng.randrange(0, n // 4 + 1))
        rows.append((f.timestamp, f.request_id.encode()[:16], offsets[source], source, f))
        offsets[source] += 101
    for start in range(0, n, 500):  # in batches, as the reader adds them
        for source in range(sources):
            batch = [r for r in rows[start : start + 500] if r[3] == source]
            index.segment(source).add(
                [r[4] for r in batch], [r[2] for r in batch], [100] * len(batch)
            )
    return rows


def expected(rows: list[Row], **q: Any) -> list[tuple[int, int]]:
    keep = [
        r
        for r in rows
        if ("key" not in q or r[4].key_name == q["key"])
        and ("model" not in q or r[4].model == q["model"])
        and ("provider" not in q or r[4].provider == q["provider"])
        and ("status" not in q or r[4].status == q["status"])
        and ("since" not in q or r[0] >= q["since"])
        and ("until" not in q or r[0] <= q["until"])
    ]
    keep.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)
    return [(r[3], r[2]) for r in keep]


def paged(index: AuditIndex, limit: int, **q: Any) -> list[tuple[int, int]]:
    filters = {k: v for k, v in q.items() if k in ("key", "model", "status", "provider")}
    bounds = {k: v for k, v in q.items() if k in ("since", "until")}
    got: list[tuple[int, int]] = []
    before = None
    for _ in range(10_000):
        page = index.query(filters=filters, before=before, limit=limit, **bounds)
        assert len(page.locations) <= limit
        got += [(source, offset) for source, offset, length in page.locations]
        assert all(length == 100 for _, _, length in page.locations)
        if page.next_cursor is None:
            return got
        assert len(page.locations) == limit
        before = page.next_cursor
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize("sources", [1, 3])
def test_random_queries_match_a_full_scan(sources: int) -> None:
    index = AuditIndex()
    rows = fill(index, 3 * BUFFER_ENTRIES + 123, sources=sources)  # several runs per file
    assert len(index) == len(rows)
    rng = random.Random(7)
    for _ in range(60):
        q: dict[str, Any] = {}
        for name, values in (
            ("key", ["k0", "k1", "k2"]),
            ("model", ["m0", "m3"]),
            ("provider", ["p", "q"]),
            ("status", [200, 500]),
        ):
            if rng.random() < 0.3:
                q[name] = rng.choice(values)
        if rng.random() < 0.5:
            q["since"] = rng.randrange(1_000, 4_000)
        if rng.random() < 0.5:
            q["until"] = rng.randrange(1_000, 4_000)
        limit = rng.choice([1, 7, 100, 1000])
        assert paged(index, limit, **q) == expected(rows, **q), q


def test_appends_between_pages_do_not_disturb_older_pages() -> None:
    """Newer records added while paging do not shift the pages of older ones."""
    index = AuditIndex()
    rows = fill(index, 2000)
    rng = random.Random(11)
    got: list[tuple[int, int]] = []
    before = None
    offset = 10**9
    while True:
        page = index.query(before=before, limit=50)
        got += [(source, off) for source, off, _ in page.locations]
        if page.next_cursor is None:
            break
        before = page.next_cursor
        for _ in range(5):  # newer than anything: never in the remaining pages
            f = fields(rng, 10**6 + rng.randrange(100))
            index.segment(0).add([f], [offset], [100])
            offset += 101
    assert got == expected(rows)


def test_unknown_values_match_nothing() -> None:
    index = AuditIndex()
    fill(index, 100)
    assert index.query(filters={"key": "nobody"}).locations == []
    assert index.query(filters={"status": 201}).locations == []
    assert index.query(since=10**9).locations == []


def test_a_dropped_file_leaves_no_entries_or_rollups() -> None:
    index = AuditIndex()
    rows = fill(index, 500, sources=2)
    index.drop(1)
    kept = [r for r in rows if r[3] == 0]
    assert paged(index, 100) == expected(kept)
    assert sum(cell[0] for cell in select(index.rollup_sources()).values()) == len(kept)


def test_rollups_match_a_naive_sum() -> None:
    index = AuditIndex()
    rng = random.Random(5)
    rows: list[IndexedFields] = []
    for i in range(5000):
        f = fields(rng, rng.randrange(0, 50 * 3_600_000))
        index.segment(i % 2).add([f], [i * 101], [100])
        rows.append(f)
    for since, until, filters in [
        (None, None, {}),
        (7_200_000 + 5, 20 * 3_600_000, {}),
        (0, 3_600_000 * 49, {"key": "k1", "status": 200}),
        (3_600_000 * 10, None, {"model": "m2", "provider": "q"}),
    ]:
        naive: dict[tuple[Any, ...], list[int]] = {}
        low = None if since is None else since - since % 3_600_000
        for f in rows:
            hour = f.timestamp - f.timestamp % 3_600_000
            if (low is not None and hour < low) or (until is not None and hour > until):
                continue
            values = {"key": f.key_name, "model": f.model, "provider": f.provider}
            values["status"] = f.status  # type: ignore[assignment]
            if any(values[k] != v for k, v in filters.items()):
                continue
            cell = naive.setdefault((hour, f.key_name, f.model, f.provider, f.status), [0] * 4)
            cell[0] += 1
            cell[1] += f.prompt_tokens or 0
            cell[2] += f.completion_tokens or 0
            cell[3] += f.cost_micros
        got = select(index.rollup_sources(), since=since, until=until, filters=filters)
        assert {key: cell[:4] for key, cell in got.items()} == naive
        assert all(sum(cell[4:]) == cell[0] for cell in got.values())


def test_grouped_rollups_match_a_naive_sum() -> None:
    index = AuditIndex()
    rng = random.Random(9)
    rows: list[IndexedFields] = []
    for i in range(0, 6000, 300):  # batches, several files
        batch = [fields(rng, 86_400_000 * 3 + rng.randrange(0, 9 * 86_400_000)) for _ in range(300)]
        index.segment(i % 3).add(batch, list(range(300)), [100] * 300)
        rows += batch
    day, hour = 86_400_000, 3_600_000
    partial = {"since": 4 * day + 5 * hour + 7, "until": 9 * day + 2 * hour + 1}  # mid-hour
    for group_by, interval, filters, bounds in [
        (("key",), day, {}, {}),
        (("key",), day, {}, partial),  # whole days from daily cells, the edges from hourly
        (("model", "status"), hour, {"provider": "q"}, partial),
        ((), None, {"key": "k2"}, {}),
        ((), None, {}, partial),
        (("provider",), None, {}, {"since": 6 * day}),
        (("provider",), None, {}, {"until": 6 * day - 1}),
    ]:
        naive: dict[tuple[Any, ...], list[int]] = {}
        low = bounds.get("since", 0) - bounds.get("since", 0) % hour
        for f in rows:
            if f.timestamp < low or f.timestamp - f.timestamp % hour > bounds.get("until", 2**62):
                continue
            values = {"key": f.key_name, "model": f.model, "provider": f.provider}
            values["status"] = f.status  # type: ignore[assignment]
            if any(values[k] != v for k, v in filters.items()):
                continue
            bucket = None if interval is None else f.timestamp - f.timestamp % interval
            group = (bucket, *(values[name] for name in group_by))
            cell = naive.setdefault(group, [0, 0, 0, 0])
            cell[0] += 1
            cell[1] += f.prompt_tokens or 0
            cell[2] += f.completion_tokens or 0
            cell[3] += f.cost_micros
        got = select(
            index.rollup_sources(), filters=filters, group_by=group_by, interval=interval, **bounds
        )
        assert {group: cell[:4] for group, cell in got.items()} == naive, (group_by, bounds)
        assert all(sum(cell[4:]) == cell[0] for cell in got.values())


def test_a_batch_with_a_non_ascii_request_id_is_indexed_in_order() -> None:
    index = AuditIndex()
    rng = random.Random(1)
    batch = [fields(rng, 1000) for _ in range(3)]
    batch[1].request_id = "é" * 20  # 40 bytes of UTF-8: ordered by its first 16
    batch[0].request_id, batch[2].request_id = "a" * 32, "z" * 32
    index.segment(0).add(batch, [0, 101, 202], [100] * 3)
    locations = index.query().locations
    assert [offset for _, offset, _ in locations] == [101, 202, 0]  # "é" > "z" > "a" in UTF-8


def naive_sums(
    rows: list[IndexedFields],
    group_by: tuple[str, ...],
    interval: int | None,
    filters: dict[str, Any],
    since: int = 0,
    until: int = 2**62,
) -> dict[tuple[Any, ...], list[int]]:
    """Per (interval start or None, *group_by values): requests, prompt and completion
    tokens, cost and errors (status >= 400) of the records of the hours that overlap
    [since, until]."""
    hour = 3_600_000
    out: dict[tuple[Any, ...], list[int]] = {}
    for f in rows:
        if f.timestamp < since - since % hour or f.timestamp - f.timestamp % hour > until:
            continue
        values = {"key": f.key_name, "model": f.model, "provider": f.provider}
        values["status"] = f.status  # type: ignore[assignment]
        if any(values[k] != v for k, v in filters.items()):
            continue
        bucket = None if interval is None else f.timestamp - f.timestamp % interval
        cell = out.setdefault((bucket, *(values[name] for name in group_by)), [0] * 5)
        cell[0] += 1
        cell[1] += f.prompt_tokens or 0
        cell[2] += f.completion_tokens or 0
        cell[3] += f.cost_micros
        cell[4] += f.status >= 400
    return out


def summed_as_dict(index: AuditIndex, **query: Any) -> dict[tuple[Any, ...], list[int]]:
    """`summed`'s columns as naive_sums' dict (and each group's histogram counts it once)."""
    found = summed(index.rollup_sources(), **query)
    starts = [None] * len(found) if found.starts is None else found.starts.tolist()
    groups = zip(starts, *(found.column(name) for name in found.group_by), strict=True)
    values = found.values
    assert (values[HISTOGRAM : HISTOGRAM + BUCKETS].sum(axis=0) == values[REQUESTS]).all()
    picked = values[[REQUESTS, PROMPT, COMPLETION, COST, ERRORS]].T.tolist()
    return dict(zip(groups, picked, strict=True))


def test_summed_errors_and_sums_match_a_naive_sum() -> None:
    """Every way to a group's sums: daily cells summed over some dimensions, hourly cells
    summed in runs or scattered, groups named in any order, several files' strings."""
    index = AuditIndex()
    rng = random.Random(13)
    rows: list[IndexedFields] = []
    for i in range(0, 6000, 300):
        batch = [fields(rng, 86_400_000 * 3 + rng.randrange(0, 9 * 86_400_000)) for _ in range(300)]
        index.segment(i % 3).add(batch, list(range(300)), [100] * 300)
        rows += batch
    day, hour = 86_400_000, 3_600_000
    partial = {"since": 4 * day + 5 * hour + 7, "until": 9 * day + 2 * hour + 1}
    for group_by, interval, filters, bounds in [
        (("key",), day, {}, partial),
        (("status", "key"), day, {}, partial),
        (("key", "model"), day, {"status": 500}, partial),
        (("key",), hour, {}, partial),
        (("model",), hour, {"key": "k1"}, partial),
        (("provider", "status"), None, {}, partial),
        (("key", "model", "provider", "status"), hour, {}, {}),
        (("status", "provider", "model", "key"), day, {}, partial),
        ((), None, {"model": "m3"}, partial),
        ((), day, {}, {}),
    ]:
        query = {"group_by": group_by, "interval": interval, "filters": filters, **bounds}
        expected = naive_sums(rows, group_by, interval, filters, **bounds)
        assert summed_as_dict(index, **query) == expected, query
    assert summed_as_dict(index, filters={"key": "nobody"}) == {}


def test_cached_groupings_follow_the_records_added_later() -> None:
    index = AuditIndex()
    rng = random.Random(17)
    day = 86_400_000
    rows = [fields(rng, rng.randrange(0, 6 * day)) for _ in range(3000)]
    index.segment(0).add(rows, list(range(len(rows))), [100] * len(rows))
    queries: list[tuple[tuple[str, ...], int | None, dict[str, Any]]] = [
        (("key",), day, {}),
        (("key", "status"), day, {}),
        ((), None, {"key": "k2"}),
        (("model",), day, {}),
        (("provider",), None, {}),
        (("status",), day, {}),  # more groupings than are kept
    ]
    for _ in range(2):  # the second time from what the first one kept
        for group_by, interval, filters in queries:
            got = summed_as_dict(index, group_by=group_by, interval=interval, filters=filters)
            assert got == naive_sums(rows, group_by, interval, filters), group_by
        more = [fields(rng, rng.randrange(0, 6 * day)) for _ in range(500)]
        index.segment(0).add(more, list(range(len(more))), [100] * len(more))
        rows += more


@pytest.mark.parametrize(
    "columns",
    [
        [np.repeat(np.arange(50), 40), np.tile(np.arange(40), 50)],  # in order: runs
        [np.arange(2000) % 7, np.arange(2000) % 11 * 100 + 200],  # few groups, sparse values
        [np.arange(2000) * 997 % 1500, np.arange(2000) % 3],  # many groups
        [np.arange(2000) % 5 * 10**12, np.arange(2000) % 2],  # values too wide to count
        [np.random.default_rng(1).permutation(6000) * 3 for _ in range(5)],  # > 2**62 groups
        [],
    ],
)
def test_grouped_sums_each_distinct_row(columns: list[np.ndarray]) -> None:
    n = len(columns[0]) if columns else 100
    rng = np.random.default_rng(5)
    values = rng.integers(1, 1000, (WIDTH, n)).astype(np.float64)
    extra = rng.integers(0, 3, (1, n)).astype(np.float64)
    naive: dict[tuple[int, ...], np.ndarray] = {}
    for i in range(n):
        group = tuple(int(column[i]) for column in columns)
        naive[group] = naive.get(group, 0) + np.concatenate([values[:, i], extra[:, i]])
    found, sums = grouped(columns, values, extra)
    assert sums.shape == (WIDTH + 1, len(naive))
    got = {tuple(int(c[j]) for c in found): sums[:, j] for j in range(sums.shape[1])}
    assert got.keys() == naive.keys()
    assert all((got[group] == naive[group]).all() for group in naive)
    empty, none = grouped([column[:0] for column in columns], values[:, :0], extra[:, :0])
    assert none.shape == (WIDTH + 1, 0) and all(len(column) == 0 for column in empty)
