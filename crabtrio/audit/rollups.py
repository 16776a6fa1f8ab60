"""Per-hour rollups of the audit trail: for every (hour, key, model, provider, status) seen,
the request count, token and cost sums, and a latency histogram for percentile estimates.

They are what usage reports, budgets and limits read: summing a month takes the hours of
the month, never the records. Cells are numpy columns (a sealed segment's are mapped from its
sidecar); key, model and provider are codes of the segment's string table.
"""

from __future__ import annotations

import time
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
# float64: what bincount sums in anyway (exact for integers below 2**53).
VALUES_DTYPE = np.dtype("<f8")
_FAR = 2**62  # an unbounded end of a time range
# Per-record values are clipped so that sums of billions of them stay inside int64.
MAX_TOKENS = 2**31
MAX_COST = 2**40  # micro-USD: $1.1M for one request

# Groups, and per value column their sums (WIDTH x len(groups)).
Piece = tuple[list[tuple[Any, ...]], np.ndarray]


def utc_text(ms: int) -> str:
    """An interval's start (ms since the epoch) in ISO 8601 UTC, as reports show it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


def latency_bucket(latency_ms: int) -> int:
    return int(np.searchsorted(LATENCY_BOUNDS_MS, latency_ms, "left"))


def _summed(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row per distinct key row (sorted by column 0, then 1...), and per value column
    the sums over each. lexsort on the integer columns: np.unique(axis=0) sorts the rows as
    opaque bytes, 10x slower."""
    if not len(keys):
        return keys, values
    order = np.lexsort(keys.T[::-1])
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], np.any(ordered[1:] != ordered[:-1], axis=1))))
    return ordered[starts], np.add.reduceat(values[:, order], starts, axis=1)


def _sums(group: np.ndarray, values: np.ndarray, groups: int) -> np.ndarray:
    """Per value column (a row of `values`), the sums over each group number. bincount
    works in float64: exact while a sum stays below 2**53."""
    return np.stack([np.bincount(group, column, groups) for column in values])


