"""Shipping the audit log to PostgreSQL as operators run it: real hypercorn gateways, a real
PostgreSQL server, kills of either, and fleet queries over what arrived."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from ..postgres import PostgresServer, running_postgres
from .conftest import gateway_config
from .faults import audit_lines, parsed, worker_pids
from .processes import Gateway, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

ADMIN = {"authorization": "Bearer adm-e2e-token"}
KEY = "sk-team-e2e"
OTHER_KEY = "sk-team-two"
SECOND_KEY = '[[keys]]\nname = "team-two"\nkey = "sk-team-two"\n'
PASSWORD = "pw-secret-123"
TABLE = "crabtrio_audit"


# --- gateways --------------------------------------------------------------------------


@pytest.fixture
def pg_root() -> Iterator[Path]:
    """A directory for a test's own PostgreSQL server, outside pytest's temporary root.

    postgres runs as an unprivileged user when we are root, and tests/postgres.py makes
    the server's parents traversable for it; but every pytest run that starts meanwhile
    (other work on this machine) resets `/tmp/pytest-of-<user>` to 0700, after which a
    server under it cannot be restarted ("could not access directory ...: Permission denied").
    """
    root = Path(tempfile.mkdtemp(prefix="crabtrio-fleet-e2e-pg-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fleet_config(
    upstream_url: str,
    audit: Path,
    dsn: str,
    instance: str,
    *,
    audit_extra: str = "",
    postgres_extra: str = "",
) -> str:
    audit.parent.mkdir(parents=True, exist_ok=True)
    postgres = f'[audit.postgres]\ndsn = "{dsn}"\ninstance = "{instance}"\n{postgres_extra}'
    return gateway_config(
        upstream_url, audit, extra=SECOND_KEY, audit_extra=f"{audit_extra}\n{postgres}"
    )


def unreachable_port() -> int:
    """A port on 127.0.0.1 with nothing listening (until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def password_dsn(server: PostgresServer, dbname: str = "postgres") -> str:
    """A DSN with a password (trust auth ignores it; the gateway must never show it)."""
    server.psql(f"CREATE ROLE shipper LOGIN PASSWORD '{PASSWORD}' SUPERUSER")
    return f"postgresql://shipper:{PASSWORD}@127.0.0.1:{server.port}/{dbname}"


def health(gateway: Gateway) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{gateway.url}/health", timeout=5).json()
    return body


def shipping(gateway: Gateway) -> dict[str, Any]:
    block: dict[str, Any] = health(gateway)["shipping"]
    return block


# --- requests --------------------------------------------------------------------------


def chat(http: httpx.Client, url: str, *, key: str = KEY, **body: Any) -> httpx.Response:
    payload = {"model": "gpt-e2e", "messages": [{"role": "user", "content": "hi"}], **body}
    return http.post(
        f"{url}/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {key}"}
    )


