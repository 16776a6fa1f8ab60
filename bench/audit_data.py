"""A large, realistic audit file for the audit benchmarks, and the naive scan to beat."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import orjson

FORMAT_VERSION = 1  # bump when the generated content changes, so caches are rebuilt
START_MS = 1_790_000_000_000  # fixed, so a cached file and its queries stay consistent
SPAN_MS = 30 * 24 * 3600 * 1000
KEYS = [f"team-{i:02d}" for i in range(50)]
MODELS = [
    *("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3-mini"),
    *("claude-sonnet", "claude-haiku", "llama-3.1-70b", "mistral-large", "text-embedding-3-small"),
]
PROVIDERS = ["openai", "azure", "groq"]
# Mostly successes; rejections and upstream failures at realistic rates.
STATUSES = [200] * 930 + [400] * 10 + [401] * 15 + [403] * 5 + [429] * 20 + [500] * 8 + [502] * 12
ERRORS = {
    400: "'model' is required and must be a string",
    401: "invalid virtual key",
    403: "key may not use this model",
    429: "upstream openai returned 429 (after retries and fallback)",
    500: "upstream openai returned 500",
    502: "cannot reach upstream openai: ConnectError",
}
# Key i is used in proportion to 1/(i+1): a few busy teams, a long tail of quiet ones.
KEY_WEIGHTS = [1 / (i + 1) for i in range(len(KEYS))]
MODEL_WEIGHTS = [30, 25, 10, 8, 5, 8, 5, 4, 3, 2]
RAREST_KEY = KEYS[-1]


def audit_file(cache_dir: Path, count: int) -> Path:
    """The cached file of `count` generated records, generated on first use."""
    path = cache_dir / f"audit-{count}-v{FORMAT_VERSION}.jsonl"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        generate(partial, count)
        os.replace(partial, path)
    return path


def generate(path: Path, count: int, seed: int = 3) -> None:
    """Write `count` records in timestamp order (ties in random order), 30 days of traffic."""
    rng = random.Random(seed)
    keys = rng.choices(KEYS, KEY_WEIGHTS, k=count)
    models = rng.choices(MODELS, MODEL_WEIGHTS, k=count)
    providers = rng.choices(PROVIDERS, [6, 3, 1], k=count)
    statuses = rng.choices(STATUSES, k=count)
    step = SPAN_MS / count
    with path.open("wb") as out:
        lines: list[str] = []
        for i in range(count):
            status = statuses[i]
            model = models[i]
            embed = model.startswith("text-embedding")
            prompt = rng.randrange(5, 4000)
            completion = 0 if embed else rng.randrange(1, 800)
            ok = status == 200
            line = (
                f'{{"request_id":"{rng.getrandbits(128):032x}",'
                f'"timestamp":{START_MS + int(i * step + rng.random() * step)},'
                f'"key_name":"{keys[i]}","model":"{model}","provider":"{providers[i]}",'
            )
            if ok:
                line += f'"prompt_tokens":{prompt},"completion_tokens":{completion},'
            line += (
                f'"cost_micros":{(prompt * 15 + completion * 60) // 100 if ok else 0},'
                f'"latency_ms":{rng.randrange(40, 9000)},"status":{status},'
                f'"stream":{"false" if embed or rng.random() < 0.4 else "true"},'
                f'"endpoint":"{"embeddings" if embed else "chat"}"'
            )
            if not ok:
                line += f',"error":"{ERRORS[status]}"'
            lines.append(line + "}\n")
            if len(lines) == 10_000:
                out.write("".join(lines).encode())
                lines.clear()
        out.write("".join(lines).encode())


_FIELDS = {"key": "key_name", "model": "model", "provider": "provider", "status": "status"}


def naive_query(
    path: Path,
    *,
    filters: dict[str, Any] | None = None,
    since: int | None = None,
    until: int | None = None,
    before: tuple[int, str] | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The seed's admin query: decode every record, filter, sort newest first, truncate."""
    wanted = [(_FIELDS[name], value) for name, value in (filters or {}).items()]
    found = []
    with path.open("rb") as lines:
        for line in lines:
            record = orjson.loads(line)
            ts = record["timestamp"]
            if since is not None and ts < since:
                continue
            if until is not None and ts > until:
                continue
            if before is not None and (ts, record["request_id"]) >= before:
                continue
            if all(record.get(name) == value for name, value in wanted):
                found.append(record)
    found.sort(key=lambda r: (r["timestamp"], r["request_id"]), reverse=True)
    return found[:limit]
