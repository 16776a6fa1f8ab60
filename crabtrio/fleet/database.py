"""Database: asyncpg under trio-asyncio, as Trio code sees it.

asyncpg is asyncio-only; `Database.open()` runs an asyncio loop inside Trio
(`trio_asyncio.open_loop`) for as long as its block, and every call goes through
`aio_as_trio` on that loop, so any Trio task of the process may use it. Connections are
handed out one at a time and closed on any error or cancellation (a connection cut in the
middle of a command is never reused). Errors become `DatabaseError`, whose text never holds
the DSN or its password.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg
import trio
import trio_asyncio

from ..upstream.scrub import Scrubber

T = TypeVar("T")
log = logging.getLogger("crabtrio.fleet")

CONNECT_SECONDS = 5.0
# Idle connections kept for queries; more are opened while busy and closed after.
IDLE_MAX = 2


def _ignore_loop_noise(loop: Any, context: dict[str, Any]) -> None:
    log.debug("fleet: asyncio: %s", context.get("message"))


class DatabaseError(Exception):
    """PostgreSQL could not be reached or refused a command; the text is safe to show."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class Connection:
    """One asyncpg connection with Trio-flavoured methods."""

    def __init__(self, db: Database, raw: asyncpg.Connection) -> None:
        self._db = db
        self.raw = raw

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._db.call(self.raw.execute, sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._db.call(self.raw.fetch, sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._db.call(self.raw.fetchrow, sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._db.call(self.raw.fetchval, sql, *args)

    async def copy_records(
        self, table: str, records: Sequence[tuple[Any, ...]], columns: Sequence[str]
    ) -> None:
        await self._db.call(
            self.raw.copy_records_to_table, table, records=records, columns=list(columns)
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN ... COMMIT, or ROLLBACK on an exception. On cancellation the connection is
        closed by its owner (`Database.connect`), which ends the transaction server-side."""
        await self.execute("BEGIN")
        try:
            yield
        except trio.Cancelled:
            raise  # mid-command: the owner closes the connection, ending the transaction
        except BaseException:
            if not self.raw.is_closed():
                with trio.CancelScope(shield=True), trio.move_on_after(CONNECT_SECONDS):
                    await self.execute("ROLLBACK")
            raise
        await self.execute("COMMIT")


class Database:
    def __init__(self, dsn: str, loop: Any) -> None:
        self._dsn = dsn
        self._loop = loop
        self._idle: list[asyncpg.Connection] = []
        try:
            password = urlsplit(dsn).password
        except ValueError:  # the config checks it: never here
            password = None
        self._scrubber = Scrubber([dsn, password, unquote(password) if password else None])

    @classmethod
    @asynccontextmanager
    async def open(cls, dsn: str) -> AsyncIterator[Database]:
        async with trio_asyncio.open_loop() as loop:
            # trio-asyncio's default handler raises what asyncio reports (a future of a
            # connection PostgreSQL cut whose error nobody read) into the loop's nursery,
            # which would end the gateway: the calls that matter raise their own errors.
            loop.set_exception_handler(_ignore_loop_noise)
            db = cls(dsn, loop)
            try:
                yield db
            finally:
                for raw in db._idle:
                    raw.terminate()
                db._idle.clear()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run an asyncpg coroutine function on the loop; its errors as DatabaseError."""
        try:
            result: T = await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args, **kwargs)
            return result
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,  # a connection cut mid-command, in a bad state
            OSError,
            TimeoutError,
            ValueError,  # what asyncpg raises for connection parameters it cannot use
            OverflowError,
        ) as exc:
            raise DatabaseError(
                self.describe(exc), sqlstate=getattr(exc, "sqlstate", None)
            ) from None

    def describe(self, exc: BaseException) -> str:
        """What went wrong, for a log line or /health: never the DSN or its password."""
        if isinstance(exc, asyncpg.PostgresError):
            text = f"{type(exc).__name__} ({exc.sqlstate}): {exc.args[0] if exc.args else ''}"
        elif isinstance(exc, OSError):
            text = f"{type(exc).__name__}: {exc.strerror or 'cannot connect'}"
        elif isinstance(exc, TimeoutError):
            text = "timed out connecting to PostgreSQL"
        else:
            text = f"{type(exc).__name__}: {exc}"
        return self._scrubber.text(text)[:300]

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        """A connection for one job (an idle one when there is one). It goes back to the idle
        list only when the job ended cleanly; otherwise it is closed at once."""
        raw = self._idle.pop() if self._idle else await self._open_raw()
        clean = False
        try:
            yield Connection(self, raw)
            clean = True
        finally:
            if clean and not raw.is_closed() and len(self._idle) < IDLE_MAX:
                self._idle.append(raw)
            else:
                raw.terminate()

    async def _open_raw(self) -> asyncpg.Connection:
        with trio.move_on_after(CONNECT_SECONDS) as scope:
            return await self.call(
                asyncpg.connect,
                self._dsn,
                timeout=CONNECT_SECONDS,
                server_settings={"application_name": "crabtrio"},
            )
        assert scope.cancelled_caught
        raise DatabaseError("timed out connecting to PostgreSQL")
