"""Rollup cells as records arrive: hourly levels merged as a binary counter and daily cells
(and the groupings kept of them) that follow each batch, against a naive sum of the records,
in any order and across days, alone or over a checkpoint's cells as a read-only base."""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import numpy as np
import pytest

from crabtrio.audit.index import Segment
from crabtrio.audit.record import IndexedFields
from crabtrio.audit.rollups import (
    BUCKETS,
    DIMENSIONS,
    WIDTH,
    Rollups,
    by_day,
    latency_bucket,
    merged,
)
from crabtrio.audit.sums import summed

HOUR, DAY = 3_600_000, 86_400_000
DAY0 = 400 * DAY
# (group_by, interval, filters): the daily cells themselves, groupings of them (kept and
# followed), hourly cells only.
QUERIES: list[tuple[tuple[str, ...], int | None, dict[str, Any]]] = [
    (("key",), DAY, {}),
    (("status", "model"), DAY, {}),
    (DIMENSIONS, DAY, {}),
    (("provider",), HOUR, {"key": "k1"}),
    ((), None, {"status": 500}),
]
BOUNDS: list[dict[str, int]] = [{}, {"since": DAY0 + 5 * HOUR + 7, "until": DAY0 + 3 * DAY}]


def fields(rng: random.Random, ts: int) -> IndexedFields:
    return IndexedFields(
        request_id=f"{rng.getrandbits(128):032x}",
        timestamp=ts,
        key_name=f"k{rng.randrange(4)}",
        model=f"m{rng.randrange(3)}",
        provider=rng.choice(["p", "q"]),
        status=rng.choice([200, 200, 200, 429, 500]),
        latency_ms=rng.choice([5, 10, 11, 400, 70_000, 10**6]),
        cost_micros=rng.randrange(1000),
        prompt_tokens=rng.choice([None, rng.randrange(500)]),
        completion_tokens=rng.randrange(500),
    )


def traffic(rng: random.Random, batches: int, clock: int) -> Iterator[list[IndexedFields]]:
    """Batches as a follower indexes them: mostly the last hour's records, some late ones
    (earlier hours and days), a few early (another worker's clock); hours and days pass."""
    for _ in range(batches):
        clock += rng.randrange(3 * HOUR)
        batch = []
        for _ in range(rng.choice([1, 3, 20, 120])):
            late = rng.random()
            if late < 0.8:
                ts = clock - rng.randrange(HOUR)
            elif late < 0.93:
                ts = clock - rng.randrange(3 * DAY)
            else:
                ts = clock + rng.randrange(2 * HOUR)
            batch.append(fields(rng, ts))
        yield batch


def add(segment: Segment, batch: list[IndexedFields]) -> None:
    segment.add(batch, list(range(len(batch))), [100] * len(batch))


def naive(
    rows: list[IndexedFields],
    group_by: tuple[str, ...],
    interval: int | None,
    filters: dict[str, Any],
    since: int = 0,
    until: int = 2**62,
) -> dict[tuple[Any, ...], list[int]]:
    """Per (interval start or None, *group_by values) of the records of the hours that
    overlap [since, until]: requests, tokens, cost, the latency histogram, errors."""
    out: dict[tuple[Any, ...], list[int]] = {}
    for f in rows:
        if f.timestamp < since - since % HOUR or f.timestamp - f.timestamp % HOUR > until:
            continue
        values: dict[str, Any] = {"key": f.key_name, "model": f.model, "provider": f.provider}
        values["status"] = f.status
        if any(values[name] != value for name, value in filters.items()):
            continue
        bucket = None if interval is None else f.timestamp - f.timestamp % interval
        cell = out.setdefault((bucket, *(values[name] for name in group_by)), [0] * (WIDTH + 1))
        cell[0] += 1
        cell[1] += f.prompt_tokens or 0
        cell[2] += f.completion_tokens or 0
        cell[3] += f.cost_micros
        cell[4 + latency_bucket(f.latency_ms)] += 1
        cell[WIDTH] += f.status >= 400
    return out


def answered(sources: list[Rollups], **query: Any) -> dict[tuple[Any, ...], list[int]]:
    found = summed(sources, **query)
    starts = [None] * len(found) if found.starts is None else found.starts.tolist()
    groups = zip(starts, *(found.column(name) for name in found.group_by), strict=True)
    return dict(zip(groups, found.values.T.tolist(), strict=True))


def check_levels(rollups: Rollups) -> None:
    """Each level sorted with one cell per key; each more than twice the next one's size."""
    levels = rollups.levels()
    for keys, values in levels:
        assert values.shape == (WIDTH, len(keys))
        order = np.lexsort(keys.T[::-1])
        assert (order == np.arange(len(keys))).all()
        assert (np.diff(keys, axis=0) != 0).any(axis=1).all()
    sizes = [len(keys) for keys, _ in levels]
    assert all(older > 2 * newer for older, newer in pairwise(sizes)), sizes


def readonly_base(segment: Segment) -> Rollups:
    """The segment's cells as a checkpoint's sidecar holds them: one part, read-only."""
    keys, values = merged(segment.rollups.parts())
    day_keys, day_values = by_day(keys, values)
    arrays = [np.array(a) for a in (keys, values, day_keys, day_values)]
    for array in arrays:
        array.setflags(write=False)
    return Rollups(segment.strings, arrays[0], arrays[1], (arrays[2], arrays[3]))


