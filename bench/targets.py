"""The targets under load: the mock upstreams, crabtrio's variants and the peer gateways."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peers
from http_probe import Request, wait_ready
from procs import Process, free_port
from scenarios import (
    CHAT_MODEL,
    CLAUDE_MODEL,
    EMBED_MODEL,
    PACE_MS,
    PACED_MODEL,
    STREAM_CHUNKS,
    STREAM_MODELS,
    VARIANTS,
    Scenario,
)

BENCH = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
MOCK_SCRIPT = BENCH / "mock_upstream.py"
CLIENT_KEY = "sk-bench-client"  # the virtual key (crabtrio) or master key (LiteLLM)
UPSTREAM_KEY = "sk-bench-upstream"
ADMIN_TOKEN = "bench-admin-token"
STARTUP_TIMEOUT_S = {"litellm": 180.0}
DEFAULT_STARTUP_TIMEOUT_S = 60.0
READY_PROBE = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "ready?"}]}
ANTHROPIC_VERSION = "2023-06-01"  # what the official anthropic SDK sends
# The messages scenarios' provider: the fast mock again, spoken to as Anthropic's API. Only
# for a crabtrio that knows the kind (see serves_anthropic): an older one refuses the config.
ANTHROPIC_PROVIDER = """
[providers.anthropic]
kind = "anthropic"
base_url = "http://127.0.0.1:{port}/v1"
api_key = "{key}"
models = ["{model}"]
"""
# Anthropic's list prices for the model (USD per million tokens), cache reads and writes apart.
ANTHROPIC_PRICING = """
[pricing.{model}]
prompt_cost_per_million = 3.00
completion_cost_per_million = 15.00
cache_read_cost_per_million = 0.30
cache_creation_cost_per_million = 3.75
"""
# Where the crabtrio under test is imported from (see snapshot_crabtrio); None: the checkout.
_crabtrio_path: Path | None = None
# Where `crabtrio-baseline` (an earlier commit, `--baseline REF`) is imported from.
_baseline_path: Path | None = None


def extract_crabtrio(ref: str, dest: Path) -> str:
    """Extract the crabtrio package of git `ref` into `dest` (made here); return the commit
    it resolved to. Imported with `dest` first on PYTHONPATH, it runs on the checkout's venv."""
    root = BENCH.parent
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{ref}^{{commit}}"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", commit, "crabtrio"], cwd=root, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def snapshot_baseline(ref: str, dest: Path) -> str:
    """`ref`'s crabtrio for the `crabtrio-baseline` target; returns its commit."""
    global _baseline_path
    commit = extract_crabtrio(ref, dest)
    _baseline_path = dest
    return commit


