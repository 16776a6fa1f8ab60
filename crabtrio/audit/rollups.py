"""Per-hour rollups of the audit trail: for every (hour, key, model, provider, status) seen,
the request count, token and cost sums, and a latency histogram for percentile estimates.

They are what usage reports, budgets and limits read: summing a month takes the hours of
the month, never the records. Cells are numpy columns (a sealed segment's are mapped from its
sidecar); key, model and provider are codes of the segment's string table. A query sums each
file's cells per group, then every file's sums at once, in numpy until its answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .columns import CODED, Strings

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# Upper bounds (ms, inclusive) of the latency buckets; the last bucket takes the rest.
_BOUNDS = (10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 60_000, 120_000)
LATENCY_BOUNDS_MS = np.array([*_BOUNDS, 300_000, 600_000])
BUCKETS = len(LATENCY_BOUNDS_MS) + 1
# The values of a cell: requests, prompt_tokens, completion_tokens, cost_micros, buckets.
REQUESTS, PROMPT, COMPLETION, COST, HISTOGRAM = 0, 1, 2, 3, 4
WIDTH = HISTOGRAM + BUCKETS
ERRORS = WIDTH  # summed cells have one more row: the requests with status >= 400
DIMENSIONS = ("key", "model", "provider", "status")
KEY_WIDTH = 1 + len(DIMENSIONS)  # a cell's key: hour start (ms), key, model, provider, status
# float64: what bincount sums in anyway (exact for integers below 2**53).
VALUES_DTYPE = np.dtype("<f8")
_FAR = 2**62  # an unbounded end of a time range
# Per-record values are clipped so that sums of billions of them stay inside int64.
MAX_TOKENS = 2**31
MAX_COST = 2**40  # micro-USD: $1.1M for one request


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
    starts = _starts(ordered, ordered.shape[1])
    return ordered[starts], np.add.reduceat(values.take(order, axis=1), starts, axis=1)


def _starts(keys: np.ndarray, width: int) -> np.ndarray:
    """Where each run of rows equal in their first `width` columns starts (keys sorted).
    Column by column: np.any(axis=1) over so few columns is 10x slower."""
    changed = np.ones(len(keys), bool)
    changed[1:] = keys[1:, 0] != keys[:-1, 0]
    for column in range(1, width):
        changed[1:] |= keys[1:, column] != keys[:-1, column]
    return np.flatnonzero(changed)


def _sums(group: np.ndarray, values: Iterable[np.ndarray], groups: int) -> np.ndarray:
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

    __slots__ = (
        "_base",
        "_days",
        "_pending",
        "_pending_rows",
        "_reduced",
        "keys",
        "strings",
        "values",
    )

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
        # The daily cells summed over some dimensions, per dimensions kept (see _days_over).
        self._reduced: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
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
        self._reduced = {}
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

    def sum_parts(
        self,
        start: int,
        end: int,
        filters: dict[str, Any],
        group_by: Sequence[str],
        interval: int | None,
        names: Names,
    ) -> list[Part]:
        """The cells of the hours in [start, end) (ms, whole hours) summed per group (see
        `Part`), one part per part of the cells: a group may be in several."""
        self.compact()
        found = []
        if self._base is not None:
            found = self._base.sum_parts(start, end, filters, group_by, interval, names)
        resolved = self.strings.resolve(filters)
        if resolved is None:
            return found
        hourly: _Cells = (self.keys, self.values, DIMENSIONS, HOUR_MS)
        spans = [(hourly, start, end)]
        first, last = -(-start // DAY_MS) * DAY_MS, end - end % DAY_MS  # whole days inside
        if (interval is None or interval % DAY_MS == 0) and first < last:
            dims = tuple(name for name in DIMENSIONS if name in group_by or name in resolved)
            spans = [(self._days_over(dims), first, last), (hourly, start, first)]
            spans.append((hourly, last, end))
        for (keys, values, dims, length), low, high in spans:
            times = keys[:, 0]
            lo, hi = np.searchsorted(times, low), np.searchsorted(times, high)
            if lo < hi:
                cells = (keys[lo:hi], values[:, lo:hi], dims, length)
                part = _part(cells, resolved, group_by, interval)
                if part is not None:
                    found.append(names.translated(part, group_by, self.strings.values))
        return found

    def _days_over(self, dims: tuple[str, ...]) -> _Cells:
        """The daily cells summed over the dimensions not in `dims` (keys: day, *dims), with
        their ERRORS row. The few most recently used are kept while the cells do not change
        (a sealed file's never do): in a file of 1M records, per key per day is 170 cells of
        22k, read in 0.1 ms rather than summed in 0.6 ms (per key and status 1.2k, 2.4 ms)."""
        keys, values = self.daily()
        if dims == DIMENSIONS or not len(keys):
            return keys, values, dims, DAY_MS
        found = self._reduced.pop(dims, None)
        if found is None:
            part = _part((keys, values, DIMENSIONS, DAY_MS), {}, dims, DAY_MS)
            assert part is not None  # (without filters)
            columns, sums = part
            columns[0] = columns[0] * DAY_MS
            found = np.stack(columns, axis=1), sums
        # Only much smaller groupings are kept: the cache stays below the cells' size.
        if _SHRINK * len(found[0]) <= len(keys):
            self._reduced[dims] = found  # last: the most recently used
            if len(self._reduced) > _CACHED:
                del self._reduced[next(iter(self._reduced))]
        return (*found, dims, DAY_MS)


# Cells (keys: time, *dimensions), their values (with the ERRORS row once summed over some
# dimensions), the names of those dimensions, and the time a cell covers (ms: hour or day).
_Cells = tuple[np.ndarray, np.ndarray, tuple[str, ...], int]
_CACHED = 4  # groupings cached per file
_SHRINK = 8  # how much smaller than the daily cells a grouping must be to be cached


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


def grouped(columns: list[np.ndarray], *values: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The distinct rows of `columns` (as columns) and the sums over each of every row of
    `values` (arrays of rows, each with a column per row of `columns`), as one array of rows;
    without columns, one group. One integer per row (mixed radix over the values each column
    holds) to sum over: far cheaper than sorting rows."""
    if not values[0].shape[1]:
        return [column[:0] for column in columns], np.concatenate(values)
    if not columns:
        return [], np.concatenate([array.sum(axis=1, keepdims=True) for array in values])
    digits = [_digits(column) for column in columns]
    if np.prod([float(len(held)) for _, held in digits]) >= 2**62:  # no room: sort the rows
        unique, sums = _summed(np.stack(columns, axis=1), np.concatenate(values))
        return list(unique.T), sums
    group = np.zeros(values[0].shape[1], np.int64)
    for digit, held in digits:
        group = group * len(held) + digit
    space = int(np.prod([len(held) for _, held in digits]))
    rows = [row for array in values for row in array]
    if len(group) > 1 and bool(np.all(group[1:] >= group[:-1])):
        # Already in group order (cells are sorted by time, key, ...): sum each run.
        starts = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1])))
        present = group[starts]
        sums = np.concatenate([np.add.reduceat(array, starts, axis=1) for array in values])
    elif space <= 4 * len(group):  # few possible groups: count into all of them
        present = np.flatnonzero(np.bincount(group, minlength=space))
        sums = _sums(group, rows, space).take(
            present, axis=1
        )  # C order: [:, present] makes F order, 2x slower
    else:
        present, inverse = np.unique(group, return_inverse=True)
        sums = _sums(inverse.reshape(-1), rows, len(present))
    decoded = []
    for _, held in reversed(digits):
        present, digit = np.divmod(present, len(held))
        decoded.append(held[digit])
    return decoded[::-1], sums


