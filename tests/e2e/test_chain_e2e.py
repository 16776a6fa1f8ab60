"""The hash chain as users run the gateway: `python -m crabtrio --workers 2` under concurrent
load writes one chain that `python -m crabtrio verify` accepts and GET /v1/admin/chain pins; a
gateway killed under load leaves a torn tail that the restart cuts and links past; the chain
key is never shown."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from crabtrio.audit.verify import verify

from .conftest import gateway_config
from .faults import worker_pids
from .processes import PYTHON, Process, wait_until

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": "Bearer adm-e2e-token"}
TEAM = {"authorization": "Bearer sk-team-e2e"}
CHAT = {"model": "gpt-e2e", "messages": [{"role": "user", "content": "hi"}]}
# Each answer's worker and request id, from hypercorn's access log.
ACCESS_LOG = ("--access-logfile", "-", "--access-logformat", "access %(p)s %({x-request-id}o)s")
ACCESS = re.compile(r"access <(\d+)> ([0-9a-f]{32})$")
REQUESTS = 200


@contextlib.contextmanager
def launched(tmp_path: Path, config: Path, env: dict[str, str]) -> Iterator[Process]:
    """`python -m crabtrio --workers 2`, as a user starts it, once both workers serve."""
    command = [PYTHON, "-m", "crabtrio", "--bind", "127.0.0.1:0", "--workers", "2"]
    command += ["--graceful-timeout", "3", *ACCESS_LOG]
    process = Process(command, cwd=tmp_path, env={"CRABTRIO_CONFIG": str(config), **env})
    try:
        wait_until(lambda: process.output.count("Running on") == 2, 20, "two workers serving")
        assert len(worker_pids(process.proc.pid)) == 2
        yield process
    finally:
        process.stop()


def url_of(gateway: Process) -> str:
    return gateway.wait_for_line(r"Running on (http://[\d.:]+)").group(1)


def fresh_client() -> httpx.Client:
    # No kept-alive connections: each request connects anew, so both workers take some.
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=20)


def chat(client: httpx.Client, url: str) -> str:
    """One chat completion; its request id."""
    answer = client.post(f"{url}/v1/chat/completions", json=CHAT, headers=TEAM)
    assert answer.status_code == 200, answer.text
    return answer.headers["x-request-id"]


def records(audit: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in audit.read_bytes().splitlines()]


def cli_verify(tmp_path: Path, *args: str, key: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRABTRIO_CHAIN_KEY": key, "CRABTRIO_CONFIG": ""}
    command = [PYTHON, "-m", "crabtrio", "verify", *args]
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def startup_head(gateway: Process, seq: int, head: str) -> None:
    """Both workers' startup lines name where the chain stands."""
    line = re.escape(f"hash chain (HMAC-SHA256) at seq {seq}, head {head}")
    gateway.wait_for_line(line, timeout=5)
    assert len(re.findall(line, gateway.output)) == 2, gateway.output


def test_two_workers_under_load_write_one_chain_that_verify_and_the_admin_route_agree_on(
    tmp_path, upstream
) -> None:
    key = f"e2e-chain-key-{secrets.token_hex(8)}"
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "gateway.toml"
    extra = 'sync = "always"\nchain_key = "${CRABTRIO_CHAIN_KEY}"'
    config.write_text(gateway_config(upstream.url, audit, audit_extra=extra))
    with launched(tmp_path, config, {"CRABTRIO_CHAIN_KEY": key}) as gateway:
        url = url_of(gateway)
        workers = {str(pid) for pid in worker_pids(gateway.proc.pid)}
        startup_head(gateway, 0, "0" * 64)
        with fresh_client() as client, ThreadPoolExecutor(8) as pool:
            acknowledged = list(pool.map(lambda _: chat(client, url), range(REQUESTS)))
            # sync = "always": every answered request's record is in the file by now.
            answers = [client.get(f"{url}/v1/admin/chain", headers=ADMIN) for _ in range(4)]
            health = client.get(f"{url}/health")
        served: dict[str, str] = {}

        def every_answer_logged() -> bool:
            for line in gateway.output.splitlines():
                if (match := ACCESS.search(line)) is not None:
                    served[match.group(2)] = match.group(1)
            return set(acknowledged) <= served.keys()

        wait_until(every_answer_logged, 10, "the access log line of every answer")
        report = verify(str(audit), [key])
        cli = cli_verify(tmp_path, str(audit), key=key)
        gateway.signal(signal.SIGTERM)
        assert gateway.wait(30) == 0, gateway.output

    assert report.ok, report.broken
    assert (report.records, report.segments, report.torn_tail) == (REQUESTS, 1, False)
    written = records(audit)
    assert [r["seq"] for r in written] == list(range(1, REQUESTS + 1))
    assert sorted(r["request_id"] for r in written) == sorted(acknowledged)
    # Each worker writes the records of the requests it answered: both wrote into one chain.
    writers = [served[str(r["request_id"])] for r in written]
    assert set(writers) == workers, f"one worker answered everything: {set(writers)}"
    switches = sum(a != b for a, b in itertools.pairwise(writers))
    assert switches >= 2, "the workers' records did not interleave"  # (typically ~80 times)
    for answer in answers:  # fresh connections: from both workers, as likely as not
        assert answer.status_code == 200
        assert answer.json() == {"head": report.head, "seq": REQUESTS, "records": REQUESTS}
    assert (cli.returncode, cli.stdout) == (
        0,
        f"ok: {REQUESTS} records, 1 segments, chain head {report.head}\n",
    )
    assert health.status_code == 200
    shown = [gateway.output, health.text, cli.stdout, cli.stderr, audit.read_text()]
    shown += [answer.text for answer in answers]
    assert not [text for text in shown if key in text]


