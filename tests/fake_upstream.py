"""A fake upstream for in-process tests: httpx-style handlers answer requests.

`httpx.MockTransport` plays the upstream; like a network transport (and unlike the mock
alone), this one bounds the wait for the head and each read of a response body by the
request's read timeout, and
hands bodies over as raw bytes, not yet decoded.
"""

from __future__ import annotations

import httpx
import trio


class FakeUpstream(httpx.MockTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {}).get("read")
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                response = await super().handle_async_request(request)
        except trio.TooSlowError:
            raise httpx.ReadTimeout("no answer in time") from None
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Timed(stream, timeout),
            extensions=response.extensions,
        )


class _Timed(httpx.AsyncByteStream):
    """An iterator (not an async generator, which the GC would have to finalize)."""

    def __init__(self, stream: httpx.AsyncByteStream, timeout: float | None) -> None:
        self._stream = stream
        self._chunks = aiter(stream)
        self._timeout = timeout if timeout is not None else float("inf")

    def __aiter__(self) -> _Timed:
        return self

    async def __anext__(self) -> bytes:
        try:
            with trio.fail_after(self._timeout):
                return await anext(self._chunks)
        except trio.TooSlowError:
            raise httpx.ReadTimeout("nothing in time") from None

    async def aclose(self) -> None:
        close = getattr(self._chunks, "aclose", None)
        if close is not None:
            await close()
        await self._stream.aclose()