@pytest.mark.parametrize("resumed", [False, True])
def test_sums_follow_every_batch_in_any_order_and_across_days(resumed: bool) -> None:
    rng = random.Random(21 + resumed)
    segment = Segment(0)
    # A replay first: batches without a query between them, made levels as they add up.
    rows = [fields(rng, DAY0 + rng.randrange(4 * DAY)) for _ in range(6000)]
    for start in range(0, len(rows), 500):
        add(segment, rows[start : start + 500])
    assert len(segment.rollups.levels()) > 1
    if resumed:  # those as a checkpoint's cells; the records after them of the same days
        segment = Segment(0, segment.strings, rollups=readonly_base(segment).writable())
    for step, batch in enumerate(traffic(rng, 36, DAY0 + 2 * DAY)):
        add(segment, batch)
        rows += batch
        # Per key per day each time (a grouping kept, followed), the others in turn.
        for group_by, interval, filters in (QUERIES[0], QUERIES[1 + step % 4]):
            bounds = BOUNDS[step % 2]
            query = {"group_by": group_by, "interval": interval, "filters": filters, **bounds}
            assert answered([segment.rollups], **query) == naive(
                rows, group_by, interval, filters, **bounds
            ), (step, query)
        check_levels(segment.rollups)
    histogram = answered([segment.rollups], group_by=(), interval=None)[(None,)][4 : 4 + BUCKETS]
    assert sum(histogram) == len(rows)


def test_a_small_batch_leaves_the_large_levels_as_they_are() -> None:
    rng = random.Random(5)
    segment = Segment(0)
    for hour in range(200):
        add(segment, [fields(rng, DAY0 + hour * HOUR + rng.randrange(HOUR)) for _ in range(100)])
    summed([segment.rollups], group_by=("key",), interval=DAY)
    levels = segment.rollups.levels()
    assert len(levels) >= 2
    for _ in range(20):  # a query after each batch: each a level of its own at first
        add(segment, [fields(rng, DAY0 + 200 * HOUR + rng.randrange(HOUR)) for _ in range(5)])
        summed([segment.rollups], group_by=("key",), interval=DAY)
        assert segment.rollups.levels()[0] is levels[0]
    check_levels(segment.rollups)


def test_a_batch_of_today_rewrites_only_todays_daily_cells() -> None:
    rng = random.Random(8)
    segment = Segment(0)
    rows = [fields(rng, DAY0 + rng.randrange(10 * DAY)) for _ in range(3000)]
    add(segment, rows)
    rollups = segment.rollups
    today = DAY0 + 10 * DAY
    seen = []
    for _ in range(3):
        batch = [fields(rng, today + rng.randrange(HOUR)) for _ in range(10)]
        add(segment, batch)
        rows += batch
        seen.append([rollups.days_over(dims) for dims in (DIMENSIONS, ("key",))])
    for (keys, values), (later_keys, later_values) in zip(seen[1], seen[2], strict=True):
        earlier = int(np.searchsorted(keys[:, 0], today))
        assert np.shares_memory(keys[:earlier], later_keys)
        assert np.shares_memory(values[:, :earlier], later_values)
    assert answered([rollups], group_by=("key",), interval=DAY) == naive(rows, ("key",), DAY, {})


def test_a_summed_answer_stays_as_it_was_when_records_arrive() -> None:
    rng = random.Random(3)
    segment = Segment(0)
    add(segment, [fields(rng, DAY0 + rng.randrange(4 * DAY)) for _ in range(2000)])
    for _ in range(2):  # the daily cells followed once: rewritten in place from now on
        found = summed([segment.rollups], group_by=DIMENSIONS, interval=DAY)
        add(segment, [fields(rng, DAY0 + 3 * DAY + rng.randrange(HOUR)) for _ in range(5)])
    found = summed([segment.rollups], group_by=DIMENSIONS, interval=DAY)
    groups = [column.copy() for column in found.groups]
    for _ in range(3):  # into the first day: every later daily cell moves
        add(segment, [fields(rng, DAY0 + rng.randrange(HOUR)) for _ in range(50)])
        summed([segment.rollups], group_by=DIMENSIONS, interval=DAY)
    assert all((a == b).all() for a, b in zip(found.groups, groups, strict=True))


def test_cells_it_was_given_are_never_written() -> None:
    """A sidecar's cells are mapped read-only: records counted over them go elsewhere."""
    rng = random.Random(4)
    segment = Segment(0)
    rows = [fields(rng, DAY0 + rng.randrange(2 * DAY)) for _ in range(1000)]
    add(segment, rows)
    given = readonly_base(segment)
    segment = Segment(0, segment.strings, rollups=given)
    for _ in range(3):  # the same hours and days: cells that exist already
        batch = [fields(rng, DAY0 + rng.randrange(2 * DAY)) for _ in range(30)]
        add(segment, batch)
        rows += batch
        for group_by, interval, filters in QUERIES:
            assert answered([given], group_by=group_by, interval=interval, filters=filters) == (
                naive(rows, group_by, interval, filters)
            )
