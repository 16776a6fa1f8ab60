"""Audit figures: writer records/s per sync mode, replay of a large file, admin query latency.

Run by bench/run.py; `python bench/audit_bench.py replay FILE` replays FILE in a fresh
process and prints its time and peak memory as JSON (that is how run.py measures replay).
"""

from __future__ import annotations

import base64
import gc
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import audit_data
import orjson
import trio
from measure import percentile
from procs import peak_rss_bytes
from scenarios import CHAT_MODEL
from targets import ADMIN_TOKEN, CLIENT_KEY, crabtrio_config, start_crabtrio

from crabtrio.audit import AuditLogger, AuditReader, AuditRecord
from crabtrio.config import AuditConfig

SyncMode = Literal["interval", "always", "never"]
RECORD_FIELDS: dict[str, Any] = {
    "key_name": "team-07",
    "model": "gpt-4o-mini",
    "provider": "openai",
    "cost_micros": 230,
    "latency_ms": 412,
    "status": 200,
    "stream": True,
    "endpoint": "chat",
    "prompt_tokens": 12,
    "completion_tokens": 20,
}


async def _write_records(path: Path, sync: SyncMode, count: int, waiters: int) -> float:
    """Records/s through AuditLogger until every record is on disk (and fsynced if asked)."""

    def record(i: int) -> AuditRecord:
        now = int(time.time() * 1000)
        return AuditRecord(request_id=f"{i:032x}", timestamp=now, **RECORD_FIELDS)

    start = time.perf_counter()
    async with AuditLogger.open(AuditConfig(path=str(path), sync=sync)) as logger:
        if waiters == 0:
            for i in range(count):
                logger.record(record(i))
                if i % 100 == 99:
                    await trio.sleep(0)  # requests arrive over time, not in one burst
        else:
            issued = 0

            async def client() -> None:
                nonlocal issued
                while issued < count:
                    issued += 1
                    await logger.wait_durable(logger.record(record(issued)))

            async with trio.open_nursery() as nursery:
                for _ in range(waiters):
                    nursery.start_soon(client)
    return count / (time.perf_counter() - start)


def writer_throughput(workdir: Path, quick: bool) -> list[dict[str, Any]]:
    scale = 0.2 if quick else 1.0
    cases: list[tuple[SyncMode, int, int]] = [
        ("interval", 0, 200_000),
        ("never", 0, 200_000),
        ("always", 0, 200_000),
        ("always", 1, 300),
        ("always", 1000, 20_000),
    ]
    results = []
    for sync, waiters, count in cases:
        count = max(100, int(count * scale))
        path = Path(tempfile.mkdtemp(dir=workdir)) / "writer.jsonl"
        rate = trio.run(_write_records, path, sync, count, waiters)
        label = f"{sync}, {waiters} waiting" if waiters else f"{sync}, no waiting"
        results.append(
            {
                "case": label,
                "sync": sync,
                "waiters": waiters,
                "records": count,
                "records_per_s": round(rate),
            }
        )
        print(f"  audit writer {label}: {rate:,.0f} records/s", flush=True)
        shutil.rmtree(path.parent, ignore_errors=True)
    return results


