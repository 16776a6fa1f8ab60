"""Where a relayed stream event's CPU goes: crabtrio (one worker) under a paced scenario,
sampled by py-spy, summarised by self time into bench/figures/stream-profile.md.

    .venv/bin/pip install py-spy   # a wheel
    .venv/bin/python bench/profile_stream.py [--scenario paced500] [--seconds 20] [--rate 200]

Starts the round's mock upstreams and `crabtrio` as `make bench` does (bench/targets.py), runs
wrk for warm-up + a py-spy-free window (the CPU per event) + the profiled window, and stops
every process it started by PID.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import targets
from procs import cpu_seconds, group_pids
from scenarios import PACED_MODEL, SCENARIOS, Scenario
from wrk import run_wrk

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "figures" / "stream-profile.md"
# Events the paced mock writes per stream when usage is asked for (crabtrio always asks):
# role, 20 content deltas, finish, the usage chunk, [DONE].
EVENTS_PER_STREAM = 24
WARMUP_S = 3.0
PLAIN_S = 5.0  # CPU per event measured without the profiler attached
# The issue's groups. The client's HTTP parsing was h11's; it is now crabtrio's own codec
# (upstream/http1.py, upstream/chunked.py), and most events now reach the client through
# DirectBody (body_writer.py) rather than hypercorn's ASGI send: each counts in its old group.
GROUPS = (
    "upstream read",
    "h11 client parsing",
    "SSE splitting and usage filtering",
    "ASGI send through hypercorn and h11",
    "trio scheduling and syscalls",
    "request handling (quart, crabtrio routes, audit)",
    "other",
)
# trio's cached worker threads waiting for a job (a lock acquire py-spy does not see as idle).
IDLE_THREAD = "WorkerThread._work"
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--scenario", default="paced500", help="paced100, paced500 or stream-paced-2000"
    )
    parser.add_argument("--seconds", type=int, default=20, help="the profiled window")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep-raw", type=Path, help="also keep py-spy's collapsed stacks here")
    return parser.parse_args()


def _short(path: str) -> str:
    """A file name from its site-packages or checkout root onwards."""
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def frames(stack: str) -> list[tuple[str, str]]:
    """py-spy's collapsed stack (root first) as (function, short file) pairs."""
    out = []
    for part in stack.split(";"):
        m = FRAME.match(part.strip())
        out.append((m["func"], _short(m["file"])) if m else (part.strip(), ""))
    return out


def group_of(stack: list[tuple[str, str]]) -> str:
    """The issue's groups, decided by the leaf frame's module (h11 split by who calls it)."""
    leaf = stack[-1][1]
    callers = " ".join(f for _, f in stack)
    if leaf.startswith("h11/"):
        if "hypercorn/" in callers and "crabtrio/upstream" not in callers:
            return "ASGI send through hypercorn and h11"
        return "h11 client parsing"
    if leaf.startswith(("crabtrio/upstream/http1", "crabtrio/upstream/chunked")):
        return "h11 client parsing"
    if leaf.startswith("crabtrio/body_writer"):
        return "ASGI send through hypercorn and h11"
    if leaf.startswith(("crabtrio/sse", "crabtrio/stream")):
        return "SSE splitting and usage filtering"
    if leaf.startswith(("crabtrio/upstream", "httpx/", "httpcore/")):
        return "upstream read"
    if leaf.startswith("hypercorn/"):
        return "ASGI send through hypercorn and h11"
    trio = ("trio/", "selectors", "socket", "outcome/", "sniffio/", "<attrs generated methods t")
    if leaf.startswith(trio) or leaf.startswith("<attrs generated methods outcome"):
        return "trio scheduling and syscalls"
    if leaf.startswith(("quart", "crabtrio/", "werkzeug/", "orjson")):
        return "request handling (quart, crabtrio routes, audit)"
    return "other"


RELAY = ("relay", "crabtrio/stream.py")  # the per-event loop: everything under it is per event


@dataclass
class Samples:
    total: int = 0
    idle: int = 0  # of idle worker threads, left out
    in_relay: int = 0  # inside the per-event loop
    by_group: collections.Counter[str] = field(default_factory=collections.Counter)
    by_frame: collections.Counter[str] = field(default_factory=collections.Counter)  # leaf