def send(
    urls: list[str], count: int, *, status: int = 200, threads: int = 6, **options: Any
) -> list[str]:
    """`count` requests spread over `urls` from `threads` threads; each answered `status`.
    Returns the request ids."""

    def run(share: list[str]) -> list[str]:
        ids = []
        with httpx.Client(timeout=20) as http:
            for url in share:
                response = chat(http, url, **options)
                assert response.status_code == status, response.text
                if options.get("stream"):
                    assert response.text.endswith("data: [DONE]\n\n")
                ids.append(response.headers["x-request-id"])
        return ids

    targets = [urls[i % len(urls)] for i in range(count)]
    shares = [targets[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return [rid for ids in pool.map(run, shares) for rid in ids]


class Traffic:
    """Threads sending chat requests to `urls` until stopped (bounded in count); every
    answer that is not a 200 and every transport error is kept as a failure."""

    def __init__(self, urls: list[str], threads: int = 4, per_thread: int = 2000) -> None:
        self.urls = urls
        self.acknowledged: list[str] = []
        self.failures: list[str] = []
        self._per_thread = per_thread
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=20) as http:
            for n in range(self._per_thread):
                if self._stop.is_set():
                    return
                url = self.urls[(index + n) % len(self.urls)]
                try:
                    response = chat(http, url)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(f"{url}: {exc!r}")
                    continue
                with self._lock:
                    if response.status_code == 200:
                        self.acknowledged.append(response.headers["x-request-id"])
                    else:
                        self.failures.append(f"{url}: {response.status_code} {response.text}")

    def count(self) -> int:
        with self._lock:
            return len(self.acknowledged)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


# --- what is where ---------------------------------------------------------------------


def local_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Every record of `directory/audit*.jsonl` (rotated files too), by request id."""
    records = parsed(audit_lines(directory))
    by_id = {r["request_id"]: r for r in records}
    assert len(by_id) == len(records), "a request id twice in the JSONL"
    return by_id


def wait_recorded(directory: Path, ids: set[str], timeout: float = 5) -> dict[str, dict[str, Any]]:
    """The records of `directory` once all of `ids` are written (a 200 is sent first)."""
    records: dict[str, dict[str, Any]] = {}

    def written() -> bool:
        nonlocal records
        records = local_records(directory)
        return ids <= records.keys()

    wait_until(written, timeout, f"{len(ids)} records in the JSONL")
    return records


def database_of(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def shipped(server: PostgresServer, dbname: str = "postgres") -> Counter[str]:
    """request id -> how many rows PostgreSQL holds for it ({} before the table exists)."""
    exists = server.psql(f"SELECT to_regclass('{TABLE}') IS NOT NULL", dbname=dbname).strip()
    if exists != "t":
        return Counter()
    return Counter(server.psql(f"SELECT request_id FROM {TABLE}", dbname=dbname).split())


def duplicates(server: PostgresServer, dbname: str = "postgres") -> str:
    return server.psql(
        f"SELECT request_id, count(*) FROM {TABLE} GROUP BY request_id HAVING count(*) > 1",
        dbname=dbname,
    )


def wait_shipped(
    server: PostgresServer, expected: set[str], timeout: float, dbname: str = "postgres"
) -> None:
    """Until PostgreSQL holds every id of `expected`; then it must hold nothing else, once."""
    seen: Counter[str] = Counter()

    def arrived() -> bool:
        nonlocal seen
        seen = shipped(server, dbname)
        return expected <= set(seen)

    try:
        wait_until(arrived, timeout, f"{len(expected)} records in PostgreSQL")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {len(expected - set(seen))} missing") from None
    assert set(seen) == expected, f"unexpected rows: {sorted(set(seen) - expected)[:5]}"
    assert max(seen.values()) == 1, f"duplicated rows: {duplicates(server, dbname)}"
    assert duplicates(server, dbname) == ""


def fleet_pages(gateway: Gateway, limit: int, **params: Any) -> list[dict[str, Any]]:
    """Every record of a fleet query, followed page by page through `x-next-cursor`."""
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        query = {"scope": "fleet", "limit": limit, **params}
        if cursor:
            query["before"] = cursor
        response = httpx.get(f"{gateway.url}/v1/admin/logs", params=query, headers=ADMIN)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page) <= limit
        out += page
        cursor = response.headers.get("x-next-cursor")
        if not cursor:
            return out
        assert len(page) == limit, "a short page with a next cursor"
    raise AssertionError("more than 1000 pages")


def first_pages(gateway: Gateway, pages: int, **params: Any) -> list[list[dict[str, Any]]]:
    """Up to `pages` pages of a query (local unless `scope=fleet` is in `params`)."""
    out = []
    for _ in range(pages):
        response = httpx.get(f"{gateway.url}/v1/admin/logs", params=params, headers=ADMIN)
        assert response.status_code == 200, response.text
        out.append(response.json())
        cursor = response.headers.get("x-next-cursor")
        if not cursor:
            break
        params = {**params, "before": cursor}
    return out


def newest_first(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return sorted(((r["timestamp"], r["request_id"]) for r in records), reverse=True)


def without_instance(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "instance"}


# --- tests -----------------------------------------------------------------------------


def test_two_gateways_ship_to_one_database_and_a_fleet_query_pages_through_all(
    tmp_path, upstream, start_gateway, postgres, postgres_dsn
) -> None:
    dbname = database_of(postgres_dsn)
    dirs = {name: tmp_path / name for name in ("host-a", "host-b")}
    a = start_gateway(
        home="gw-a",
        config=fleet_config(upstream.url, dirs["host-a"] / "audit.jsonl", postgres_dsn, "host-a"),
        workers=2,
    )
    b = start_gateway(
        home="gw-b",
        config=fleet_config(upstream.url, dirs["host-b"] / "audit.jsonl", postgres_dsn, "host-b"),
    )
    wait_until(lambda: len(worker_pids(a.proc.pid)) == 2, 20, "two workers of host-a")
    both = [a.url, b.url]
    sent = send(both, 240)
    sent += send(both, 30, stream=True, stream_options={"include_usage": True})
    sent += send(both, 30, key=OTHER_KEY)
    sent += send(both, 8, status=404, model="no-such-model")
    sent += send(both, 8, status=400, mock={"status": 400})  # an upstream error, recorded
    assert len(set(sent)) == 316

    wait_shipped(postgres, set(sent), 30, dbname)
    local = {name: local_records(path) for name, path in dirs.items()}
    assert local["host-a"].keys() | local["host-b"].keys() == set(sent)
    instance_of = {rid: name for name, records in local.items() for rid in records}
    everything = {rid: r for records in local.values() for rid, r in records.items()}

    fleet = fleet_pages(a, 37)
    ids = [r["request_id"] for r in fleet]
    assert len(ids) == len(set(ids)) == len(sent) and set(ids) == set(sent)
    assert [(r["timestamp"], r["request_id"]) for r in fleet] == newest_first(fleet)
    for record in fleet:  # the JSONL record as written, plus where it came from
        assert record["instance"] == instance_of[record["request_id"]]
        assert without_instance(record) == everything[record["request_id"]]

    # The filters, each against what the JSONL files say, asked of either gateway.
    for name, gateway in (("host-a", b), ("host-b", a)):
        only = fleet_pages(gateway, 29, instance=name)
        assert [r["request_id"] for r in only] == [rid for rid in ids if instance_of[rid] == name]
    two = fleet_pages(b, 11, key="team-two")
    assert {r["request_id"] for r in two} == {
        rid for rid, r in everything.items() if r["key_name"] == "team-two"
    }
    assert len(two) == 30
    for status in (404, 400):
        found = fleet_pages(a, 5, status=status)
        assert {r["request_id"] for r in found} == {
            rid for rid, r in everything.items() if r["status"] == status
        }
        assert len(found) == 8
    assert fleet_pages(a, 50, instance="host-a", key="team-two", status=200) == [
        r for r in fleet if r["instance"] == "host-a" and r["key_name"] == "team-two"
    ]
    assert fleet_pages(a, 50, instance="host-c") == []

    # Fleet pages equal the local query's pages of that host, apart from `instance`. Each
    # worker's index follows the file (within 1 s): every worker first has every record.
    def indexed(gateway: Gateway, name: str) -> bool:
        for _ in range(4):  # fresh connections, so that both workers of host-a answer
            response = httpx.get(f"{gateway.url}/v1/admin/logs?limit=1000", headers=ADMIN)
            if {r["request_id"] for r in response.json()} != local[name].keys():
                return False
        return True

    wait_until(lambda: indexed(a, "host-a") and indexed(b, "host-b"), 5, "indexes caught up")
    cases: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
        ({}, lambda r: True),
        ({"key": "team-two"}, lambda r: r["key_name"] == "team-two"),
        ({"status": 404}, lambda r: r["status"] == 404),
        ({"model": "gpt-e2e", "status": 200}, lambda r: r["status"] == 200),
    ]
    for gateway, name in ((b, "host-b"), (a, "host-a")):
        for filters, matches in cases:
            local_pages = first_pages(gateway, 3, limit=7, **filters)
            fleet_side = first_pages(gateway, 3, limit=7, scope="fleet", instance=name, **filters)
            assert [[without_instance(r) for r in page] for page in fleet_side] == local_pages
            assert all(r["instance"] == name for page in fleet_side for r in page)
            expected = newest_first([r for r in local[name].values() if matches(r)])[:21]
            assert [r["request_id"] for page in local_pages for r in page] == [
                rid for _, rid in expected
            ]

    for gateway, name in ((a, "host-a"), (b, "host-b")):
        wait_until(
            lambda g=gateway: shipping(g)["lag_records"] == 0, 5, f"no lag reported by {name}"
        )
        block = shipping(gateway)
        assert block["state"] == "ok" and block["instance"] == name
        assert block["last_error"] is None


def test_postgres_killed_under_load_loses_and_duplicates_nothing(
    tmp_path, upstream, start_gateway, pg_root
) -> None:
    with running_postgres(pg_root) as pg:
        dsn = password_dsn(pg)
        dirs = {name: tmp_path / name for name in ("host-a", "host-b")}
        gateways = [
            start_gateway(
                home=f"gw-{name}",
                config=fleet_config(upstream.url, path / "audit.jsonl", dsn, name),
            )
            for name, path in dirs.items()
        ]
        bodies: list[str] = []
        with Traffic([g.url for g in gateways]) as traffic:
            wait_until(lambda: len(shipped(pg)) >= 100, 20, "100 records shipped")
            pg.kill()
            killed_at, acknowledged_at_kill = time.monotonic(), traffic.count()

            def down(gateway: Gateway) -> bool:
                response = httpx.get(f"{gateway.url}/health", timeout=5)
                bodies.append(response.text)
                return response.json()["shipping"]["state"] == "down"

            try:
                wait_until(lambda: all(down(g) for g in gateways), 10, "shipping down on both")
            except (AssertionError, httpx.HTTPError) as exc:  # say why, with the gateways' logs
                exits = [g.proc.poll() for g in gateways]
                outputs = "\n".join(g.output[-6000:] for g in gateways)
                raise AssertionError(f"{exc!r}; gateway exit codes {exits}:\n{outputs}") from None
            for gateway in gateways:
                block = shipping(gateway)
                assert block["last_error"], block
                assert PASSWORD not in block["last_error"] and dsn not in block["last_error"]
            unavailable = httpx.get(
                f"{gateways[0].url}/v1/admin/logs", params={"scope": "fleet"}, headers=ADMIN
            )
            assert unavailable.status_code == 503
            assert unavailable.json()["error"]["code"] == "fleet_unavailable"
            bodies.append(unavailable.text)
            wait_until(
                lambda: (
                    traffic.count() >= acknowledged_at_kill + 150
                    and time.monotonic() - killed_at >= 2
                ),
                20,
                "2 s and 150 more answers with PostgreSQL down",
            )
            pg.start()
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.count() > acknowledged_at_kill + 150

        local: dict[str, dict[str, dict[str, Any]]] = {}

        def all_written() -> bool:
            local.update({name: local_records(path) for name, path in dirs.items()})
            return set(traffic.acknowledged) <= local["host-a"].keys() | local["host-b"].keys()

        wait_until(all_written, 5, "a record of every answered request")
        written = local["host-a"].keys() | local["host-b"].keys()
        wait_shipped(pg, written, 40)
        for gateway in gateways:
            wait_until(
                lambda g=gateway: shipping(g)["state"] == "ok" and shipping(g)["lag_records"] == 0,
                10,
                "shipping ok again",
            )
            bodies.append(json.dumps(health(gateway)))
        instances = pg.psql(f"SELECT instance, count(*) FROM {TABLE} GROUP BY 1 ORDER BY 1")
        assert instances.split() == [
            f"host-a|{len(local['host-a'])}",
            f"host-b|{len(local['host-b'])}",
        ]
    for gateway in gateways:
        gateway.stop()
        assert "fleet: cannot ship to PostgreSQL" in gateway.output
        assert PASSWORD not in gateway.output
    assert not [body for body in bodies if PASSWORD in body]


def test_gateway_killed_while_shipping_a_backlog_resumes_without_loss_or_duplicates(
    tmp_path, upstream, start_gateway, postgres, postgres_dsn
) -> None:
    dbname = database_of(postgres_dsn)
    audit = tmp_path / "host-c" / "audit.jsonl"
    nowhere = f"postgresql://postgres@127.0.0.1:{unreachable_port()}/{dbname}"
    # A backlog: written while the database cannot be reached.
    offline = start_gateway(
        home="gw-1", config=fleet_config(upstream.url, audit, nowhere, "host-c")
    )
    backlog = 800
    sent = send([offline.url], backlog)
    wait_until(lambda: shipping(offline)["lag_records"] == backlog, 10, "the backlog counted")
    assert shipping(offline)["state"] == "down"
    offline.stop()

    # Shipped one record per transaction, so the kill lands in the middle of it.
    slow = fleet_config(upstream.url, audit, postgres_dsn, "host-c", postgres_extra="batch_max = 1")
    shipping_gateway = start_gateway(home="gw-2", config=slow)
    wait_until(lambda: len(shipped(postgres, dbname)) >= 50, 20, "shipping under way")
    shipping_gateway.signal_group(signal.SIGKILL)
    shipping_gateway.wait(10)
    at_kill = len(shipped(postgres, dbname))
    assert 50 <= at_kill < backlog, f"{at_kill} of {backlog} shipped: not killed mid-backlog"

    restarted = start_gateway(
        home="gw-3", config=fleet_config(upstream.url, audit, postgres_dsn, "host-c")
    )
    after = send([restarted.url], 20)
    records = wait_recorded(audit.parent, set(sent) | set(after))
    assert records.keys() == set(sent) | set(after)
    wait_shipped(postgres, set(records), 30, dbname)
    wait_until(lambda: shipping(restarted)["lag_records"] == 0, 5, "no lag reported")


def test_postgres_down_from_the_start_keeps_serving_and_retention_keeps_unshipped_files(
    tmp_path, upstream, start_gateway, pg_root
) -> None:
    pg = PostgresServer(pg_root)
    pg.port = unreachable_port()  # nothing listens there until the server starts below
    directory = tmp_path / "host-d"
    limits = "max_file_mb = 0.01\nmax_total_mb = 0.02"
    config = fleet_config(
        upstream.url, directory / "audit.jsonl", pg.dsn, "host-d", audit_extra=limits
    )
    try:
        gateway = start_gateway(home="gw", config=config)
        count = 200
        sent = send([gateway.url], count)
        wait_recorded(directory, set(sent))  # every one, none in a file retention deleted
        wait_until(lambda: shipping(gateway)["lag_records"] == count, 10, f"lag_records == {count}")
        block = shipping(gateway)
        assert block["state"] == "down" and block["last_error"], block
        assert health(gateway)["status"] == "ok"  # shipping never makes the gateway unhealthy
        rotated = sorted(directory.glob("audit-*.jsonl"))
        files = [*rotated, directory / "audit.jsonl"]
        # Retention would delete: more than max_total_mb in the files.
        assert sum(path.stat().st_size for path in files) > 0.02 * 2**20 * 1.5
        assert len(rotated) >= 3
        more = send([gateway.url], 60)  # more rotations, each a chance to prune
        records = wait_recorded(directory, set(sent) | set(more))
        assert records.keys() == set(sent) | set(more)
        now_rotated = sorted(directory.glob("audit-*.jsonl"))
        assert set(rotated) <= set(now_rotated), "a file with unshipped records was deleted"
        assert len(now_rotated) > len(rotated)

        pg.start()
        wait_shipped(pg, set(records), 30)
        wait_until(
            lambda: shipping(gateway)["lag_records"] == 0 and shipping(gateway)["state"] == "ok",
            10,
            "shipping ok, no lag",
        )
        # Once shipped, the same limits delete the oldest files at the next rotation.
        last = send([gateway.url], 80)  # at least one more rotation (~275 bytes a record)
        wait_shipped(pg, set(records) | set(last), 10)
        remaining = set(directory.glob("audit-*.jsonl"))
        assert not set(rotated) & remaining, "retention kept the oldest files once shipped"
    finally:
        pg.stop()


def test_a_standby_worker_takes_over_when_the_shipping_worker_is_killed(
    tmp_path, upstream, start_gateway, postgres, postgres_dsn
) -> None:
    # Two hypercorn masters with one worker each, on one audit file: the workers are
    # processes sharing the file and its ship lock, as the workers of one master are. One
    # master with two workers cannot show a takeover: hypercorn 0.18 does not respawn a
    # killed worker, it stops the whole server (its other workers too).
    dbname = database_of(postgres_dsn)
    audit = tmp_path / "shared" / "audit.jsonl"
    config = fleet_config(upstream.url, audit, postgres_dsn, "host-e")
    gateways = [
        start_gateway(home="gw-1", config=config),
        start_gateway(home="gw-2", config=config),
    ]
    workers = {}
    for gateway in gateways:
        wait_until(lambda g=gateway: len(worker_pids(g.proc.pid)) == 1, 20, "a worker")
        workers[worker_pids(gateway.proc.pid)[0]] = gateway
    before = send([g.url for g in gateways], 60)
    wait_shipped(postgres, set(before), 20, dbname)
    status_file = Path(f"{audit}.shipping")

    def status() -> dict[str, Any]:
        found: dict[str, Any] = json.loads(status_file.read_text())  # replaced atomically
        return found

    # Written every 0.25 s at most: it catches up with the commits just after them.
    wait_until(
        lambda: status_file.exists() and (status()["state"], status()["lag_records"]) == ("ok", 0),
        5,
        "the status file up to date",
    )
    shipper = status()["pid"]
    assert shipper in workers
    killed = workers.pop(shipper)
    [(survivor_pid, survivor)] = workers.items()
    standby = shipping(survivor)  # the shipping worker's status, read from its file
    assert standby["state"] == "ok" and standby["instance"] == "host-e"
    assert standby["lag_records"] == 0

    os.kill(shipper, signal.SIGKILL)
    killed.wait(10)  # its master stops once its only worker is gone
    during = send([survivor.url], 60)
    wait_until(lambda: status()["pid"] == survivor_pid, 5, "the standby worker shipping")
    after = send([survivor.url], 30)
    records = wait_recorded(audit.parent, set(before) | set(during) | set(after))
    assert records.keys() == set(before) | set(during) | set(after)
    wait_shipped(postgres, set(records), 5, dbname)
    wait_until(lambda: shipping(survivor)["lag_records"] == 0, 5, "no lag reported")
    block = shipping(survivor)
    assert block["state"] == "ok", f"the worker that took over reports {block}"