def replay_in_child(path: Path, workdir: Path, repeats: int) -> list[dict[str, Any]]:
    """Replay in a fresh process (importing crabtrio from `workdir`, the run's snapshot)."""
    runs = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, __file__, "replay", str(path)],
            env={**os.environ, "PYTHONPATH": str(workdir)},
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(
            f"  audit replay: {r['records']:,} records in {r['seconds']:.2f}s "
            f"({r['records_per_s']:,.0f}/s), peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    return runs


def _replay_main(path: str) -> None:
    reader = AuditReader(path)
    start = time.perf_counter()
    reader.replay()
    seconds = time.perf_counter() - start
    records = len(reader.index)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec.
    peak_mb = peak_rss_bytes(os.getpid()) / 1024 / 1024
    print(
        json.dumps(
            {
                "records": records,
                "seconds": round(seconds, 3),
                "records_per_s": round(records / seconds),
                "peak_rss_mb": round(peak_mb, 1),
                "corrupt": reader.corrupt_lines,
            }
        )
    )


def _queries() -> dict[str, dict[str, Any]]:
    """The admin queries under test, by name, as query-string parameters."""
    middle = audit_data.START_MS + audit_data.SPAN_MS // 2
    return {
        "key (selective)": {"key": audit_data.RAREST_KEY, "limit": 100},
        "model": {"model": "gpt-4.1", "limit": 100},
        "time range (1 h)": {"since": middle, "until": middle + 3_600_000, "limit": 100},
        "cursor pages": {"limit": 100},  # pages 2.. of the unfiltered log, via x-next-cursor
    }


def _naive_args(params: dict[str, Any], before: tuple[int, str] | None) -> dict[str, Any]:
    filters = {name: params[name] for name in ("key", "model") if name in params}
    return {
        "filters": filters,
        "since": params.get("since"),
        "until": params.get("until"),
        "before": before,
        "limit": params["limit"],
    }


class _Admin:
    """Keep-alive GETs to /v1/admin/logs with the admin token."""

    def __init__(self, port: int, route: str = "/v1/admin/logs") -> None:
        self.port = port
        self.route = route
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.idle_since = time.monotonic()

    def get(self, params: dict[str, Any]) -> tuple[float, Any, str | None]:
        if time.monotonic() - self.idle_since > 2:  # the server closes idle connections (5 s)
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self.conn.connect()
        start = time.perf_counter()
        self.conn.request(
            "GET",
            f"{self.route}?" + urlencode(params),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        response = self.conn.getresponse()
        body = response.read()
        self.idle_since = time.monotonic()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"admin query {params} answered {response.status}: {body[:200]!r}")
        return elapsed, orjson.loads(body), response.getheader("x-next-cursor")


def usage_figures(port: int, since: int, until: int, repeats: int) -> dict[str, Any]:
    """Time `/v1/admin/usage` over [since, until] (per key per day, and one key's total)."""
    admin = _Admin(port, "/v1/admin/usage")
    results: dict[str, Any] = {}
    reports = {
        "per key per day": {"group_by": "key", "interval": "day"},
        "one key's total": {"key": audit_data.KEYS[3]},
    }
    for name, params in reports.items():
        params = {**params, "since": since, "until": until}
        first, _, _ = admin.get(params)  # the report's first: nothing cached for it yet
        for _ in range(4):
            admin.get(params)  # untimed warm-up
        times = []
        gc.collect()
        gc.disable()
        try:
            for _ in range(repeats):
                elapsed, body, _ = admin.get(params)
                times.append(elapsed)
        finally:
            gc.enable()
        results[name] = {
            "rows": len(body["data"]),
            "requests": sum(row["requests"] for row in body["data"]),
            "first_ms": round(first * 1000, 2),
            "p50_ms": round(percentile(times, 50) * 1000, 2),
            "p99_ms": round(percentile(times, 99) * 1000, 2),
        }
        print(
            f"  admin usage {name}: p50 {results[name]['p50_ms']} ms, "
            f"p99 {results[name]['p99_ms']} ms, the first {results[name]['first_ms']} ms "
            f"({results[name]['rows']} rows)",
            flush=True,
        )
    return results


def usage_under_traffic(
    port: int, since: int, until: int, repeats: int, arriving: int = 100
) -> dict[str, Any]:
    """Time `/v1/admin/usage` per key per day over [since, until] with `arriving` chat
    requests answered (and so recorded) before each report: the gateway indexes them and
    counts them into its rollups before it answers (read your writes)."""
    admin = _Admin(port, "/v1/admin/usage")
    chat = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = orjson.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]})
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}

    def traffic() -> None:
        for _ in range(arriving):
            chat.request("POST", "/v1/chat/completions", body, headers)
            response = chat.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"chat answered {response.status}: {answer[:200]!r}")

    params = {"group_by": "key", "interval": "day", "since": since, "until": until}
    for _ in range(5):  # untimed warm-up (the first report fills the caches)
        traffic()
        admin.get(params)
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            traffic()
            elapsed, found, _ = admin.get(params)
            times.append(elapsed)
    finally:
        gc.enable()
        chat.close()
    results = {
        "arriving_per_report": arriving,
        "rows": len(found["data"]),
        "p50_ms": round(percentile(times, 50) * 1000, 2),
        "p99_ms": round(percentile(times, 99) * 1000, 2),
    }
    print(
        f"  admin usage per key per day, {arriving} records arriving before each: "
        f"p50 {results['p50_ms']} ms, p99 {results['p99_ms']} ms ({results['rows']} rows)",
        flush=True,
    )
    return results


