"""The fleet table's schema: versioned SQL in `sql/`, applied at startup, and day partitions.

Every DDL step runs in a transaction under an advisory lock on the table's name, so replicas
starting together migrate once and never race to create the same partition.
"""

from __future__ import annotations

import calendar
import importlib.resources
import re
import time
from collections.abc import Iterable

from ..audit.rollups import DAY_MS
from .database import Connection

# Partitions made ahead of the clock, so a record written just after midnight has one.
DAYS_AHEAD = 2
_MIGRATION = re.compile(r"(\d{3})_\w+\.sql")


class SchemaTooNew(Exception):
    """The database was migrated by a newer crabtrio: this one must not write to it."""


def migrations() -> list[tuple[int, str]]:
    """(version, SQL text) of every migration in the package, in order."""
    found = []
    for entry in importlib.resources.files(__package__).joinpath("sql").iterdir():
        match = _MIGRATION.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text()))
    return sorted(found)


SCHEMA_VERSION = migrations()[-1][0]


async def _lock(conn: Connection, table: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"crabtrio:{table}")


async def migrate(conn: Connection, table: str) -> int:
    """Bring the schema to SCHEMA_VERSION; return the version found. Raises SchemaTooNew."""
    async with conn.transaction():
        await _lock(conn, table)
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table}_schema (version integer NOT NULL)")
        found = await conn.fetchval(f"SELECT max(version) FROM {table}_schema") or 0
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the table {table} has schema version {found}, newer than this crabtrio "
                f"knows ({SCHEMA_VERSION}): upgrade crabtrio on this host; shipping stopped"
            )
        for version, sql in migrations():
            if version > found:
                await conn.execute(sql.replace("{table}", table))
                await conn.execute(f"INSERT INTO {table}_schema (version) VALUES ($1)", version)
    return int(found)


def partition_name(table: str, day: int) -> str:
    return f"{table}_p{time.strftime('%Y%m%d', time.gmtime(day * 86400))}"


async def partitions(conn: Connection, table: str) -> set[int]:
    """The days (since the epoch) that have a partition."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1",
        table,
    )
    days = set()
    prefix = f"{table}_p"
    for row in rows:
        name = row["relname"]
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            stamp = time.strptime(name[len(prefix) :], "%Y%m%d")
            days.add(calendar.timegm(stamp) // 86400)
    return days


async def create_partitions(conn: Connection, table: str, days: Iterable[int]) -> None:
    """Create the day partitions that are missing (each `[day, day + 1)` in ms)."""
    async with conn.transaction():
        await _lock(conn, table)
        for day in sorted(set(days)):
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {partition_name(table, day)} PARTITION OF {table} "
                f"FOR VALUES FROM ({day * DAY_MS}) TO ({(day + 1) * DAY_MS})"
            )


async def drop_partitions(conn: Connection, table: str, days: Iterable[int]) -> None:
    async with conn.transaction():
        await _lock(conn, table)
        for day in sorted(set(days)):
            await conn.execute(f"DROP TABLE IF EXISTS {partition_name(table, day)}")


def today() -> int:
    """Days since the epoch, UTC."""
    return int(time.time()) // 86400
