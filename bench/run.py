"""`make bench`: load every target side by side with wrk, measure the audit log, report.

    python bench/run.py [--quick] [--peers litellm,portkey] [--rounds 3]

Writes bench/results/<timestamp>/results.json (raw runs and summaries), report.md and
chart.png, and prints the report. Every process it starts runs in its own process group on
127.0.0.1 and is stopped by PID before it exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import admission_bench
import audit_bench
import audit_scale
import chain_bench
import chart
import fleet_bench
import markdown
import peers
import report
import targets
from measure import Durations, load, single_connection, smoke
from scenarios import SCENARIOS, Scenario
from targets import PEERS, TARGETS, Running, start_target, start_upstreams
from wrk import WrkMissing, ensure_wrk

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
FULL = Durations(load_s=5, single_s=3, single_streams=300)
QUICK = Durations(load_s=1, single_s=1, single_streams=100)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~2-minute subset")
    parser.add_argument("--peers", default="", help="comma-separated: litellm,portkey")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of every run")
    parser.add_argument("--targets", default="", help="only these targets (debugging)")
    parser.add_argument(
        "--baseline", default="", help="a git ref run beside as `crabtrio-baseline`"
    )
    parser.add_argument("--mock-procs", type=int, default=1, help="processes of the mock")
    parser.add_argument("--no-audit", action="store_true", help="skip the audit figures")
    args = parser.parse_args()
    args.peers = [p for p in args.peers.replace(" ", ",").split(",") if p]
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return args


def machine() -> str:
    model = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def crabtrio_commit() -> str:
    """HEAD, marked when the work tree has uncommitted changes (those are what ran)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "crabtrio"],
            capture_output=True,
            text=True,
            cwd=BENCH.parent,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' + uncommitted changes' if dirty else ''}" or "unknown"


def install_peers(names: list[str]) -> dict[str, str]:
    """Install what is missing; the peers that cannot run here, with the reason."""
    unavailable = {}
    for name in names:
        try:
            peers.litellm_executable() if name == "litellm" else peers.portkey_entry()
        except peers.PeerUnavailable as exc:
            unavailable[name] = str(exc)
            print(f"peer {name} cannot run here, going on without it: {exc}", flush=True)
    return unavailable


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total} {elapsed:4.0f}s, ~{left:3.0f}s left] {text}", flush=True)


@dataclass
class Round:
    """What every target of one round shares."""

    number: int
    scenarios: list[Scenario]
    durations: Durations
    bodies: dict[str, Path]
    results: dict[str, Any]
    progress: Progress

    def note_failure(self, target: str, reason: str) -> None:
        self.results["failures"].append({"round": self.number, "target": target, "reason": reason})

    def scenarios_of(self, target: str) -> list[Scenario]:
        return [s for s in self.scenarios if s.runs_on(target)]


def run_round(names: list[str], workdir: Path, mock_procs: int, rnd: Round) -> None:
    """Start this round's mock upstreams, then each target in turn, side by side."""
    up = start_upstreams(workdir, mock_procs)
    try:
        for name in names:
            try:
                target = start_target(name, up, workdir)
            except (RuntimeError, peers.PeerUnavailable) as exc:
                rnd.note_failure(name, f"did not start: {exc}")
                print(f"round {rnd.number}: {name} did not start: {exc}", flush=True)
                rnd.progress.done += len(rnd.scenarios_of(name)) + 1
                continue
            try:
                measure_target(target, rnd)
            finally:
                target.stop()
    finally:
        up.stop()


def measure_target(target: Running, rnd: Round) -> None:
    name, results, step = target.name, rnd.results, rnd.progress.step
    where = {"round": rnd.number, "target": name}
    results["startup"].append({**where, "startup_s": round(target.startup_s, 3)})
    # First, while nothing else has run: the latency each request gets on its own.
    chat, stream = (next(s for s in SCENARIOS if s.name == n) for n in ("chat", "stream"))
    row = single_connection(target, chat, stream, rnd.bodies["chat"], rnd.durations)
    results["single"].append({**where, **row})
    step(
        f"round {rnd.number} {name} one connection: chat p50 {row['chat_p50_ms']:.3f} ms, "
        f"TTFE p50 {row['ttfe_p50_ms']} ms, startup {target.startup_s:.2f}s"
    )
    for scenario in rnd.scenarios_of(name):
        problem = smoke(target, scenario)
        # A baseline may be older than the API of a scenario that only some targets run.
        own_api = name == "crabtrio-baseline" and scenario.targets is not None
        if own_api and problem is not None and problem.startswith("status 404"):
            step(f"round {rnd.number} {name} {scenario.name}: not served by the baseline")
            continue
        if problem is not None:
            rnd.note_failure(name, f"{scenario.name}: {problem}")
            step(f"round {rnd.number} {name} {scenario.name}: SKIPPED ({problem})")
            continue
        row = load(target, scenario, rnd.bodies[scenario.name], rnd.durations.load_s)
        results["runs"].append({**where, "scenario": scenario.name, **row})
        ttfe = row["ttfe_load_p50_ms"]
        latency = f"p50 {row['p50_ms']:.2f} ms" if row["p50_ms"] is not None else "none finished"
        step(
            f"round {rnd.number} {name} {scenario.name} c{scenario.connections}: "
            f"{row['rps']:,.0f} req/s, {latency}, {row['errors']} errors, "
            f"{row['cpu_ms_per_request']} CPU ms/req, RSS {row['rss_tree_mb']:.0f} MB"
            + (f", TTFE {ttfe:.1f} ms" if ttfe is not None else "")
        )


