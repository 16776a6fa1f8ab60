"""Per-hour rollups of the audit trail: the cells of each file and their upkeep as records
arrive (what `sums` reads: usage reports, budgets and limits).

A cell sums the records of one (hour, key, model, provider, status): the request count, token
and cost sums, and a latency histogram for percentile estimates. Summing a month takes the
hours of the month, never the records. Cells are numpy columns (a sealed segment's are mapped
from its sidecar); key, model and provider are codes of the segment's string table.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

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
ERRORS = WIDTH  # summed cells have one more row: the requests with status >= 400
DIMENSIONS = ("key", "model", "provider", "status")
KEY_WIDTH = 1 + len(DIMENSIONS)  # a cell's key: hour start (ms), key, model, provider, status
# float64: what bincount sums in anyway (exact for integers below 2**53).
VALUES_DTYPE = np.dtype("<f8")
# Per-record values are clipped so that sums of billions of them stay inside int64.
MAX_TOKENS = 2**31
MAX_COST = 2**40  # micro-USD: $1.1M for one request
PENDING_ROWS = 4096  # cells of new batches kept apart before they become a level

# Cells: keys (int64 rows: time, then codes or statuses) sorted by row, and their values (a
# row per value column, so that each is contiguous).
Cells = tuple[np.ndarray, np.ndarray]


def utc_text(ms: int) -> str:
    """An interval's start (ms since the epoch) in ISO 8601 UTC, as reports show it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


def latency_bucket(latency_ms: int) -> int:
    return int(np.searchsorted(LATENCY_BOUNDS_MS, latency_ms, "left"))


def collapsed(keys: np.ndarray, values: np.ndarray) -> Cells:
    """One row per distinct key row, sorted (by column 0, then 1...), and per value row the
    sums over each. May return its arguments themselves (already sorted and distinct)."""
    if not len(keys):
        return keys, values
    packed = _packed(keys)
    if packed is None:  # no room for one integer per row: sort the rows (4x slower on the
        # 300k cells of two sorted levels: 160 ms, not 40)
        order = np.lexsort(keys.T[::-1])
        keys, values = keys[order], values.take(order, axis=1)
        starts = run_starts(keys, keys.shape[1])
    else:
        if not bool(np.all(packed[1:] >= packed[:-1])):
            # Stable: timsort, linear on the two sorted runs a merge concatenates.
            order = np.argsort(packed, kind="stable")
            keys, values, packed = keys[order], values.take(order, axis=1), packed[order]
        starts = np.flatnonzero(np.concatenate(([True], packed[1:] != packed[:-1])))
    if len(starts) == len(keys):
        return keys, values
    return keys[starts], np.add.reduceat(values, starts, axis=1)


def _packed(keys: np.ndarray) -> np.ndarray | None:
    """Each key row as one int64 that orders as the rows do (mixed radix over the span of
    each column, time in hours where cells are whole hours apart), or None if they overflow."""
    times: np.ndarray = keys[:, 0] - keys[:, 0].min()
    if not bool((times % HOUR_MS).any()):
        times = times // HOUR_MS
    packed, room = times, float(times.max()) + 1
    for column in range(1, keys.shape[1]):
        low = keys[:, column].min()
        span = int(keys[:, column].max() - low) + 1
        room *= span
        if room >= 2**62:
            return None
        packed = packed * span + (keys[:, column] - low)
    return packed


def run_starts(keys: np.ndarray, width: int) -> np.ndarray:
    """Where each run of rows equal in their first `width` columns starts (keys sorted).
    Column by column: np.any(axis=1) over so few columns is 10x slower."""
    changed = np.ones(len(keys), bool)
    changed[1:] = keys[1:, 0] != keys[:-1, 0]
    for column in range(1, width):
        changed[1:] |= keys[1:, column] != keys[:-1, column]
    return np.flatnonzero(changed)


def merged(parts: Iterable[Cells]) -> Cells:
    """Several parts' cells as one (summed where they share a key)."""
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.zeros((0, KEY_WIDTH), np.int64), np.zeros((WIDTH, 0), VALUES_DTYPE)
    return collapsed(
        np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts], 1)
    )


