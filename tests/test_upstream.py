"""UpstreamClient: requests as providers expect them, and every failure translated once into
an UpstreamError in our words (httpx.MockTransport plays the upstream)."""

from __future__ import annotations

import gzip
import zlib
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from crabtrio.config import ProviderConfig, parse_config
from crabtrio.errors import UpstreamError, UpstreamTimeout
from crabtrio.upstream import UpstreamClient

from .fake_upstream import FakeUpstream

TOML = '[providers.p]\nbase_url = "http://up.test:8000/v1"\napi_key = "k"\nmodels = ["m"]\ntimeout = 2\n'
PROVIDER = parse_config(TOML).providers["p"]


@asynccontextmanager
async def client_for(handler, provider: ProviderConfig = PROVIDER):
    async with UpstreamClient.open([provider], transport=FakeUpstream(handler)) as client:
        yield client


async def test_requests_carry_the_providers_headers() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"ok")

    async with client_for(handler) as client:
        response = await client.post(PROVIDER, "/chat/completions", b"{}")
        assert await response.read() == b"ok"
    (request,) = seen
    assert str(request.url) == "http://up.test:8000/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k"
    assert request.headers["host"] == "up.test:8000"
    assert request.headers["content-length"] == "2"
    assert request.headers["accept-encoding"] == "identity"


async def test_failures_are_translated(idle_jump_clock) -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused: sk-secret-from-the-socket-layer", request=request)

    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep(60)
        raise AssertionError("unreachable")

    async def garbled(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("illegal header line: b'sk-leaked'", request=request)

    async with client_for(refuse) as client:
        with pytest.raises(UpstreamError, match="cannot reach upstream p") as refused:
            await client.post(PROVIDER, "/x", b"{}")
    assert refused.value.retryable and not isinstance(refused.value, UpstreamTimeout)
    assert "sk-" not in str(refused.value)
    async with client_for(hang) as client:
        with pytest.raises(UpstreamTimeout, match="sent nothing for 2s") as slow:
            await client.post(PROVIDER, "/x", b"{}")
    assert not slow.value.retryable  # it may still be generating: not retried by default
    async with client_for(garbled) as client:
        with pytest.raises(UpstreamError, match="broke the HTTP protocol") as broken:
            await client.post(PROVIDER, "/x", b"{}")
    assert "sk-" not in str(broken.value) and "illegal" not in str(broken.value)


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

    for handler, expected, kind in (
        (breaks, "broke off the connection", UpstreamError),
        (stalls, "sent nothing for 2s", UpstreamTimeout),
    ):
        async with client_for(handler) as client:
            response = await client.post(PROVIDER, "/x", b"{}")
            assert await response.receive() == b"data: {}\n\n"
            with pytest.raises(kind, match=expected):
                await response.receive()
            await response.aclose()


async def streamed(body: bytes):
    """As a network transport hands a body over: raw, in pieces, not yet decoded."""
    for start in range(0, len(body), 65536):
        yield body[start : start + 65536]


LIMITED = parse_config(TOML + "max_response_mb = 1\n").providers["p"]


async def test_a_body_over_the_limit_is_an_error_without_reading_it_all() -> None:
    sent = 0

    async def huge(request: httpx.Request) -> httpx.Response:
        async def chunks():
            nonlocal sent
            for _ in range(200):  # 200 x 64 KB = 12.5 MB on offer
                sent += 1
                yield b"x" * 65536

        return httpx.Response(200, content=chunks())

    async with client_for(huge, LIMITED) as client:
        response = await client.post(LIMITED, "/x", b"{}")
        with pytest.raises(UpstreamError, match="larger than 1 MB") as error:
            await response.read()
        await response.aclose()
    assert error.value.code == "upstream_response_too_large" and not error.value.retryable
    assert sent <= 17  # stopped right after the limit


async def test_a_gzip_bomb_is_cut_at_the_limit_and_garbage_is_an_error() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 MB in about 64 KB

    async def answer(request: httpx.Request) -> httpx.Response:
        body = bomb if request.url.path == "/v1/bomb" else b"\x1f\x8bnot gzip at all"
        return httpx.Response(200, headers={"content-encoding": "gzip"}, content=streamed(body))

    async with client_for(answer, LIMITED) as client:
        response = await client.post(LIMITED, "/bomb", b"{}")
        with pytest.raises(UpstreamError, match="larger than 1 MB"):
            await response.read()
        response = await client.post(LIMITED, "/garbage", b"{}")
        with pytest.raises(UpstreamError, match="corrupt compressed body"):
            await response.read()


async def test_gzip_and_deflate_bodies_are_decoded() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("gzip"):
            body, coding = gzip.compress(b"hello"), "gzip"
        else:
            body, coding = zlib.compress(b"hello"), "deflate"
        return httpx.Response(200, headers={"content-encoding": coding}, content=streamed(body))

    async with client_for(answer) as client:
        for path in ("/gzip", "/deflate"):
            response = await client.post(PROVIDER, path, b"{}")
            assert await response.read() == b"hello"
