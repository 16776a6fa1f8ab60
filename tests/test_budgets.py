"""Spend per budget period: calendar months and days in UTC, followed record by record."""

from __future__ import annotations

import calendar

from crabtrio.audit.record import IndexedFields
from crabtrio.budgets import Spend, month_start
from crabtrio.config import KeyConfig


def ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, 0, 0)) * 1000


def record(name: str, at: int, cost: int) -> IndexedFields:
    return IndexedFields(
        request_id=f"r{at}",
        timestamp=at,
        key_name=name,
        model="m",
        provider="p",
        status=200,
        latency_ms=1,
        cost_micros=cost,
    )


def test_month_start_is_the_utc_calendar_month() -> None:
    assert month_start(ms(2026, 12, 31, 23) + 3_599_999) == ms(2026, 12, 1)
    assert month_start(ms(2027, 1, 1)) == ms(2027, 1, 1)
    assert month_start(ms(2028, 2, 29, 12)) == ms(2028, 2, 1)
    assert month_start(ms(2028, 3, 1) - 1) == ms(2028, 2, 1)


def test_spend_per_period_from_the_records_followed() -> None:
    day, month, total = (
        KeyConfig(name=n, key=f"sk-{n}", max_budget_usd=1.0, budget_period=p)  # type: ignore[arg-type]
        for n, p in (("d", "day"), ("m", "month"), ("t", "total"))
    )
    unbudgeted = KeyConfig(name="free", key="sk-free")
    spend = Spend(clock=lambda: ms(2027, 1, 1, 5) / 1000)
    spend.start([], [day, month, total, unbudgeted])
    spend.observe(
        [
            record(k.name, at, cost)
            for k in (day, month, total, unbudgeted)
            for at, cost in (
                (ms(2026, 12, 31, 23), 100),
                (ms(2027, 1, 1, 1), 20),
                (ms(2027, 1, 1, 4), 3),
            )
        ]
    )
    assert spend.spent(day) == 23
    assert spend.spent(month) == 23
    assert spend.spent(total) == 123
    assert spend.spent(unbudgeted) == 0  # not followed
    assert spend.spent(day, ms(2026, 12, 31, 12)) == 100
    assert spend.spent(month, ms(2026, 12, 15)) == 100
    assert spend.over_budget(total) is None
    spend.observe([record("t", ms(2027, 1, 2), 999_877)])
    assert spend.over_budget(total) == (1_000_000, 1_000_000)  # at the budget: refused
