"""PendingRecord: what a request learns about itself, turned into exactly one AuditRecord."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..config import Pricing
from .record import AuditRecord, clip, cost_micros
from .writer import AuditLogger


class PendingRecord:
    """Filled in as a request proceeds; `finish()` records it once, later calls do nothing.

    `finish()` never awaits, so it is safe in `finally` blocks after cancellation.
    """

    __slots__ = (
        "_logger",
        "_pricing",
        "completion_tokens",
        "done",
        "endpoint",
        "key_name",
        "model",
        "prompt_tokens",
        "provider",
        "request_id",
        "started",
        "stream",
    )

    def __init__(
        self,
        logger: AuditLogger,
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
        self.model = ""
        self.provider = ""
        self.stream = False
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.done = False

    def set_provider(self, name: str) -> None:
        self.provider = name

    def set_usage(self, usage: Any) -> None:
        """Take token counts from an OpenAI `usage` object, ignoring anything malformed."""
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is int and prompt >= 0:
            self.prompt_tokens = prompt
        if type(completion) is int and completion >= 0:
            self.completion_tokens = completion
        elif self.endpoint == "embeddings" and self.prompt_tokens is not None:
            self.completion_tokens = 0

    def finish(self, status: int, error: str | None = None) -> int:
        """Record the request's outcome; return the record's sequence number (0 if done)."""
        if self.done:
            return 0
        self.done = True
        now = time.time_ns() // 1_000_000
        latency_ms = int((time.perf_counter() - self.started) * 1000)
        pricing = self._pricing.get(self.model)
        cost = 0
        if pricing is not None and (self.prompt_tokens or self.completion_tokens):
            cost = cost_micros(
                self.prompt_tokens,
                self.completion_tokens,
                pricing.prompt_cost_per_million,
                pricing.completion_cost_per_million,
            )
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
                error=None if error is None else clip(error),
            )
        )
