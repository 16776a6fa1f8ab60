"""`python -m crabtrio verify [PATH]`: check the audit file's hash chain (see audit/verify).

Exit 0 with `ok: N records, M segments, chain head <digest>`, or 1 with the first break.
The chain key comes from $CRABTRIO_CHAIN_KEY, else the config (`--config`, or the gateway's
own discovery), whose `chain_old_keys` are tried where the current key does not link.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import cli
from .audit.verify import verify
from .config import ConfigError, load_config

PROG = "crabtrio verify"
KEY_ENV = "CRABTRIO_CHAIN_KEY"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crabtrio verify",
        description="Check the audit file's hash chain across every retained segment.",
    )
    parser.add_argument("path", nargs="?", help="the audit file (default: the config's)")
    parser.add_argument("--config", help="the gateway's config file (default: as the gateway)")
    args = parser.parse_args(argv)
    key = os.environ.get(KEY_ENV) or None
    old_keys: tuple[str, ...] = ()
    path = args.path
    if path is None or key is None or args.config:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            cli.fail(PROG, f"config error: {exc}")
            return 2
        path = path or config.audit.path
        key = key or config.audit.chain_key
        old_keys = config.audit.chain_old_keys
    if not os.path.exists(path):
        return cli.fail(PROG, f"{path}: no such audit file")
    started = time.perf_counter()
    try:
        report = verify(path, [key, *old_keys])
    except OSError as exc:
        return cli.fail(PROG, f"cannot read {path}: {exc.strerror or exc}")
    seconds = time.perf_counter() - started
    if report.broken is not None:
        print(f"break: {report.broken}")
        print(f"(verified {report.records} records before it)", file=sys.stderr)
        return 1
    print(f"ok: {report.records} records, {report.segments} segments, chain head {report.head}")
    notes = [f"{seconds:.2f}s, {'HMAC-SHA256' if key else 'SHA-256 (no chain key)'}"]
    if report.unchained:
        notes.append(f"{report.unchained} records from before the chain")
    if report.torn_tail:
        notes.append("a torn last line (a writer died mid-write; the next write cuts it)")
    print("; ".join(notes), file=sys.stderr)
    return 0