def headroom(results: dict[str, Any]) -> dict[str, Any]:
    ratios = {}
    for scenario in ("chat", "stream", *report.OWN_API_SCENARIOS):
        r = report.same_round_ratio(results, "direct", "crabtrio", scenario)
        if r is not None:
            ratios[scenario] = r
    return {"ratios": ratios}


def trio_floor() -> dict[str, float]:
    """bench/trio_floor.py in a process of its own (it forks): what a bare trio relay costs
    per paced event on this machine now, for issue 14's figure."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "trio_floor.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    floor: dict[str, float] = json.loads(done.stdout)
    return floor


def main() -> int:
    args = parse_args()
    # A SIGTERM unwinds like Ctrl-C, so every `finally` stops the processes it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        ensure_wrk()
    except WrkMissing as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    d = QUICK if args.quick else FULL
    scenarios = [s for s in SCENARIOS if s.quick or not args.quick]
    names = [*TARGETS, *args.peers]
    if args.baseline:
        names.insert(names.index("crabtrio") + 1, "crabtrio-baseline")
    if args.targets:
        names = [n for n in names if n in args.targets.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = RESULTS / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="crabtrio-bench-"))
    bodies = {}
    for scenario in SCENARIOS:
        bodies[scenario.name] = out / f"body-{scenario.name}.json"
        bodies[scenario.name].write_bytes(scenario.body_bytes())
    command = "make bench" + (" QUICK=1" if args.quick else "")
    command += f" BASELINE={args.baseline}" if args.baseline else ""
    command += f" PEERS={','.join(args.peers)}" if args.peers else ""
    print(f"crabtrio bench: {', '.join(names)}; {args.rounds} rounds; results in {out}", flush=True)
    code = targets.snapshot_crabtrio(workdir)
    baseline = (
        targets.snapshot_baseline(args.baseline, workdir / "baseline") if args.baseline else None
    )
    unavailable = install_peers(args.peers)
    names = [n for n in names if n not in unavailable]
    results: dict[str, Any] = {
        "meta": {
            "started": started,
            "command": command,
            "machine": machine(),
            "rounds": args.rounds,
            "load_s": d.load_s,
            "single_s": d.single_s,
            "mock_procs": args.mock_procs,
            "connections": {s.name: s.connections for s in SCENARIOS},
            "crabtrio_commit": crabtrio_commit(),
            "crabtrio_snapshot_sha256": code,
            "baseline_commit": baseline,
            "peer_versions": peers.installed_versions() if args.peers else {},
        },
        "targets": names,
        "unavailable": unavailable,
        "failures": [],
        "runs": [],
        "single": [],
        "startup": [],
        "trio_floor": [],
    }
    per_round = sum(len([s for s in scenarios if s.runs_on(n)]) + 1 for n in names)
    progress = Progress(args.rounds * per_round)
    try:
        for number in range(1, args.rounds + 1):
            round_dir = workdir / f"round{number}"
            round_dir.mkdir()
            rnd = Round(number, scenarios, d, bodies, results, progress)
            results["trio_floor"].append(trio_floor())
            run_round(names, round_dir, args.mock_procs, rnd)
        results["headroom"] = headroom(results)
        if not args.no_audit:
            print("audit log figures...", flush=True)
            results["audit"] = audit_bench.run(RESULTS / "cache", workdir, args.quick)
            print("audit at scale...", flush=True)
            results["audit_scale"] = audit_scale.run(RESULTS / "cache", workdir, args.quick)
            print("fleet (PostgreSQL)...", flush=True)
            results["fleet"] = fleet_bench.run(RESULTS / "cache", workdir, args.quick)
            print("admission (budgets and rate limits)...", flush=True)
            results["admission"] = admission_bench.run(workdir, args.quick)
            print("hash chain...", flush=True)
            results["chain"] = chain_bench.run(workdir, args.quick)
    finally:
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        shutil.rmtree(workdir, ignore_errors=True)
    summary = report.summarize(results)
    checks = report.check_targets(results, summary)
    results["summary"] = summary
    results["checks"] = [dataclasses.asdict(c) for c in checks]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = markdown.render(results, summary, checks)
    drawn = chart.draw(results, summary, out / "chart.png")
    if drawn is not None:
        text += f"\nChart: {drawn.relative_to(BENCH.parent)}\n"
    (out / "report.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
