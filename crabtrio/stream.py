"""Relay an opened upstream SSE stream to the client, event by event, and record its end."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

import orjson

from . import sse
from .audit import PendingRecord
from .errors import GatewayError
from .providers import OpenedStream


class _UsageFilter:
    """Notes `usage` as it passes; drops the usage-only chunk the client did not ask for."""

    __slots__ = ("_pending", "_wants_usage", "done")

    def __init__(self, pending: PendingRecord, wants_usage: bool) -> None:
        self._pending = pending
        self._wants_usage = wants_usage
        self.done = False  # the upstream sent [DONE]

    def __call__(self, complete: bytes) -> bytes:
        """Complete events in; the bytes to forward out (usually the same bytes)."""
        if b'"usage"' not in complete and b"[DONE]" not in complete:
            return complete
        out = []
        for event in sse.split_events(complete):
            payload = sse.data_of(event)
            if payload == b"[DONE]":
                self.done = True
                break
            if b'"usage"' in payload:
                try:
                    chunk = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    chunk = None
                if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
                    self._pending.set_usage(chunk["usage"])
                    if not self._wants_usage and chunk.get("choices") == []:
                        continue
            out.append(event)
        return b"".join(out)


async def relay(
    opened: OpenedStream,
    pending: PendingRecord,
    *,
    wants_usage: bool,
    wait_recorded: Callable[[int], Awaitable[None]],
) -> AsyncGenerator[bytes]:
    """Yield the stream's events as they arrive; end with [DONE] once the record is made.

    Records the stream at [DONE] (200) or on an upstream failure mid-stream (502, or 504
    when it stalled). A stream cut off by the client (499) or the server (503) is recorded
    by the route that owns the record (`proxy.serve`); the caller closes `opened`.
    """
    usage = _UsageFilter(pending, wants_usage)
    try:
        out = usage(opened.first)
        if out:
            yield out
        while not usage.done and (complete := await opened.receive()) is not None:
            if complete:
                out = usage(complete)
                if out:
                    yield out
        await wait_recorded(pending.finish(200))
        yield sse.DONE
        await opened.drain()
    except GatewayError as exc:
        # An upstream failure mid-stream is recorded here; a record that could not be made
        # durable was finished already (`finish` records once). Either way: no [DONE].
        pending.finish(exc.status, str(exc))
        yield sse.event(exc.body())
