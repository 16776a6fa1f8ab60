"""Fleet-wide audit queries: `/v1/admin/logs?scope=fleet`, answered from PostgreSQL.

Same filters, order and cursor as the local index (newest first by timestamp, then request
id in byte order), keyset pagination on `(timestamp, request_id)`, which the table's
indexes serve: a page costs the same at any depth.
"""

from __future__ import annotations

from typing import Any

import trio

from ..audit.columns import Cursor
from ..errors import Unavailable
from .database import Database, DatabaseError
from .rows import record

# A fleet query that cannot be answered in this long is a 503 (local queries are unaffected).
QUERY_SECONDS = 5.0
_COLUMNS = {"key": "key_name", "model": "model", "provider": "provider", "status": "status"}
CURSOR_ID_BYTES = 16
UNDEFINED_TABLE = "42P01"


def unavailable(reason: str) -> Unavailable:
    return Unavailable(f"the fleet audit trail is unavailable: {reason}", code="fleet_unavailable")


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
    with trio.move_on_after(QUERY_SECONDS) as scope:
        try:
            async with db.connect() as conn:
                found = await conn.fetch(sql, *args)
        except DatabaseError as exc:
            if exc.sqlstate == UNDEFINED_TABLE:
                raise unavailable(
                    f"the table {table} does not exist yet (no shipper has reached PostgreSQL)"
                ) from None
            raise unavailable(str(exc)) from None
    if scope.cancelled_caught:
        raise unavailable(f"no answer from PostgreSQL within {QUERY_SECONDS:g} s")
    page = [record(row) for row in found[:limit]]
    next_cursor = None
    if len(found) > limit:
        last = found[limit - 1]
        next_cursor = (last["timestamp"], last["request_id"].encode()[:CURSOR_ID_BYTES])
    return page, next_cursor
