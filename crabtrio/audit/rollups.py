"""Per-hour rollups of the audit trail: for every (hour, key, model, provider, status) seen,
the request count, token and cost sums, and a latency histogram for percentile estimates.

They are what usage reports, budgets and limits read: summing a month takes the hours of
the month, never the records. Cells are numpy columns (a sealed segment's are mapped from its
sidecar); key, model and provider are codes of the segment's string table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .columns import Strings

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# Upper bounds (ms, inclusive) of the latency buckets; the last bucket takes the rest.
_BOUNDS = (10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 60_000, 120_000)
LATENCY_BOUNDS_MS = np.array([*_BOUNDS, 300_000, 600_000])
BUCKETS = len(LATENCY_BOUNDS_MS) + 1
# The values of a cell: requests, prompt_tokens, completion_tokens, cost_micros, buckets.
REQUESTS, PROMPT, COMPLETION, COST, HISTOGRAM = 0, 1, 2, 3, 4
WIDTH = HISTOGRAM + BUCKETS
DIMENSIONS = ("key", "model", "provider", "status")
KEY_WIDTH = 1 + len(DIMENSIONS)  # a cell's key: hour start (ms), key, model, provider, status
VALUES_DTYPE = np.dtype("<i8")
# Per-record values are clipped so that sums of billions of them stay inside int64.
MAX_TOKENS = 2**31
MAX_COST = 2**40  # micro-USD: $1.1M for one request

CellKey = tuple[int, str, str, str, int]  # (hour start in ms, key, model, provider, status)


def latency_bucket(latency_ms: int) -> int:
    return int(np.searchsorted(LATENCY_BOUNDS_MS, latency_ms, "left"))


def _summed(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row per distinct key row, its values summed."""
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    sums = np.zeros((len(unique), values.shape[1]), VALUES_DTYPE)
    np.add.at(sums, inverse.reshape(-1), values)
    return unique, sums


class Rollups:
    """The cells of one file: `keys` (int64 rows of KEY_WIDTH: hour start, string-table codes
    of key, model and provider, status) and `values` (int64 rows of WIDTH), one row per
    distinct key. A growing file's batches are kept as partial cells and summed into the
    others when they are as many (no per-cell lookup on the way in)."""

    __slots__ = ("_pending", "_pending_rows", "keys", "strings", "values")

    def __init__(
        self,
        strings: Strings,
        keys: np.ndarray | None = None,
        values: np.ndarray | None = None,
    ) -> None:
        self.strings = strings
        self.keys = keys if keys is not None else np.zeros((0, KEY_WIDTH), np.int64)
        self.values = values if values is not None else np.zeros((0, WIDTH), VALUES_DTYPE)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0

    def __len__(self) -> int:
        self.compact()
        return len(self.values)

    def add(
        self,
        ts: np.ndarray,
        codes: dict[str, np.ndarray],
        prompt: np.ndarray,
        completion: np.ndarray,
        cost: np.ndarray,
        latency: np.ndarray,
    ) -> None:
        """Count a batch of records (ts in ms; codes for key, model, provider; status)."""
        keys = np.stack([ts - ts % HOUR_MS, *(codes[name] for name in DIMENSIONS)], axis=1)
        values = np.zeros((len(ts), WIDTH), VALUES_DTYPE)
        values[:, REQUESTS] = 1
        values[:, PROMPT] = prompt
        values[:, COMPLETION] = completion
        values[:, COST] = cost
        values[np.arange(len(ts)), HISTOGRAM + np.searchsorted(LATENCY_BOUNDS_MS, latency)] = 1
        keys, values = _summed(keys.astype(np.int64), values)
        self._pending.append((keys, values))
        self._pending_rows += len(keys)
        if self._pending_rows >= max(4096, len(self.values)):
            self.compact()

    def compact(self) -> None:
        if not self._pending:
            return
        parts = [(self.keys, self.values), *self._pending]
        self._pending, self._pending_rows = [], 0
        self.keys, self.values = _summed(
            np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts])
        )

    def writable(self) -> Rollups:
        """A copy that can grow (these cells may be mapped read-only from a sidecar)."""
        self.compact()
        return Rollups(self.strings, self.keys.copy(), self.values.copy())

    def select(
        self,
        since: int | None,
        until: int | None,
        filters: dict[str, Any],
        group_by: Sequence[str],
        interval: int | None,
    ) -> dict[tuple[Any, ...], np.ndarray]:
        """Summed values per group: (bucket start or None, *the group_by values)."""
        self.compact()
        keys = self.keys
        hours = keys[:, 0]
        mask = np.ones(len(keys), bool)
        if since is not None:
            mask &= hours >= since - since % HOUR_MS
        if until is not None:
            mask &= hours <= until
        for name, value in filters.items():
            column = 1 + DIMENSIONS.index(name)
            if name != "status":
                value = self.strings.codes.get(value)
                if value is None:
                    return {}
            mask &= keys[:, column] == value
        rows = np.flatnonzero(mask)
        if not len(rows):
            return {}
        values = self.values[rows]
        columns = [keys[rows, 1 + DIMENSIONS.index(name)] for name in group_by]
        if interval is not None:
            columns.insert(0, hours[rows] // interval)
        if not columns:
            return {(None,): values.sum(axis=0)}
        groups, sums = _grouped(columns, values)
        strings = self.strings.values
        out = {}
        for parts, total in zip(groups, sums, strict=True):
            bucket = parts.pop(0) * interval if interval is not None else None
            named = tuple(
                value if name == "status" else strings[value]
                for name, value in zip(group_by, parts, strict=True)
            )
            out[(bucket, *named)] = total
        return out


def _grouped(columns: list[np.ndarray], values: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """The distinct rows of `columns` and the sums of `values` over each. One integer per
    row (mixed radix over each column's range), then bincount: far cheaper than sorting rows;
    exact while a sum stays below 2**53."""
    bases = [(int(column.min()), int(column.max()) - int(column.min()) + 1) for column in columns]
    if np.prod([float(span) for _, span in bases]) >= 2**62:  # no room: sort the rows
        unique, sums = _summed(np.stack(columns, axis=1), values)
        return unique.tolist(), sums
    group = np.zeros(len(values), np.int64)
    for column, (low, span) in zip(columns, bases, strict=True):
        group = group * span + (column - low)
    present, inverse = np.unique(group, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.stack(
        [np.bincount(inverse, values[:, i], len(present)) for i in range(values.shape[1])],
        axis=1,
    ).astype(VALUES_DTYPE)
    rows = []
    for number in present.tolist():
        parts = []
        for low, span in reversed(bases):
            number, digit = divmod(number, span)
            parts.append(low + digit)
        parts.reverse()
        rows.append(parts)
    return rows, sums


def select(
    sources: Iterable[Rollups],
    *,
    since: int | None = None,
    until: int | None = None,
    filters: dict[str, Any] | None = None,
    group_by: Sequence[str] = DIMENSIONS,
    interval: int | None = HOUR_MS,
) -> dict[tuple[Any, ...], list[int]]:
    """Cells of the hours that overlap [since, until] (ms) whose dimensions equal `filters`,
    summed per (interval start, *group_by values) across `sources`: `interval` HOUR_MS or
    DAY_MS (UTC), or None for totals (then the first element of each group is None)."""
    filters = filters or {}
    out: dict[tuple[Any, ...], np.ndarray] = {}
    for rollups in sources:
        for group, total in rollups.select(since, until, filters, group_by, interval).items():
            found = out.get(group)
            out[group] = total if found is None else found + total
    return {group: total.tolist() for group, total in out.items()}
