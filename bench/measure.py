"""Measure one started target: every scenario under wrk, then latency at one connection."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from http_probe import Request, StreamTiming, chat_ended, probe_streams, send
from procs import RssSampler, cpu_seconds, group_pids, wait_idle
from scenarios import Scenario
from targets import Running
from wrk import run_wrk

MB = 1024 * 1024
# The `type` of the last event of a complete stream (chat's streams end with `data: [DONE]`).
LAST_EVENT = {"responses": "response.completed", "messages": "message_stop"}
# A field of every good JSON answer, and its value.
REPLY_KIND = {"responses": ("object", "response"), "messages": ("type", "message")}


@dataclass(frozen=True, slots=True)
class Durations:
    load_s: int  # each wrk run under load
    single_s: int  # the one-connection latency runs
    single_streams: int  # streams timed one after another at one connection


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _ms(values: list[float], q: float) -> float | None:
    return round(percentile(values, q) * 1000, 3) if values else None


def _ended(api: str) -> Callable[[bytes], bool]:
    """How the last `data:` line of a stream of `api` shows that the stream is complete."""
    if api not in LAST_EVENT:
        return chat_ended

    def ended(last_data: bytes) -> bool:
        try:
            event = json.loads(last_data[len(b"data:") :])
        except ValueError:
            return False
        return isinstance(event, dict) and event.get("type") == LAST_EVENT[api]

    return ended


def stream_probe(
    request: Request, api: str, *, count: int, until: float | None = None, timeout: float = 30.0
) -> list[StreamTiming]:
    """http_probe.probe_streams for the streams of any API."""
    return probe_streams(request, count=count, until=until, timeout=timeout, ended=_ended(api))


def _reply_problem(api: str, body: bytes) -> str | None:
    """What is wrong with a 200 answer of the Responses or Messages API (None: nothing)."""
    if api not in REPLY_KIND:
        return None
    field, value = REPLY_KIND[api]
    try:
        reply = json.loads(body)
        usage = reply["usage"]
        good = reply[field] == value and all(
            isinstance(usage[name], int) for name in ("input_tokens", "output_tokens")
        )
    except (ValueError, KeyError, TypeError):
        good = False
    return None if good else f"not a {api} answer with usage: {body[:160]!r}"


def smoke(target: Running, scenario: Scenario) -> str | None:
    """None when one request of this scenario gets a good answer, else what went wrong."""
    request = target.request(scenario)
    try:
        if scenario.stream:
            timing = stream_probe(request, scenario.api, count=1)[0]
            end = LAST_EVENT.get(scenario.api, "[DONE]")
            return None if timing.ok else f"the stream did not answer 200 and end with {end}"
        reply = send(request)
    except OSError as exc:
        return f"no answer ({exc})"
    if reply.status != 200:
        return f"status {reply.status}: {reply.body[:160].decode('utf-8', 'replace')}"
    return _reply_problem(scenario.api, reply.body)


def load(target: Running, scenario: Scenario, body_file: Path, seconds: int) -> dict[str, Any]:
    """One wrk run with CPU and RSS of the target's processes (and, for streams, a TTFE probe)."""
    request = target.request(scenario)
    group = target.group(scenario)
    url = f"http://127.0.0.1:{request.port}{scenario.path}"
    probes: list[StreamTiming] = []
    probe_thread = None
    if scenario.stream:
        # A one-connection probe beside the load: time to first event while the target is busy.
        until = time.perf_counter() + seconds
        probe_thread = threading.Thread(
            target=lambda: probes.extend(
                stream_probe(request, scenario.api, count=100_000, until=until)
            ),
            daemon=True,
        )
    pids_before = group_pids(group)
    cpu_before = cpu_seconds(pids_before)
    with RssSampler(group) as rss:
        if probe_thread is not None:
            probe_thread.start()
        result = run_wrk(
            url, body_file, request.headers, connections=scenario.connections, seconds=seconds
        )
        if probe_thread is not None:
            probe_thread.join(seconds + 30)
    cpu_after = cpu_seconds(sorted(set(pids_before) | set(group_pids(group))))
    first_events = [p.first_event for p in probes if p.ok]
    served = result.requests + len(first_events)
    # A sluggish target may finish nothing within the run: then there is no latency to show.
    done = result.requests > 0
    # A paced stream lasts about half a second: let the abandoned ones end first.
    settle = wait_idle(group_pids(group), minimum=0.6 if scenario.paced else 0.0)
    return {
        "rps": round(result.rps, 1),
        "requests": result.requests,
        "seconds": round(result.seconds, 3),
        "p50_ms": result.p50_ms if done else None,
        "p90_ms": result.p90_ms if done else None,
        "p99_ms": result.p99_ms if done else None,
        "errors": result.errors + sum(1 for p in probes if not p.ok),
        "errors_socket": result.errors_socket,
        "errors_status": result.errors_status,
        "cpu_ms_per_request": round((cpu_after - cpu_before) * 1000 / served, 4) if done else None,
        "rss_tree_mb": round(rss.peak.tree / MB, 1),
        "rss_process_mb": round(rss.peak.process / MB, 1),
        "ttfe_load_p50_ms": _ms(first_events, 50),
        "ttfe_load_p99_ms": _ms(first_events, 99),
        "settle_s": round(settle, 2),
    }


def single_connection(
    target: Running, chat: Scenario, stream: Scenario, body_file: Path, d: Durations
) -> dict[str, Any]:
    """Latency with nothing else in flight: what the gateway adds to each request."""
    request = target.request(chat)
    url = f"http://127.0.0.1:{request.port}{chat.path}"
    result = run_wrk(url, body_file, request.headers, connections=1, seconds=d.single_s)
    until = time.perf_counter() + d.single_s
    timings = probe_streams(target.request(stream), count=d.single_streams, until=until)
    good = [t for t in timings if t.ok]
    return {
        "chat_p50_ms": result.p50_ms,
        "chat_p90_ms": result.p90_ms,
        "chat_p99_ms": result.p99_ms,
        "chat_rps": round(result.rps, 1),
        "chat_errors": result.errors,
        "ttfe_p50_ms": _ms([t.first_event for t in good], 50),
        "ttfe_p99_ms": _ms([t.first_event for t in good], 99),
        "stream_total_p50_ms": _ms([t.total for t in good], 50),
        "stream_errors": len(timings) - len(good),
        "streams_timed": len(timings),
    }
