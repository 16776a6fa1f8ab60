"""In-process harness: the real app (real lifespan, real audit file) with a fake upstream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from quart import Response
from quart.typing import TestClientProtocol
from quart_trio import QuartTrio

from crabtrio import create_app
from crabtrio.config import parse_config

from .fake_upstream import FakeUpstream

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]

BASE = """
admin_token = "admin-secret"
[providers.primary]
kind = "openai"
base_url = "http://upstream.test/v1"
api_key = "sk-upstream-primary"
models = ["gpt-4o", "text-embedding-3-small"]
weight = 10
max_retries = 1
timeout = 5
[providers.backup]
kind = "openai"
base_url = "http://backup.test/v1"
api_key = "sk-upstream-backup"
models = ["gpt-4o"]
weight = 1
max_retries = 0
timeout = 5
[providers.mock]
kind = "mock"
models = ["mock-chat"]
[[keys]]
name = "team-a"
key = "sk-team-a"
[[keys]]
name = "team-b"
key = "sk-team-b"
models = ["mock-chat"]
[aliases]
gpt4 = "gpt-4o"
[pricing.gpt-4o]
prompt_cost_per_million = 2.5
completion_cost_per_million = 10.0
"""

TEAM_A = {"authorization": "Bearer sk-team-a"}


def chat_answer(usage: bool = True) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
    }
    if usage:
        answer["usage"] = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}
    return answer


def sse(*payloads: Any) -> bytes:
    out = b""
    for payload in payloads:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        out += b"data: " + data + b"\n\n"
    return out


def stream_chunks(words: list[str], *, usage: bool = True) -> bytes:
    events: list[Any] = [
        {"choices": [{"index": 0, "delta": {"content": word}}], "usage": None} for word in words
    ]
    if usage:
        events.append(
            {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(words)}}
        )
    events.append(b"[DONE]")
    return sse(*events)


class Gateway:
    def __init__(self, app: QuartTrio, client: TestClientProtocol, audit_path: Path) -> None:
        self.app = app
        self.client = client
        self.audit_path = audit_path

    async def audit_written(self, timeout: float = 5) -> None:
        """Wait (at most `timeout`) until every audit record the gateway accepted so far is
        in the file: `AuditLogger.wait_written`, which also cuts the writer's linger short.
        Returns quietly at the timeout, or when the writer has ended: assert afterwards."""
        await self.app.extensions["crabtrio"].audit._writer.wait_written(timeout=timeout)

    async def post(
        self,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        disconnect_after: int | None = None,
    ) -> Response:
        """POST and read the body as it streams (the test client's own buffer holds only 10
        chunks until the app returns); with `disconnect_after`, leave after that many chunks."""
        data = raw if raw is not None else orjson.dumps(body)
        all_headers = {"content-type": "application/json", **(headers or {})}
        async with self.client.request(path, method="POST", headers=all_headers) as connection:
            await connection.send(data)
            await connection.send_complete()
            chunks: list[bytes] = []
            try:
                while disconnect_after is None or len(chunks) < disconnect_after:
                    chunks.append(await connection.receive())
            except trio.EndOfChannel:
                pass
            if disconnect_after is not None:
                await connection.disconnect()
                # quart-trio's test connection would wait forever on its response channel,
                # which a cancelled app never closes: close our end so its exit skips the wait.
                await connection._client_receive.aclose()  # type: ignore[attr-defined]
            status, response_headers = connection.status_code, connection.headers
        return Response(b"".join(chunks), status, response_headers)

    def records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [orjson.loads(line) for line in self.audit_path.read_bytes().splitlines() if line]


@asynccontextmanager
async def gateway(
    tmp_path: Path,
    handler: Handler | None = None,
    *,
    extra: str = "",
    top: str = "",
    base: str = BASE,
    audit: str = "",
    app_config: dict[str, Any] | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Gateway]:
    audit_path = tmp_path / "audit.jsonl"
    config = parse_config(
        top + base + extra + f'\n[audit]\npath = "{audit_path}"\n{audit}\n', "test.toml"
    )
    transport = FakeUpstream(handler) if handler is not None else None
    app = create_app(config, transport=transport, clock=clock)
    app.config.update(app_config or {})
    async with app.test_app() as test_app:
        yield Gateway(app, test_app.test_client(), audit_path)