def by_day(keys: np.ndarray, values: np.ndarray) -> Cells:
    """Hourly cells summed per day."""
    days = keys.copy()
    days[:, 0] -= days[:, 0] % DAY_MS
    return collapsed(days, values)


def _joined(older: Cells, newer: Cells) -> Cells:
    """Two levels as one. The older's cells before the newer's first hour stay as they are:
    only the hours both hold are sorted again (records arrive in about time order)."""
    lo = int(np.searchsorted(older[0][:, 0], newer[0][0, 0]))
    keys, values = collapsed(
        np.concatenate((older[0][lo:], newer[0])), np.concatenate((older[1][:, lo:], newer[1]), 1)
    )
    if not lo:
        return keys, values
    return np.concatenate((older[0][:lo], keys)), np.concatenate((older[1][:, :lo], values), 1)


def _over(keys: np.ndarray, values: np.ndarray, dims: tuple[str, ...]) -> Cells:
    """Cells (every dimension in their keys) summed over the dimensions not in `dims`: keys
    (time, *dims), values with their ERRORS row."""
    status = keys[:, 1 + DIMENSIONS.index("status")]
    errors = np.where(status >= 400, values[REQUESTS], 0.0)[None]
    kept = [0, *(1 + DIMENSIONS.index(name) for name in dims)]
    return collapsed(keys[:, kept], np.concatenate((values, errors)))


class _Table:
    """Cells sorted by time first, in arrays with room to grow, so that replacing the cells
    from a day on (new records touch today's) rewrites those rows in place: a month of daily
    cells is 16 MB, today's a few hundred kB. Rows before the first replaced one never
    change; views of later ones do, so nothing hands them out beyond a query."""

    __slots__ = ("_keys", "_owned", "_values", "rows")

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        self._keys, self._values, self.rows = keys, values, len(keys)
        self._owned = False  # mapped, or shared with their maker: copied before a write

    def cells(self, start: int = 0) -> Cells:
        return self._keys[start : self.rows], self._values[:, start : self.rows]

    def replace_from(self, time: int, keys: np.ndarray, values: np.ndarray) -> int:
        """Replace the cells of times >= `time` by these; the first row replaced."""
        start = int(np.searchsorted(self._keys[: self.rows, 0], time))
        rows = start + len(keys)
        if not self._owned or rows > len(self._keys):
            room = rows + rows // 4 + 64
            grown = np.empty((room, self._keys.shape[1]), self._keys.dtype)
            grown_values = np.empty((len(self._values), room), self._values.dtype)
            grown[:start], grown_values[:, :start] = self._keys[:start], self._values[:, :start]
            self._keys, self._values, self._owned = grown, grown_values, True
        self._keys[start:rows], self._values[:, start:rows] = keys, values
        self.rows = rows
        return start

    def add(self, keys: np.ndarray, values: np.ndarray) -> int:
        """Sum cells (sorted) into these; the first row that changed."""
        start = int(np.searchsorted(self._keys[: self.rows, 0], keys[0, 0]))
        old_keys, old_values = self.cells(start)
        tail = collapsed(np.concatenate((old_keys, keys)), np.concatenate((old_values, values), 1))
        return self.replace_from(int(keys[0, 0]), *tail)


