"""The upstream client's translation of transport failures into retryable UpstreamFailures."""

from __future__ import annotations

import httpx
import pytest
import trio

from crabtrio.config import parse_config
from crabtrio.upstream import UpstreamClient, UpstreamFailure, read_body

from .fake_upstream import HandlerTransport

PROVIDER = parse_config(
    '[providers.p]\nbase_url = "http://up.test:8000/v1"\napi_key = "k"\nmodels = ["m"]\ntimeout = 2\n'
).providers["p"]


async def test_requests_carry_the_providers_headers() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"ok")

    client = UpstreamClient(HandlerTransport(handler))
    assert await read_body(await client.post(PROVIDER, "/chat/completions", b"{}")) == b"ok"
    (request,) = seen
    assert str(request.url) == "http://up.test:8000/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k"
    assert request.headers["host"] == "up.test:8000"
    assert request.headers["content-length"] == "2"


async def test_failures_are_translated(idle_jump_clock) -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep(60)
        raise AssertionError("unreachable")

    with pytest.raises(UpstreamFailure, match="cannot reach upstream p") as refused:
        await UpstreamClient(HandlerTransport(refuse)).post(PROVIDER, "/x", b"{}")
    assert not refused.value.timeout
    with pytest.raises(UpstreamFailure, match="did not answer within 2s") as slow:
        await UpstreamClient(HandlerTransport(hang)).post(PROVIDER, "/x", b"{}")
    assert slow.value.timeout


async def test_failures_while_reading_the_body_are_translated(idle_jump_clock) -> None:
    async def breaks(request: httpx.Request) -> httpx.Response:
        async def chunks():
            yield b"data: {}\n\n"
            raise httpx.ReadError("connection reset")

        return httpx.Response(200, content=chunks())

    async def stalls(request: httpx.Request) -> httpx.Response:
        async def chunks():
            yield b"data: {}\n\n"
            await trio.sleep(60)
            yield b"never"

        return httpx.Response(200, content=chunks())

    for handler, expected, timeout in (
        (breaks, "broke off its answer", False),
        (stalls, "sent nothing for 2s", True),
    ):
        response = await UpstreamClient(HandlerTransport(handler)).post(PROVIDER, "/x", b"{}")
        assert await response.receive() == b"data: {}\n\n"
        with pytest.raises(UpstreamFailure, match=expected) as failure:
            await response.receive()
        assert failure.value.timeout is timeout
        await response.aclose()