def _digits(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value's rank among the values `column` holds, and those values (in order).
    Statuses span hundreds of numbers of which a handful occur: 40x fewer groups."""
    low = int(column.min())
    shifted = column - low
    span = int(shifted.max()) + 1
    if span > 4 * len(column) + 64:  # wide and sparse: rank by sorting
        held, rank = np.unique(column, return_inverse=True)
        return rank.reshape(-1), held
    seen = np.bincount(shifted, minlength=span) > 0
    if bool(seen.all()):
        return shifted, np.arange(low, low + span)
    return np.cumsum(seen)[shifted] - 1, np.flatnonzero(seen) + low


# A part's sums per group: the group columns (the bucket number if there is an interval,
# then per group_by name the statuses or codes) and the sums ((WIDTH + 1) x groups: the cells'
# value rows, then ERRORS).
Part = tuple[list[np.ndarray], np.ndarray]


def _part(
    cells: _Cells, resolved: dict[str, int], group_by: Sequence[str], interval: int | None
) -> Part | None:
    """The cells whose dimensions equal `resolved`, summed per group, errors included."""
    keys, values, dims, length = cells
    if resolved:
        mask = np.ones(len(keys), bool)
        for name, value in resolved.items():
            mask &= keys[:, 1 + dims.index(name)] == value
        rows = np.flatnonzero(mask)
        if not len(rows):
            return None
        keys, values = keys[rows], values.take(rows, axis=1)
    arrays = [values, _errors(keys, values)] if len(values) == WIDTH else [values]
    depth = 1 + len(group_by)
    runs = set(group_by) == set(dims[: depth - 1])
    if runs and depth <= len(dims):
        # Cells are sorted by (time, *dims): each (time, *group_by) is a run of them. Summed
        # in order first, hourly cells per key per day group 10x faster than scattered.
        starts = _starts(keys, depth)
        keys = keys[starts]
        arrays = [np.add.reduceat(array, starts, axis=1) for array in arrays]
    columns = [keys[:, 1 + dims.index(name)] for name in group_by]
    if interval is not None:
        columns.insert(0, keys[:, 0] // interval)
    if runs and interval == length:
        return columns, np.concatenate(arrays)  # a group per cell already
    return grouped(columns, *arrays)


def _errors(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Of cells as stored (every dimension in their keys), the ERRORS row."""
    return np.where(keys[:, 1 + DIMENSIONS.index("status")] >= 400, values[REQUESTS], 0.0)[None]


class Names:
    """One query's codes for the strings of every file's string table."""

    __slots__ = ("codes",)

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}

    def translated(self, part: Part, group_by: Sequence[str], strings: list[str]) -> Part:
        """`part` with its string codes (of the table `strings`) as this query's."""
        columns, values = part
        columns = list(columns)
        first = len(columns) - len(group_by)  # after the bucket number, if any
        for i, name in enumerate(group_by, first):
            if name in CODED:
                rank, held = _digits(columns[i])
                codes = self.codes
                table = [codes.setdefault(strings[code], len(codes)) for code in held.tolist()]
                columns[i] = np.array(table, np.int64)[rank]
        return columns, values


