"""UpstreamClient: one `httpx.AsyncClient` per provider, and the one place where what goes
wrong upstream (httpx's errors, timeouts, broken limits) becomes an `UpstreamError`."""

from __future__ import annotations

import ssl
import urllib.request
import zlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from ..config import ProviderConfig, tls_context, tls_settings
from ..errors import UpstreamError, UpstreamTimeout
from ..mock import MockTransport
from .lean import RELEASED_AT_END, LeanBody, LeanTransport

MIB = 1024 * 1024
# Bodies with a content-encoding are decompressed in a worker thread, never on the event loop
# (a 306 KB gzip bomb is 300 MB of zlib work), and never past the provider's limit.
_DECODERS = {b"gzip": zlib.MAX_WBITS | 16, b"deflate": zlib.MAX_WBITS, b"x-gzip": 31}
# A streamed chunk may inflate to this much at most (events are bounded after it).
MAX_STREAM_PIECE = 16 * MIB
INFLATE_PIECE = MIB


class _NoCookies(httpx.Cookies):
    """Upstream APIs set no cookies we want: skip httpx's cookie handling, which builds
    urllib request and response objects for every response (~20 µs a request here)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def set_cookie_header(self, request: httpx.Request) -> None:
        pass


class UpstreamResponse:
    """A response whose head is in. `receive()` and `read()` raise UpstreamError only."""

    __slots__ = (
        "_chunks",
        "_decoder",
        "_done",
        "_next",
        "_provider",
        "_released_at_end",
        "_response",
        "headers",
        "status",
    )

    def __init__(self, response: httpx.Response, provider: ProviderConfig) -> None:
        self._response = response
        self._provider = provider
        self.status = response.status_code
        self.headers = response.headers
        self._done = False
        # LeanTransport gives the connection back at the body's end by itself; httpx's
        # transport does so only in `aclose()`, which must then always run.
        self._released_at_end = response.extensions.get(RELEASED_AT_END, False)
        # An async generator over the body (httpx's transports), closed by `aclose`.
        self._chunks: AsyncGenerator[bytes] | None = None
        if response.is_stream_consumed:  # handed over whole (a test's): httpx decoded it
            self._next = _once(response.content)
            self._decoder = None
            return
        self._decoder = _decoder(response, provider)
        # LeanTransport's body is read directly: httpx's binding and `aiter_raw` add an
        # async generator, a chunker and a context per part, ~3 µs a relayed event.
        stream = response.stream
        body = getattr(stream, "_stream", stream)  # (httpx's BoundAsyncStream keeps it there)
        if isinstance(body, LeanBody):
            self._next = body.next_part
            return
        assert isinstance(stream, httpx.AsyncByteStream)
        chunks = aiter(stream)
        if isinstance(chunks, AsyncGenerator):
            self._chunks = chunks
        self._next = partial(anext, chunks, b"")

    async def receive(self) -> bytes:
        """The next chunk of the body (decoded), b"" only at its end; each read is bounded."""
        if self._decoder is None:
            return await self._receive_raw()
        while True:
            chunk = await self._receive_raw()
            # A compressed chunk may inflate to nothing (a gzip header alone): read on.
            out = await _inflate(
                self._decoder, chunk, MAX_STREAM_PIECE, self._provider, final=not chunk
            )
            if out or not chunk:
                return out

    async def _receive_raw(self) -> bytes:
        # The transport bounds each socket read by the provider's timeout (a deadline per
        # chunk here cost a cancel scope per relayed event: 10% of a stream's CPU).
        try:
            chunk = await self._next()
        except httpx.HTTPError as exc:
            raise translate(exc, self._provider) from None
        self._done = not chunk
        return chunk

    async def read(self) -> bytes:
        """The whole body, within the provider's `max_response_mb` (also once decompressed)."""
        provider = self._provider
        limit = int(provider.max_response_mb * MIB)
        decoder, self._decoder = self._decoder, None
        parts: list[bytes] = []
        size = 0
        while chunk := await self._receive_raw():
            size += len(chunk)
            if size > limit:
                raise _too_large(provider)
            parts.append(chunk)
        body = b"".join(parts)
        if decoder is None:
            return body
        return await _inflate(decoder, body, limit, provider, final=True)

    async def aclose(self) -> None:
        """Release the connection; safe in a cancelled `finally` (shielded, bounded)."""
        if self._done and self._released_at_end:  # ~25 µs a request saved
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + 1.0
            # The body's iterator first: an async generator left to the GC (a stream the
            # client walked away from) makes trio warn, and runs its cleanup too late.
            if self._chunks is not None:
                await self._chunks.aclose()
            await self._response.aclose()


class UpstreamClient:
    """Sends requests to providers. Each provider has its own client: its own transport,
    connection limit and TLS settings (HTTP/1.1 straight: `LeanTransport`; through a proxy
    or over HTTP/2: httpx's transport; the built-in mock: `MockTransport`)."""

    def __init__(self, clients: Mapping[str, httpx.AsyncClient]) -> None:
        self._clients = clients
        self._headers: dict[tuple[str, str], tuple[httpx.URL, httpx.Headers]] = {}

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        providers: Iterable[ProviderConfig],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> AsyncIterator[UpstreamClient]:
        """`transport`, in tests, stands in for the network for every non-mock provider."""
        async with AsyncExitStack() as stack:
            clients = {}
            for provider in providers:
                chosen = transport if provider.kind != "mock" else None
                client = _client_for(provider, chosen)
                clients[provider.name] = await stack.enter_async_context(client)
            yield cls(clients)

    def _target(self, provider: ProviderConfig, path: str) -> tuple[httpx.URL, httpx.Headers]:
        found = self._headers.get((provider.name, path))
        if found is None:
            url = httpx.URL(provider.base_url + path)
            headers = [
                (b"host", url.netloc),
                (b"content-type", b"application/json"),
                (b"accept", b"application/json, text/event-stream"),
                (b"accept-encoding", b"identity"),
                (b"user-agent", b"crabtrio"),
            ]
            if provider.api_key and provider.kind == "anthropic":
                headers.append((b"x-api-key", provider.api_key.encode()))
            elif provider.api_key:
                headers.append((b"authorization", b"Bearer " + provider.api_key.encode()))
            found = self._headers[(provider.name, path)] = (url, httpx.Headers(headers))
        return found

    async def post(
        self,
        provider: ProviderConfig,
        path: str,
        body: bytes,
        extra: Sequence[tuple[str, str]] = (),
    ) -> UpstreamResponse:
        """POST `body` (with `extra` headers); return once the status and headers are in
        (the body still streams).

        `provider.timeout` bounds (in the transport) the wait for the head, then each read.
        """
        url, headers = self._target(provider, path)
        # `stream=` rather than `content=`: the headers are ready but for the length, and
        # httpx's encoding and header merging cost 15 µs a request.
        request = httpx.Request("POST", url, headers=headers, stream=httpx.ByteStream(body))
        request.headers["content-length"] = str(len(body))
        for name, value in extra:
            request.headers[name] = value
        request.read()
        try:
            response = await self._clients[provider.name].send(request, stream=True)
        except httpx.HTTPError as exc:
            raise translate(exc, provider) from None
        return UpstreamResponse(response, provider)


def _once(data: bytes) -> Callable[[], Awaitable[bytes]]:
    parts = [data, b""]

    async def next_part() -> bytes:
        return parts.pop(0) if parts else b""

    return next_part


def translate(exc: httpx.HTTPError, provider: ProviderConfig) -> UpstreamError:
    """The one translation of httpx's errors, in our own words (never the upstream's bytes)."""
    name = provider.name
    reason = _reason(exc)
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamTimeout(
            f"upstream {name}: connecting took more than {provider.connect_timeout:g}s"
        )
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamTimeout(
            f"upstream {name}: all {provider.max_connections} connections stayed busy"
        )
    if isinstance(exc, httpx.TimeoutException):  # read or write: the upstream may be working
        return UpstreamTimeout(
            f"upstream {name} sent nothing for {provider.timeout:g}s",
            retryable=provider.retry_on_timeout,
        )
    if isinstance(exc, httpx.ProxyError):
        return UpstreamError(f"cannot reach upstream {name} through its proxy{reason}")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(f"cannot reach upstream {name}{reason}")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.LocalProtocolError):
        return UpstreamError(f"upstream {name} broke the HTTP protocol")
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return UpstreamError(f"upstream {name} broke off the connection{reason}")
    return UpstreamError(f"upstream {name} failed ({type(exc).__name__})")


def _reason(exc: BaseException) -> str:
    """What the cause says, in our words: TLS trust, or the OS's description of an errno."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return ": its TLS certificate is not trusted"
        if isinstance(cause, ssl.SSLError):
            return ": the TLS handshake failed"
        if isinstance(cause, OSError) and cause.strerror:
            return f": {cause.strerror}"
        cause = cause.__cause__ or cause.__context__
    return ""


def _too_large(provider: ProviderConfig) -> UpstreamError:
    return UpstreamError(
        f"upstream {provider.name} sent a body larger than {provider.max_response_mb:g} MB",
        code="upstream_response_too_large",
        retryable=False,
    )


def _decoder(response: httpx.Response, provider: ProviderConfig) -> Any:
    coding = response.headers.get("content-encoding", "").strip().lower().encode()
    if coding in (b"", b"identity"):
        return None
    wbits = _DECODERS.get(coding)
    if wbits is None:
        raise UpstreamError(
            f"upstream {provider.name} used an unsupported content-encoding",
            retryable=False,
        )
    return zlib.decompressobj(wbits)


async def _inflate(
    decoder: Any, data: bytes, limit: int, provider: ProviderConfig, *, final: bool = False
) -> bytes:
    def work() -> bytes:
        # In pieces, so the peak stays near `limit` (one call with `limit` as its bound let
        # zlib's buffer grow to twice that).
        parts = [decoder.decompress(data, INFLATE_PIECE)]
        size = len(parts[0])
        while decoder.unconsumed_tail and size <= limit:
            parts.append(decoder.decompress(decoder.unconsumed_tail, INFLATE_PIECE))
            size += len(parts[-1])
        if final and size <= limit:
            parts.append(decoder.flush())
            size += len(parts[-1])
        if size > limit:
            raise _too_large(provider)
        return b"".join(parts)

    try:
        return await trio.to_thread.run_sync(work)
    except zlib.error:
        raise UpstreamError(
            f"upstream {provider.name} sent a corrupt compressed body", retryable=False
        ) from None


def _client_for(
    provider: ProviderConfig, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    if provider.kind == "mock":
        transport = MockTransport(provider)
    elif transport is None:
        transport = network_transport(provider)
    client = httpx.AsyncClient(
        transport=transport,
        # The transport bounds each step: the wait for a pooled connection, the connect, the
        # write, and each read (the response head's included).
        timeout=httpx.Timeout(
            connect=provider.connect_timeout,
            read=provider.timeout,
            write=provider.timeout,
            pool=provider.timeout,
        ),
        follow_redirects=False,
        trust_env=False,  # proxies from the environment are chosen in network_transport
    )
    # The `cookies` argument is copied into a plain jar; the client's own must be replaced.
    client._cookies = _NoCookies()
    return client


def network_transport(provider: ProviderConfig) -> httpx.AsyncBaseTransport:
    """LeanTransport for direct HTTP/1.1; httpx's transport through a proxy or for HTTP/2."""
    context = _ssl_context(provider)
    proxy = provider.proxy or _environment_proxy(provider.base_url)
    if proxy is None and not provider.http2:
        return LeanTransport(ssl_context=context, max_connections=provider.max_connections)
    return httpx.AsyncHTTPTransport(
        verify=context if context is not None else True,
        http2=provider.http2,
        http1=True,
        proxy=proxy,
        limits=httpx.Limits(
            max_connections=provider.max_connections,
            max_keepalive_connections=provider.max_connections,
        ),
    )


def _environment_proxy(url: str) -> str | None:
    """HTTP(S)_PROXY / ALL_PROXY for this URL's scheme, unless NO_PROXY covers its host."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    if urllib.request.proxy_bypass_environment(netloc, proxies):  # type: ignore[attr-defined]
        return None
    return proxy


def _ssl_context(provider: ProviderConfig) -> ssl.SSLContext | None:
    if not provider.base_url.startswith("https://"):
        return None
    return tls_context(*tls_settings(provider))
