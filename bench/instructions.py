"""Instructions per proxied chat request (or relayed stream event), checkout against a git ref.

    .venv/bin/python bench/instructions.py --baseline a178324
    .venv/bin/python bench/instructions.py --baseline a178324 --stream

Timings on a shared 2-vCPU machine move by 2x between runs; instruction counts from valgrind's
callgrind do not (a few percent for requests; for `--stream`, up to ~20%: paced events coalesce
into fewer reads in some runs under valgrind's slowdown). Each side serves `--short` and then
`--long` chat requests in-process (the app's ASGI path with the Quart test client, a real
bench/mock_upstream.py over loopback); the difference of the two totals over the difference in
requests is the cost of one request, start-up excluded. `--stream` serves `--streams` streams of
10 and then of 50 events, paced 20 ms apart as a model would send them (each event its own
read): the difference over the 40 extra events of each stream is the cost of one event. The
audit log is off unless `--audit`: its timers fire per unit of wall time, and valgrind runs 50x
slower.
Needs valgrind (Debian's package).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from targets import extract_crabtrio

BENCH = Path(__file__).resolve().parent

# Runs inside valgrind: PYTHONPATH picks which crabtrio is imported.
SERVE = r"""
import os, re, subprocess, sys, tempfile
import orjson, trio
from crabtrio import create_app
from crabtrio.config import parse_config

mock = subprocess.Popen(
    [sys.executable, os.environ["MOCK"], "--port", "0"], stdout=subprocess.PIPE, text=True
)
url = re.search(r"listening on (http://\S+)", mock.stdout.readline()).group(1)
audit = os.path.join(tempfile.mkdtemp(), "audit.jsonl")
config = parse_config(
    f'[providers.p]\nbase_url = "{url}/v1"\napi_key = "sk-x"\nmodels = ["gpt-4o-mini"]\n'
    f'[[keys]]\nname = "a"\nkey = "sk-a"\n[audit]\npath = "{audit}"\n'
    f'enabled = {os.environ["AUDIT"]}\n'
)
body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
if os.environ["EVENTS"] != "0":
    body.update(stream=True, mock={"chunks": int(os.environ["EVENTS"]), "chunk_delay_ms": 20})
body = orjson.dumps(body)
headers = {"authorization": "Bearer sk-a", "content-type": "application/json"}


# Streams are read by a client in its own process (not counted) through hypercorn: the Quart
# test client cannot take a stream that the app relays as it arrives.
CLIENT = '''
import http.client, os, sys, time
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for attempt in range(600):
    try:
        conn.connect()
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
for _ in range(int(os.environ["REQUESTS"])):
    conn.request("POST", "/v1/chat/completions", sys.argv[2].encode(), {
        "authorization": "Bearer sk-a", "content-type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    assert response.status == 200 and data.count(b"data: ") > int(os.environ["EVENTS"]), data
'''


async def main():
    app = create_app(config)
    if os.environ["EVENTS"] != "0":
        await serve_streams(app)
        return
    async with app.test_app() as test_app:
        client = test_app.test_client()
        for _ in range(int(os.environ["REQUESTS"])):
            response = await client.post("/v1/chat/completions", data=body, headers=headers)
            assert response.status_code == 200


async def serve_streams(app):
    import socket
    from hypercorn.config import Config
    from hypercorn.trio import serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Config()
    server.bind = [f"127.0.0.1:{port}"]
    done = trio.Event()

    async def drive():
        try:
            await trio.run_process([sys.executable, "-c", CLIENT, str(port), body.decode()])
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drive)
        await serve(app, server, shutdown_trigger=done.wait)


try:
    trio.run(main)
finally:
    mock.terminate()
"""


def collected(code: Path | None, requests: int, audit: bool, events: int = 0) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        env = {
            **os.environ,
            "PYTHONHASHSEED": "0",
            "REQUESTS": str(requests),
            "MOCK": str(BENCH / "mock_upstream.py"),
            "AUDIT": "true" if audit else "false",
            "EVENTS": str(events),
        }
        if code is not None:
            env["PYTHONPATH"] = str(code)
        out = Path(scratch) / "callgrind.out"
        run = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                SERVE,
            ],
            env=env,
            cwd=scratch,  # not the checkout: `python -c` puts the cwd first on sys.path
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.search(r"Collected : (\d+)", run.stderr)
    if found is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def per_request(code: Path | None, short: int, long: int, audit: bool) -> float:
    return (collected(code, long, audit) - collected(code, short, audit)) / (long - short)


def per_event(code: Path | None, streams: int, audit: bool) -> float:
    few, many = 10, 50
    extra = collected(code, streams, audit, many) - collected(code, streams, audit, few)
    return extra / (streams * (many - few))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="the git ref to compare with")
    parser.add_argument("--short", type=int, default=50)
    parser.add_argument("--long", type=int, default=250)
    parser.add_argument(
        "--stream", action="store_true", help="instructions per relayed stream event instead"
    )
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument(
        "--audit",
        action="store_true",
        help="audit log on: its timed background work (50 ms linger, 200 ms polls) runs 50x"
        " more often per request under valgrind, which makes the counts vary by ~20%%",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("bench/instructions.py needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 2

    def measure(code: Path | None) -> float:
        if args.stream:
            return per_event(code, args.streams, args.audit)
        return per_request(code, args.short, args.long, args.audit)

    with tempfile.TemporaryDirectory() as scratch:
        extract_crabtrio(args.baseline, Path(scratch) / "base")
        base = measure(Path(scratch) / "base")
    ours = measure(None)
    what = "relayed stream event" if args.stream else "chat request"
    print(f"| code | instructions per {what} |")
    print("|---|---:|")
    scale, unit = (1e3, "k") if args.stream else (1e6, "M")
    print(f"| {args.baseline} | {base / scale:.3f} {unit} |")
    print(f"| checkout | {ours / scale:.3f} {unit} ({ours / base:.3f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
