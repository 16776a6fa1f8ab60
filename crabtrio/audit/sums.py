"""Sums of the rollup cells per group: what usage reports, budgets and limits ask of them.

A query sums each file's cells per group (daily cells for whole days, hourly ones for the
edges), then every file's sums at once, in numpy until its answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .columns import CODED
from .rollups import (
    DAY_MS,
    DIMENSIONS,
    HOUR_MS,
    REQUESTS,
    WIDTH,
    Rollups,
    collapsed,
    run_starts,
)

_FAR = 2**62  # an unbounded end of a time range
# Cells (keys: time, *dimensions), their values (with the ERRORS row once summed over some
# dimensions), the names of those dimensions, and the time a cell covers (ms: hour or day).
_Cells = tuple[np.ndarray, np.ndarray, tuple[str, ...], int]
# A part's sums per group: the group columns (the bucket number if there is an interval,
# then per group_by name the statuses or codes) and the sums ((WIDTH + 1) x groups: the cells'
# value rows, then ERRORS).
Part = tuple[list[np.ndarray], np.ndarray]


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
        for part in _file_parts(rollups, start, end, filters or {}, group_by, interval, names)
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
    # Copies: a column may be a view of cells that change with the next records.
    groups = [np.array(column, np.int64) for column in columns]
    return Sums(group_by, starts, groups, list(names.codes), np.rint(values).astype(np.int64))


def select(
    sources: Iterable[Rollups],
    *,
    since: int | None = None,
    until: int | None = None,
    filters: dict[str, Any] | None = None,
    group_by: Sequence[str] = DIMENSIONS,
    interval: int | None = HOUR_MS,
) -> dict[tuple[Any, ...], list[int]]:
    """`summed` as a dict: per (interval start or None, *group_by values), the WIDTH sums
    in column order (REQUESTS, PROMPT, ...)."""
    sums = summed(
        sources, since=since, until=until, filters=filters, group_by=group_by, interval=interval
    )
    starts = [None] * len(sums) if sums.starts is None else sums.starts.tolist()
    groups = zip(starts, *(sums.column(name) for name in sums.group_by), strict=True)
    return dict(zip(groups, sums.values[:WIDTH].T.tolist(), strict=True))


def _file_parts(
    rollups: Rollups,
    start: int,
    end: int,
    filters: dict[str, Any],
    group_by: tuple[str, ...],
    interval: int | None,
    names: Names,
) -> list[Part]:
    """The cells of one file's hours in [start, end) (ms, whole hours) summed per group (see
    `Part`): its base's, then its own; a group may be in several parts."""
    found = []
    if rollups.base is not None:
        found = _file_parts(rollups.base, start, end, filters, group_by, interval, names)
    resolved = rollups.strings.resolve(filters)
    if resolved is None:
        return found
    hourly: tuple[str, ...] = DIMENSIONS
    levels = [(keys, values, hourly, HOUR_MS) for keys, values in rollups.levels()]
    spans = [(level, start, end) for level in levels]
    first, last = -(-start // DAY_MS) * DAY_MS, end - end % DAY_MS  # whole days inside
    if (interval is None or interval % DAY_MS == 0) and first < last:
        dims = tuple(name for name in DIMENSIONS if name in group_by or name in resolved)
        spans = [((*rollups.days_over(dims), dims, DAY_MS), first, last)]
        spans += [
            (level, low, high) for level in levels for low, high in ((start, first), (last, end))
        ]
    for (keys, values, dims, length), low, high in spans:
        times = keys[:, 0]
        lo, hi = np.searchsorted(times, low), np.searchsorted(times, high)
        if lo < hi:
            cells = (keys[lo:hi], values[:, lo:hi], dims, length)
            part = _part(cells, resolved, group_by, interval)
            if part is not None:
                found.append(names.translated(part, group_by, rollups.strings.values))
    return found


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
        starts = run_starts(keys, depth)
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
        unique, sums = collapsed(np.stack(columns, axis=1), np.concatenate(values))
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
        # C order: [:, present] makes F order, 2x slower
        sums = _sums(group, rows, space).take(present, axis=1)
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


def _sums(group: np.ndarray, values: Iterable[np.ndarray], groups: int) -> np.ndarray:
    """Per value column (a row of `values`), the sums over each group number. bincount
    works in float64: exact while a sum stays below 2**53."""
    return np.stack([np.bincount(group, column, groups) for column in values])


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
