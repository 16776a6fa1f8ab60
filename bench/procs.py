"""Processes under test: start in their own group, stop by PID, and read their cost in /proc."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def child_json(args: list[str], code: Path, timeout: float) -> dict[str, Any]:
    """Run a bench script's child mode in a fresh process importing crabtrio from `code`
    (the run's snapshot); its last line of output is a JSON object."""
    done = subprocess.run(
        [sys.executable, *args],
        env={**os.environ, "PYTHONPATH": str(code)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def free_port() -> int:
    """A loopback port nobody listens on right now (the target binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """One started command, in a new session so that its group is ours alone to signal."""

    def __init__(
        self, args: list[str], *, log: Path, env: dict[str, str | None] | None = None, cwd: Path
    ) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=_environment(env or {}),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, tail: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_bytes()[-tail:].decode("utf-8", "replace")
        return ""

    def pids(self) -> list[int]:
        return group_pids(self.pid)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the leader (a graceful stop), then SIGKILL to the group we created."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # leftovers: workers, forked helpers
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log_file.close()


def _environment(changes: dict[str, str | None]) -> dict[str, str]:
    """Ours with `changes` applied; None removes a variable."""
    environ = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return environ


def group_pids(group: int) -> list[int]:
    """Processes whose process group is `group` (a session leader we started)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat_fields(int(entry))
        if stat is not None and int(stat[2]) == group:
            found.append(int(entry))
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (which may hold spaces): state is [0]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes so far."""
    total = 0
    for pid in pids:
        stat = _stat_fields(pid)
        if stat is not None:
            total += int(stat[11]) + int(stat[12])  # utime, stime
    return total / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def peak_rss_bytes(pid: int) -> int:
    """The most memory this process has held resident so far (VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class RssPeak:
    tree: int = 0  # the whole group at its largest
    process: int = 0  # the largest single process (a worker)


@dataclass
class RssSampler:
    """Samples a process group's resident memory in a thread while the block runs."""

    group: int
    interval: float = 0.05
    peak: RssPeak = field(default_factory=RssPeak)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        sizes = [rss_bytes(pid) for pid in group_pids(self.group)]
        if sizes:
            self.peak.tree = max(self.peak.tree, sum(sizes))
            self.peak.process = max(self.peak.process, max(sizes))


def wait_idle(
    pids: list[int], *, minimum: float = 0.0, busy_below: float = 0.05, limit: float = 15.0
) -> float:
    """Wait until these processes use under `busy_below` of a core for two windows in a row.

    Streams that wrk abandoned at the end of a run may still be relayed for a while; the
    next measurement must not pay for them.
    """
    window = 0.15
    start = time.perf_counter()
    time.sleep(minimum)
    quiet = 0
    before = cpu_seconds(pids)
    while quiet < 2 and time.perf_counter() - start < limit:
        time.sleep(window)
        after = cpu_seconds(pids)
        quiet = quiet + 1 if after - before < busy_below * window else 0
        before = after
    return time.perf_counter() - start