def test_a_gateway_killed_under_load_leaves_a_torn_tail_the_restart_cuts_and_links_past(
    tmp_path, upstream
) -> None:
    key = f"e2e-config-chain-key-{secrets.token_hex(8)}"  # in the config file itself
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "gateway.toml"
    extra = f'sync = "always"\nchain_key = "{key}"'
    config.write_text(gateway_config(upstream.url, audit, audit_extra=extra))
    acknowledged: list[str] = []
    enough = threading.Event()
    stop = threading.Event()

    def load(url: str) -> None:
        """Chat until told to stop (at most 100 requests); a killed gateway ends it."""
        with fresh_client() as client:
            for _ in range(100):
                if stop.is_set():
                    return
                try:
                    acknowledged.append(chat(client, url))
                except httpx.TransportError:
                    return
                if len(acknowledged) >= 60:
                    enough.set()

    with launched(tmp_path, config, {}) as gateway:
        url = url_of(gateway)
        with ThreadPoolExecutor(6) as pool:
            for _ in range(6):
                pool.submit(load, url)
            try:
                assert enough.wait(20), "60 answered requests"
                gateway.signal_group(signal.SIGKILL)  # master and workers, requests in flight
                assert gateway.wait(10) == -signal.SIGKILL
            finally:
                stop.set()
        killed_output = gateway.output

    written = records(audit)
    assert {r["request_id"] for r in written} >= set(acknowledged)
    whole = audit.read_bytes()
    with open(audit, "ab") as file:  # what a writer killed in the middle of its write leaves
        file.write(whole.splitlines(keepends=True)[-1][:90])
    before = verify(str(audit), [key])
    assert before.ok and before.torn_tail, before.broken
    assert before.records == len(written)
    seq = len(written)

    with launched(tmp_path, config, {}) as gateway:
        url = url_of(gateway)
        startup_head(gateway, seq, before.head)  # the torn tail is no record
        assert re.search(r"cut a torn trailing line of 90 bytes", gateway.output)
        with fresh_client() as client:
            after_restart = [chat(client, url) for _ in range(10)]
            chain = client.get(f"{url}/v1/admin/chain", headers=ADMIN).json()
            health = client.get(f"{url}/health")
        gateway.signal(signal.SIGTERM)
        assert gateway.wait(30) == 0, gateway.output

    assert audit.read_bytes().startswith(whole)
    everything = records(audit)
    assert [r["seq"] for r in everything] == list(range(1, seq + 11))
    assert [r["request_id"] for r in everything[seq:]] == after_restart
    cli = cli_verify(tmp_path, "--config", str(config))  # the key from the config
    after = verify(str(audit), [key])
    assert after.ok and not after.torn_tail, after.broken
    assert chain == {"head": after.head, "seq": seq + 10, "records": seq + 10}
    assert (cli.returncode, cli.stdout) == (
        0,
        f"ok: {seq + 10} records, 1 segments, chain head {after.head}\n",
    )
    shown = [killed_output, gateway.output, health.text, cli.stdout, cli.stderr]
    shown += [path.read_text() for path in tmp_path.glob("audit.jsonl*")]
    assert not [text for text in shown if key in text]
