"""Forward a request along its provider plan: retries with backoff, then fallback.

Transient failures (429, 5xx, timeouts before the request could be served, connection
errors) retry the same provider up to its `max_retries`, then move to the next provider;
other 4xx answers are relayed at once. A timeout waiting for an answer moves on to the next
provider without retrying the same one (it may still be generating, and billing, the first
answer) unless the provider says `retry_on_timeout`. A stream is only retried before its
first event has been read, i.e. before the client has received anything.

Everything here sees `UpstreamError`s only: `upstream.client` made them.
"""

from __future__ import annotations

import contextlib
import email.utils
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from .audit.record import clip
from .config import ProviderConfig
from .errors import UpstreamError, UpstreamRejected, UpstreamTimeout
from .routing import backoff_delay
from .sse import EventSplitter, EventTooLarge
from .upstream import Scrubber, UpstreamClient, UpstreamResponse

# How long a stream's remainder after [DONE] may take before the connection is dropped.
DRAIN_SECONDS = 1.0
KIB = 1024


@dataclass(slots=True)
class OpenedStream:
    """A stream whose first complete event(s) are in hand; `receive()` gives the rest."""

    provider: ProviderConfig
    first: bytes
    splitter: EventSplitter
    response: UpstreamResponse

    async def receive(self) -> bytes | None:
        """The next complete events: b"" while none is complete yet, None at the end.

        Raises UpstreamError, also for an event longer than the provider's `max_event_kb`.
        """
        chunk = await self.response.receive()
        return _feed(self.splitter, chunk, self.provider) if chunk else None

    async def drain(self) -> None:
        """Read what follows [DONE] (normally just the body's end) so the connection is reused."""
        with trio.move_on_after(DRAIN_SECONDS), contextlib.suppress(UpstreamError):
            while await self.response.receive():
                pass

    async def aclose(self) -> None:
        """Release the upstream connection; safe in a cancelled `finally` (shielded, bounded)."""
        await self.response.aclose()


def _feed(splitter: EventSplitter, chunk: bytes, provider: ProviderConfig) -> bytes:
    """The events `chunk` completes; an event past `max_event_kb` is an UpstreamError."""
    try:
        return splitter.feed(chunk)
    except EventTooLarge as exc:
        raise UpstreamError(
            f"upstream {provider.name} sent {exc} (max_event_kb = {provider.max_event_kb:g})",
            code="upstream_event_too_large",
            retryable=False,
        ) from None


class _Attempts:
    """Walks the plan, sleeping between retries, and builds the error once all have failed."""

    def __init__(self, plan: Sequence[ProviderConfig], on_try: Callable[[str], None]) -> None:
        self.plan = plan
        self.on_try = on_try
        self.all_timeouts = True
        self.last: UpstreamError | None = None
        self._wait: float | None = None
        self._next_provider = False

    def __iter__(self) -> Iterator[tuple[ProviderConfig, int]]:
        for provider in self.plan:
            self._next_provider = False
            for retry in range(provider.max_retries + 1):
                if self._next_provider:
                    break
                yield provider, retry

    async def begin(self, provider: ProviderConfig, retry: int) -> None:
        if retry:
            delay = backoff_delay(retry - 1)
            if self._wait is not None:  # Retry-After, capped, never past the attempt's timeout
                delay = max(delay, min(self._wait, provider.retry_after_max, provider.timeout))
            await trio.sleep(delay)
        self._wait = None
        self.on_try(provider.name)

    def failed(self, error: UpstreamError) -> None:
        self.all_timeouts = self.all_timeouts and isinstance(error, UpstreamTimeout)
        self.last = error
        self._wait = error.retry_after
        self._next_provider = not error.retryable

    def error(self) -> UpstreamError:
        tried = len(self.plan)
        if self.last is None:  # pragma: no cover - a plan is never empty
            return UpstreamError("no provider could be tried")
        if self.all_timeouts:
            return UpstreamTimeout(f"{self.last} (tried {tried} provider(s), retries included)")
        self.last.args = (f"{self.last} (after retries and fallback)",)
        return self.last


