"""The sorted index: filters, time bounds, newest-first order and gapless pagination."""

from __future__ import annotations

import random

from crabtrio.audit.index import AuditIndex, Entry


def entries(n: int, seed: int = 3) -> list[Entry]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = 1_000 + rng.randrange(0, n // 3 + 1)  # many equal timestamps
        out.append(
            (
                ts,
                f"r{rng.getrandbits(32):08x}",
                i,
                f"k{i % 3}",
                f"m{i % 4}",
                "p",
                200 if i % 5 else 500,
            )
        )
    return out


def expected(all_entries: list[Entry], **f: object) -> list[int]:
    keep = [
        e
        for e in all_entries
        if ("key" not in f or e[3] == f["key"])
        and ("model" not in f or e[4] == f["model"])
        and ("status" not in f or e[6] == f["status"])
        and ("since" not in f or e[0] >= f["since"])  # type: ignore[operator]
        and ("until" not in f or e[0] <= f["until"])  # type: ignore[operator]
    ]
    return [e[2] for e in sorted(keep, reverse=True)]


def paged(index: AuditIndex, limit: int, **query: object) -> list[int]:
    filters = {k: v for k, v in query.items() if k in ("key", "model", "status", "provider")}
    rest = {k: v for k, v in query.items() if k in ("since", "until")}
    got: list[int] = []
    before = None
    for _ in range(10_000):
        page = index.query(filters=filters, before=before, limit=limit, **rest)  # type: ignore[arg-type]
        assert len(page.locations) <= limit
        got += page.locations
        if page.next_cursor is None:
            return got
        assert len(page.locations) == limit
        before = page.next_cursor
    raise AssertionError("pagination did not end")


def test_queries_match_a_full_scan() -> None:
    data = entries(2000)
    index = AuditIndex()
    index.extend(data[:100])
    index.extend(data[100:1400])  # larger than what is there: rebuilt with one sort
    index.extend(data[1400:1500])  # smaller: inserted
    for entry in data[1500:]:
        index.add(entry)
    assert len(index) == 2000
    cases = [
        {},
        {"key": "k1"},
        {"model": "m2", "key": "k0"},
        {"status": 500},
        {"since": 1100, "until": 1300},
        {"key": "k2", "since": 1200},
        {"until": 1000},
    ]
    for case in cases:
        want = expected(data, **case)
        filters = {k: v for k, v in case.items() if k in ("key", "model", "status")}
        bounds = {k: v for k, v in case.items() if k in ("since", "until")}
        page = index.query(filters=filters, limit=1000, **bounds)  # type: ignore[arg-type]
        assert page.locations == want[:1000], case
        for limit in (1, 7, 100):
            assert paged(index, limit, **case) == want, (case, limit)


def test_unknown_filter_value_is_empty() -> None:
    index = AuditIndex()
    index.extend(entries(100))
    page = index.query(filters={"key": "nobody"})
    assert page.locations == [] and page.next_cursor is None


def test_pagination_survives_inserts_of_older_records() -> None:
    """A clock stepping back inserts old timestamps mid-walk: no skip, no repeat of the rest."""
    data = entries(300)
    index = AuditIndex()
    index.extend(data)
    first = index.query(limit=50)
    assert first.next_cursor is not None
    late = [(500, f"late{i}", 10_000 + i, "k0", "m0", "p", 200) for i in range(20)]
    for entry in late:
        index.add(entry)
    rest = []
    before = first.next_cursor
    while before is not None:
        page = index.query(before=before, limit=50)
        rest += page.locations
        before = page.next_cursor
    want = expected(data)
    assert first.locations + [loc for loc in rest if loc < 10_000] == want
    assert sorted(loc for loc in rest if loc >= 10_000) == [e[2] for e in late]
    assert len(set(first.locations + rest)) == len(first.locations + rest)


def test_discard_forgets_entries() -> None:
    data = entries(200)
    index = AuditIndex()
    index.extend(data)
    index.discard(data[:150])
    assert len(index) == 50
    assert sorted(index.query(limit=1000).locations) == [e[2] for e in data[150:]]
    assert sorted(index.query(filters={"key": "k0"}, limit=1000).locations) == sorted(
        e[2] for e in data[150:] if e[3] == "k0"
    )