@dataclass(frozen=True, slots=True)
class Sums:
    """Rollup cells summed per group, as columns: one entry per group, in no set order."""

    group_by: tuple[str, ...]
    starts: np.ndarray | None  # each group's interval start (ms); None without an interval
    groups: list[np.ndarray]  # per group_by name: statuses, or indices into `names`
    names: list[str]
    values: np.ndarray  # int64, (WIDTH + 1) x groups: the cells' values, then ERRORS

    def __len__(self) -> int:
        return int(self.values.shape[1])

    def column(self, name: str) -> list[Any]:
        """The values of a group_by column, one per group."""
        found: list[Any] = self.groups[self.group_by.index(name)].tolist()
        return [self.names[code] for code in found] if name in CODED else found


class Selection(dict[tuple[Any, ...], list[int]]):
    """What `select` answers: per (interval start or None, *group_by values), the WIDTH sums
    in column order (REQUESTS, PROMPT, ...); and as `sums` the columns they were made from,
    errors included (the usage report reads those: see `Sums`)."""

    __slots__ = ("sums",)

    def __init__(self, sums: Sums) -> None:
        starts = [None] * len(sums) if sums.starts is None else sums.starts.tolist()
        groups = zip(starts, *(sums.column(name) for name in sums.group_by), strict=True)
        super().__init__(zip(groups, sums.values[:WIDTH].T.tolist(), strict=True))
        self.sums = sums


def summed(
    sources: Iterable[Rollups],
    *,
    since: int | None = None,
    until: int | None = None,
    filters: dict[str, Any] | None = None,
    group_by: Sequence[str] = DIMENSIONS,
    interval: int | None = HOUR_MS,
) -> Sums:
    """Cells of the hours that overlap [since, until] (ms) whose dimensions equal `filters`,
    summed per (interval start, *group_by values) across `sources`: `interval` HOUR_MS or
    DAY_MS (UTC), or None for totals. Each file's parts are summed per group, then all the
    parts at once: numpy throughout, Python only per distinct string."""
    start = -_FAR if since is None else since - since % HOUR_MS
    end = _FAR if until is None else until - until % HOUR_MS + HOUR_MS  # exclusive
    group_by = tuple(group_by)
    names = Names()
    parts = [
        part
        for rollups in sources
        for part in rollups.sum_parts(start, end, filters or {}, group_by, interval, names)
    ]
    width = len(group_by) + (interval is not None)
    if not parts:
        columns, values = [np.zeros(0, np.int64)] * width, np.zeros((WIDTH + 1, 0))
    elif len(parts) == 1:
        columns, values = parts[0]
    else:
        joined = [np.concatenate(column) for column in zip(*(c for c, _ in parts), strict=True)]
        columns, values = grouped(joined, np.concatenate([v for _, v in parts], axis=1))
    starts = None if interval is None else columns.pop(0) * interval
    return Sums(group_by, starts, columns, list(names.codes), np.rint(values).astype(np.int64))


def select(
    sources: Iterable[Rollups],
    *,
    since: int | None = None,
    until: int | None = None,
    filters: dict[str, Any] | None = None,
    group_by: Sequence[str] = DIMENSIONS,
    interval: int | None = HOUR_MS,
) -> Selection:
    """`summed` as a dict (see `Selection`)."""
    return Selection(
        summed(
            sources, since=since, until=until, filters=filters, group_by=group_by, interval=interval
        )
    )
