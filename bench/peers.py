"""Install the peer gateways (LiteLLM proxy, Portkey's Node gateway) once, under bench/.peers/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent / ".peers"
LITELLM_DIR = PEERS_DIR / "litellm"
PORTKEY_DIR = PEERS_DIR / "portkey"
# Newer @hono/node-server versions break Portkey's streaming (Portkey-AI/gateway#1389);
# the gateway's own lockfile pins this one.
HONO_NODE_SERVER = "1.13.5"
INSTALL_TIMEOUT_S = 1800


class PeerUnavailable(Exception):
    """A peer cannot be installed or started here; the message says why, in one line."""


def _run(args: list[str], cwd: Path, what: str) -> None:
    print(f"  installing {what}: {' '.join(args)}", flush=True)
    log = cwd / "install.log"
    with log.open("w") as out:
        try:
            done = subprocess.run(
                args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PeerUnavailable(f"{what}: install failed ({exc}); see {log}") from None
    if done.returncode != 0:
        raise PeerUnavailable(f"{what}: install exited {done.returncode}; see {log}")


def litellm_executable() -> Path:
    """The `litellm` CLI in its own venv, installed on first use."""
    exe = LITELLM_DIR / "venv" / "bin" / "litellm"
    stamp = LITELLM_DIR / ".installed"
    if stamp.exists() and exe.exists():
        return exe
    LITELLM_DIR.mkdir(parents=True, exist_ok=True)
    venv = LITELLM_DIR / "venv"
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], LITELLM_DIR, "litellm venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, "litellm[proxy]"], LITELLM_DIR, "litellm[proxy]")
    if not exe.exists():
        raise PeerUnavailable(f"litellm: no CLI at {exe} after install")
    stamp.write_text("ok\n")
    return exe


def portkey_entry() -> Path:
    """Portkey's start-server.js, installed with npm on first use."""
    entry = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    stamp = PORTKEY_DIR / ".installed"
    if stamp.exists() and entry.exists():
        return entry
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise PeerUnavailable("portkey: needs node and npm (apt-get install -y nodejs npm)")
    PORTKEY_DIR.mkdir(parents=True, exist_ok=True)
    package = {
        "name": "crabtrio-bench-portkey",
        "private": True,
        "dependencies": {
            "@portkey-ai/gateway": "*",
            "@hono/node-server": HONO_NODE_SERVER,
        },
        # Forces the gateway's nested copy to the pinned version too.
        "overrides": {"@hono/node-server": HONO_NODE_SERVER},
    }
    (PORTKEY_DIR / "package.json").write_text(json.dumps(package, indent=2) + "\n")
    _run([npm, "install", "--no-audit", "--no-fund"], PORTKEY_DIR, "@portkey-ai/gateway")
    if not entry.exists():
        raise PeerUnavailable(f"portkey: no {entry} after npm install")
    stamp.write_text("ok\n")
    return entry


def installed_versions() -> dict[str, str]:
    """Versions of the installed peers, for the report (read from their package metadata)."""
    versions = {}
    for info in (LITELLM_DIR / "venv" / "lib").glob("python*/site-packages/litellm-*.dist-info"):
        versions["litellm"] = info.name.removeprefix("litellm-").removesuffix(".dist-info")
    modules = PORTKEY_DIR / "node_modules"
    for name, package in (
        ("portkey", "@portkey-ai/gateway"),
        ("hono-node-server", "@hono/node-server"),
    ):
        manifest = modules / package / "package.json"
        if manifest.exists():
            versions[name] = json.loads(manifest.read_text()).get("version", "?")
    return versions