class Rollups:
    """The cells of one file: hourly `levels` (each sorted, one cell per distinct key), and
    the same summed per day. A growing file's batches wait as pending cells (no per-cell
    lookup on the way in) and become a level at the next query or when they are many; levels
    are merged two by two as they grow, like the index's runs (a binary counter: each cell is
    merged O(log n) times, a query reads O(log n) levels). The daily cells follow each new
    level: only the days it touches are summed again. A growing file resumed from a checkpoint
    counts the checkpoint's cells as its `base` (mapped, shared between workers) and keeps
    only what came after as its own."""

    __slots__ = ("_days", "_levels", "_pending", "_pending_rows", "_reduced", "base", "strings")

    def __init__(
        self,
        strings: Strings,
        keys: np.ndarray | None = None,
        values: np.ndarray | None = None,
        days: Cells | None = None,
        base: Rollups | None = None,
    ) -> None:
        self.strings = strings
        self.base = base
        self._levels: list[Cells] = []
        if keys is not None and values is not None and len(keys):
            self._levels.append((keys, values))
        # The daily cells (column 0 the day's start); None until a query needs them.
        self._days = _Table(*days) if days is not None else None
        # The daily cells summed over some dimensions, per dimensions kept (see days_over).
        self._reduced: dict[tuple[str, ...], _Table] = {}
        self._pending: list[Cells] = []
        self._pending_rows = 0

    def __len__(self) -> int:
        """The number of cells (where the same key is in several levels, several)."""
        self.compact()
        own = sum(len(keys) for keys, _ in self._levels)
        return own + (len(self.base) if self.base is not None else 0)

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
        if not len(ts):
            return
        keys = np.stack([ts - ts % HOUR_MS, *(columns[name] for name in DIMENSIONS)], axis=1)
        values = np.zeros((WIDTH, len(ts)), VALUES_DTYPE)
        values[REQUESTS] = 1
        values[PROMPT] = prompt
        values[COMPLETION] = completion
        values[COST] = cost
        values[HISTOGRAM + np.searchsorted(LATENCY_BOUNDS_MS, latency), np.arange(len(ts))] = 1
        keys, values = collapsed(keys.astype(np.int64), values)
        self._pending.append((keys, values))
        self._pending_rows += len(keys)
        if self._pending_rows >= PENDING_ROWS:
            self.compact()

    def compact(self) -> None:
        """Make the pending cells a level, and count them into the daily cells."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        level = merged(pending)
        if self._days is not None:
            day_keys, day_values = by_day(*level)
            start = self._days.add(day_keys, day_values)
            changed = self._days.cells(start)
            for dims, table in self._reduced.items():
                table.replace_from(int(day_keys[0, 0]), *_over(*changed, dims))
        levels = self._levels
        levels.append(level)
        while len(levels) > 1 and len(levels[-2][0]) <= 2 * len(levels[-1][0]):
            newer = levels.pop()
            levels[-1] = _joined(levels[-1], newer)

    def writable(self) -> Rollups:
        """Rollups that can grow, counting these (which may be mapped read-only) as a base."""
        return Rollups(self.strings, base=self)

    def parts(self) -> list[Cells]:
        """Every part's cells: the base's, then these levels."""
        return [*(self.base.parts() if self.base is not None else []), *self.levels()]

    def levels(self) -> list[Cells]:
        """The hourly cells of this file's own levels (not the base's), oldest first."""
        self.compact()
        return list(self._levels)

    def days_over(self, dims: tuple[str, ...]) -> Cells:
        """The daily cells of the own levels; summed over the dimensions not in `dims`
        (keys: day, *dims) with their ERRORS row unless `dims` is DIMENSIONS. Views valid
        until the next `add` or `compact`. The few most recently used groupings are kept,
        and follow new records like the daily cells: in a file of 1M records, per key per
        day is 170 cells of 22k, read in 0.1 ms rather than summed in 0.6 ms."""
        self.compact()
        if self._days is None:
            levels = self._levels or [merged([])]
            hours = np.concatenate([keys for keys, _ in levels])
            self._days = _Table(*by_day(hours, np.concatenate([v for _, v in levels], 1)))
        keys, values = self._days.cells()
        if dims == DIMENSIONS or not len(keys):
            return keys, values
        table = self._reduced.pop(dims, None)
        if table is None:
            table = _Table(*_over(keys, values, dims))
        # Only much smaller groupings are kept: the cache stays below the cells' size.
        if _SHRINK * table.rows <= len(keys):
            self._reduced[dims] = table  # last: the most recently used
            if len(self._reduced) > _CACHED:
                del self._reduced[next(iter(self._reduced))]
        return table.cells()


_CACHED = 4  # groupings kept per file
_SHRINK = 8  # how much smaller than the daily cells a grouping must be to be kept
