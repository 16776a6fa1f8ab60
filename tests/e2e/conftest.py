"""End-to-end fixtures: processes are always stopped, whatever the test did."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .processes import Gateway, MockUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[MockUpstream]:
    server = MockUpstream(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(config: str | None, *, home: str | None = None, **options: Any) -> Gateway:
        """`home`: a subdirectory of its own (each gateway writes its config file there)."""
        directory = tmp_path
        if home is not None:
            directory = tmp_path / home
            directory.mkdir(exist_ok=True)
        gateway = Gateway(directory, config, **options)
        started.append(gateway)
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            gateway.stop()


def gateway_config(
    upstream_url: str, audit: Path, *, extra: str = "", audit_extra: str = ""
) -> str:
    return f"""
admin_token = "adm-e2e-token"
[providers.up]
kind = "openai"
base_url = "{upstream_url}/v1"
api_key = "sk-upstream-e2e"
models = ["gpt-e2e", "embed-e2e"]
max_retries = 1
timeout = 2
{extra}
[[keys]]
name = "team-e2e"
key = "sk-team-e2e"
[aliases]
fast = "gpt-e2e"
[pricing.gpt-e2e]
prompt_cost_per_million = 1.0
completion_cost_per_million = 2.0
[audit]
path = "{audit}"
{audit_extra}
"""
