"""GET /v1/admin/usage and /v1/usage: exact sums against a naive aggregation of the records,
latency percentiles within a histogram bucket, the guards, parameter checks, CSV and order."""

from __future__ import annotations

import csv
import io
import math
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import orjson
import pytest

from crabtrio import usage
from crabtrio.audit import AuditRecord
from crabtrio.audit.rollups import BUCKETS, DAY_MS, HOUR_MS, LATENCY_BOUNDS_MS, latency_bucket
from crabtrio.errors import InvalidRequest
from crabtrio.usage import parse_usage_query, percentile

from .harness import BASE, TEAM_A, gateway

ADMIN = {"authorization": "Bearer admin-secret"}
TEAM_B = {"authorization": "Bearer sk-team-b"}
# Configured keys removed: authentication is off.
NO_KEYS = BASE.split("[[keys]]")[0] + BASE[BASE.index("[aliases]") :]

DAY0 = 1_773_100_800_000  # 2026-03-10T00:00:00Z
SINCE, UNTIL = DAY0, DAY0 + 3 * DAY_MS - 1  # the three days the records span
FIGURES = list(usage.FIGURES)
KEYS = ["team-a", "team-b", "team-c", ""]  # "" as a request refused before its key was known
MODELS = ["gpt-4o", "mock-chat", "text-embedding-3-small", 'odd,"model"']
PROVIDERS = ["primary", "backup", "mock", ""]
STATUSES = [200] * 8 + [400, 401, 404, 429, 499, 500, 502, 503]
# Each bucket's edges and their neighbours, so that the inclusive upper bounds are exercised.
EDGES = [b + d for b in LATENCY_BOUNDS_MS.tolist() for d in (-1, 0, 1)]


def make_records(n: int = 400, seed: int = 20260310) -> list[AuditRecord]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.3:
            latency = rng.choice(EDGES)
        elif kind < 0.9:
            latency = int(rng.lognormvariate(6, 1.8))  # mostly 10 ms .. 60 s
        else:
            latency = rng.randrange(100_000, 900_000)  # into the open last bucket
        records.append(
            AuditRecord(
                request_id=f"req-{i:06d}",
                timestamp=DAY0 + rng.randrange(3 * DAY_MS),
                key_name=rng.choice(KEYS),
                model=rng.choice(MODELS),
                provider=rng.choice(PROVIDERS),
                cost_micros=rng.randrange(0, 50_000),
                latency_ms=latency,
                status=rng.choice(STATUSES),
                stream=rng.random() < 0.5,
                endpoint="chat",
                prompt_tokens=None if rng.random() < 0.2 else rng.randrange(0, 5_000),
                completion_tokens=None if rng.random() < 0.25 else rng.randrange(0, 2_000),
            )
        )
    # Written in the order requests end, as the gateway does: timestamps (their start) are
    # not quite in order in the file.
    records.sort(key=lambda r: (r.timestamp + r.latency_ms, r.request_id))
    return records


def write(tmp_path: Path, records: Sequence[AuditRecord]) -> None:
    (tmp_path / "audit.jsonl").write_bytes(b"".join(r.to_line() for r in records))


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dimension(record: AuditRecord, name: str) -> Any:
    return {
        "key": record.key_name,
        "model": record.model,
        "provider": record.provider,
        "status": record.status,
    }[name]


