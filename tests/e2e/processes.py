"""Run real server processes for end-to-end tests: started in their own process group,
watched line by line, and stopped by PID (SIGKILL to their own group as a last resort)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
HYPERCORN = str(Path(sys.executable).with_name("hypercorn"))


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Process:
    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: signal it without touching ours
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no line matching {pattern!r} in:\n" + "\n".join(self.lines)
                    )
                self._changed.wait(min(left, 0.1))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        """Ask politely, then insist: used by fixtures, so nothing outlives a test."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created: workers, trackers
        self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class MockUpstream(Process):
    def __init__(self, tmp: Path, *extra: str) -> None:
        script = str(ROOT / "bench" / "mock_upstream.py")
        super().__init__([PYTHON, script, "--port", "0", "--record", *extra], cwd=tmp)
        self.url = self.wait_for_line(r"listening on (http://\S+)").group(1)

    def requests(self) -> list[dict]:
        return httpx.get(f"{self.url}/_requests").json()


class Gateway(Process):
    def __init__(
        self,
        tmp: Path,
        config: str | None,
        *,
        graceful_timeout: float = 3,
        workers: int = 1,
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
        wait: bool = True,
    ) -> None:
        environment = {"CRABTRIO_CONFIG": ""}
        if config is not None:
            (tmp / "crabtrio-test.toml").write_text(config)
            environment["CRABTRIO_CONFIG"] = str(tmp / "crabtrio-test.toml")
        environment.update(env or {})
        args = [HYPERCORN, "crabtrio:app", "--worker-class", "trio", "--bind", "127.0.0.1:0"]
        args += [
            "--graceful-timeout",
            str(graceful_timeout),
            "--workers",
            str(workers),
            *extra_args,
        ]
        super().__init__(args, cwd=tmp, env=environment)
        self.tmp = tmp
        self.url = ""
        if wait:
            self.url = self.wait_for_line(r"Running on (http://[\d.:]+)").group(1)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"
