"""PendingRecord: what a request learns about itself, turned into exactly one AuditRecord."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..config import Pricing
from .record import AuditRecord, clip, cost_micros


class Recorder(Protocol):
    """Where a finished record goes (the AuditLog, or its writer)."""

    def record(self, record: AuditRecord) -> int: ...


# Largest token count taken from an upstream's `usage`, per request and field: the largest
# context windows are ~10**7 tokens, so 10**9 leaves 100x headroom while any cost computed
# from it stays far inside 64 bits (10**9 tokens x $10**6 per million = 10**15 micro-USD).
MAX_TOKENS = 10**9
# (field of the upstream's usage object, count of the record) for OpenAI's chat and
# embeddings; the other APIs name theirs differently (see `apis`).
_OPENAI_USAGE = (("prompt_tokens", "prompt_tokens"), ("completion_tokens", "completion_tokens"))


class PendingRecord:
    """Filled in as a request proceeds; `finish()` records it once, later calls do nothing.

    `finish()` never awaits, so it is safe in `finally` blocks after cancellation.
    """

    __slots__ = (
        "_logger",
        "_pricing",
        "_usage_problems",
        "cache_creation_tokens",
        "cache_read_tokens",
        "completion_tokens",
        "done",
        "endpoint",
        "key_name",
        "meter",
        "model",
        "prompt_tokens",
        "provider",
        "request_id",
        "started",
        "stream",
    )

    def __init__(
        self,
        logger: Recorder,
        pricing: Mapping[str, Pricing],
        request_id: str,
        endpoint: str,
        started: float,
    ) -> None:
        self._logger = logger
        self._pricing = pricing
        self.request_id = request_id
        self.endpoint = endpoint
        self.started = started
        self.key_name = ""
        # Counts the request's tokens against its key's tpm (see `limits`) when recorded.
        self.meter: Callable[[str, int], None] | None = None
        self.model = ""
        self.provider = ""
        self.stream = False
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        # Anthropic's prompt caching: input tokens read from and written to the cache.
        self.cache_read_tokens: int | None = None
        self.cache_creation_tokens: int | None = None
        # Why a token count from upstream was not taken, by field; noted in the record.
        self._usage_problems: dict[str, str] = {}
        self.done = False

    def set_provider(self, name: str) -> None:
        self.provider = name

    def set_usage(self, usage: Any, fields: tuple[tuple[str, str], ...] = _OPENAI_USAGE) -> None:
        """Take token counts from an upstream's `usage` object, its `fields` named as
        (upstream field, record field); a later count replaces an earlier one.

        A count that is not an int in 0..MAX_TOKENS is unknown (None), and the record's
        `error` says which one was invalid; an absent or null count changes nothing.
        """
        if usage is None:
            return
        if not isinstance(usage, dict):
            self._usage_problems["usage"] = "not an object"
            return
        self._usage_problems.pop("usage", None)
        for source, name in fields:
            value = usage.get(source)
            if value is None:
                continue
            if type(value) is not int:
                count, problem = None, "not an integer"
            elif not 0 <= value <= MAX_TOKENS:
                count, problem = None, "out of range"
            else:
                count, problem = value, None
            setattr(self, name, count)
            if problem is None:
                self._usage_problems.pop(name, None)
            else:
                self._usage_problems[name] = problem
        if (
            self.endpoint == "embeddings"
            and usage.get("completion_tokens") is None
            and self.prompt_tokens is not None
        ):
            self.completion_tokens = 0

    def _error(self, error: str | None) -> str | None:
        """The record's `error`: the request's own error first, then invalid usage, if any."""
        if error is not None:
            error = clip(error)
        if not self._usage_problems:
            return error
        note = "upstream usage invalid: " + ", ".join(
            f"{name} {problem}" for name, problem in self._usage_problems.items()
        )
        return note if error is None else f"{error}; {note}"

    def finish(self, status: int, error: str | None = None) -> int:
        """Record the request's outcome; return the record's sequence number (0 if done)."""
        if self.done:
            return 0
        self.done = True
        now = time.time_ns() // 1_000_000
        latency_ms = int((time.perf_counter() - self.started) * 1000)
        pricing = self._pricing.get(self.model)
        cost = 0
        counted = self.prompt_tokens or self.completion_tokens
        if pricing is not None and (
            counted or self.cache_read_tokens or self.cache_creation_tokens
        ):
            cost = cost_micros(
                self.prompt_tokens,
                self.completion_tokens,
                pricing.prompt_cost_per_million,
                pricing.completion_cost_per_million,
                (self.cache_read_tokens, pricing.cache_read_cost_per_million),
                (self.cache_creation_tokens, pricing.cache_creation_cost_per_million),
            )
        if self.meter is not None:
            self.meter(self.key_name, (self.prompt_tokens or 0) + (self.completion_tokens or 0))
        return self._logger.record(
            AuditRecord(
                request_id=self.request_id,
                timestamp=now,
                key_name=self.key_name,
                model=clip(self.model),
                provider=self.provider,
                cost_micros=cost,
                latency_ms=latency_ms,
                status=status,
                stream=self.stream,
                endpoint=self.endpoint,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                error=self._error(error),
                cache_read_tokens=self.cache_read_tokens,
                cache_creation_tokens=self.cache_creation_tokens,
            )
        )
