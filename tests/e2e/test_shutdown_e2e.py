"""Graceful shutdown: every acknowledged request is in the file, cut streams get one record."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from .conftest import gateway_config
from .processes import wait_until

pytestmark = pytest.mark.e2e

KEY = {"authorization": "Bearer sk-team-e2e"}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def load(url: str, acknowledged: list[str], stop: threading.Event, stream: bool) -> None:
    """Send requests on one keep-alive connection until the server goes away (bounded)."""
    body = {
        "model": "gpt-e2e",
        "messages": [],
        "stream": stream,
        "mock": {"delay_ms": 20, "chunks": 5},
    }
    if stream:
        body["mock"] = {"chunk_delay_ms": 5, "chunks": 5}
    with httpx.Client(timeout=10) as http:
        for _ in range(2000):
            if stop.is_set():
                return
            try:
                response = http.post(f"{url}/v1/chat/completions", json=body, headers=KEY)
            except httpx.HTTPError:
                return
            if response.status_code == 200 and (
                not stream or response.text.endswith("data: [DONE]\n\n")
            ):
                acknowledged.append(response.headers["x-request-id"])


@pytest.mark.parametrize("target", ["master", "group"])
def test_sigterm_drains_every_acknowledged_request(
    tmp_path, upstream, start_gateway, target
) -> None:
    audit = tmp_path / "audit.jsonl"
    gateway = start_gateway(gateway_config(upstream.url, audit), graceful_timeout=5)
    acknowledged: list[str] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=load, args=(gateway.url, acknowledged, stop, i % 2 == 0))
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(acknowledged) >= 100, 20, "100 acknowledged requests")
        if target == "master":
            gateway.signal(signal.SIGTERM)
        else:
            gateway.signal_group(signal.SIGTERM)  # as systemd and `docker stop` deliver it
        assert gateway.wait(30) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    counts = Counter(r["request_id"] for r in records(audit))
    assert all(count == 1 for count in counts.values()), "a request was recorded twice"
    missing = [rid for rid in acknowledged if rid not in counts]
    assert not missing, (
        f"{len(missing)} of {len(acknowledged)} acknowledged requests have no record"
    )


def test_stream_cut_by_the_end_of_the_graceful_window_gets_one_503_record(
    tmp_path, upstream, start_gateway
) -> None:
    audit = tmp_path / "audit.jsonl"
    gateway = start_gateway(gateway_config(upstream.url, audit), graceful_timeout=1)
    body = {
        "model": "gpt-e2e",
        "messages": [],
        "stream": True,
        "mock": {"chunks": 400, "chunk_delay_ms": 25},
    }
    received = b""
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=KEY, timeout=30
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = response.iter_bytes()
        received += next(chunks)
        gateway.signal(signal.SIGTERM)
        try:
            for chunk in chunks:
                received += chunk
        except httpx.HTTPError:
            pass  # the server cut the stream
    assert time.monotonic() - started < 8  # cut at the end of the window, not at the stream's end
    assert b"[DONE]" not in received
    assert gateway.wait(30) == 0
    (record,) = [r for r in records(audit) if r["request_id"] == request_id]
    assert record["status"] == 503 and record["stream"] is True
    assert len(records(audit)) == 1
