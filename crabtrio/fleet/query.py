"""Fleet-wide audit queries: `/v1/admin/logs?scope=fleet`, answered from PostgreSQL.

Same filters, order and cursor as the local index (newest first by timestamp, then request
id in byte order), keyset pagination on `(timestamp, request_id)`, which the table's
indexes serve: a page costs the same at any depth.
"""

from __future__ import annotations

from typing import Any

import trio

from ..audit.columns import Cursor
from ..audit.rollups import HOUR_MS, utc_text
from ..errors import Unavailable
from .database import Database, DatabaseError
from .rows import record

# A fleet query that cannot be answered in this long is a 503 (local queries are unaffected).
QUERY_SECONDS = 5.0
_COLUMNS = {"key": "key_name", "model": "model", "provider": "provider", "status": "status"}
CURSOR_ID_BYTES = 16
UNDEFINED_TABLE = "42P01"
_SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_micros")


def unavailable(reason: str) -> Unavailable:
    return Unavailable(f"the fleet audit trail is unavailable: {reason}", code="fleet_unavailable")


async def _fetch(db: Database, table: str, sql: str, args: list[Any]) -> list[Any]:
    """Rows of one read-only query, or a 503 within QUERY_SECONDS."""
    with trio.move_on_after(QUERY_SECONDS) as scope:
        try:
            async with db.connect() as conn:
                return await conn.fetch(sql, *args)
        except DatabaseError as exc:
            if exc.sqlstate == UNDEFINED_TABLE:
                raise unavailable(
                    f"the table {table} does not exist yet (no shipper has reached PostgreSQL)"
                ) from None
            raise unavailable(str(exc)) from None
    assert scope.cancelled_caught
    raise unavailable(f"no answer from PostgreSQL within {QUERY_SECONDS:g} s")


async def usage(
    db: Database,
    table: str,
    *,
    since: int,
    until: int,
    filters: dict[str, Any],
    instance: str | None,
    group_by: tuple[str, ...],
    interval: int | None,
) -> list[dict[str, Any]]:
    """The usage report's rows over every instance: the hours that overlap [since, until],
    as the local report; percentiles computed exactly (`percentile_cont`)."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    start, end = since - since % HOUR_MS, until - until % HOUR_MS + HOUR_MS
    where = [f"timestamp >= {arg(start)}", f"timestamp < {arg(end)}"]
    where += [f"{_COLUMNS[name]} = {arg(value)}" for name, value in filters.items()]
    if instance is not None:
        where.append(f"instance = {arg(instance)}")
    groups = [f"{_COLUMNS[name]} AS {name}" for name in group_by]
    if interval is not None:
        groups.insert(0, f"timestamp - timestamp % {arg(interval)} AS bucket_ms")
    sql = (
        f"SELECT {', '.join([*groups, ''])}"
        "count(*) AS requests, count(*) FILTER (WHERE status >= 400) AS errors, "
        "coalesce(sum(prompt_tokens), 0) AS prompt_tokens, "
        "coalesce(sum(completion_tokens), 0) AS completion_tokens, "
        "coalesce(sum(cost_micros), 0) AS cost_micros, "
        "percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS latency_ms_p50, "
        "percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS latency_ms_p95 "
        f"FROM {table} WHERE {' AND '.join(where)}"
    )
    names = (["bucket_ms"] if interval is not None else []) + list(group_by)
    if names:
        positions = ", ".join(str(i + 1) for i in range(len(names)))
        sql += f" GROUP BY {positions} ORDER BY {positions}"
    out = []
    for row in await _fetch(db, table, sql, args):
        if not row["requests"]:
            continue  # totals over nothing
        item: dict[str, Any] = {}
        if interval is not None:
            item["bucket"] = utc_text(row["bucket_ms"])
        item |= {name: row[name] for name in group_by}
        item |= {name: int(row[name]) for name in _SUMS}
        item |= {name: round(row[name]) for name in ("latency_ms_p50", "latency_ms_p95")}
        out.append(item)
    return out


async def query(
    db: Database,
    table: str,
    *,
    filters: dict[str, Any] | None = None,
    instance: str | None = None,
    since: int | None = None,
    until: int | None = None,
    before: Cursor | None = None,
    limit: int = 100,
) -> tuple[list[dict[str, Any]], Cursor | None]:
    """Matching records of every instance, newest first, and the next page's cursor."""
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    for name, value in (filters or {}).items():
        where.append(f"{_COLUMNS[name]} = {arg(value)}")
    if instance is not None:
        where.append(f"instance = {arg(instance)}")
    if since is not None:
        where.append(f"timestamp >= {arg(since)}")
    if until is not None:
        where.append(f"timestamp <= {arg(until)}")
    if before is not None:
        ts, tie = before
        tie_text = tie.decode("utf-8", "replace")
        # The first half bounds an index scan on (filter column, timestamp DESC).
        ts_arg = arg(ts)
        where.append(f"timestamp <= {ts_arg}")
        where.append(f"(timestamp, request_id) < ({ts_arg}, {arg(tie_text)})")
    sql = f"SELECT * FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY timestamp DESC, request_id DESC LIMIT {arg(limit + 1)}"
    found = await _fetch(db, table, sql, args)
    page = [record(row) for row in found[:limit]]
    next_cursor = None
    if len(found) > limit:
        last = found[limit - 1]
        next_cursor = (last["timestamp"], last["request_id"].encode()[:CURSOR_ID_BYTES])
    return page, next_cursor
