"""The admission section of `make bench`: what budgets and rate limits cost the request path.

Figures:
- chat throughput at c32 (builtin mock upstream, one worker) with the bench key carrying
  `rpm`, `tpm` and `max_budget_usd` (limits on every key; all high enough never to refuse)
  against the same key without them, the runs alternated, and the gateway's CPU per request;
- the checks' own CPU per request, timed in-process: the budget check, the rate-limit
  admission with its headers, and counting the request's tokens, against the shared file;
  and that as a share of the gateway's CPU per chat request (a figure without the run-to-run
  noise of throughput on this machine).

`python bench/admission_bench.py [--quick]` runs this section alone.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import targets
from fleet_bench import chat_load, on_off
from procs import child_json
from targets import CLIENT_KEY, crabtrio_config

LIMITS = "rpm = 1000000000\ntpm = 1000000000000\nmax_budget_usd = 1000000000\n"
CHECKS = 200_000


def limited_config(audit: Path) -> str:
    plain = crabtrio_config(None, audit, builtin_mock=True)
    line = f'key = "{CLIENT_KEY}"\n'
    assert line in plain
    return plain.replace(line, line + LIMITS)


def _checks_main(directory: str) -> None:
    """CPU per request of the admission steps, in a fresh process (PYTHONPATH: the snapshot)."""
    from crabtrio.budgets import Spend
    from crabtrio.config import KeyConfig
    from crabtrio.limits import Windows

    key = KeyConfig(name="bench", key=CLIENT_KEY, rpm=10**9, tpm=10**12, max_budget_usd=10.0**9)
    windows = Windows.open(str(Path(directory) / "bench.limits"), lambda since: [])
    spend = Spend()
    spend.start([], [key])
    for _ in range(1000):  # warm up
        windows.admit(key)
    start = time.process_time()
    for _ in range(CHECKS):
        spend.over_budget(key)
        windows.admit(key)
        windows.count_tokens(key.name, 120)
    per_request = (time.process_time() - start) / CHECKS
    windows.close()
    print(json.dumps({"us_per_request": round(per_request * 1e6, 2)}))


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    seconds = 5 if quick else 10
    rounds = 1 if quick else 3
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for number in range(rounds):
        for mode in ("off", "on"):
            audit = workdir / f"admission-{mode}-{number}" / "audit.jsonl"
            audit.parent.mkdir(parents=True, exist_ok=True)
            config = (
                limited_config(audit)
                if mode == "on"
                else crabtrio_config(None, audit, builtin_mock=True)
            )
            runs[mode].append(chat_load(config, workdir, f"crabtrio-admission-{mode}", seconds))
    checks = child_json([__file__, "checks", str(workdir)], workdir, timeout=300)
    results = on_off(runs)
    on, off, cpu_on, cpu_off = (
        results[k] for k in ("rps_on", "rps_off", "cpu_ms_on", "cpu_ms_off")
    )
    results |= {
        "records": CHECKS,
        "checks_us_per_request": checks["us_per_request"],
        "checks_share_pct": round(checks["us_per_request"] / (cpu_off * 1000) * 100, 2),
    }
    print(
        f"  admission: chat c32 {on:.0f} req/s with rpm, tpm and a budget on the key, "
        f"{off:.0f} without (cost {results['cost_pct']}%); gateway CPU per request "
        f"{cpu_on:.3f} ms against {cpu_off:.3f} ms ({results['cpu_cost_pct']:+}%); the checks "
        f"alone {checks['us_per_request']} µs per request = {results['checks_share_pct']}% "
        "of a chat request's CPU",
        flush=True,
    )
    return results


def main() -> None:
    if sys.argv[1:2] == ["checks"]:
        _checks_main(sys.argv[2])
        return
    targets.run_alone("admission", run)


if __name__ == "__main__":
    main()