def run_alone(prefix: str, run: Callable[[Path, bool], dict[str, Any]]) -> None:
    """A section of `make bench` on its own (`python bench/<section>.py [--quick]`): `run`
    over a fresh snapshot in a temporary workdir, its figures printed as JSON."""
    workdir = Path(tempfile.mkdtemp(prefix=f"crabtrio-{prefix}-bench-"))
    try:
        snapshot_crabtrio(workdir)
        print(json.dumps(run(workdir, "--quick" in sys.argv), indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def snapshot_crabtrio(dest: Path) -> str:
    """Copy the crabtrio package now, so every round runs the same code even if the
    checkout is edited meanwhile; returns a digest of what was copied."""
    global _crabtrio_path
    source = BENCH.parent / "crabtrio"
    shutil.copytree(source, dest / "crabtrio", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for path in sorted((dest / "crabtrio").rglob("*.py")):
        digest.update(path.relative_to(dest).as_posix().encode() + b"\0" + path.read_bytes())
    _crabtrio_path = dest
    return digest.hexdigest()[:12]


@dataclass
class Upstreams:
    """The mock upstreams of one round: fast for most scenarios, paced for the paced ones."""

    fast: Process
    fast_port: int
    fast_startup_s: float
    paced: Process
    paced_port: int

    def stop(self) -> None:
        self.fast.stop()
        self.paced.stop()


def start_mock(workdir: Path, name: str, *extra: str) -> tuple[Process, int, float]:
    port = free_port()
    args = [sys.executable, str(MOCK_SCRIPT), "--port", str(port), *extra]
    process = Process(args, log=workdir / f"{name}.log", cwd=workdir)
    request = Request(port, "/v1/chat/completions", _json(READY_PROBE), {})
    try:
        startup = wait_ready(request, process.started, DEFAULT_STARTUP_TIMEOUT_S, process.alive)
    except RuntimeError as exc:
        process.stop()
        raise RuntimeError(f"mock upstream {exc}; log tail:\n{process.output(1500)}") from None
    return process, port, startup


def start_upstreams(workdir: Path, mock_procs: int) -> Upstreams:
    chunks = ["--chunks", str(STREAM_CHUNKS)]
    variants = [f"--variant={v}" for v in VARIANTS]
    fast, fast_port, startup = start_mock(
        workdir, "mock-fast", *chunks, *variants, "--procs", str(mock_procs)
    )
    try:
        paced, paced_port, _ = start_mock(
            workdir, "mock-paced", *chunks, "--delay-ms", str(PACE_MS), "--procs", str(mock_procs)
        )
    except BaseException:
        fast.stop()
        raise
    return Upstreams(fast, fast_port, startup, paced, paced_port)


@dataclass
class Running:
    """A started target: where each scenario's requests go, and whose processes to watch."""

    name: str
    port: int
    startup_s: float
    process: Process | None  # None for `direct` (the round's upstreams are its processes)
    headers: Callable[[Scenario], dict[str, str]]
    route: Callable[[Scenario], tuple[int, int]]  # (port, process group to measure)

    def request(self, scenario: Scenario) -> Request:
        port, _ = self.route(scenario)
        return Request(port, scenario.path, scenario.body_bytes(), self.headers(scenario))

    def group(self, scenario: Scenario) -> int:
        return self.route(scenario)[1]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _launch(
    name: str,
    args: list[str],
    workdir: Path,
    port: int,
    headers: dict[str, str],
    **env: str | None,
) -> tuple[Process, float]:
    process = Process(args, log=workdir / f"{name}.log", env=env, cwd=workdir)
    request = Request(port, "/v1/chat/completions", _json(READY_PROBE), headers)
    timeout = STARTUP_TIMEOUT_S.get(name, DEFAULT_STARTUP_TIMEOUT_S)
    try:
        startup = wait_ready(request, process.started, timeout, process.alive)
    except RuntimeError as exc:
        process.stop()
        raise RuntimeError(f"{name} {exc}; log tail:\n{process.output(1500)}") from None
    return process, startup


def start_direct(up: Upstreams, workdir: Path) -> Running:
    def route(scenario: Scenario) -> tuple[int, int]:
        if scenario.paced:
            return up.paced_port, up.paced.pid
        return up.fast_port, up.fast.pid

    return Running("direct", up.fast_port, up.fast_startup_s, None, lambda s: {}, route)


def _anthropic_sections(port: int) -> str:
    provider = ANTHROPIC_PROVIDER.format(port=port, key=UPSTREAM_KEY, model=CLAUDE_MODEL)
    return provider + ANTHROPIC_PRICING.format(model=CLAUDE_MODEL)


@functools.cache
def serves_anthropic(code: Path | None) -> bool:
    """Whether the crabtrio at `code` (None: the checkout) accepts an anthropic provider and
    its pricing: asked of its own config parser, in a child process importing that code."""
    parse = "import sys; from crabtrio.config import parse_config; parse_config(sys.stdin.read())"
    env = {**os.environ, "PYTHONPATH": str(code)} if code else None
    done = subprocess.run(
        [sys.executable, "-c", parse],
        input=_anthropic_sections(1),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode == 0


def crabtrio_config(
    up: Upstreams | None,
    audit_path: Path,
    *,
    audit: bool = True,
    builtin_mock: bool = False,
    sync: str = "interval",
    anthropic: bool = False,
) -> str:
    """Auth on (one virtual key), admin token set; `up` is only needed without builtin_mock.
    `anthropic` adds the messages scenarios' provider (not with builtin_mock)."""
    if builtin_mock or up is None:
        providers = f"""
[providers.mock]
kind = "mock"
models = ["{CHAT_MODEL}", "{EMBED_MODEL}"]
chunks = {STREAM_CHUNKS}

[providers.mock-paced]
kind = "mock"
models = ["{PACED_MODEL}"]
chunks = {STREAM_CHUNKS}
delay_ms = {PACE_MS}
"""
    else:
        providers = f"""
[providers.openai]
kind = "openai"
base_url = "http://127.0.0.1:{up.fast_port}/v1"
api_key = "{UPSTREAM_KEY}"
models = [{", ".join(f'"{m}"' for m in (*STREAM_MODELS, EMBED_MODEL))}]

[providers.openai-paced]
kind = "openai"
base_url = "http://127.0.0.1:{up.paced_port}/v1"
api_key = "{UPSTREAM_KEY}"
models = ["{PACED_MODEL}"]
max_connections = 4000  # every paced stream holds an upstream connection (2,000 at once)
"""
        if anthropic:
            providers += _anthropic_sections(up.fast_port)
    return f"""# Generated by bench/targets.py
admin_token = "{ADMIN_TOKEN}"
{providers}
[[keys]]
name = "bench"
key = "{CLIENT_KEY}"

[pricing.{CHAT_MODEL}]
prompt_cost_per_million = 0.15
completion_cost_per_million = 0.60

[audit]
path = "{audit_path}"
enabled = {"true" if audit else "false"}
sync = "{sync}"
"""


def hypercorn_args(port: int, workers: int) -> list[str]:
    return [
        str(VENV_BIN / "hypercorn"),
        "crabtrio:app",
        "--worker-class",
        "trio",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--graceful-timeout",
        "2",
    ]


def start_crabtrio(
    name: str,
    config: str,
    workdir: Path,
    *,
    workers: int = 1,
    port: int | None = None,
    code: Path | None = None,
) -> Running:
    port = port or free_port()
    config_path = workdir / f"{name}.toml"
    config_path.write_text(config)
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}

    def client_headers(scenario: Scenario) -> dict[str, str]:
        """Anthropic's SDK authenticates with x-api-key and names the API version."""
        if scenario.api == "messages":
            return {"x-api-key": CLIENT_KEY, "anthropic-version": ANTHROPIC_VERSION}
        return headers

    process, startup = _launch(
        name,
        hypercorn_args(port, workers),
        workdir,
        port,
        headers,
        CRABTRIO_CONFIG=str(config_path),
        # PYTHONPATH comes before the editable install's path entry: the snapshot wins.
        PYTHONPATH=str(code or _crabtrio_path) if (code or _crabtrio_path) else None,
    )
    return Running(name, port, startup, process, client_headers, lambda s: (port, process.pid))


def start_litellm(up: Upstreams, workdir: Path) -> Running:
    exe = peers.litellm_executable()
    port = free_port()
    fast = f"http://127.0.0.1:{up.fast_port}/v1"
    paced = f"http://127.0.0.1:{up.paced_port}/v1"
    # The upstream name is the public one: the mock picks a stream's shape by it.
    entries = [(m, m, fast) for m in (*STREAM_MODELS, EMBED_MODEL)]
    entries.append((PACED_MODEL, CHAT_MODEL, paced))
    lines = ["model_list:"]
    for public, upstream, base in entries:
        lines += [
            f"  - model_name: {public}",
            "    litellm_params:",
            f"      model: openai/{upstream}",
            f"      api_base: {base}",
            f"      api_key: {UPSTREAM_KEY}",
        ]
    lines += ["general_settings:", f"  master_key: {CLIENT_KEY}"]
    config_path = workdir / "litellm.yaml"
    config_path.write_text("\n".join(lines) + "\n")
    args = [str(exe), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--num_workers", "1"]
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    process, startup = _launch(
        "litellm",
        args,
        workdir,
        port,
        headers,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_MASTER_KEY=CLIENT_KEY,
        DATABASE_URL=None,  # no database: LiteLLM's spend tracking and key store stay off
        LITELLM_LOG="ERROR",
    )
    return Running(
        "litellm", port, startup, process, lambda s: headers, lambda s: (port, process.pid)
    )


def start_portkey(up: Upstreams, workdir: Path) -> Running:
    entry = peers.portkey_entry()
    port = free_port()
    preload = BENCH / "portkey_loopback.cjs"
    args = ["node", "--require", str(preload), str(entry), "--headless", f"--port={port}"]

    def headers(scenario: Scenario) -> dict[str, str]:
        upstream = up.paced_port if scenario.paced else up.fast_port
        return {
            "Authorization": f"Bearer {UPSTREAM_KEY}",
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"http://127.0.0.1:{upstream}/v1",
        }

    ready = headers(Scenario("ready", "", {}, 1))
    process, startup = _launch("portkey", args, workdir, port, ready, NODE_ENV="production")
    return Running("portkey", port, startup, process, headers, lambda s: (port, process.pid))


TARGETS = [
    "direct",
    "crabtrio",
    "crabtrio-noaudit",
    "crabtrio-always",
    "crabtrio-mock",
    "crabtrio-w2",
]
PEERS = ["litellm", "portkey"]


def start_target(name: str, up: Upstreams, workdir: Path) -> Running:
    audit_path = workdir / f"{name}-audit.jsonl"
    if name == "direct":
        return start_direct(up, workdir)
    if name == "crabtrio-baseline":
        anthropic = serves_anthropic(_baseline_path)
        config = crabtrio_config(up, audit_path, anthropic=anthropic)
        return start_crabtrio(name, config, workdir, code=_baseline_path)
    if name in ("crabtrio", "crabtrio-w2"):  # the targets of the messages scenarios
        config = crabtrio_config(up, audit_path, anthropic=serves_anthropic(_crabtrio_path))
        return start_crabtrio(name, config, workdir, workers=2 if name == "crabtrio-w2" else 1)
    if name == "crabtrio-noaudit":
        return start_crabtrio(name, crabtrio_config(up, audit_path, audit=False), workdir)
    if name == "crabtrio-always":  # group commit: each response waits for its fsync
        return start_crabtrio(name, crabtrio_config(up, audit_path, sync="always"), workdir)
    if name == "crabtrio-mock":
        return start_crabtrio(name, crabtrio_config(up, audit_path, builtin_mock=True), workdir)
    if name == "litellm":
        return start_litellm(up, workdir)
    if name == "portkey":
        return start_portkey(up, workdir)
    raise ValueError(f"unknown target {name!r}")
