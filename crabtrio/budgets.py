"""Budgets: each key's spend in its calendar period, from the audit trail.

Spend is the sum of the key's records' `cost_micros` in the period (UTC day, month, or the
whole retained trail). A worker sums it from its index's rollups once, then adds every record
its follower indexes after that; since every worker follows every worker's records, they
agree within one follower poll. A request is refused when its key's spend has reached the
budget, so the spend can pass it by the cost of the requests already in flight at that
moment, plus those that ended on another worker during the last poll (README: "Budgets").
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .audit.record import IndexedFields
from .audit.rollups import COST, DAY_MS, MAX_COST, Rollups
from .audit.sums import select
from .config import KeyConfig

MICROS_PER_USD = 1_000_000


def month_start(ms: int) -> int:
    """The start (ms) of the UTC calendar month holding `ms`."""
    year, month = time.gmtime(ms // 1000)[:2]
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000


class Spend:
    """Per budgeted key: spend per day, per month and in total, in micro-USD."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._days: dict[str, dict[int, int]] = {}
        self._months: dict[str, dict[int, int]] = {}
        self._totals: dict[str, int] = {}
        self._month = (0, 0)  # [start, end) of the last month looked up (see `_month_of`)

    def start(self, sources: Iterable[Rollups], keys: Sequence[KeyConfig]) -> None:
        """Sum the spend of every budgeted key in `keys` from the rollups (the index as it
        stands: records indexed later come through `observe`)."""
        names = {key.name for key in keys if key.max_budget_usd is not None}
        self._days = {name: {} for name in names}
        self._months = {name: {} for name in names}
        self._totals = dict.fromkeys(names, 0)
        if not names:
            return
        cells = select(sources, group_by=("key",), interval=DAY_MS)
        for (day, name), values in cells.items():
            if name in self._totals:
                self._add(name, day, values[COST])

    def observe(self, records: Sequence[IndexedFields]) -> None:
        """Count newly indexed records (the follower calls this for every batch)."""
        totals = self._totals
        if not totals:
            return
        for record in records:
            if record.cost_micros and record.key_name in totals:
                self._add(record.key_name, record.timestamp, min(record.cost_micros, MAX_COST))

    def spent(self, key: KeyConfig, now_ms: int | None = None) -> int:
        """The key's spend (micro-USD) in its current budget period."""
        name = key.name
        if name not in self._totals:
            return 0
        now_ms = int(self._clock() * 1000) if now_ms is None else now_ms
        if key.budget_period == "total":
            return self._totals[name]
        if key.budget_period == "day":
            return self._days[name].get(now_ms - now_ms % DAY_MS, 0)
        return self._months[name].get(self._month_of(now_ms), 0)

    def over_budget(self, key: KeyConfig) -> tuple[int, int] | None:
        """(spent, budget) in micro-USD when the key has reached its budget, else None."""
        if key.max_budget_usd is None:
            return None
        budget = round(key.max_budget_usd * MICROS_PER_USD)
        spent = self.spent(key)
        return (spent, budget) if spent >= budget else None

    def _month_of(self, ms: int) -> int:
        """The start of the UTC month holding `ms`, from the last month's bounds when it is
        in it (nearly always: every check and every record asks)."""
        low, high = self._month
        if not low <= ms < high:
            low = month_start(ms)
            self._month = (low, month_start(low + 32 * DAY_MS))
        return low

    def _add(self, name: str, ms: int, cost: Any) -> None:
        cost = int(cost)
        self._totals[name] += cost
        days = self._days[name]
        day = ms - ms % DAY_MS
        days[day] = days.get(day, 0) + cost
        month = self._month_of(ms)
        months = self._months[name]
        months[month] = months.get(month, 0) + cost
        if len(days) > 64:  # only today's is ever asked for: keep a few
            for old in sorted(days)[:-2]:
                del days[old]
