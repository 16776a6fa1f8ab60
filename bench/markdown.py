"""The markdown report printed at the end of `make bench` (and saved as report.md)."""

from __future__ import annotations

import statistics
from typing import Any

from report import Check, fmt, same_round_ratio
from scenarios import SCENARIO_NAMES

BASELINES = ["direct", "crabtrio-mock", "litellm", "portkey"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _durability_cost(summary: dict[str, Any]) -> list[str]:
    """What `sync = "always"` (an fsync before each answer, shared by concurrent requests)
    costs against the default `interval` mode, chat at 32 connections."""
    base = summary["load"].get("crabtrio/chat")
    always = summary["load"].get("crabtrio-always/chat")
    if not base or not always or not base["p50_ms"] or not always["p50_ms"]:
        return []
    p50 = always["p50_ms"]["median"] - base["p50_ms"]["median"]
    p99 = always["p99_ms"]["median"] - base["p99_ms"]["median"]
    rps = always["rps"]["median"] / base["rps"]["median"]
    return [
        "",
        '## Durability cost (`sync = "always"` against the default `"interval"`, chat, c32)',
        "",
        f"- added latency: p50 {p50:+.2f} ms, p99 {p99:+.2f} ms; throughput {rps:.2f}x",
    ]


def render(results: dict[str, Any], summary: dict[str, Any], checks: list[Check]) -> str:
    meta = results["meta"]
    targets = results["targets"]
    out = [
        f"# crabtrio benchmark, {meta['started']}",
        "",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`. "
        f"{meta['rounds']} rounds, every target side by side in each; wrk {meta['load_s']} s "
        f"per run at the connections shown; medians with [min-max] over rounds. "
        f"crabtrio at {meta.get('crabtrio_commit', '?')} "
        f"(snapshot {meta.get('crabtrio_snapshot_sha256', '?')}).",
    ]
    if meta.get("peer_versions"):
        versions = ", ".join(f"{k} {v}" for k, v in meta["peer_versions"].items())
        out.append(f"Peers: {versions}.")
    for name, reason in results["unavailable"].items():
        out.append(f"\n**{name} was not run**: {reason}")
    for failure in results["failures"]:
        out.append(
            f"\n**failure** round {failure['round']} {failure['target']}: {failure['reason']}"
        )

    out += ["", "## Load", ""]
    rows = []
    for target in targets:
        for scenario in SCENARIO_NAMES:
            load = summary["load"].get(f"{target}/{scenario}")
            if load is None:
                continue
            connections = meta["connections"][scenario]
            rows.append(
                [
                    target,
                    f"{scenario} (c{connections})",
                    fmt(load["rps"], 0) if load["p50_ms"] else "0 (none finished)",
                    fmt(load["p50_ms"], 2),
                    fmt(load["p90_ms"], 2, False),
                    fmt(load["p99_ms"], 2, False),
                    fmt(load["errors"], 0),
                    fmt(load["cpu_ms_per_request"], 3),
                    f"{fmt(load['rss_process_mb'], 0, False)} / "
                    f"{fmt(load['rss_tree_mb'], 0, False)}",
                    fmt(load["ttfe_load_p50_ms"], 2, False),
                ]
            )
    out += _table(
        [
            "target",
            "scenario",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "errors",
            "CPU ms/req",
            "peak RSS MB (largest proc / tree)",
            "TTFE under load p50 ms",
        ],
        rows,
    )

    out += ["", "## One connection (added = minus `direct` in the same round)", ""]
    rows = []
    for target in targets:
        single = summary["single"].get(target)
        added = summary["added"].get(target)
        if single is None or added is None:
            continue
        peak = summary["peak_rss"].get(target, {})
        rows.append(
            [
                target,
                fmt(summary["startup"].get(target), 2),
                fmt(single["chat_p50_ms"], 3),
                fmt(added["chat_p50_ms"], 3),
                fmt(single["ttfe_p50_ms"], 3),
                fmt(added["ttfe_p50_ms"], 3),
                fmt(single["stream_total_p50_ms"], 2, False),
                f"{peak.get('process_mb', 0):.0f} / {peak.get('tree_mb', 0):.0f}",
            ]
        )
    out += _table(
        [
            "target",
            "startup to first 200 s",
            "chat p50 ms",
            "added p50 ms",
            "stream TTFE p50 ms",
            "added TTFE ms",
            "whole stream p50 ms",
            "peak RSS MB (largest proc / tree)",
        ],
        rows,
    )

    out += ["", "## Throughput ratios (same-round req/s ratio, median [min-max])", ""]
    baselines = [b for b in BASELINES if b in targets]
    rows = []
    for target in targets:
        row = [target]
        for base in baselines:
            cells = []
            for scenario in ("chat", "stream", "paced500"):
                r = same_round_ratio(results, target, base, scenario)
                cells.append("-" if r is None or target == base else f"{r['median']:.2f}")
            row.append(" / ".join(cells))
        rows.append(row)
    out += _table(["target", *(f"vs {b} (chat / stream / paced500)" for b in baselines)], rows)

    headroom = results.get("headroom")
    if headroom:
        out += ["", "## Mock upstream headroom", ""]
        for scenario, ratio in headroom["ratios"].items():
            out.append(
                f"- {scenario}: the mock alone serves {fmt(ratio, 1)}x crabtrio's req/s "
                f"({'OK' if ratio['median'] >= 20 else 'BELOW'} the 20x needed)"
            )

    out += _durability_cost(summary)
    audit = results.get("audit")
    if audit:
        out += ["", "## Audit log", ""]
        out += _table(
            ["writer (sync mode, tasks waiting for fsync)", "records", "records/s"],
            [[w["case"], f"{w['records']:,}", f"{w['records_per_s']:,}"] for w in audit["writer"]],
        )
        replay = audit["replay"]
        rate = statistics.median(r["records_per_s"] for r in replay)
        seconds = statistics.median(r["seconds"] for r in replay)
        rss = statistics.median(r["peak_rss_mb"] for r in replay)
        out += [
            "",
            f"Replay of {audit['records']:,} records: {seconds:.2f} s, {rate:,.0f} records/s, "
            f"peak RSS {rss:.0f} MB (median of {len(replay)}). A gateway serving that file "
            f"answered its first request {audit['admin']['startup_s']:.1f} s after start "
            f"(peak RSS of its worker {audit['admin']['rss_mb']} MB).",
            "",
        ]
        rows = [
            [
                name,
                str(q["returned"]),
                f"{q['p50_ms']:.2f}",
                f"{q['p99_ms']:.2f}",
                f"{q.get('max_ms', 0):.2f}",
                f"{q['scan_s']:.2f}",
                f"{q['scan_over_p99']:,.0f}x",
                "yes" if q["same_answer"] else "NO",
            ]
            for name, q in audit["admin"]["queries"].items()
        ]
        out += _table(
            [
                "admin query (HTTP)",
                "records",
                "p50 ms",
                "p99 ms",
                "max ms",
                "naive scan s",
                "scan / p99",
                "same answer",
            ],
            rows,
        )

    out += ["", "## Targets (the issues' checks, by issue number)", ""]
    out += _table(
        ["#", "target", "measured", "needed", "status"],
        [[str(c.number), c.text, c.measured, c.needed, c.status] for c in checks],
    )
    return "\n".join(out) + "\n"
