"""Shared fixtures."""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from crabtrio import routing
from crabtrio.audit import store

from .postgres import PostgresServer, running_postgres


@pytest.fixture
def idle_jump_clock() -> MockClock:
    """Virtual time that jumps ahead once the loop has been idle for 50 ms of real time.

    Unlike `autojump_clock`, it does not jump while a worker thread (the audit writer's
    disk I/O) is running, so timeouts only fire when everything is really waiting.
    """
    return MockClock(autojump_threshold=0.05)


class _HeaviestFirst(random.Random):
    """Routing's weighted pick, made deterministic: always the heaviest provider."""

    def choices(self, population, weights=None, **_):  # type: ignore[override]
        return [
            max(
                zip(
                    weights or [1] * len(population),
                    range(len(population)),
                    population,
                    strict=True,
                )
            )[2]
        ]


@pytest.fixture(autouse=True)
def heaviest_provider_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """App tests see the heaviest provider tried first (test_routing passes its own rng)."""
    monkeypatch.setattr(routing, "random", _HeaviestFirst())


class FullDisk:
    """A switch for the `full_disk` fixture: while `full`, audit appends fail with ENOSPC."""

    def __init__(self) -> None:
        self.full = True
        self.failed = trio.Event()  # set at the first failed append


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> FullDisk:
    disk = FullDisk()
    real_append = store.AuditFile.append

    def append(self: store.AuditFile, data: bytes, **options: Any) -> store.AppendResult:
        if disk.full and data:
            trio.from_thread.run_sync(disk.failed.set)  # appends run in a worker thread
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(self, data, **options)

    monkeypatch.setattr(store.AuditFile, "append", append)
    return disk


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (tests that kill it start their own)."""
    with running_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh database on the session's server, for one test."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[-50:]
    postgres.psql(f"DROP DATABASE IF EXISTS {name}")
    return postgres.create_database(name)
