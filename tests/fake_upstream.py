"""A fake upstream for in-process tests: httpx-style handlers answer requests.

`httpx.MockTransport` plays the upstream; like a network transport (and unlike the mock
alone), this one bounds the wait for the head and each read of a response body by the
request's read timeout, and
hands bodies over as raw bytes, not yet decoded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

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
    def __init__(self, stream: httpx.AsyncByteStream, timeout: float | None) -> None:
        self._stream = stream
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = aiter(self._stream)
        while True:
            try:
                with trio.fail_after(self._timeout if self._timeout is not None else float("inf")):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except trio.TooSlowError:
                raise httpx.ReadTimeout("nothing in time") from None
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()
