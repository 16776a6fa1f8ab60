"""Calls to OpenAI-compatible upstreams; transport errors are translated here only.

The real transport is `http11` (h11 + trio, keep-alive pools per origin); tests plug in a fake
with the same shape. Headers are built once per provider and path.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import h11
import trio

from .config import ProviderConfig
from .http11 import ConnectionPool, HTTPError, Origin


class UpstreamFailure(Exception):
    """One attempt failed in a way worth retrying elsewhere: timeout, or no connection."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


class UpstreamResponse(Protocol):
    status: int

    async def receive(self) -> bytes:
        """The next chunk of the body, b"" at its end."""

    async def aclose(self) -> None: ...


class Transport(Protocol):
    async def request(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        timeout: float,
    ) -> UpstreamResponse: ...


class H11Transport:
    """One keep-alive connection pool per origin."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._pools: dict[Origin, ConnectionPool] = {}

    async def request(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        timeout: float,
    ) -> UpstreamResponse:
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = ConnectionPool(origin, self._ssl_context)
        return await pool.request(method, target, headers, body, timeout)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()


# What a broken (rather than slow) exchange raises below us.
_BROKEN = (
    HTTPError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.ProtocolError,
    OSError,
)


class _Translated:
    """A response whose body reads raise UpstreamFailure, never a transport's own errors."""

    __slots__ = ("_provider", "_response", "status")

    def __init__(self, response: UpstreamResponse, provider: ProviderConfig) -> None:
        self._response = response
        self._provider = provider
        self.status = response.status

    async def receive(self) -> bytes:
        try:
            return await self._response.receive()
        except trio.TooSlowError:
            provider = self._provider
            raise UpstreamFailure(
                f"upstream {provider.name} sent nothing for {provider.timeout:g}s", timeout=True
            ) from None
        except _BROKEN as exc:
            raise UpstreamFailure(
                f"upstream {self._provider.name} broke off its answer: {describe(exc)}",
                timeout=False,
            ) from None

    async def aclose(self) -> None:
        await self._response.aclose()


@dataclass(frozen=True, slots=True)
class _Endpoint:
    origin: Origin
    target: bytes
    headers: list[tuple[bytes, bytes]]


class UpstreamClient:
    """Sends requests to providers; owns the transport's connections."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._endpoints: dict[tuple[str, str], _Endpoint] = {}

    @classmethod
    @asynccontextmanager
    async def open(cls, *, transport: Transport | None = None) -> AsyncIterator[UpstreamClient]:
        own = H11Transport() if transport is None else None
        try:
            yield cls(transport or own)  # type: ignore[arg-type]
        finally:
            if own is not None:
                await own.aclose()

    def _endpoint(self, provider: ProviderConfig, path: str) -> _Endpoint:
        endpoint = self._endpoints.get((provider.name, path))
        if endpoint is None:
            url = urlsplit(provider.base_url + path)
            scheme = url.scheme
            port = url.port or (443 if scheme == "https" else 80)
            origin = Origin(scheme, url.hostname or "", port)
            netloc = url.netloc.rsplit("@", 1)[-1]
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            headers = [
                (b"host", netloc.encode("ascii")),
                (b"content-type", b"application/json"),
                (b"accept", b"application/json, text/event-stream"),
                (b"accept-encoding", b"identity"),
                (b"user-agent", b"crabtrio"),
            ]
            if provider.api_key:
                headers.append((b"authorization", b"Bearer " + provider.api_key.encode()))
            endpoint = _Endpoint(origin, target.encode(), headers)
            self._endpoints[(provider.name, path)] = endpoint
        return endpoint

    async def post(self, provider: ProviderConfig, path: str, body: bytes) -> UpstreamResponse:
        """POST `body`; return once the status and headers are in (the body still streams).

        `provider.timeout` bounds the wait for the headers, then each gap between reads.
        Raises UpstreamFailure on timeout or transport error, here and from `receive()`.
        """
        endpoint = self._endpoint(provider, path)
        headers = [*endpoint.headers, (b"content-length", b"%d" % len(body))]
        try:
            response = await self._transport.request(
                endpoint.origin, b"POST", endpoint.target, headers, body, provider.timeout
            )
        except trio.TooSlowError:
            raise UpstreamFailure(
                f"upstream {provider.name} did not answer within {provider.timeout:g}s",
                timeout=True,
            ) from None
        except _BROKEN as exc:
            raise UpstreamFailure(
                f"cannot reach upstream {provider.name}: {describe(exc)}", timeout=False
            ) from None
        return _Translated(response, provider)


async def read_body(response: UpstreamResponse) -> bytes:
    """The whole body of a response from `post` (raises UpstreamFailure), then close it."""
    try:
        parts = []
        while chunk := await response.receive():
            parts.append(chunk)
        return b"".join(parts)
    finally:
        await response.aclose()


async def close_quietly(response: UpstreamResponse) -> None:
    """Close a response even from a cancelled scope (shielded, bounded)."""
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + 1.0
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
