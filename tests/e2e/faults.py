"""Helpers for fault tests: load that remembers acknowledgements, worker PIDs, a tiny disk."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

KEY = {"authorization": "Bearer sk-team-e2e"}


def audit_lines(directory: Path, stem: str = "audit") -> list[bytes]:
    """Every line of the active file and its rotated siblings, oldest file first."""
    files = [*sorted(directory.glob(f"{stem}-*.jsonl")), directory / f"{stem}.jsonl"]
    lines: list[bytes] = []
    for path in files:
        if path.exists():
            lines += [line for line in path.read_bytes().split(b"\n") if line]
    return lines


def parsed(lines: list[bytes]) -> list[dict]:
    return [json.loads(line) for line in lines]


@dataclass
class Load:
    """Threads sending chat requests (plain and streamed) until stopped; bounded in count."""

    url: str
    threads: int = 8
    per_thread: int = 3000
    acknowledged: dict[str, float] = field(default_factory=dict)  # request id -> when
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self, index: int) -> None:
        stream = index % 2 == 1
        body: dict = {"model": "gpt-e2e", "messages": [], "stream": stream, "mock": {"chunks": 3}}
        # Fresh connections now and then, so every hypercorn worker gets some of them.
        for _ in range(self.per_thread // 20):
            with httpx.Client(timeout=10) as http:
                for _ in range(20):
                    if self.stop.is_set():
                        return
                    try:
                        response = http.post(
                            f"{self.url}/v1/chat/completions", json=body, headers=KEY
                        )
                    except httpx.HTTPError:
                        continue
                    complete = response.status_code == 200 and (
                        not stream or response.text.endswith("data: [DONE]\n\n")
                    )
                    if complete:
                        with self._lock:
                            self.acknowledged[response.headers["x-request-id"]] = time.monotonic()

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run, args=(i,)) for i in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for worker in self._workers:
            worker.join(30)

    def count(self) -> int:
        with self._lock:
            return len(self.acknowledged)


def worker_pids(master: int) -> list[int]:
    """hypercorn's worker processes (its multiprocessing children, not the resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == master and b"spawn_main" in command:
            pids.append(int(entry.name))
    return sorted(pids)


@contextlib.contextmanager
def small_disk(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (skips the test where mounting is not allowed)."""
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Fill the filesystem holding `path`'s directory until it reports ENOSPC."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler
