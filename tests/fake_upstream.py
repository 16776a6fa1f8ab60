"""A fake upstream transport for in-process tests: httpx-style handlers answer requests.

Handlers receive an `httpx.Request` and return an `httpx.Response` (content may be an async
iterator, to stream). Transport failures are raised the way the real client meets them:
`httpx.ConnectError` from a handler becomes a refused connection, `httpx.ReadError` while
streaming becomes a broken connection.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import httpx
import trio

from crabtrio.http11 import Origin

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class HandlerTransport:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def request(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        timeout: float,
    ) -> FakeResponse:
        port = "" if origin.port in (80, 443) else f":{origin.port}"
        url = f"{origin.scheme}://{origin.host}{port}{target.decode()}"
        request = httpx.Request(method.decode(), url, headers=list(headers), content=body)
        with trio.fail_after(timeout):
            try:
                response = await self.handler(request)
            except httpx.ConnectError as exc:
                raise OSError(errno.ECONNREFUSED, str(exc)) from None
        return FakeResponse(response, timeout)


class FakeResponse:
    """Like the real client's responses: each read of the body waits at most `timeout`."""

    def __init__(self, response: httpx.Response, timeout: float) -> None:
        self.status = response.status_code
        self._timeout = timeout
        self._response = response
        self._chunks: AsyncIterator[bytes] | None = None
        try:
            self._whole: bytes | None = response.content  # built from bytes: already read
        except httpx.ResponseNotRead:
            self._whole = None

    async def receive(self) -> bytes:
        if self._whole is not None:
            whole, self._whole = self._whole, b""
            return whole
        if self._chunks is None:
            self._chunks = self._response.aiter_raw()
        try:
            with trio.fail_after(self._timeout):
                while not (chunk := await anext(self._chunks)):
                    pass
            return chunk
        except StopAsyncIteration:
            return b""
        except httpx.ReadError as exc:
            raise trio.BrokenResourceError(str(exc)) from None

    async def aclose(self) -> None:
        if self._chunks is not None:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        await self._response.aclose()
