"""The hash chain section of `make bench`: what the chain costs, and how fast it verifies.

Figures:
- the writer's records/s (AuditLogger, sync "interval", records queued as fast as they are
  taken) with the chain keyed (HMAC-SHA256), unkeyed (SHA-256), and without it (the file
  opened without a Chain: the writer of the commit before the chain), runs alternated;
- `verify` over a chained file of 1M records (200k with QUICK), records/s;
- chat throughput at c32 (builtin mock, one worker) against the commit before the chain
  (the parent of the commit that added crabtrio/audit/chain.py), runs alternated, when git
  can find it; and the chain's CPU per record as a share of a chat request's CPU.

`python bench/chain_bench.py [--quick]` runs this section alone.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import targets
from audit_bench import RECORD_FIELDS
from fleet_bench import chat_load, on_off
from procs import child_json
from targets import crabtrio_config

KEY = "bench-chain-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]


def _writer_main(directory: str, count: int) -> None:
    """Records/s of the whole writer per mode, alternated (PYTHONPATH: the snapshot)."""
    import trio

    from crabtrio.audit import writer
    from crabtrio.audit.chain import Chain
    from crabtrio.audit.record import AuditRecord
    from crabtrio.config import AuditConfig

    async def write(path: str, mode: str) -> float:
        # "off": the writer opens its file without a Chain, as before the chain existed.
        setattr(writer, "Chain", Chain if mode != "off" else (lambda key: None))  # noqa: B010
        config = AuditConfig(path=path, chain_key=KEY if mode == "keyed" else None)
        now = int(time.time() * 1000)
        start = time.perf_counter()
        async with writer.AuditLogger.open(config) as logger:
            for i in range(count):
                logger.record(AuditRecord(request_id=f"{i:032x}", timestamp=now, **RECORD_FIELDS))
                if i % 100 == 99:
                    await trio.sleep(0)
        return count / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {"off": [], "sha256": [], "keyed": []}
    for round_number in range(3):
        for mode in rates:
            path = str(Path(directory) / f"writer-{mode}-{round_number}.jsonl")
            rates[mode].append(trio.run(write, path, mode))
    print(json.dumps({mode: round(statistics.median(found)) for mode, found in rates.items()}))


def _verify_main(directory: str, count: int) -> None:
    """Write a chained (keyed) file of `count` records, then time verify over it."""
    from crabtrio.audit.chain import Chain
    from crabtrio.audit.record import AuditRecord, encode_batch
    from crabtrio.audit.store import AuditFile
    from crabtrio.audit.verify import verify

    path = str(Path(directory) / "verify.jsonl")
    file = AuditFile(path, Chain(KEY))
    now = int(time.time() * 1000)
    for start in range(0, count, 1000):
        batch = [
            AuditRecord(request_id=f"{i:032x}", timestamp=now + i, **RECORD_FIELDS)
            for i in range(start, min(count, start + 1000))
        ]
        file.append(encode_batch(batch))
    file.close()
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        report = verify(path, [KEY])
        runs.append(time.perf_counter() - started)
        assert report.ok and report.records == count, report.broken
    seconds = statistics.median(runs)
    print(json.dumps({"records": count, "seconds": round(seconds, 3)}))


def _before_chain() -> str | None:
    """The commit before the one that added the chain, if git knows it."""
    try:
        added = subprocess.run(
            ["git", "log", "--diff-filter=A", "--format=%H", "--", "crabtrio/audit/chain.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{added[-1]}^" if added else None


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    count = 30_000 if quick else 100_000
    writer = child_json([__file__, "writer", str(workdir), str(count)], workdir, timeout=600)
    checked = 200_000 if quick else 1_000_000
    verified = child_json([__file__, "verify", str(workdir), str(checked)], workdir, 1200)
    results: dict[str, Any] = {
        "records": checked,
        "writer_records_per_s": writer,
        "writer_cost_pct": round((1 - writer["keyed"] / writer["off"]) * 100, 1),
        "writer_cost_pct_sha256": round((1 - writer["sha256"] / writer["off"]) * 100, 1),
        "verify_records_per_s": round(verified["records"] / verified["seconds"]),
    }
    # The chain's CPU per record, from the writer's rates.
    chain_us = (1 / writer["keyed"] - 1 / writer["off"]) * 1e6
    results["chain_us_per_record"] = round(chain_us, 2)
    before = _before_chain()
    if before is not None:
        code = workdir / "before-chain"
        results["before_chain_commit"] = targets.extract_crabtrio(before, code)
        seconds, rounds = (5, 1) if quick else (10, 3)
        runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for number in range(rounds):
            for mode in ("off", "on"):
                audit = workdir / f"chain-{mode}-{number}" / "audit.jsonl"
                audit.parent.mkdir(parents=True, exist_ok=True)
                config = crabtrio_config(None, audit, builtin_mock=True)
                config = config.replace("[audit]\n", f'[audit]\nchain_key = "{KEY}"\n')
                runs[mode].append(
                    chat_load(
                        config,
                        workdir,
                        f"crabtrio-chain-{mode}",
                        seconds,
                        code=None if mode == "on" else code,
                    )
                )
        results["chat"] = on_off(runs)
        results["chain_share_pct"] = round(
            chain_us / (results["chat"]["cpu_ms_off"] * 1000) * 100, 2
        )
    print(
        f"  chain: writer {writer['off']:,} records/s without, {writer['sha256']:,} SHA-256, "
        f"{writer['keyed']:,} HMAC ({results['writer_cost_pct']}%); verify "
        f"{results['verify_records_per_s']:,} records/s over {checked:,}"
        + (
            f"; chat c32 {results['chat']['rps_on']:.0f} req/s with the chain, "
            f"{results['chat']['rps_off']:.0f} before it (cost {results['chat']['cost_pct']}%), "
            f"the chain's own CPU {results['chain_share_pct']}% of a chat request's"
            if "chat" in results
            else ""
        ),
        flush=True,
    )
    return results


def main() -> None:
    if sys.argv[1:2] == ["writer"]:
        _writer_main(sys.argv[2], int(sys.argv[3]))
        return
    if sys.argv[1:2] == ["verify"]:
        _verify_main(sys.argv[2], int(sys.argv[3]))
        return
    targets.run_alone("chain", run)


if __name__ == "__main__":
    main()
