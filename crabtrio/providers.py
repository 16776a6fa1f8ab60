"""Forward a request along its provider plan: retries with backoff, then fallback.

Transient failures (429, 5xx, timeouts, connection errors) retry the same provider up to
its `max_retries`, then move to the next provider; other 4xx answers are relayed at once.
A stream is only retried before its first event has been read, i.e. before the client
has received anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from . import mock
from .audit.record import clip
from .config import ProviderConfig
from .errors import GatewayError, UpstreamError, UpstreamRejected, UpstreamTimeout
from .routing import backoff_delay
from .sse import EventSplitter
from .upstream import (
    UpstreamClient,
    UpstreamFailure,
    UpstreamResponse,
    close_quietly,
    read_body,
    scrub,
)

PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings"}
# How long a stream's remainder after [DONE] may take before the connection is dropped.
DRAIN_SECONDS = 1.0


@dataclass(slots=True)
class OpenedStream:
    """A stream whose first complete event(s) are in hand; `receive()` gives the rest."""

    provider: ProviderConfig
    first: bytes
    splitter: EventSplitter
    response: UpstreamResponse

    async def receive(self) -> bytes:
        """The next chunk of the stream, b"" at its end; raises UpstreamFailure."""
        return await self.response.receive()

    async def drain(self) -> None:
        """Read what follows [DONE] (normally just the body's end) so the connection is reused."""
        with trio.move_on_after(DRAIN_SECONDS), contextlib.suppress(UpstreamFailure):
            while await self.receive():
                pass

    async def aclose(self) -> None:
        """Release the upstream connection; safe in a cancelled `finally` (shielded, bounded)."""
        await close_quietly(self.response)


class _Attempts:
    """Walks the plan, sleeping between retries, and builds the error once all have failed."""

    def __init__(self, plan: Sequence[ProviderConfig], on_try: Callable[[str], None]) -> None:
        self.plan = plan
        self.on_try = on_try
        self.all_timeouts = True
        self.last: GatewayError | None = None

    def __iter__(self) -> Iterator[tuple[ProviderConfig, int]]:
        for provider in self.plan:
            for retry in range(provider.max_retries + 1):
                yield provider, retry

    async def begin(self, provider: ProviderConfig, retry: int) -> None:
        if retry:
            await trio.sleep(backoff_delay(retry - 1))
        self.on_try(provider.name)

    def failed(self, failure: UpstreamFailure | GatewayError) -> None:
        if isinstance(failure, UpstreamFailure):
            self.all_timeouts = self.all_timeouts and failure.timeout
            self.last = (
                UpstreamTimeout(str(failure)) if failure.timeout else UpstreamError(str(failure))
            )
        else:
            self.all_timeouts = False
            self.last = failure

    def error(self) -> GatewayError:
        tried = len(self.plan)
        if self.all_timeouts and self.last is not None:
            return UpstreamTimeout(f"{self.last} (tried {tried} provider(s), retries included)")
        if self.last is None:  # pragma: no cover - a plan is never empty
            return UpstreamError("no provider could be tried")
        self.last.args = (f"{self.last} (after retries and fallback)",)
        return self.last


async def _check_status(
    response: UpstreamResponse, provider: ProviderConfig
) -> UpstreamError | None:
    """None for 2xx; an UpstreamError for a transient status; raise UpstreamRejected for 4xx."""
    status = response.status
    if 200 <= status < 300:
        return None
    body = scrub(await read_body(response), [provider.api_key])
    if 400 <= status < 500 and status != 429:
        raise UpstreamRejected(status, _error_body(body, status, provider), provider.name)
    message = f"upstream {provider.name} returned {status}{_upstream_message(body)}"
    return UpstreamError(message, status=status if status >= 429 else 502)


async def call_json(
    client: UpstreamClient,
    plan: Sequence[ProviderConfig],
    endpoint: str,
    body: dict[str, Any],
    payload: bytes,
    on_try: Callable[[str], None],
) -> bytes:
    """The upstream's whole 2xx answer, or raise GatewayError / UpstreamRejected."""
    attempts = _Attempts(plan, on_try)
    for provider, retry in attempts:
        await attempts.begin(provider, retry)
        if provider.kind == "mock":
            return (
                mock.chat(body, provider) if endpoint == "chat" else mock.embeddings(body, provider)
            )
        try:
            response = await client.post(provider, PATHS[endpoint], payload)
            problem = await _check_status(response, provider)
            if problem is None:
                return await read_body(response)
            attempts.failed(problem)
        except UpstreamFailure as failure:
            attempts.failed(failure)
    raise attempts.error()


async def open_stream(
    client: UpstreamClient,
    plan: Sequence[ProviderConfig],
    body: dict[str, Any],
    payload: bytes,
    on_try: Callable[[str], None],
) -> OpenedStream:
    """Open a chat stream and read its first event; retry and fall back until one does."""
    attempts = _Attempts(plan, on_try)
    for provider, retry in attempts:
        await attempts.begin(provider, retry)
        if provider.kind == "mock":
            events = mock.StreamResponse(body, provider)
            splitter = EventSplitter()
            return OpenedStream(provider, splitter.feed(await events.receive()), splitter, events)
        response: UpstreamResponse | None = None
        opened: OpenedStream | None = None
        try:
            response = await client.post(provider, PATHS["chat"], payload)
            problem = await _check_status(response, provider)
            if problem is not None:
                attempts.failed(problem)
                continue
            opened = await _first_events(response, provider)
            if opened is not None:
                return opened
            attempts.failed(
                UpstreamFailure(f"upstream {provider.name} ended the stream early", timeout=False)
            )
        except UpstreamFailure as failure:
            attempts.failed(failure)
        finally:
            if opened is None and response is not None:
                await close_quietly(response)
    raise attempts.error()


async def _first_events(
    response: UpstreamResponse, provider: ProviderConfig
) -> OpenedStream | None:
    splitter = EventSplitter()
    while chunk := await response.receive():
        first = splitter.feed(chunk)
        if first:
            return OpenedStream(provider, first, splitter, response)
    return None


def _upstream_message(body: bytes) -> str:
    try:
        message = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""
    return f": {clip(message)}" if isinstance(message, str) and message else ""


def _error_body(body: bytes, status: int, provider: ProviderConfig) -> bytes:
    """The upstream's error body if it is OpenAI-shaped JSON, else one built around it."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return body
    text = body.decode("utf-8", "replace").strip()
    message = f"upstream {provider.name} returned {status}" + (f": {clip(text)}" if text else "")
    return orjson.dumps({"error": {"message": message, "type": "upstream_error", "code": None}})
