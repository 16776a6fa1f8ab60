"""HTTP calls to OpenAI-compatible upstreams over httpx; httpx errors are translated here only.

Requests go straight to httpx's connection-pooling transport with headers built once per
provider: a gateway needs none of the high-level client's cookies, redirects, auth flows or
URL merging, which cost more than the call itself on a fast upstream.

httpcore's pool does work proportional to its connections on every request, so concurrent
requests are spread over several transports: the first one that is not busy is used, so a
quiet gateway keeps reusing the same warm connections.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import trio

from .config import ProviderConfig

# Connections kept per transport; 500 concurrent streams need as many open connections.
MAX_CONNECTIONS = 2048
MAX_KEEPALIVE = 512
# Transports, and how many requests one carries before the next one is used. Measured with
# 32 concurrent requests: CPU per request fell from 1.28 ms with one transport to 0.88 ms.
POOLS = 16
SPREAD_AT = 1
_POOL_KEY = "crabtrio.pool"
# Transports, and how many requests one carries before the next one is used. Measured with
# 32 concurrent requests: CPU per request fell from 1.28 ms with one transport to 0.88 ms.
POOLS = 16
SPREAD_AT = 1
_POOL_KEY = "crabtrio.pool"


class UpstreamFailure(Exception):
    """One attempt failed in a way worth retrying elsewhere: timeout, or no connection."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class _Endpoint:
    url: httpx.URL
    headers: list[tuple[bytes, bytes]]
    timeout: dict[str, float]


class _Pool:
    __slots__ = ("active", "transport")

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport
        self.active = 0  # responses handed out and not yet closed


class UpstreamClient:
    """Owns the httpx transports; each request uses the first one that is not busy."""

    def __init__(self, transports: list[httpx.AsyncBaseTransport]) -> None:
        self._pools = [_Pool(transport) for transport in transports]
        self._endpoints: dict[tuple[str, str], _Endpoint] = {}

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        *,
        pools: int = POOLS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> AsyncIterator[UpstreamClient]:
        async with AsyncExitStack() as stack:
            if transport is not None:
                transports = [transport]
            else:
                limits = httpx.Limits(
                    max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE
                )
                transports = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(pools)]
            for item in transports:
                await stack.enter_async_context(item)
            yield cls(transports)

    def _endpoint(self, provider: ProviderConfig, path: str) -> _Endpoint:
        endpoint = self._endpoints.get((provider.name, path))
        if endpoint is None:
            url = httpx.URL(provider.base_url + path)
            netloc = urlsplit(provider.base_url).netloc.rsplit("@", 1)[-1]
            headers = [
                (b"host", netloc.encode("ascii")),
                (b"content-type", b"application/json"),
                (b"accept", b"application/json, text/event-stream"),
                (b"accept-encoding", b"identity"),
                (b"user-agent", b"crabtrio"),
            ]
            if provider.api_key:
                headers.append((b"authorization", b"Bearer " + provider.api_key.encode()))
            t = provider.timeout
            timeout = {"connect": t, "read": t, "write": t, "pool": t}
            endpoint = self._endpoints[(provider.name, path)] = _Endpoint(url, headers, timeout)
        return endpoint

    async def post(self, provider: ProviderConfig, path: str, body: bytes) -> httpx.Response:
        """POST `body`; return once the status and headers are in (the body still streams).

        `provider.timeout` bounds the wait for the headers, then each gap between reads.
        Raises UpstreamFailure on timeout or transport error.
        """
        endpoint = self._endpoint(provider, path)
        headers = [*endpoint.headers, (b"content-length", str(len(body)).encode())]
        request = httpx.Request(
            "POST",
            endpoint.url,
            headers=headers,
            stream=httpx.ByteStream(body),
            extensions={"timeout": endpoint.timeout},
        )
        pool = self._pick()
        pool.active += 1
        try:
            with trio.fail_after(provider.timeout):
                response = await pool.transport.handle_async_request(request)
        except BaseException as exc:
            pool.active -= 1
            if isinstance(exc, trio.TooSlowError | httpx.TimeoutException):
                raise UpstreamFailure(
                    f"upstream {provider.name} did not answer within {provider.timeout:g}s",
                    timeout=True,
                ) from None
            if isinstance(exc, httpx.TransportError):
                raise UpstreamFailure(
                    f"cannot reach upstream {provider.name}: {describe(exc)}", timeout=False
                ) from None
            raise
        response.extensions[_POOL_KEY] = pool
        return response

    def in_flight(self) -> list[int]:
        """Open responses per transport."""
        return [pool.active for pool in self._pools]

    def _pick(self) -> _Pool:
        for pool in self._pools:
            if pool.active < SPREAD_AT:
                return pool
        return min(self._pools, key=lambda pool: pool.active)


def _release(response: httpx.Response) -> None:
    """The response is closed: its transport may take more requests."""
    pool = response.extensions.pop(_POOL_KEY, None)
    if pool is not None:
        pool.active -= 1


async def read_body(response: httpx.Response, provider: ProviderConfig) -> bytes:
    """The whole response body (each read gap bounded by the provider's timeout)."""
    try:
        return await response.aread()
    except httpx.TimeoutException:
        raise UpstreamFailure(
            f"upstream {provider.name} stalled for {provider.timeout:g}s while answering",
            timeout=True,
        ) from None
    except httpx.TransportError as exc:
        raise UpstreamFailure(
            f"upstream {provider.name} broke off its answer: {describe(exc)}", timeout=False
        ) from None
    finally:
        _release(response)
        await response.aclose()


def failure_mid_body(exc: Exception, provider: ProviderConfig) -> UpstreamFailure:
    """Translate an httpx error raised while reading a stream's body."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamFailure(
            f"upstream {provider.name} sent nothing for {provider.timeout:g}s mid-stream",
            timeout=True,
        )
    return UpstreamFailure(
        f"upstream {provider.name} broke off the stream: {describe(exc)}", timeout=False
    )


async def close_quietly(response: httpx.Response) -> None:
    """Close a response even from a cancelled scope (shielded, bounded)."""
    _release(response)
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + 1.0
        with contextlib.suppress(httpx.HTTPError, OSError):
            await response.aclose()


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def scrub(body: bytes, secrets: Iterable[str | None]) -> bytes:
    """Remove any configured secret that an upstream echoed into an error body."""
    for secret in secrets:
        if secret and secret.encode() in body:
            body = body.replace(secret.encode(), b"[redacted]")
    return body