def summarise(raw: str) -> Samples:
    """py-spy's collapsed stacks, counted."""
    out = Samples()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parsed = [f for f in frames(stack) if not f[0].startswith("process ")]
        n = int(count)
        if not parsed or parsed[-1][0] == IDLE_THREAD:
            out.idle += n
            continue
        out.total += n
        out.by_group[group_of(parsed)] += n
        func, leaf = parsed[-1]
        out.by_frame[f"{func} ({leaf})"] += n
        if RELAY in parsed:
            out.in_relay += n
    return out


def worker_pid(group: int) -> int:
    """Hypercorn's worker: the busiest process of the target's group."""
    pids = group_pids(group)
    before = {p: cpu_seconds([p]) for p in pids}
    time.sleep(1.0)
    return max(pids, key=lambda p: cpu_seconds([p]) - before[p])


def mock_requests(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as reply:
        count: int = json.load(reply)["requests"]
    return count


def established(port: int) -> int:
    """TCP connections to a local port (the upstream connections in use)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"dport = :{port}"], capture_output=True, text=True
    )
    return len(out.stdout.splitlines())


def window(pid: int, mock_port: int, seconds: float) -> tuple[float, int]:
    """Worker CPU seconds and events the paced mock sent to it over `seconds`."""
    cpu, started = cpu_seconds([pid]), mock_requests(mock_port)
    time.sleep(seconds)
    return cpu_seconds([pid]) - cpu, (mock_requests(mock_port) - started) * EVENTS_PER_STREAM


def main() -> int:
    args = parse_args()
    # Events are counted at the paced mock (its streams x EVENTS_PER_STREAM): only scenarios it
    # serves, not the `paced-*ev` ones (the fast mock, paced by the body's `mock` object).
    scenario = next(
        (s for s in SCENARIOS if s.name == args.scenario and s.body["model"] == PACED_MODEL), None
    )
    if scenario is None:
        sys.exit(f"no scenario served by the paced mock is named {args.scenario!r}")
    py_spy = shutil.which("py-spy") or str(targets.VENV_BIN / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy is missing: .venv/bin/pip install py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="crabtrio-profile-"))
    body = workdir / "body.json"
    body.write_bytes(scenario.body_bytes())
    up = targets.start_upstreams(workdir, 1)
    try:
        target = targets.start_target("crabtrio", up, workdir)
        try:
            result = profile(args, scenario, target, up, body, py_spy)
        finally:
            target.stop()
    finally:
        up.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    args.out.write_text(result)
    print(result)
    return 0


def profile(
    args: argparse.Namespace,
    scenario: Scenario,
    target: targets.Running,
    up: targets.Upstreams,
    body: Path,
    py_spy: str,
) -> str:
    connections = scenario.connections
    request = target.request(scenario)
    url = f"http://127.0.0.1:{request.port}{scenario.path}"
    total_s = int(WARMUP_S + PLAIN_S + args.seconds + 3)
    loaded: list[object] = []
    load = threading.Thread(
        target=lambda: loaded.append(
            run_wrk(url, body, request.headers, connections=connections, seconds=total_s)
        ),
        daemon=True,
    )
    load.start()
    time.sleep(WARMUP_S - 1.0)
    pid = worker_pid(target.group(scenario))
    plain_cpu, plain_events = window(pid, up.paced_port, PLAIN_S)
    upstream_conns = established(up.paced_port)
    raw_path = Path(tempfile.mkstemp(suffix=".txt")[1])
    spy = [py_spy, "record", "--pid", str(pid), "--rate", str(args.rate)]
    spy += ["--duration", str(args.seconds), "--format", "raw", "--output", str(raw_path)]
    cpu0, streams0 = cpu_seconds([pid]), mock_requests(up.paced_port)
    done = subprocess.run(spy, capture_output=True, text=True, timeout=args.seconds + 60)
    spy_cpu = cpu_seconds([pid]) - cpu0
    spy_events = (mock_requests(up.paced_port) - streams0) * EVENTS_PER_STREAM
    load.join(total_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"py-spy failed: {done.stderr[-500:]}")
    raw = raw_path.read_text()
    if args.keep_raw:
        args.keep_raw.write_text(raw)
    raw_path.unlink()
    wrk = loaded[0] if loaded else None
    return render(
        args,
        scenario.name,
        connections,
        spy,
        raw,
        wrk,
        upstream_conns,
        [
            ("without the profiler", PLAIN_S, plain_cpu, plain_events),
            ("under py-spy", args.seconds, spy_cpu, spy_events),
        ],
    )


def render(
    args: argparse.Namespace,
    name: str,
    connections: int,
    spy: list[str],
    raw: str,
    wrk: object,
    upstream_conns: int,
    windows: list[tuple[str, float, float, int]],
) -> str:
    samples = summarise(raw)
    total, idle, by_group, by_frame = (
        samples.total,
        samples.idle,
        samples.by_group,
        samples.by_frame,
    )
    spy_shown = " ".join(["py-spy", spy[1], "--pid", "WORKER_PID", *spy[4:-1], "out.txt"])
    lines = [
        "# Where a paced stream event's CPU goes (crabtrio, one worker)",
        "",
        f"Generated by `.venv/bin/python bench/profile_stream.py --scenario {name} "
        f"--seconds {args.seconds} --rate {args.rate}` on {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"- load: wrk -t1 -c{connections} (scenario `{name}`): each stream is "
        f"{EVENTS_PER_STREAM} OpenAI-shaped events from the paced mock, one per 20 ms "
        '(50 events/s a stream), `"usage":null` on every chunk (crabtrio asks for usage)',
        f"- profiler: `{spy_shown}` (Python frames only, idle samples left out, blocking sampling)",
        f"- upstream connections in use during the load: {upstream_conns}",
        f"- wrk over the whole run: {wrk}",
        "",
        "| window | seconds | worker CPU s | events read | CPU µs per event | CPU use |",
        "|---|---|---|---|---|---|",
    ]
    for label, seconds, cpu, events in windows:
        per = f"{cpu / events * 1e6:.1f}" if events else "n/a"
        lines.append(
            f"| {label} | {seconds:.0f} | {cpu:.2f} | {events:,} | {per} | {cpu / seconds:.0%} |"
        )
    share = samples.in_relay / total if total else 0.0
    plain = windows[0]
    relay_us = share * plain[2] / plain[3] * 1e6 if plain[3] else 0.0
    lines += [
        "",
        "Events are counted at the mock (streams it started in the window x "
        f"{EVENTS_PER_STREAM}); a worker near 100% CPU is saturated, and its CPU per event "
        "then includes the cost of streams queuing.",
        "",
        f"Inside the per-event loop (`stream.relay` and everything it calls: reading, "
        f"decoding, watching, sending): {share:.1%} of the samples, so about "
        f"{relay_us:.1f} µs of each event's {plain[2] / plain[3] * 1e6 if plain[3] else 0:.1f}; "
        "the rest is each stream's request and response (parsing, routing, auth, the "
        "upstream request, the response head and end, the record) and trio's scheduling.",
        "",
        f"## Self time by group ({total:,} samples; {idle:,} of idle worker threads left out)",
        "",
        "| group | samples | share |",
        "|---|---|---|",
    ]
    for group in GROUPS:
        n = by_group.get(group, 0)
        lines.append(f"| {group} | {n:,} | {n / total:.1%} |" if total else f"| {group} | 0 | |")
    lines += [
        "",
        "## Top 25 frames by self time",
        "",
        "| # | frame | group | samples | share |",
        "|---|---|---|---|---|",
    ]
    for k, (frame, n) in enumerate(by_frame.most_common(25), 1):
        func, _, leaf = frame.rpartition(" (")
        group = group_of([(func, leaf.rstrip(")"))])
        lines.append(f"| {k} | `{frame}` | {group} | {n:,} | {n / total:.1%} |")
    lines += [
        "",
        "Groups are decided by the leaf frame's module: h11 frames called from hypercorn "
        "count as the ASGI send, other h11 frames and crabtrio's own HTTP client codec "
        "(upstream/http1.py, upstream/chunked.py) as the client's parsing, DirectBody "
        "(body_writer.py) as the send; time inside a C call (a socket send, orjson) shows as "
        "the Python frame that made it.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