def admin_queries(source: Path, workdir: Path, quick: bool) -> dict[str, Any]:
    """Serve a copy of `source` with crabtrio and time each query against the naive scan."""
    served = workdir / "admin-audit.jsonl"
    shutil.copyfile(source, served)
    config = crabtrio_config(None, served, builtin_mock=True)
    gateway = start_crabtrio("crabtrio-admin", config, workdir)
    assert gateway.process is not None
    rss_mb = max(peak_rss_bytes(pid) for pid in gateway.process.pids()) / 1024 / 1024
    results: dict[str, Any] = {
        "startup_s": round(gateway.startup_s, 2),
        "rss_mb": round(rss_mb),
        "queries": {},
    }
    print(
        f"  admin: gateway over {source.name} ready in {gateway.startup_s:.1f}s, "
        f"RSS {rss_mb:.0f} MB",
        flush=True,
    )
    try:
        results["queries"] = admin_query_figures(gateway.port, served, quick)
    finally:
        gateway.stop()
        served.unlink(missing_ok=True)
    return results


def admin_query_figures(
    port: int, naive_source: Path, quick: bool, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Time each admin query against the gateway on `port`; check its answer against the
    naive scan of `naive_source` (a file holding the same records). `extra` parameters go
    with every query (`scope=fleet`)."""
    repeats, scans = (50, 1) if quick else (300, 3)
    results: dict[str, Any] = {}
    admin = _Admin(port)
    # Untimed warm-up: the first queries after a replay of a million records pay for
    # one-off work (allocator growth, a garbage collection pass over the new index).
    for _ in range(20):
        for params in _queries().values():
            admin.get({**params, **(extra or {})})
    for name, params in _queries().items():
        params = {**params, **(extra or {})}
        times: list[float] = []
        first_page = admin.get(params)
        cursors = [first_page[2]]
        if name == "cursor pages":
            # Walk 20 pages deep once, then time fetching each of those pages again.
            for _ in range(20):
                _, _, cursor = admin.get({**params, "before": cursors[-1]})
                cursors.append(cursor)
            cursors = [c for c in cursors if c]
        # The client's own garbage collector (it decodes a million records for the naive
        # scan) must not land in the server's percentiles: pause it while timing.
        gc.collect()
        gc.disable()
        try:
            for i in range(repeats):
                page_params = dict(params)
                if name == "cursor pages":
                    page_params["before"] = cursors[i % len(cursors)]
                elapsed, _, _ = admin.get(page_params)
                times.append(elapsed)
        finally:
            gc.enable()
        # The naive scan of the same file answers the same question.
        before = _decode_cursor(cursors[0]) if name == "cursor pages" else None
        probe = dict(params) | ({"before": cursors[0]} if before else {})
        _, served_page, _ = admin.get(probe)
        scan_times = []
        for _ in range(scans):
            start = time.perf_counter()
            expected = audit_data.naive_query(naive_source, **_naive_args(params, before))
            scan_times.append(time.perf_counter() - start)
        same = [r["request_id"] for r in served_page] == [r["request_id"] for r in expected]
        scan_s = sorted(scan_times)[len(scan_times) // 2]
        p99 = percentile(times, 99)
        entry = {
            "params": params,
            "repeats": repeats,
            "returned": len(served_page),
            "p50_ms": round(percentile(times, 50) * 1000, 3),
            "p99_ms": round(p99 * 1000, 3),
            "max_ms": round(max(times) * 1000, 3),
            "scan_s": round(scan_s, 3),
            "scan_runs_s": [round(s, 3) for s in scan_times],
            "scan_over_p99": round(scan_s / p99, 1),
            "same_answer": same,
        }
        results[name] = entry
        print(
            f"  admin {name}: p50 {entry['p50_ms']:.2f} ms, p99 {entry['p99_ms']:.2f} ms; "
            f"naive scan {scan_s:.2f}s ({entry['scan_over_p99']:,.0f}x p99)"
            f"{'' if same else '  ANSWERS DIFFER'}",
            flush=True,
        )
    return results


def _decode_cursor(text: str | None) -> tuple[int, str] | None:
    if not text:
        return None

    # [timestamp, hex of the request id's first 16 bytes]: the naive scan compares ids, and
    # an id after that prefix sorts after it, as in the index.
    ts, tie = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    return int(ts), bytes.fromhex(tie).decode()


def run(cache_dir: Path, workdir: Path, quick: bool) -> dict[str, Any]:
    count = 200_000 if quick else 1_000_000
    start = time.perf_counter()
    path = audit_data.audit_file(cache_dir, count)
    print(
        f"  audit file: {count:,} records ({path.stat().st_size / 1e6:.0f} MB) "
        f"ready in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    return {
        "records": count,
        "writer": writer_throughput(workdir, quick),
        "replay": replay_in_child(path, workdir, 1 if quick else 3),
        "admin": admin_queries(path, workdir, quick),
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "replay":
        _replay_main(sys.argv[2])
    else:
        sys.exit(__doc__)
