"""Relay an opened upstream SSE stream to the client, event by event, and record its end.

Each API marks its stream's end and carries its usage differently: chat completions end
with `data: [DONE]` and put usage in a last chunk (asked for with `include_usage`); the
Responses API ends with `response.completed` (usage in its response) and Anthropic's
Messages API with `message_stop` (input tokens in `message_start`, output tokens in
`message_delta`). A watcher per API notes usage and the end as events pass, parsing only the
few events that can hold them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from . import sse
from .apis import MESSAGES_USAGE, RESPONSES_USAGE, Api
from .audit import PendingRecord
from .audit.record import clip
from .errors import GatewayError, UpstreamError
from .providers import OpenedStream


class ChatEvents:
    """Notes `usage` as it passes; drops the usage-only chunk the client did not ask for."""

    __slots__ = ("_pending", "_wants_usage", "done")
    ending = sse.DONE  # sent once the record is made
    failure: str | None = None
    response_id: str | None = None

    def __init__(self, pending: PendingRecord, wants_usage: bool) -> None:
        self._pending = pending
        self._wants_usage = wants_usage
        self.done = False  # the upstream sent [DONE]

    def __call__(self, complete: bytes) -> bytes:
        """Complete events in; the bytes to forward out (usually the same bytes)."""
        if b"[DONE]" not in complete:
            usages = complete.count(b'"usage"')
            # With include_usage on, OpenAI sends `"usage":null` in every chunk but the last:
            # those carry nothing to take (and parsing them cost 5x the event's relay).
            if usages == 0 or usages == complete.count(b'"usage":null'):
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

    def ended_early(self) -> bool:
        return False  # chat streams without [DONE] were always taken as complete


class TypedEvents:
    """The Responses and Messages APIs' typed events: forwarded untouched, the ones that
    carry usage, a response id, an error or the end read on the way."""

    __slots__ = ("_markers", "_pending", "_responses", "done", "failure", "response_id")
    ending = b""  # their last event is the upstream's own

    def __init__(self, pending: PendingRecord, api: Api) -> None:
        self._pending = pending
        self._responses = api.endpoint == "responses"
        # Every event that matters holds one of these (its type, or the usage it carries;
        # `response.failed` holds "error"); text deltas rarely do.
        self._markers = (
            (b'"usage"', b"error", b"response.created", b"response.completed", b"incomplete")
            if self._responses
            else (b'"usage"', b"message_stop", b"error")
        )
        self.done = False
        self.failure: str | None = None
        self.response_id: str | None = None

    def __call__(self, complete: bytes) -> bytes:
        markers = self._markers
        for marker in markers:  # (a loop, not any(): this runs for every event)
            if marker in complete:
                break
        else:
            return complete
        for event in sse.split_events(complete):
            if any(marker in event for marker in markers):
                payload = sse.data_of(event)
                try:
                    data = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(data, dict):
                    self._note(data)
        return complete

    def _note(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "error":
            self.done = True
            self.failure = "upstream error event: " + _message(data)
        elif self._responses:
            response = data.get("response")
            if not isinstance(response, dict):
                return
            if isinstance(response.get("id"), str) and self.response_id is None:
                self.response_id = response["id"]
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                self._pending.set_usage(response.get("usage"), RESPONSES_USAGE)
                self.done = True
                if kind == "response.failed":
                    self.failure = "upstream response failed: " + _message(response)
        elif kind == "message_start":
            message = data.get("message")
            if isinstance(message, dict):
                self._pending.set_usage(message.get("usage"), MESSAGES_USAGE)
        elif kind == "message_delta":
            self._pending.set_usage(data.get("usage"), MESSAGES_USAGE)
        elif kind == "message_stop":
            self.done = True

    def ended_early(self) -> bool:
        return not self.done


Events = ChatEvents | TypedEvents


def _message(data: dict[str, Any]) -> str:
    error = data.get("error")
    found = error.get("message") if isinstance(error, dict) else data.get("message")
    return clip(found) if isinstance(found, str) else "no message"


async def relay(
    opened: OpenedStream,
    pending: PendingRecord,
    events: Events,
    api: Api,
    *,
    send_part: Callable[[bytes], Awaitable[None]],
    wait_recorded: Callable[[int], Awaitable[None]],
) -> None:
    """Send the stream's events on as they arrive (everything one read completes, in one
    part); end (for chat with [DONE]) once the record is made.

    Records the stream at its end (200, or 502 when the upstream sent an error event or
    stopped before the end), or on an upstream failure mid-stream (502, or 504 when it
    stalled). A stream cut off by the client (499) or the server (503) is recorded by the
    route that owns the record (`proxy.serve`); the caller closes `opened`.
    """
    try:
        out = events(opened.first)
        if out:
            await send_part(out)
        while not events.done and (complete := await opened.receive()) is not None:
            if complete:
                out = events(complete)
                if out:
                    await send_part(out)
        if events.ended_early():
            raise UpstreamError(
                f"upstream {opened.provider.name} ended the stream before it was complete"
            )
        failure = events.failure
        await wait_recorded(
            pending.finish(200) if failure is None else pending.finish(502, failure)
        )
        if events.ending:
            await send_part(events.ending)
        await opened.drain()
    except GatewayError as exc:
        # An upstream failure mid-stream is recorded here; a record that could not be made
        # durable was finished already (`finish` records once). Either way: no normal end.
        pending.finish(exc.status, str(exc))
        await send_part(api.error_event(exc))
