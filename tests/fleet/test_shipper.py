"""Shipping the audit log to a real PostgreSQL: exactly once, across rotation and restarts,
the schema guard, retention, fleet queries, and a database that is not there."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from crabtrio.audit import AuditLog, AuditRecord
from crabtrio.config import AuditConfig, PostgresConfig
from crabtrio.errors import Unavailable
from crabtrio.fleet import schema
from crabtrio.fleet.local import LocalFiles

from ..audit.records import record
from ..postgres import PostgresServer

INSTANCE = "gw-a"
TABLE = "crabtrio_audit"
WAIT_SECONDS = 15.0
DAY_MS = 86_400_000


class Sql:
    """psql against the test's database, off the event loop."""

    def __init__(self, server: PostgresServer, dsn: str) -> None:
        self.server = server
        self.name = dsn.rsplit("/", 1)[1]

    async def rows(self, sql: str) -> list[list[str]]:
        out = await trio.to_thread.run_sync(self.server.psql, sql, self.name)
        return [line.split("|") for line in out.splitlines()]

    async def column(self, sql: str) -> list[str]:
        return [row[0] for row in await self.rows(sql)]

    async def run(self, sql: str) -> None:
        await trio.to_thread.run_sync(self.server.psql, sql, self.name)


@pytest.fixture
def sql(postgres: PostgresServer, postgres_dsn: str) -> Sql:
    return Sql(postgres, postgres_dsn)


def config(tmp_path: Path, dsn: str, **postgres: Any) -> AuditConfig:
    return AuditConfig(
        path=str(tmp_path / "audit.jsonl"),
        sync="always",  # a settled record is in the file: the shipper can see it
        postgres=PostgresConfig(dsn=dsn, instance=INSTANCE, **postgres),
    )


async def write(audit: AuditLog, records: list[AuditRecord]) -> None:
    """Queue `records` (one append) and wait until they are in the file."""
    sequences = [audit.record(r) for r in records]
    with trio.fail_after(5):
        await audit.settle(sequences[-1])


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, seconds: float = WAIT_SECONDS
) -> None:
    """Wait until `check()` holds, up to `seconds` of real time."""
    with trio.move_on_after(seconds):
        while not await check():
            await trio.sleep(0.05)
        return
    pytest.fail(f"not {what} within {seconds:g} s")


async def checkpoint(sql: Sql, table: str = TABLE) -> list[list[str]]:
    """This instance's checkpoint row ([] until the shipper has created the table)."""
    if await sql.column(f"select to_regclass('{table}_checkpoints') is null") == ["t"]:
        return []
    return await sql.rows(
        f"select file_id, file_name, file_offset from {table}_checkpoints "
        f"where instance = '{INSTANCE}'"
    )


def last_line_end(path: str) -> list[str]:
    """(file id, name, size) of the newest file holding records: where a shipper that has
    shipped everything stands."""
    last = [s for s in LocalFiles(path).segments() if s.size][-1]
    assert last.file_id is not None
    return [last.file_id, os.path.basename(last.path), str(last.size)]


def state(audit: AuditLog) -> str:
    """The shipper's state; a stopped shipper fails the test at once (it never resumes)."""
    shipping = audit.shipping()
    assert shipping is not None
    if shipping["state"] == "stopped":
        pytest.fail(f"the shipper stopped: {shipping['last_error']}")
    return str(shipping["state"])


async def caught_up(
    audit: AuditLog, sql: Sql, table: str = TABLE, seconds: float = WAIT_SECONDS
) -> None:
    async def check() -> bool:
        state(audit)
        return await checkpoint(sql, table) == [last_line_end(audit.config.path)]

    await eventually(check, "caught up with the audit file", seconds)


async def shipped_ids(sql: Sql, table: str = TABLE) -> list[str]:
    return await sql.column(f"select request_id from {table} order by request_id")


def ids(records: list[AuditRecord]) -> list[str]:
    return sorted(r.request_id for r in records)


async def test_records_are_shipped_once_and_the_checkpoint_advances(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    first, second = [record(i) for i in range(5)], [record(i) for i in range(5, 8)]
    async with AuditLog.open(config(tmp_path, postgres_dsn)) as audit:
        await write(audit, first)
        await caught_up(audit, sql)
        assert await shipped_ids(sql) == ids(first)
        size = os.path.getsize(audit.config.path)
        ((file_id, name, offset),) = await checkpoint(sql)
        assert (file_id, name, int(offset)) == (
            LocalFiles(audit.config.path).segments()[0].file_id,
            "audit.jsonl",
            size,
        )

        await write(audit, second)
        await caught_up(audit, sql)
        ((file_id_after, _, offset_after),) = await checkpoint(sql)
        assert file_id_after == file_id and int(offset_after) > size

        async def reported_caught_up() -> bool:
            shipping = audit.shipping()
            assert shipping is not None
            return shipping["lag_records"] == 0 and shipping["state"] == "ok"

        await eventually(reported_caught_up, "reported as caught up")
        shipping = audit.shipping()
    assert shipping == {
        "state": "ok",
        "instance": INSTANCE,
        "lag_records": 0,
        "lag_seconds": 0.0,
        "last_error": None,
    }
    rows = await sql.rows(f"select request_id, count(*), min(instance) from {TABLE} group by 1")
    assert sorted(rows) == [[i, "1", INSTANCE] for i in ids(first + second)]
    # Each row is the record that was written, field for field.
    fields = "request_id, timestamp, key_name, cost_micros, prompt_tokens, completion_tokens"
    assert await sql.rows(f"select {fields} from {TABLE} where request_id = 'req-000006'") == [
        ["req-000006", str(record(6).timestamp), "k", "6", "3", "4"]
    ]


async def test_the_checkpoint_survives_rotation_and_restarts(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    tiny = replace(config(tmp_path, postgres_dsn), max_file_mb=0.005)  # ~20 records a file
    groups = [[record(i) for i in range(n, n + 25)] for n in (0, 25, 50)]
    async with AuditLog.open(tiny) as audit:
        for group in groups:
            await write(audit, group)  # 25 records in one append: it fills a file
        await caught_up(audit, sql)
    segments = LocalFiles(tiny.path).segments()
    assert len(segments) >= 3
    everything = [r for group in groups for r in group]
    assert await shipped_ids(sql) == ids(everything)
    ((file_id, name, _),) = await checkpoint(sql)
    assert (file_id, name) in {(s.file_id, os.path.basename(s.path)) for s in segments}

    # Rows deleted behind the checkpoint stay deleted: a restart resumes, it does not re-send.
    await sql.run(f"delete from {TABLE} where request_id in ('req-000003', 'req-000040')")
    more = [record(i) for i in range(75, 80)]
    async with AuditLog.open(tiny) as audit:
        await write(audit, more)
        await caught_up(audit, sql)
    expected = [r for r in everything + more if r.request_id not in ("req-000003", "req-000040")]
    assert await shipped_ids(sql) == ids(expected)


@pytest.mark.parametrize(
    "lose",
    [
        f"delete from {TABLE}_checkpoints",
        f"update {TABLE}_checkpoints set file_id = 'no-such-file', file_name = 'gone.jsonl'",
    ],
    ids=["deleted", "unknown-file"],
)
async def test_a_lost_checkpoint_resends_everything_without_duplicates(
    tmp_path: Path, postgres_dsn: str, sql: Sql, lose: str
) -> None:
    tiny = replace(config(tmp_path, postgres_dsn), max_file_mb=0.005)
    first = [record(i) for i in range(60)]
    async with AuditLog.open(tiny) as audit:
        await write(audit, first[:30])
        await write(audit, first[30:])
        await caught_up(audit, sql)
    assert len(LocalFiles(tiny.path).segments()) >= 2
    # Some rows are missing too: re-sending must fill them in and skip the others.
    await sql.run(f"{lose}; delete from {TABLE} where request_id in ('req-000001', 'req-000059')")
    more = [record(i) for i in range(60, 63)]
    async with AuditLog.open(tiny) as audit:
        await write(audit, more)
        await caught_up(audit, sql)
    assert await shipped_ids(sql) == ids(first + more)
    assert await sql.column(f"select count(*) from {TABLE}") == [str(len(first + more))]


async def test_a_schema_from_the_future_stops_shipping_but_not_the_gateway(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    await sql.run(
        f"create table {TABLE}_schema (version integer not null); insert into {TABLE}_schema values (99)"
    )
    async with AuditLog.open(config(tmp_path, postgres_dsn)) as audit:

        async def stopped() -> bool:
            shipping = audit.shipping()
            return shipping is not None and shipping["state"] == "stopped"

        await eventually(stopped, "stopped")
        shipping = audit.shipping()
        assert shipping is not None
        assert "schema version 99" in shipping["last_error"]
        await write(audit, [record(1), record(2)])
        lines, _ = await audit.query()
        assert [orjson.loads(line)["request_id"] for line in lines] == ["req-000002", "req-000001"]
    # Nothing was migrated or written under the newer schema.
    assert await sql.column(f"select to_regclass('{TABLE}') is null") == ["t"]
    assert await sql.column(f"select version from {TABLE}_schema") == ["99"]


async def test_a_custom_table_name_is_used_for_every_table(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    records = [record(i) for i in range(4)]
    async with AuditLog.open(config(tmp_path, postgres_dsn, table="fleet_log")) as audit:
        await write(audit, records)
        await caught_up(audit, sql, table="fleet_log")
        page, cursor = await audit.fleet_query()
    assert await shipped_ids(sql, table="fleet_log") == ids(records)
    assert [r["request_id"] for r in page] == ids(records)[::-1] and cursor is None
    versions = [str(version) for version, _ in schema.migrations()]
    assert await sql.column("select version from fleet_log_schema order by 1") == versions
    assert await sql.column(f"select to_regclass('{TABLE}') is null") == ["t"]


async def test_retention_drops_day_partitions_older_than_retention_days(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    now = time.time_ns() // 1_000_000
    old = [record(i, ts=now - 40 * DAY_MS + i) for i in range(3)]
    recent = [record(i, ts=now - 20 * DAY_MS + i) for i in range(3, 6)]
    current = [record(i, ts=now + i) for i in range(6, 9)]

    def partition(ts: int) -> str:
        return schema.partition_name(TABLE, ts // DAY_MS)

    async def partitions() -> set[str]:
        return set(
            await sql.column(
                "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid "
                f"join pg_class p on p.oid = i.inhparent where p.relname = '{TABLE}'"
            )
        )

    async with AuditLog.open(config(tmp_path, postgres_dsn)) as audit:  # no retention
        await write(audit, old + recent + current)
        await caught_up(audit, sql)
    assert {partition(old[0].timestamp), partition(recent[0].timestamp)} <= await partitions()
    assert await shipped_ids(sql) == ids(old + recent + current)

    async with AuditLog.open(config(tmp_path, postgres_dsn, retention_days=30)) as audit:

        async def dropped() -> bool:
            return partition(old[0].timestamp) not in await partitions()

        await eventually(dropped, "dropped")
        # Records older than retention are not shipped (their partition would go at once).
        late = [record(10, ts=now - 35 * DAY_MS), record(11, ts=now + 11)]
        await write(audit, late)
        await caught_up(audit, sql)
    assert partition(recent[0].timestamp) in await partitions()
    assert partition(late[0].timestamp) not in await partitions()
    assert await shipped_ids(sql) == ids([*recent, *current, late[1]])


async def test_fleet_queries_answer_like_local_ones(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    now = time.time_ns() // 1_000_000
    records = [
        # Three records per millisecond, their ids out of write order: ties sort by id.
        record(
            (i * 7) % 45,
            ts=now + i // 3,
            key=f"k{i % 3}",
            model=f"m{i % 2}",
            status=(200, 200, 404, 500)[i % 4],
        )
        for i in range(45)
    ]
    async with AuditLog.open(config(tmp_path, postgres_dsn)) as audit:
        await write(audit, records)
        await caught_up(audit, sql)
        # Another replica's rows, in the same table.
        await sql.run(
            f"insert into {TABLE} (request_id, timestamp, key_name, model, provider, cost_micros, "
            "latency_ms, status, stream, endpoint, instance) values "
            + ", ".join(
                f"('other-{i}', {now + i}, 'k0', 'm0', 'p', 0, 1, 200, false, 'chat', 'gw-b')"
                for i in range(5)
            )
        )

        async def both(**query: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            lines, local_cursor = await audit.query(**query)
            fleet, fleet_cursor = await audit.fleet_query(instance=INSTANCE, **query)
            assert (fleet_cursor is None) == (local_cursor is None)
            return [{**orjson.loads(line), "instance": INSTANCE} for line in lines], fleet

        ts = sorted(r.timestamp for r in records)
        for query in (
            {"limit": 1000},
            {"filters": {"key": "k1"}},
            {"filters": {"model": "m0", "status": 404}},
            {"filters": {"provider": "p", "key": "k2", "model": "m1"}},
            {"filters": {"key": "nobody"}},
            {"since": ts[10], "until": ts[20]},
            {"since": ts[-1]},
            {"until": ts[0], "filters": {"status": 200}},
        ):
            local, fleet = await both(**query)
            assert fleet == local, query
        # since and until are inclusive.
        bounded, _ = await both(since=ts[10], until=ts[20])
        assert {r["timestamp"] for r in bounded} == {t for t in ts if ts[10] <= t <= ts[20]}
        everything, _ = await both(limit=1000)
        order = [(r["timestamp"], r["request_id"]) for r in everything]
        assert order == sorted(order, reverse=True) and len(order) == 45

        # Pages: each record once, in order, the same pages as the local index's.
        for filters in ({}, {"key": "k0"}):
            pages: list[list[str]] = []
            local_pages: list[list[str]] = []
            cursor = local_cursor = None
            while True:
                page, cursor = await audit.fleet_query(
                    instance=INSTANCE, filters=filters, before=cursor, limit=7
                )
                lines, local_cursor = await audit.query(
                    filters=filters, before=local_cursor, limit=7
                )
                pages.append([r["request_id"] for r in page])
                local_pages.append([orjson.loads(line)["request_id"] for line in lines])
                if cursor is None:
                    break
                assert len(pages) < 20
            assert pages == local_pages
            flat = [i for page in pages for i in page]
            assert (
                len(flat)
                == len(set(flat))
                == len([r for r in records if filters.get("key", r.key_name) == r.key_name])
            )

        # Without an instance: every replica's records; with one, only its.
        all_instances, _ = await audit.fleet_query(limit=1000)
        assert len(all_instances) == 50
        other, _ = await audit.fleet_query(instance="gw-b", filters={"key": "k0"})
        assert [r["request_id"] for r in other] == [f"other-{i}" for i in range(4, -1, -1)]
        assert {r["instance"] for r in other} == {"gw-b"}


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_an_unreachable_database_is_reported_and_fleet_queries_fail_fast(
    tmp_path: Path,
) -> None:
    dsn = f"postgresql://u:s3cret-pw@127.0.0.1:{unused_port()}/db"
    async with AuditLog.open(config(tmp_path, dsn)) as audit:

        async def down() -> bool:
            shipping = audit.shipping()
            return shipping is not None and shipping["state"] == "down"

        await eventually(down, "down")
        shipping = audit.shipping()
        assert shipping is not None and shipping["last_error"]
        assert "s3cret-pw" not in shipping["last_error"] and dsn not in shipping["last_error"]

        with trio.fail_after(5), pytest.raises(Unavailable) as unavailable:
            await audit.fleet_query()
        assert (unavailable.value.status, unavailable.value.code) == (503, "fleet_unavailable")
        assert "s3cret-pw" not in unavailable.value.body_bytes().decode()

        # The gateway's own log is unaffected.
        await write(audit, [record(1)])
        lines, _ = await audit.query()
        assert len(lines) == 1
        shipping = audit.shipping()
        assert shipping is not None and shipping["state"] == "down"


async def test_a_refused_batch_is_retried_until_it_is_accepted(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    async with AuditLog.open(config(tmp_path, postgres_dsn)) as audit:
        await write(audit, [record(1)])
        await caught_up(audit, sql)
        await sql.run(f"alter table {TABLE} rename to {TABLE}_away")
        await write(audit, [record(2), record(3)])

        async def down() -> bool:
            return state(audit) == "down"

        await eventually(down, "down")
        shipping = audit.shipping()
        assert shipping is not None and "does not exist" in shipping["last_error"]
        await sql.run(f"alter table {TABLE}_away rename to {TABLE}")
        await caught_up(audit, sql)
        assert state(audit) == "ok"
    assert await shipped_ids(sql) == ["req-000001", "req-000002", "req-000003"]


async def test_a_checkpoint_moved_by_another_shipper_is_read_again(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    async with AuditLog.open(config(tmp_path, postgres_dsn)) as audit:
        await write(audit, [record(1), record(2)])
        await caught_up(audit, sql)
        # Another shipper with this instance name moved the checkpoint back (to record 1's
        # end), and someone deleted record 2: this one must re-read it and ship from there.
        await sql.run(
            f"update {TABLE}_checkpoints set file_offset = {len(record(1).to_line())}; "
            f"delete from {TABLE} where request_id = 'req-000002'"
        )
        await write(audit, [record(3)])
        await caught_up(audit, sql)
    assert await shipped_ids(sql) == ["req-000001", "req-000002", "req-000003"]


async def test_a_batch_whose_rows_span_days_out_of_order_is_shipped(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    now = time.time_ns() // 1_000_000
    batch = [record(1, ts=now), record(2, ts=now - 10 * DAY_MS), record(3, ts=now + 1)]
    async with AuditLog.open(config(tmp_path, postgres_dsn)) as audit:
        await write(audit, batch)
        await caught_up(audit, sql, seconds=5)
    assert await shipped_ids(sql) == ids(batch)


async def test_database_errors_never_show_the_password(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    # The server's own error text names the database, here spelled like the password.
    dsn = f"postgresql://postgres:s3cret-pw@127.0.0.1:{postgres.port}/s3cret-pw"
    async with AuditLog.open(config(tmp_path, dsn)) as audit:

        async def down() -> bool:
            return state(audit) == "down"

        await eventually(down, "down")
        shipping = audit.shipping()
        assert shipping is not None
        assert "does not exist" in shipping["last_error"]
        assert "s3cret-pw" not in shipping["last_error"]
        with trio.fail_after(5), pytest.raises(Unavailable) as unavailable:
            await audit.fleet_query()
        assert "does not exist" in str(unavailable.value)
        assert "s3cret-pw" not in str(unavailable.value)


async def test_retention_keeps_rotated_files_that_are_not_shipped(tmp_path: Path) -> None:
    unreachable = f"postgresql://u:pw@127.0.0.1:{unused_port()}/db"
    groups = [[record(i) for i in range(n, n + 25)] for n in (0, 25, 50)]

    async def files_and_records(audit_config: AuditConfig) -> tuple[int, int]:
        """(rotated files left, records the local index holds) after writing the groups."""
        async with AuditLog.open(audit_config) as audit:
            for group in groups:
                await write(audit, group)  # fills a file: rotation, then retention
            lines, _ = await audit.query(limit=1000)
        return len(LocalFiles(audit_config.path).segments()) - 1, len(lines)

    # Each group of 25 chained records (~7.5 KB) fills a file; 9 KB keep one rotated file.
    shipping = replace(config(tmp_path, unreachable), max_file_mb=0.005, max_total_mb=0.009)
    assert await files_and_records(shipping) == (3, 75)  # nothing shipped: nothing deleted
    (tmp_path / "plain").mkdir()
    plain = replace(shipping, path=str(tmp_path / "plain" / "audit.jsonl"), postgres=None)
    assert await files_and_records(plain) == (1, 25)  # without shipping, retention deletes


async def test_of_two_workers_one_ships_and_the_other_takes_over(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    shared = config(tmp_path, postgres_dsn)

    async def worker(stop: trio.Event, *, task_status: trio.TaskStatus[AuditLog]) -> None:
        async with AuditLog.open(shared) as audit:
            task_status.started(audit)
            await stop.wait()

    async with trio.open_nursery() as nursery:
        stop_first, stop_second = trio.Event(), trio.Event()
        first: AuditLog = await nursery.start(worker, stop_first)
        await write(first, [record(1)])
        await caught_up(first, sql)  # the first worker holds the lock
        second: AuditLog = await nursery.start(worker, stop_second)
        await write(second, [record(2)])
        await caught_up(first, sql)
        # The standby worker reports the shipping worker's status, and only one connects
        # (a shipper keeps two connections: two batches are in flight with a backlog).
        assert second.shipping() == first.shipping()
        assert await sql.column(
            "select count(*) from pg_stat_activity "
            "where datname = current_database() and application_name = 'crabtrio'"
        ) == ["2"]

        stop_first.set()  # the shipping worker goes away; its lock with it
        await write(second, [record(3)])
        await caught_up(second, sql)
        stop_second.set()
    assert await shipped_ids(sql) == ["req-000001", "req-000002", "req-000003"]


async def test_a_stopped_shipper_reports_what_it_has_not_shipped(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    await sql.run(
        f"create table {TABLE}_schema (version integer not null); "
        f"insert into {TABLE}_schema values (99)"
    )
    (tmp_path / "audit.jsonl").write_bytes(record(1).to_line() + record(2).to_line())
    async with AuditLog.open(config(tmp_path, postgres_dsn)) as audit:

        async def stopped() -> bool:
            shipping = audit.shipping()
            return shipping is not None and shipping["state"] == "stopped"

        await eventually(stopped, "stopped", seconds=5)
        shipping = audit.shipping()
        assert shipping is not None and shipping["lag_records"] == 2


async def test_a_backlog_ships_two_batches_at_a_time_in_order_and_once(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    """A backlog goes two batches at a time on two connections; the checkpoint still
    moves batch by batch, and a record the file holds twice in neighbouring batches (in two
    transactions at once, each would wait for the other) is shipped once, without a stall."""
    records = [record(i) for i in range(40)]
    lines = [r.to_line() for r in records]
    lines.insert(21, lines[20])  # the same record in two neighbouring batches
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(lines))
    async with AuditLog.open(config(tmp_path, postgres_dsn, batch_max=3)) as audit:
        await caught_up(audit, sql, seconds=10)
        assert await shipped_ids(sql) == ids(records)
        assert state(audit) in ("ok", "lagging")
    ((_, _, offset),) = await checkpoint(sql)
    assert int(offset) == path.stat().st_size


async def test_the_fleet_usage_report_sums_what_the_local_one_does(
    tmp_path: Path, postgres_dsn: str, sql: Sql
) -> None:
    """scope=fleet usage over one instance's shipped records: the same groups and sums as
    the local report from the rollups (percentiles differ: exact there, estimated here)."""
    from crabtrio import usage
    from crabtrio.usage import parse_usage_query

    base = 1_790_000_000_000
    records = [
        replace(
            record(i),
            timestamp=base + i * 997_000,
            key_name=f"team-{i % 3}",
            status=(200, 200, 429, 502)[i % 4],
            prompt_tokens=None if i % 5 == 0 else i,
            completion_tokens=2 * i,
            cost_micros=7 * i,
        )
        for i in range(60)
    ]
    async with AuditLog.open(config(tmp_path, postgres_dsn)) as audit:
        await write(audit, records)
        await caught_up(audit, sql)
        for text in ("group_by=key,status&interval=hour", "group_by=status,key", "interval=day"):
            pairs = [tuple(p.split("=")) for p in text.split("&")]
            pairs += [("since", str(base)), ("until", str(base + 60 * 997_000))]
            query = parse_usage_query(pairs, now_ms=base)  # type: ignore[arg-type]
            local = await usage.report(audit, query)
            fleet = await usage.report(audit, replace(query, fleet=True, instance=INSTANCE))
            exact = ("latency_ms_p50", "latency_ms_p95")
            assert [{k: v for k, v in r.items() if k not in exact} for r in fleet] == [
                {k: v for k, v in r.items() if k not in exact} for r in local
            ], text
            assert sum(r["requests"] for r in fleet) == len(records)