def naive(
    records: Sequence[AuditRecord],
    *,
    since: int,
    until: int,
    group_by: Sequence[str] = (),
    interval: str | None = None,
    **filters: Any,
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The report computed record by record: every record of the whole hours that overlap
    [since, until], per (bucket, *group_by values); `latencies` kept for the percentiles."""
    first, last = since - since % HOUR_MS, until - until % HOUR_MS
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        if not first <= r.timestamp - r.timestamp % HOUR_MS <= last:
            continue
        if any(dimension(r, name) != value for name, value in filters.items()):
            continue
        group: tuple[Any, ...] = tuple(dimension(r, name) for name in group_by)
        if interval is not None:
            size = HOUR_MS if interval == "hour" else DAY_MS
            group = (iso(r.timestamp - r.timestamp % size), *group)
        sums = out.setdefault(
            group,
            {
                "requests": 0,
                "errors": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cost_micros": 0,
                "latencies": [],
            },
        )
        sums["requests"] += 1
        sums["errors"] += r.status >= 400
        sums["prompt_tokens"] += r.prompt_tokens or 0
        sums["completion_tokens"] += r.completion_tokens or 0
        sums["cost_micros"] += r.cost_micros
        sums["latencies"].append(r.latency_ms)
    return out


def exact_percentile(latencies: list[int], q: float) -> int:
    """Nearest rank: the smallest latency with at least q of them at or below it."""
    ordered = sorted(latencies)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def row_group(row: dict[str, Any], group_by: Sequence[str]) -> tuple[Any, ...]:
    return (*((row["bucket"],) if "bucket" in row else ()), *(row[n] for n in group_by))


async def get(gw, path: str, params=(), headers=ADMIN):
    """(status, headers, body) of a GET; `params` (name, value) pairs, repeats allowed."""
    query = ("?" + urlencode(list(params))) if params else ""
    response = await gw.client.get(path + query, headers=headers)
    return response.status_code, response.headers, await response.get_data()


async def report(gw, params, path: str = "/v1/admin/usage", headers=ADMIN) -> list[dict]:
    status, _, body = await get(gw, path, params, headers)
    assert status == 200, body
    data = orjson.loads(body)
    assert list(data) == ["data"]
    return data["data"]


def check_report(rows: list[dict], expected: dict, group_by: Sequence[str], interval) -> None:
    """`rows` are exactly `expected`'s groups with their exact sums, p50 and p95 within
    one histogram bucket of the exact percentiles, in (bucket, *group_by) order."""
    fields = {*(["bucket"] if interval else []), *group_by, *FIGURES}
    for row in rows:
        assert set(row) == fields, row
    got = {row_group(row, group_by): row for row in rows}
    assert len(got) == len(rows), "a group is reported twice"
    assert set(got) == set(expected)
    for group, sums in expected.items():
        row = got[group]
        for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_micros"):
            assert row[name] == sums[name], (group, name)
        for name, q in (("latency_ms_p50", 0.5), ("latency_ms_p95", 0.95)):
            exact = exact_percentile(sums["latencies"], q)
            estimate = row[name]
            assert type(estimate) is int, (group, name, estimate)
            assert abs(latency_bucket(estimate) - latency_bucket(exact)) <= 1, (
                group,
                name,
                estimate,
                exact,
            )
    assert [row_group(row, group_by) for row in rows] == sorted(
        row_group(row, group_by) for row in rows
    )


def test_the_records_cover_what_the_checks_need() -> None:
    records = make_records()
    assert {r.status for r in records} == set(STATUSES)
    assert any(r.prompt_tokens is None for r in records)
    assert any(r.completion_tokens is None for r in records)
    buckets = {latency_bucket(r.latency_ms) for r in records}
    assert buckets == set(range(BUCKETS))
    days = {(r.timestamp - DAY0) // DAY_MS for r in records}
    assert days == {0, 1, 2}


QUERIES: list[dict[str, Any]] = [
    {},
    {"group_by": "key"},
    {"group_by": "model,provider", "interval": "hour"},
    {"group_by": "status", "interval": "day"},
    {"group_by": "provider,status,model,key", "interval": "hour"},
    {"group_by": "key", "interval": "day", "model": "gpt-4o"},
    {"group_by": "provider", "status": "500"},
    {"interval": "hour", "key": "team-b", "provider": "primary"},
    {"group_by": "model", "key": "", "interval": "day"},
    {"group_by": "key,model", "model": 'odd,"model"'},
    # Ranges that are not whole hours or days: whole hours are counted, days from hours.
    {"group_by": "key", "interval": "day", "since": DAY0 + 5 * HOUR_MS + 123},
    {"group_by": "model", "since": DAY0 + 5 * HOUR_MS + 1, "until": DAY0 + 55 * HOUR_MS + 5},
    {"interval": "day", "since": DAY0 + 22 * HOUR_MS, "until": DAY0 + 26 * HOUR_MS},
    {"interval": "hour", "since": DAY0 + 30 * HOUR_MS + 59_000, "until": DAY0 + 31 * HOUR_MS},
    {"group_by": "status", "since": DAY0 + 31 * HOUR_MS, "until": DAY0 + 31 * HOUR_MS},
    {"group_by": "status,key", "interval": "day", "since": DAY0 + DAY_MS},
]


async def check_queries(gw, records) -> None:
    """Every query of QUERIES against the naive aggregation of `records`."""
    for query in QUERIES:
        params = {"since": SINCE, "until": UNTIL, **query}
        group_by = params["group_by"].split(",") if "group_by" in params else []
        filters = {
            name: int(params[name]) if name == "status" else params[name]
            for name in ("key", "model", "provider", "status")
            if name in params
        }
        expected = naive(
            records,
            since=params["since"],
            until=params["until"],
            group_by=group_by,
            interval=params.get("interval"),
            **filters,
        )
        assert expected, query  # every query here matches some records
        rows = await report(gw, params.items())
        check_report(rows, expected, group_by, params.get("interval"))


async def test_sums_equal_a_naive_aggregation_of_the_records(tmp_path) -> None:
    records = make_records()
    write(tmp_path, records)
    async with gateway(tmp_path) as gw:
        await check_queries(gw, records)

        # Nothing matches: no rows.
        assert await report(gw, {"since": 0, "until": DAY0 - HOUR_MS}.items()) == []
        assert await report(gw, {"since": SINCE, "until": UNTIL, "model": "nope"}.items()) == []
        assert await report(gw, {"since": SINCE, "until": UNTIL, "status": "201"}.items()) == []


async def test_sums_are_exact_across_rotated_files_and_their_sidecars(tmp_path) -> None:
    """Sealed segments sum from their sidecars (daily sums for long ranges) and the active
    file from memory; an hour whose records straddle files is one group, summed."""
    records = make_records(300, seed=11)
    cuts = [0, 70, 150, 240, len(records)]
    stamps = ["20260310T120000.000Z", "20260311T080000.000Z", "20260312T030000.000Z"]
    for stamp, (a, b) in zip(stamps, pairwise(cuts[:-1]), strict=True):
        write_to = tmp_path / f"audit-{stamp}.jsonl"
        write_to.write_bytes(b"".join(r.to_line() for r in records[a:b]))
    (tmp_path / "audit.jsonl").write_bytes(b"".join(r.to_line() for r in records[cuts[-2] :]))
    for run in ("sidecars built", "sidecars loaded"):
        async with gateway(tmp_path) as gw:
            await check_queries(gw, records)
        assert len(list(tmp_path.glob("audit-*.jsonl.idx"))) == len(stamps), run


async def test_the_gateways_own_requests_are_reported_at_once(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        for i in range(9):
            if i % 3:
                body, headers = {"model": "mock-chat", "messages": []}, TEAM_A
            else:
                body, headers = {"model": "nope", "messages": []}, TEAM_B
            await gw.post("/v1/chat/completions", body, headers=headers)
        # No wait: a report reads this process's writes.
        rows = await report(gw, [("group_by", "key,status")])
        chained = ("seq", "chain")  # the writer's, not the request's
        records = [
            AuditRecord(**{k: v for k, v in r.items() if k not in chained}) for r in gw.records()
        ]
        assert len(records) == 9
        now = time.time_ns() // 1_000_000
        expected = naive(records, since=now - DAY_MS, until=now, group_by=["key", "status"])
        check_report(rows, expected, ["key", "status"], None)
        assert {(row["key"], row["status"] >= 400) for row in rows} == {
            ("team-a", False),
            ("team-b", True),
        }
        (own,) = await report(gw, [], "/v1/usage", TEAM_A)
        assert (own["requests"], own["errors"]) == (6, 0)
        (own,) = await report(gw, [], "/v1/usage", TEAM_B)
        assert (own["requests"], own["errors"]) == (3, 3)


async def test_the_default_range_is_the_last_24_hours(tmp_path) -> None:
    now = time.time_ns() // 1_000_000
    ages = [HOUR_MS, 2 * HOUR_MS, 23 * HOUR_MS - 1, 26 * HOUR_MS, 40 * DAY_MS]
    records = [
        AuditRecord(f"r{i}", now - age, "team-a", "gpt-4o", "primary", 7, 12, 200, False, "chat")
        for i, age in enumerate(ages)
    ]
    write(tmp_path, records)
    async with gateway(tmp_path) as gw:
        (row,) = await report(gw, [])
        assert (row["requests"], row["cost_micros"]) == (3, 21)
        (row,) = await report(gw, [], "/v1/usage", TEAM_A)
        assert row["requests"] == 3
        # `until` alone: the 24 hours before it.
        (row,) = await report(gw, [("until", str(now - 25 * HOUR_MS))])
        assert row["requests"] == 1
        # `since` alone: until now.
        (row,) = await report(gw, [("since", str(now - 30 * DAY_MS))])
        assert row["requests"] == 4


async def test_a_virtual_key_sees_its_own_usage_only(tmp_path) -> None:
    records = make_records(200)
    write(tmp_path, records)
    span = [("since", str(SINCE)), ("until", str(UNTIL))]
    async with gateway(tmp_path) as gw:
        for headers, name in ((TEAM_A, "team-a"), (TEAM_B, "team-b")):
            rows = await report(gw, [*span, ("group_by", "key")], "/v1/usage", headers)
            expected = naive(records, since=SINCE, until=UNTIL, group_by=["key"], key=name)
            check_report(rows, expected, ["key"], None)
            assert [row["key"] for row in rows] == [name]
            params = [*span, ("group_by", "model,status"), ("interval", "day")]
            rows = await report(gw, params, "/v1/usage", headers)
            expected = naive(
                records,
                since=SINCE,
                until=UNTIL,
                group_by=["model", "status"],
                interval="day",
                key=name,
            )
            check_report(rows, expected, ["model", "status"], "day")
            # Without grouping: that key's totals, not everyone's.
            (total,) = await report(gw, span, "/v1/usage", headers)
            assert total["requests"] == sum(r.key_name == name for r in records)

        # `key` is refused, even the caller's own.
        for value in ("team-b", "team-a", ""):
            status, _, body = await get(gw, "/v1/usage", [*span, ("key", value)], TEAM_A)
            error = orjson.loads(body)["error"]
            assert status == 400 and error["param"] == "key", body
            assert error["type"] == "invalid_request_error"

        # No key, an unknown one, the admin token: 401.
        for headers in (
            {},
            {"authorization": "Bearer sk-nope"},
            ADMIN,
            {"authorization": "sk-team-a"},
        ):
            status, _, body = await get(gw, "/v1/usage", span, headers)
            assert status == 401, (headers, body)
            assert orjson.loads(body)["error"]["type"] == "authentication_error"
            assert b"sk-team-a" not in body and b"admin-secret" not in body

        # The admin route: the admin token only.
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            TEAM_A,
            {"authorization": "admin-secret"},
        ):
            status, _, body = await get(gw, "/v1/admin/usage", span, headers)
            assert status == 401, (headers, body)
            assert orjson.loads(body)["error"]["type"] == "authentication_error"
            assert b"admin-secret" not in body

        # GET only.
        for path in ("/v1/usage", "/v1/admin/usage"):
            response = await gw.client.post(path, headers=ADMIN if "admin" in path else TEAM_A)
            assert response.status_code == 405


async def test_without_virtual_keys_the_key_report_is_401(tmp_path) -> None:
    write(tmp_path, make_records(20))
    async with gateway(tmp_path, base=NO_KEYS) as gw:
        for headers in ({}, TEAM_A):
            status, _, body = await get(gw, "/v1/usage", (), headers)
            assert status == 401
            assert orjson.loads(body)["error"]["code"] == "no_virtual_keys"
        # The admin report still answers.
        (row,) = await report(gw, [("since", str(SINCE)), ("until", str(UNTIL))])
        assert row["requests"] == 20


BAD = [
    ([("bogus", "1")], "bogus"),
    ([("limit", "10")], "limit"),  # /v1/admin/logs' parameter, not this one's
    ([("interval", "hour"), ("interval", "day")], "interval"),
    ([("group_by", "key"), ("group_by", "model")], "group_by"),
    ([("since", "1"), ("since", "1")], "since"),
    ([("group_by", "team")], "group_by"),
    ([("group_by", "key,key")], "group_by"),
    ([("group_by", "status,model,status")], "group_by"),
    ([("group_by", "key,,model")], "group_by"),
    ([("group_by", "key,")], "group_by"),
    ([("group_by", "Key")], "group_by"),
    ([("group_by", "key, model")], "group_by"),
    ([("group_by", "bucket")], "group_by"),
    ([("interval", "week")], "interval"),
    ([("interval", "HOUR")], "interval"),
    ([("interval", "3600000")], "interval"),
    ([("format", "xml")], "format"),
    ([("format", "CSV")], "format"),
    ([("format", "")], "format"),
    ([("group_by", "")], "group_by"),
    ([("interval", "")], "interval"),
    ([("since", "yesterday")], "since"),
    ([("since", "-1")], "since"),
    ([("since", "1.5")], "since"),
    ([("since", "")], "since"),
    ([("until", "abc")], "until"),
    ([("until", "9" * 40)], "until"),
    ([("since", "2000"), ("until", "1000")], "since"),
    ([("since", "9999999999999")], "since"),  # in 2286: after the default `until`, now
    ([("status", "abc")], "status"),
    ([("status", "99")], "status"),
    ([("model", "m" * 257)], "model"),
    ([("key", "k" * 257)], "key"),
]


@pytest.mark.parametrize(("pairs", "param"), BAD)
def test_bad_parameters_are_rejected_naming_them(pairs, param) -> None:
    with pytest.raises(InvalidRequest) as bad:
        parse_usage_query(pairs, now_ms=DAY0)
    assert bad.value.param == param and param in str(bad.value)


async def test_bad_parameters_are_400_in_openai_error_shape(tmp_path) -> None:
    async with gateway(tmp_path) as gw:
        for path, headers in (("/v1/admin/usage", ADMIN), ("/v1/usage", TEAM_A)):
            for pairs, param in BAD:
                if path == "/v1/usage" and param == "key":
                    continue  # refused there whatever its value (tested above)
                status, response_headers, body = await get(gw, path, pairs, headers)
                assert status == 400, (path, pairs, body)
                assert response_headers["content-type"] == "application/json"
                error = orjson.loads(body)["error"]
                assert set(error) == {"message", "type", "code", "param"}, error
                assert error["type"] == "invalid_request_error"
                assert error["param"] == param and param in error["message"], (pairs, error)


def test_good_parameters_parse() -> None:
    query = parse_usage_query(
        [
            ("since", "5"),
            ("until", "7"),
            ("key", "k"),
            ("model", "m"),
            ("provider", "p"),
            ("status", "404"),
            ("group_by", "status,model"),
            ("interval", "day"),
            ("format", "csv"),
        ],
        now_ms=DAY0,
    )
    assert (query.since, query.until, query.interval, query.format) == (5, 7, DAY_MS, "csv")
    assert query.filters == {"key": "k", "model": "m", "provider": "p", "status": 404}
    assert query.group_by == ("status", "model")
    default = parse_usage_query([], now_ms=DAY0)
    assert (default.since, default.until) == (DAY0 - DAY_MS, DAY0)
    assert (default.group_by, default.interval, default.format) == ((), None, "json")
    own = parse_usage_query([("model", "m")], now_ms=DAY0, own_key="team-a")
    assert own.filters == {"model": "m", "key": "team-a"}
    assert parse_usage_query([("interval", "hour")], now_ms=DAY0).interval == HOUR_MS


def csv_of(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))


@pytest.mark.parametrize(
    ("group_by", "interval"),
    [("provider,key", "hour"), ("status,model", None), ("", "day"), ("", None)],
)
async def test_csv_is_the_json_report_as_a_table(tmp_path, group_by, interval) -> None:
    records = make_records(150)
    write(tmp_path, records)
    params = [("since", str(SINCE)), ("until", str(UNTIL))]
    if group_by:
        params.append(("group_by", group_by))
    if interval:
        params.append(("interval", interval))
    async with gateway(tmp_path) as gw:
        rows = await report(gw, params)
        status, headers, body = await get(gw, "/v1/admin/usage", [*params, ("format", "csv")])
        assert status == 200, body
        assert headers["content-type"].split(";")[0].strip() == "text/csv"
        assert int(headers["content-length"]) == len(body)
        table = csv_of(body)
        columns = [
            *(["bucket"] if interval else []),
            *(group_by.split(",") if group_by else []),
            *FIGURES,
        ]
        assert table[0] == columns
        assert len(table) == len(rows) + 1 and rows
        for line, row in zip(table[1:], rows, strict=True):
            assert line == ["" if row[c] is None else str(row[c]) for c in columns]
        if "model" in group_by:  # a value with a comma and quotes survives the round trip
            assert 'odd,"model"' in [line[columns.index("model")] for line in table[1:]]

        # /v1/usage answers CSV the same way.
        status, headers, body = await get(gw, "/v1/usage", [*params, ("format", "csv")], TEAM_A)
        assert status == 200 and headers["content-type"].startswith("text/csv")
        own = await report(gw, params, "/v1/usage", TEAM_A)
        assert csv_of(body) == [
            columns,
            *(["" if row[c] is None else str(row[c]) for c in columns] for row in own),
        ]


async def test_rows_are_ordered_and_group_by_order_only_reorders_them(tmp_path) -> None:
    records = make_records(300)
    write(tmp_path, records)
    span = [("since", str(SINCE)), ("until", str(UNTIL))]
    async with gateway(tmp_path) as gw:
        for first, second, interval in (
            ("status,key", "key,status", "hour"),
            ("model,provider,key", "key,provider,model", "day"),
            ("provider,status", "status,provider", None),
        ):
            reports = {}
            for group_by in (first, second):
                params = [*span, ("group_by", group_by)]
                if interval:
                    params.append(("interval", interval))
                rows = await report(gw, params)
                names = [*(["bucket"] if interval else []), *group_by.split(",")]
                order = [tuple(row[name] for name in names) for row in rows]
                assert order == sorted(order), group_by
                assert len(set(order)) == len(order)
                by_name = sorted(names)
                reports[group_by] = {tuple(row[n] for n in by_name): row for row in rows}
            assert reports[first] == reports[second]


def histogram(counts: dict[int, int]) -> np.ndarray:
    out = np.zeros(BUCKETS, np.float64)
    for bucket, count in counts.items():
        out[bucket] = count
    return out


LOWER = [0, *LATENCY_BOUNDS_MS.tolist()]
UPPER = [*LATENCY_BOUNDS_MS.tolist(), LATENCY_BOUNDS_MS[-1].item()]


def test_percentile_of_no_requests_is_none() -> None:
    assert percentile(histogram({}), 0.5) is None
    assert percentile(histogram({}), 0.95) is None


@pytest.mark.parametrize("bucket", range(BUCKETS))
def test_percentile_of_one_bucket_is_within_it(bucket) -> None:
    for count in (1, 7, 1000):
        for q in (0.01, 0.5, 0.95, 1.0):
            value = percentile(histogram({bucket: count}), q)
            assert LOWER[bucket] <= value <= UPPER[bucket], (bucket, count, q, value)
    low, high = LOWER[bucket], UPPER[bucket]
    assert percentile(histogram({bucket: 10}), 0.5) == round(low + (high - low) * 0.5)
    assert percentile(histogram({bucket: 10}), 1.0) == high


def test_percentile_interpolates_along_the_cumulative_counts() -> None:
    # 50 requests in [0, 10] ms, 50 in (50, 100] ms.
    h = histogram({0: 50, 3: 50})
    assert percentile(h, 0.5) == 10  # exactly the first 50: the top of their bucket
    assert percentile(h, 0.2) == 4  # 20 of 50 through [0, 10]
    assert percentile(h, 0.95) == 95  # 45 of 50 through (50, 100]
    assert percentile(h, 0.51) == 51
    # 1 request in (100, 250], 3 in (1000, 2500]: p50 is 1 of 3 through the second bucket.
    h = histogram({4: 1, 7: 3})
    assert percentile(h, 0.5) == 1_500
    assert percentile(h, 0.25) == 250
    # Past the last bound: the open bucket reports its lower bound.
    h = histogram({0: 1, BUCKETS - 1: 99})
    assert percentile(h, 0.5) == LATENCY_BOUNDS_MS[-1]
    assert percentile(h, 0.95) == LATENCY_BOUNDS_MS[-1]
    # Empty buckets in between.
    h = histogram({2: 2, 9: 2})
    assert percentile(h, 0.5) == 50 and percentile(h, 0.75) == 7_500


def test_percentile_is_within_a_bucket_of_the_exact_value() -> None:
    rng = random.Random(7)
    for _ in range(200):
        latencies = [
            rng.choice(EDGES) if rng.random() < 0.3 else int(rng.lognormvariate(6, 2.5))
            for _ in range(rng.randrange(1, 60))
        ]
        h = histogram({})
        for latency in latencies:
            h[latency_bucket(latency)] += 1
        for q in (0.5, 0.95):
            exact = exact_percentile(latencies, q)
            estimate = percentile(h, q)
            assert abs(latency_bucket(estimate) - latency_bucket(exact)) <= 1, (
                latencies,
                q,
                estimate,
                exact,
            )
