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
# (name, dtype) of the cell key columns, in the order a sidecar stores them.
KEY_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("hour", np.dtype("<i8")),
    ("key", np.dtype("<u4")),
    ("model", np.dtype("<u4")),
    ("provider", np.dtype("<u4")),
    ("status", np.dtype("<u2")),
)
VALUES_DTYPE = np.dtype("<i8")
# Per-record values are clipped so that sums of billions of them stay inside int64.
MAX_TOKENS = 2**31
MAX_COST = 2**40  # micro-USD: $1.1M for one request

CellKey = tuple[int, str, str, str, int]  # (hour start in ms, key, model, provider, status)


def latency_bucket(latency_ms: int) -> int:
    return int(np.searchsorted(LATENCY_BOUNDS_MS, latency_ms, "left"))


class Rollups:
    """The cells of one file. Grows by batches (the active file) or is loaded whole."""

    __slots__ = ("_rows", "keys", "size", "strings", "values")

    def __init__(
        self,
        strings: Strings,
        keys: dict[str, np.ndarray] | None = None,
        values: np.ndarray | None = None,
    ) -> None:
        self.strings = strings
        if keys is None or values is None:
            keys = {name: np.zeros(0, dtype) for name, dtype in KEY_COLUMNS}
            values = np.zeros((0, WIDTH), VALUES_DTYPE)
        self.keys = keys
        self.values = values
        self.size = len(values)
        self._rows: dict[tuple[int, ...], int] | None = None  # built when first added to

    def __len__(self) -> int:
        return self.size

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
        hours = ts - ts % HOUR_MS
        batch = np.stack([hours, *(codes[name].astype(np.int64) for name in DIMENSIONS)], axis=1)
        unique, inverse = np.unique(batch, axis=0, return_inverse=True)
        rows = np.fromiter(
            (self._row(cell) for cell in map(tuple, unique.tolist())), np.int64, len(unique)
        )
        at = rows[inverse.reshape(-1)]
        values = self.values
        np.add.at(values[:, REQUESTS], at, 1)
        np.add.at(values[:, PROMPT], at, prompt)
        np.add.at(values[:, COMPLETION], at, completion)
        np.add.at(values[:, COST], at, cost)
        buckets = np.searchsorted(LATENCY_BOUNDS_MS, latency, "left")
        np.add.at(values, (at, HISTOGRAM + buckets), 1)

    def _row(self, cell: tuple[int, ...]) -> int:
        if self._rows is None:
            self._rows = {
                tuple(row): i
                for i, row in enumerate(
                    zip(
                        *(self.keys[name][: self.size].tolist() for name, _ in KEY_COLUMNS),
                        strict=True,
                    )
                )
            }
        found = self._rows.get(cell)
        if found is not None:
            return found
        if self.size == len(self.values):
            self._grow()
        row = self.size
        for (name, _), value in zip(KEY_COLUMNS, cell, strict=True):
            self.keys[name][row] = value
        self.size += 1
        self._rows[cell] = row
        return row

    def _grow(self) -> None:
        capacity = max(64, 2 * len(self.values))
        keys = {}
        for name, dtype in KEY_COLUMNS:
            keys[name] = np.zeros(capacity, dtype)
            keys[name][: self.size] = self.keys[name][: self.size]
        values = np.zeros((capacity, WIDTH), VALUES_DTYPE)
        values[: self.size] = self.values[: self.size]
        self.keys, self.values = keys, values

    def trimmed(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The cells without spare capacity (what a sidecar stores)."""
        return {name: self.keys[name][: self.size] for name, _ in KEY_COLUMNS}, self.values[
            : self.size
        ]

    def select(
        self,
        since: int | None,
        until: int | None,
        filters: dict[str, Any],
        group_by: Sequence[str],
        interval: int | None,
    ) -> dict[tuple[Any, ...], np.ndarray]:
        """Summed values per group: (bucket start or None, *the group_by values)."""
        size = self.size
        hours = self.keys["hour"][:size]
        mask = np.ones(size, bool)
        if since is not None:
            mask &= hours >= since - since % HOUR_MS
        if until is not None:
            mask &= hours <= until
        for name, value in filters.items():
            if name == "status":
                mask &= self.keys["status"][:size] == value
                continue
            code = self.strings.codes.get(value)
            if code is None:
                return {}
            mask &= self.keys[name][:size] == code
        rows = np.flatnonzero(mask)
        if not len(rows):
            return {}
        columns = []
        if interval is not None:
            columns.append(hours[rows] - hours[rows] % interval)
        columns += [self.keys[name][:size][rows].astype(np.int64) for name in group_by]
        values = self.values[:size][rows]
        if not columns:
            return {(None,): values.sum(axis=0)}
        unique, inverse = np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)
        sums = np.zeros((len(unique), WIDTH), VALUES_DTYPE)
        np.add.at(sums, inverse.reshape(-1), values)
        strings = self.strings.values
        out = {}
        for group, total in zip(unique.tolist(), sums, strict=True):
            bucket = group.pop(0) if interval is not None else None
            named = tuple(
                value if name == "status" else strings[value]
                for name, value in zip(group_by, group, strict=True)
            )
            out[(bucket, *named)] = total
        return out


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
