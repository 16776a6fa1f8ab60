"""Instructions per proxied chat request through the app, this checkout against a git ref.

    .venv/bin/python bench/instructions.py --baseline a178324

Timings on a shared 2-vCPU machine move by 2x between runs; instruction counts from
valgrind's callgrind do not (a few percent). Each side serves `--short` and then `--long`
chat requests in-process (the app's ASGI path with the Quart test client, a real
bench/mock_upstream.py over loopback, the audit log on); the difference of the two totals over
the difference in requests is the cost of one request, start-up excluded. The audit log is
off unless `--audit`: its timers fire per unit of wall time, and valgrind runs 50x slower.
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
body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
headers = {"authorization": "Bearer sk-a", "content-type": "application/json"}


async def main():
    app = create_app(config)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        for _ in range(int(os.environ["REQUESTS"])):
            response = await client.post("/v1/chat/completions", data=body, headers=headers)
            assert response.status_code == 200


try:
    trio.run(main)
finally:
    mock.terminate()
"""


def collected(code: Path | None, requests: int, audit: bool) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        env = {
            **os.environ,
            "PYTHONHASHSEED": "0",
            "REQUESTS": str(requests),
            "MOCK": str(BENCH / "mock_upstream.py"),
            "AUDIT": "true" if audit else "false",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="the git ref to compare with")
    parser.add_argument("--short", type=int, default=50)
    parser.add_argument("--long", type=int, default=250)
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
    with tempfile.TemporaryDirectory() as scratch:
        extract_crabtrio(args.baseline, Path(scratch) / "base")
        base = per_request(Path(scratch) / "base", args.short, args.long, args.audit)
    ours = per_request(None, args.short, args.long, args.audit)
    print("| code | instructions per chat request |")
    print("|---|---:|")
    print(f"| {args.baseline} | {base / 1e6:.3f} M |")
    print(f"| checkout | {ours / 1e6:.3f} M ({ours / base:.3f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