class Upstreams:
    """The provider plan's calls, with the client and the secrets to keep out of answers."""

    def __init__(self, client: UpstreamClient, scrubber: Scrubber) -> None:
        self.client = client
        self.scrubber = scrubber

    async def _check_status(
        self, response: UpstreamResponse, provider: ProviderConfig
    ) -> UpstreamError | None:
        """None for 2xx; else the error: UpstreamRejected for a 4xx to relay as it is."""
        status = response.status
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:  # the caller closes the response, as for any error
            return UpstreamError(
                f"upstream {provider.name} answered {status} (a redirect: not followed)",
                retryable=False,
            )
        body = self.scrubber.body(await response.read())
        parsed = _json(body)
        if 400 <= status < 500 and status not in (408, 429):
            relayed = _error_body(body, parsed, status, provider)
            return UpstreamRejected(status, relayed, provider.name)
        message = f"upstream {provider.name} returned {status}{_message(parsed)}"
        return UpstreamError(
            message,
            status=status if status >= 429 else 502,
            retry_after=_retry_after(response) if status in (429, 503) else None,
        )

    async def call_json(
        self,
        plan: Sequence[ProviderConfig],
        path: str,
        payload: bytes,
        on_try: Callable[[str], None],
        headers: Sequence[tuple[str, str]] = (),
    ) -> bytes:
        """The upstream's whole 2xx answer, or raise UpstreamError."""
        attempts = _Attempts(plan, on_try)
        for provider, retry in attempts:
            await attempts.begin(provider, retry)
            try:
                response = await self.client.post(provider, path, payload, headers)
                try:
                    problem = await self._check_status(response, provider)
                    if problem is None:
                        return await response.read()
                finally:
                    await response.aclose()
            except UpstreamError as failure:
                problem = failure
            if isinstance(problem, UpstreamRejected):
                raise problem
            attempts.failed(problem)
        raise attempts.error()

    async def open_stream(
        self,
        plan: Sequence[ProviderConfig],
        path: str,
        payload: bytes,
        on_try: Callable[[str], None],
        headers: Sequence[tuple[str, str]] = (),
    ) -> OpenedStream:
        """Open a stream and read its first event; retry and fall back until one does."""
        attempts = _Attempts(plan, on_try)
        for provider, retry in attempts:
            await attempts.begin(provider, retry)
            response: UpstreamResponse | None = None
            opened: OpenedStream | None = None
            try:
                response = await self.client.post(provider, path, payload, headers)
                problem = await self._check_status(response, provider)
                if problem is None:
                    opened = await _first_events(response, provider)
                    if opened is not None:
                        return opened
                    problem = UpstreamError(f"upstream {provider.name} ended the stream early")
            except UpstreamError as failure:
                problem = failure
            finally:
                if opened is None and response is not None:
                    await response.aclose()
            if isinstance(problem, UpstreamRejected):
                raise problem
            attempts.failed(problem)
        raise attempts.error()


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _message(parsed: Any) -> str:
    """The upstream's own error message (OpenAI's shape), clipped, to quote in ours."""
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return f": {clip(message)}" if isinstance(message, str) and message else ""


def _error_body(body: bytes, parsed: Any, status: int, provider: ProviderConfig) -> bytes:
    """The upstream's error body if it is OpenAI-shaped JSON, else one built around it."""
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return body
    text = body.decode("utf-8", "replace").strip()
    message = f"upstream {provider.name} returned {status}" + (f": {clip(text)}" if text else "")
    return orjson.dumps({"error": {"message": message, "type": "upstream_error", "code": None}})


async def _first_events(
    response: UpstreamResponse, provider: ProviderConfig
) -> OpenedStream | None:
    splitter = EventSplitter(int(provider.max_event_kb * KIB))
    while chunk := await response.receive():
        first = _feed(splitter, chunk, provider)
        if first:
            return OpenedStream(provider, first, splitter, response)
    return None


def _retry_after(response: UpstreamResponse) -> float | None:
    """Retry-After in seconds, from either form (delta seconds, or an HTTP date)."""
    value = response.headers.get("retry-after", "").strip()
    if value.isascii() and value.isdigit():
        return float(value[:7])
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())
