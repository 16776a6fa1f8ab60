"""Audit at scale: 10M records (1M with QUICK) in sealed 256 MB segments and a full active file.

Figures: the first start after an upgrade (every sidecar built from JSONL), startup to the
first 200 afterwards, worker RSS per indexed record, proportional set size of two workers
against one, admin query latency over HTTP (and the same answers as a naive scan), usage
reports (also with records arriving), and the rollup query over 30 days in-process.

Run by bench/run.py (`make bench`); `python bench/audit_scale.py child ACTION DIR` runs the
in-process parts in a fresh process (importing crabtrio from PYTHONPATH, the run's snapshot).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import audit_data
from audit_bench import admin_query_figures, usage_figures, usage_under_traffic
from procs import child_json, group_pids
from targets import crabtrio_config, start_crabtrio

SEGMENT_MB = 256  # the default max_file_mb
QUICK_SEGMENT_MB = 64  # QUICK's 1M records (263 MB) would not fill one default segment
ACTIVE = "audit.jsonl"
DAY_MS = 86_400_000


def layout(source: Path, directory: Path, segment_mb: int) -> Path:
    """`source` split into sealed segments and a full active file (its last segment_mb)."""
    # The active file just under the rotation size: the bench's own requests must not seal it.
    segment_bytes = segment_mb * 1024 * 1024 * 98 // 100
    from crabtrio.audit.rotation import rotated_name

    active = directory / ACTIVE
    done = directory / "layout.done"
    if done.exists():
        return active
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    sealed_bytes = max(0, source.stat().st_size - segment_bytes)
    with open(source, "rb") as lines:
        written, number = 0, 0
        out = None
        for line in lines:
            if written >= sealed_bytes:
                if out is None or out.name != str(active):
                    if out is not None:
                        out.close()
                    out = open(active, "wb")  # noqa: SIM115 - closed below
            elif out is None or out.tell() >= segment_bytes:
                if out is not None:
                    out.close()
                out = open(rotated_name(str(active), 1_790_000_000 + number), "wb")  # noqa: SIM115
                number += 1
            out.write(line)
            written += len(line)
        if out is not None:
            out.close()
    done.touch()
    return active


def traffic_layout(directory: Path, target: Path) -> Path:
    """The layout again, its sealed segments and their sidecars linked, its active file
    copied without its checkpoint: a gateway replays that file into rollup cells of its own,
    as one running since the file was new holds them (a checkpoint's are a mapped base)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in directory.iterdir():
        if path.name == ACTIVE:
            shutil.copyfile(path, target / ACTIVE)
        elif path.suffix in (".jsonl", ".idx") and not path.name.startswith(ACTIVE):
            (target / path.name).symlink_to(path)
    return target / ACTIVE


def _child(action: str, directory: Path, workdir: Path) -> dict[str, Any]:
    return child_json([__file__, "child", action, str(directory)], workdir, timeout=3600)


def _child_main(action: str, directory: str) -> None:
    from crabtrio.audit.reader import AuditReader
    from crabtrio.audit.sums import select

    reader = AuditReader(os.path.join(directory, ACTIVE))
    start = time.perf_counter()
    reader.replay()
    out: dict[str, Any] = {
        "replay_s": round(time.perf_counter() - start, 2),
        "records": len(reader.index),
        "sidecars": reader.sidecars,
        "checkpoints": reader.checkpoints,
    }
    if action == "prepare":  # what a running gateway's follower would have written
        start = time.perf_counter()
        reader.checkpoint()
        out["checkpoint_s"] = round(time.perf_counter() - start, 2)
    elif action == "rollups":
        since = audit_data.START_MS
        until = since + 30 * DAY_MS
        for name, kwargs in {
            "by key per day, 30 days": {"group_by": ("key",), "interval": DAY_MS},
            "one key's total, 30 days": {
                "group_by": (),
                "interval": None,
                "filters": {"key": audit_data.KEYS[3]},
            },
        }.items():
            times = []
            for _ in range(21):
                start = time.perf_counter()
                sources = reader.index.rollup_sources()
                select(sources, since=since, until=until, **kwargs)  # type: ignore[arg-type]
                times.append(time.perf_counter() - start)
            first = times[0]  # what this grouping summed before anything was cached for it
            times.sort()
            out[name] = {
                "first_ms": round(first * 1000, 2),
                "p50_ms": round(times[10] * 1000, 2),
                "max_ms": round(times[-1] * 1000, 2),
            }
    reader.close()
    print(json.dumps(out))


def _memory(pid: int) -> dict[str, int]:
    """RSS and PSS (kB) of one process, from /proc."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                values[name.lower()] = int(rest.split()[0])
    return values


def _group(process: Any) -> list[dict[str, int]]:
    """RSS and PSS of every process of a gateway's group (hypercorn's and its workers')."""
    return [_memory(pid) for pid in group_pids(process.pid)]


def run(cache_dir: Path, workdir: Path, quick: bool) -> dict[str, Any]:
    count = 1_000_000 if quick else 10_000_000
    source = audit_data.audit_file(cache_dir, count)
    segment_mb = QUICK_SEGMENT_MB if quick else SEGMENT_MB
    directory = cache_dir / f"scale-{count}-{segment_mb}mb-v{audit_data.FORMAT_VERSION}b"
    start = time.perf_counter()
    active = layout(source, directory, segment_mb)
    for stale in directory.glob("*.idx"):  # every run measures the first start too
        stale.unlink()
    segments = len(list(directory.glob("*.jsonl"))) - 1
    print(
        f"  audit at scale: {count:,} records, {segments} sealed segments and a "
        f"{active.stat().st_size / 1e6:.0f} MB active file (laid out in "
        f"{time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    first = _child("prepare", directory, workdir)
    print(
        f"  first start (sidecars built from JSONL): {first['replay_s']:.1f}s; "
        f"checkpoint of the active file {first['checkpoint_s']:.1f}s",
        flush=True,
    )
    results: dict[str, Any] = {"records": count, "segments": segments, "first_start": first}

    empty = workdir / "empty-audit.jsonl"
    empty.write_bytes(b"")
    config = crabtrio_config(None, empty, builtin_mock=True)
    baseline = start_crabtrio("crabtrio-empty", config, workdir)
    idle = _group(baseline.process)
    base_rss = max(m["rss"] for m in idle)  # the worker's
    empty_pss_one = sum(m["pss"] for m in idle)
    baseline.stop()
    baseline = start_crabtrio("crabtrio-empty-2", config, workdir, workers=2)
    empty_pss_two = sum(m["pss"] for m in _group(baseline.process))
    baseline.stop()

    config = crabtrio_config(None, active, builtin_mock=True)
    config = config.replace("[audit]\n", f"[audit]\nmax_file_mb = {segment_mb}\n", 1)
    assert f"max_file_mb = {segment_mb}" in config
    one = start_crabtrio("crabtrio-scale", config, workdir)
    try:
        memory = _group(one.process)
        rss_kb = max(m["rss"] for m in memory)  # the worker's
        pss_one = sum(m["pss"] for m in memory)
        results["startup_s"] = round(one.startup_s, 2)
        results["rss_mb"] = round(rss_kb / 1024)
        results["rss_bytes_per_record"] = round((rss_kb - base_rss) * 1024 / count, 1)
        print(
            f"  startup to first 200: {one.startup_s:.2f}s; worker RSS {rss_kb / 1024:.0f} MB "
            f"({results['rss_bytes_per_record']:.0f} B per record over an empty gateway's "
            f"{base_rss / 1024:.0f} MB)",
            flush=True,
        )
        results["admin"] = admin_query_figures(one.port, source, quick)
        since = audit_data.START_MS
        results["usage"] = usage_figures(one.port, since, since + 30 * DAY_MS, 50 if quick else 200)
    finally:
        one.stop()

    two = start_crabtrio("crabtrio-scale-2", config, workdir, workers=2)
    try:
        pss_two = sum(m["pss"] for m in _group(two.process))
    finally:
        two.stop()
    results["pss_one_mb"] = round(pss_one / 1024)
    results["pss_two_mb"] = round(pss_two / 1024)
    results["pss_two_over_one"] = round(pss_two / pss_one, 2)
    # What the index and the records add, over the same gateways serving an empty log: each
    # worker's own interpreter (~60 MB, private) weighs more than a shared 10M-record index.
    index_one, index_two = pss_one - empty_pss_one, pss_two - empty_pss_two
    results["index_pss_one_mb"] = round(index_one / 1024)
    results["index_pss_two_mb"] = round(index_two / 1024)
    results["index_pss_two_over_one"] = round(index_two / index_one, 2)
    print(
        f"  proportional set size: one worker {pss_one / 1024:.0f} MB, two workers "
        f"{pss_two / 1024:.0f} MB ({pss_two / pss_one:.2f}x); over an empty log's: "
        f"{index_one / 1024:.0f} MB and {index_two / 1024:.0f} MB ({index_two / index_one:.2f}x)",
        flush=True,
    )
    # Records arriving while reports are asked for, the active file's cells the gateway's own.
    busy_active = traffic_layout(directory, workdir / "traffic")
    config = crabtrio_config(None, busy_active, builtin_mock=True)
    config = config.replace("[audit]\n", f"[audit]\nmax_file_mb = {2 * segment_mb}\n", 1)
    busy = start_crabtrio("crabtrio-traffic", config, workdir)
    try:
        since = audit_data.START_MS
        repeats = 50 if quick else 200
        results["usage_under_traffic"] = usage_under_traffic(
            busy.port, since, since + 30 * DAY_MS, repeats
        )
    finally:
        busy.stop()
        shutil.rmtree(busy_active.parent, ignore_errors=True)

    rollups = _child("rollups", directory, workdir)
    results["rollups"] = {k: v for k, v in rollups.items() if isinstance(v, dict) and "p50_ms" in v}
    for name, figures in results["rollups"].items():
        print(
            f"  rollups {name}: p50 {figures['p50_ms']} ms, max {figures['max_ms']} ms, "
            f"the first {figures['first_ms']} ms"
        )
    return results


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "child":
        _child_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: audit_scale.py child prepare|rollups DIR")
