"""The upstream client: busy transports spill over to the next, quiet traffic stays on one."""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from crabtrio.config import parse_config
from crabtrio.upstream import UpstreamClient, UpstreamFailure, close_quietly, read_body

PROVIDER = parse_config(
    '[providers.p]\nbase_url = "http://up.test/v1"\napi_key = "k"\nmodels = ["m"]\n'
).providers["p"]


async def test_quiet_traffic_reuses_the_first_transport_and_busy_traffic_spreads() -> None:
    seen: list[int] = []
    gate = trio.Event()

    def transport(number: int) -> httpx.MockTransport:
        async def handler(request: httpx.Request) -> httpx.Response:
            seen.append(number)
            await gate.wait()
            return httpx.Response(200, json={"ok": True})

        return httpx.MockTransport(handler)

    client = UpstreamClient([transport(i) for i in range(4)])
    gate.set()
    for _ in range(5):
        await read_body(await client.post(PROVIDER, "/chat/completions", b"{}"), PROVIDER)
    assert seen == [0] * 5
    assert client.in_flight() == [0, 0, 0, 0]

    gate = trio.Event()
    seen.clear()
    responses: list[httpx.Response] = []

    async def one() -> None:
        responses.append(await client.post(PROVIDER, "/chat/completions", b"{}"))

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert sorted(seen) == [0, 0, 1, 1, 2, 3]  # one each, then the least busy
    assert sum(client.in_flight()) == 6
    for response in responses:
        await close_quietly(response)
    assert client.in_flight() == [0, 0, 0, 0]


async def test_failed_attempts_release_their_transport() -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = UpstreamClient([httpx.MockTransport(refuse)])
    for _ in range(3):
        with pytest.raises(UpstreamFailure, match="cannot reach upstream p"):
            await client.post(PROVIDER, "/chat/completions", b"{}")
    assert client.in_flight() == [0]