class Rollups:
    """The cells of one file: `keys` (int64 rows of KEY_WIDTH: hour start, string-table codes
    of key, model and provider, status) and `values` (WIDTH float64 columns, stored as rows
    so that each is contiguous), one cell per distinct key. A growing file's batches are kept as
    partial cells and summed into the others when they are as many (no per-cell lookup on
    the way in). A growing file resumed from a checkpoint counts the checkpoint's cells as
    its `base` (mapped, shared between workers) and keeps only what came after as its own."""

    __slots__ = ("_base", "_days", "_pending", "_pending_rows", "keys", "strings", "values")

    def __init__(
        self,
        strings: Strings,
        keys: np.ndarray | None = None,
        values: np.ndarray | None = None,
        days: tuple[np.ndarray, np.ndarray] | None = None,
        base: Rollups | None = None,
    ) -> None:
        self.strings = strings
        self._base = base
        # The same cells summed per day (column 0 the day's start): what long ranges read.
        self._days = days
        self.keys = keys if keys is not None else np.zeros((0, KEY_WIDTH), np.int64)
        self.values = values if values is not None else np.zeros((WIDTH, 0), VALUES_DTYPE)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0

    def __len__(self) -> int:
        self.compact()
        return int(self.values.shape[1]) + (len(self._base) if self._base is not None else 0)

    def add(
        self,
        columns: dict[str, np.ndarray],
        prompt: np.ndarray,
        completion: np.ndarray,
        cost: np.ndarray,
        latency: np.ndarray,
    ) -> None:
        """Count a batch of records: their index columns (`ts` in ms, the codes of key,
        model and provider, `status`) and what else a cell sums."""
        ts = columns["ts"]
        keys = np.stack([ts - ts % HOUR_MS, *(columns[name] for name in DIMENSIONS)], axis=1)
        values = np.zeros((WIDTH, len(ts)), VALUES_DTYPE)
        values[REQUESTS] = 1
        values[PROMPT] = prompt
        values[COMPLETION] = completion
        values[COST] = cost
        values[HISTOGRAM + np.searchsorted(LATENCY_BOUNDS_MS, latency), np.arange(len(ts))] = 1
        keys, values = _summed(keys.astype(np.int64), values)
        self._pending.append((keys, values))
        self._pending_rows += len(keys)
        if self._pending_rows >= max(4096, self.values.shape[1]):
            self.compact()

    def compact(self) -> None:
        if not self._pending:
            return
        parts = [(self.keys, self.values), *self._pending]
        self._pending, self._pending_rows = [], 0
        self._days = None
        self.keys, self.values = merged(parts)

    def writable(self) -> Rollups:
        """Rollups that can grow, counting these (which may be mapped read-only) as a base."""
        return Rollups(self.strings, base=self)

    def parts(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, values) of every part: the base's, then these cells."""
        self.compact()
        base = self._base.parts() if self._base is not None else []
        return [*base, (self.keys, self.values)] if len(self.keys) else base

    def daily(self) -> tuple[np.ndarray, np.ndarray]:
        """The cells summed per day (computed once; a sidecar stores them)."""
        self.compact()
        if self._days is None:
            self._days = by_day(self.keys, self.values)
        return self._days

    def select(
        self,
        since: int | None,
        until: int | None,
        filters: dict[str, Any],
        group_by: Sequence[str],
        interval: int | None,
    ) -> list[Piece]:
        """Summed values per group, (bucket start or None, *the group_by values), in pieces
        (one per part of the cells; a group may be in several)."""
        self.compact()
        start = -_FAR if since is None else since - since % HOUR_MS
        end = _FAR if until is None else until - until % HOUR_MS + HOUR_MS  # exclusive
        parts = []
        first, last = -(-start // DAY_MS) * DAY_MS, end - end % DAY_MS  # whole days inside
        if (interval is None or interval % DAY_MS == 0) and first < last:
            parts.append(_within(*self.daily(), first, last))
            parts.append(_within(self.keys, self.values, start, first))
            parts.append(_within(self.keys, self.values, last, end))
        else:
            parts.append(_within(self.keys, self.values, start, end))
        pieces = []
        if self._base is not None:
            pieces = self._base.select(since, until, filters, group_by, interval)
        for keys, values in parts:
            piece = self._grouped(keys, values, filters, group_by, interval)
            if piece is not None:
                pieces.append(piece)
        return pieces

    def _grouped(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        filters: dict[str, Any],
        group_by: Sequence[str],
        interval: int | None,
    ) -> Piece | None:
        if filters:
            resolved = self.strings.resolve(filters)
            if resolved is None:
                return None
            mask = np.ones(len(keys), bool)
            for name, value in resolved.items():
                mask &= keys[:, 1 + DIMENSIONS.index(name)] == value
            rows = np.flatnonzero(mask)
            keys, values = keys[rows], values[:, rows]
        if not len(keys):
            return None
        columns = [keys[:, 1 + DIMENSIONS.index(name)] for name in group_by]
        if interval is not None:
            columns.insert(0, keys[:, 0] // interval)
        if not columns:
            return [(None,)], values.sum(axis=1, keepdims=True)
        decoded, sums = _grouped(columns, values)
        strings = self.strings.values
        named: list[list[Any]] = []
        if interval is not None:
            named.append([bucket * interval for bucket in decoded.pop(0).tolist()])
        else:
            named.append([None] * sums.shape[1])
        for name, codes in zip(group_by, decoded, strict=True):
            listed = codes.tolist()
            named.append(listed if name == "status" else [strings[code] for code in listed])
        return list(zip(*named, strict=True)), sums


def merged(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several parts' cells as one (summed where they share a key)."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.zeros((0, KEY_WIDTH), np.int64), np.zeros((WIDTH, 0), VALUES_DTYPE)
    return _summed(np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts], 1))


def by_day(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hourly cells summed per day."""
    days = keys.copy()
    days[:, 0] -= days[:, 0] % DAY_MS
    return _summed(days, values)


def _within(
    keys: np.ndarray, values: np.ndarray, start: int, end: int
) -> tuple[np.ndarray, np.ndarray]:
    """The cells whose time (column 0, sorted) is in [start, end)."""
    times = keys[:, 0]
    lo, hi = np.searchsorted(times, start), np.searchsorted(times, end)
    return keys[lo:hi], values[:, lo:hi]


def _grouped(columns: list[np.ndarray], values: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The distinct rows of `columns` (as columns) and, per value column, the sums over each.
    One integer per row (mixed radix over each column's range) to sum over: far cheaper than
    sorting rows."""
    bases = [(int(column.min()), int(column.max()) - int(column.min()) + 1) for column in columns]
    if np.prod([float(span) for _, span in bases]) >= 2**62:  # no room: sort the rows
        unique, sums = _summed(np.stack(columns, axis=1), values)
        return list(unique.T), sums
    group = np.zeros(values.shape[1], np.int64)
    for column, (low, span) in zip(columns, bases, strict=True):
        group = group * span + (column - low)
    space = int(np.prod([span for _, span in bases]))
    if len(group) > 1 and bool(np.all(group[1:] >= group[:-1])):
        # Already in group order (cells are sorted by time, key, ...): sum each run.
        starts = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1])))
        present = group[starts]
        sums = np.add.reduceat(values, starts, axis=1)
    elif space <= 4 * values.shape[1]:  # few possible groups: count into all of them
        sums = _sums(group, values, space)
        present = np.flatnonzero(sums[REQUESTS])
        sums = sums[:, present]
    else:
        present, inverse = np.unique(group, return_inverse=True)
        sums = _sums(inverse.reshape(-1), values, len(present))
    decoded = []
    for low, span in reversed(bases):
        present, digit = np.divmod(present, span)
        decoded.append(digit + low)
    return decoded[::-1], sums


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
    index: dict[tuple[Any, ...], int] = {}
    found = []
    for rollups in sources:
        for groups, sums in rollups.select(since, until, filters, group_by, interval):
            found.append(([index.setdefault(group, len(index)) for group in groups], sums))
    total = np.zeros((WIDTH, len(index)), VALUES_DTYPE)
    for columns, sums in found:
        total[:, columns] += sums  # (each piece names a group once)
    return dict(zip(index, np.rint(total.T).astype(np.int64).tolist(), strict=True))
