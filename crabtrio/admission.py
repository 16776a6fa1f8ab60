"""Admission: a key's budget and rate limits, checked before anything goes upstream."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

from .audit import AuditLog
from .budgets import MICROS_PER_USD, Spend
from .config import KeyConfig
from .errors import BudgetExceeded, RateLimited, Unavailable
from .limits import Windows

log = logging.getLogger("crabtrio")

Headers = list[tuple[bytes, bytes]]


class Admission:
    """Owns the budgets' spend and the shared rate-limit windows (opened when a key first
    has rpm or tpm, at startup or at a reload)."""

    def __init__(self, audit: AuditLog, clock: Callable[[], float] = time.time) -> None:
        self._audit = audit
        self._clock = clock
        self.spend = Spend(clock)
        self._windows: Windows | None = None

    def configure(self, keys: Sequence[KeyConfig]) -> None:
        """Take the keys' limits and budgets (at startup and at each reload). Raises
        LimitsFileError when a limit needs the windows' file and it cannot be used."""
        if not self._audit.enabled:
            return  # the config refuses limits and budgets without the audit trail
        if self._windows is None and any(key.limited for key in keys):
            path = os.path.abspath(self._audit.config.path) + ".limits"
            self._windows = Windows.open(path, self._audit.recent, self._clock)
        self._audit.follow_spend(self.spend, keys)

    def close(self) -> None:
        if self._windows is not None:
            self._windows.close()
            self._windows = None

    def check(self, key: KeyConfig) -> Headers:
        """Admit a request of `key` (counting it against its rpm), or raise a 429: the
        budget first, so a key over budget spends none of its rate. The headers go on the
        response."""
        over = self.spend.over_budget(key)
        if over is not None:
            spent, budget = over
            raise BudgetExceeded(
                f"key {key.name!r} has spent ${spent / MICROS_PER_USD:.6f} of its "
                f"${budget / MICROS_PER_USD:.6f} {key.budget_period} budget",
                headers=self.headers(key),
            )
        if not key.limited:
            return []
        windows = self._opened()
        verdict = windows.admit(key)
        if not verdict.admitted:
            limit = key.rpm if verdict.exceeded == "requests" else key.tpm
            raise RateLimited(
                f"key {key.name!r} is at its limit of {limit} {verdict.exceeded} per minute; "
                f"retry in {verdict.retry_after}s",
                headers=verdict.headers,
            )
        return verdict.headers

    def headers(self, key: KeyConfig) -> Headers:
        """The x-ratelimit-* headers of a limited key, without counting a request."""
        if not key.limited:
            return []
        return self._opened().admit(key, count=False).headers

    def meter(self, key: KeyConfig | None) -> Callable[[str, int], None] | None:
        """What counts a finished request's tokens, for a key with a tpm."""
        if key is None or key.tpm is None:
            return None
        return self._opened().count_tokens

    def _opened(self) -> Windows:
        windows = self._windows
        if windows is None:  # configure() opens it for any limited key
            raise Unavailable("rate limits are not initialised", code="limits_unavailable")
        return windows
