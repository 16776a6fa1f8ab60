"""Load from wrk: install it if missing, run it with a Lua POST script, parse its summary."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA_POST = Path(__file__).resolve().parent / "lua" / "post.lua"


class WrkMissing(Exception):
    pass


def ensure_wrk() -> str:
    """The wrk executable; installs Debian's package when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk is not installed; installing it with apt-get (Debian package 'wrk')...", flush=True)
    apt = shutil.which("apt-get")
    if apt is not None:
        for args in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "wrk"]):
            done = subprocess.run(args, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                break
    found = shutil.which("wrk")
    if found:
        return found
    raise WrkMissing(
        "wrk is required and could not be installed automatically; install it with "
        "`sudo apt-get install -y wrk` (or build it from source) and run again"
    )


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    errors_socket: int  # connect, read, write and timeout errors
    errors_status: int  # answers with a status of 400 or more
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.errors_socket + self.errors_status


def run_wrk(
    url: str,
    body_file: Path,
    headers: dict[str, str],
    *,
    connections: int,
    seconds: int,
    threads: int = 1,
    timeout_s: int = 10,
) -> WrkResult:
    """One bounded wrk run; raises RuntimeError when wrk fails or prints no summary."""
    args = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={timeout_s}s",
        "--latency",
        "-s",
        str(LUA_POST),
        url,
        "--",
        str(body_file),
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            raw = json.loads(line[len("WRK_JSON ") :])
            return WrkResult(
                requests=raw["requests"],
                seconds=raw["duration_us"] / 1e6,
                errors_socket=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
                errors_status=raw["status"],
                p50_ms=raw["p50_us"] / 1000,
                p90_ms=raw["p90_us"] / 1000,
                p99_ms=raw["p99_us"] / 1000,
            )
    raise RuntimeError(f"wrk failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
