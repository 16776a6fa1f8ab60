"""In-memory sorted index over audit records: O(log n + k) filtered, paginated queries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .sortedblocks import SortedBlocks

# An entry: (timestamp, request_id, location, key_name, model, provider, status).
# Sorted by (timestamp, request_id); `location` (unique per line) settles exact duplicates.
Entry = tuple[int, str, int, str, str, str, int]
Cursor = tuple[int, str]

# Posting lists exist for these fields, so a filter on any of them walks only its matches.
FIELDS: dict[str, int] = {"key": 3, "model": 4, "provider": 5, "status": 6}


def _merged(existing: SortedBlocks | None, batch: list[Entry]) -> SortedBlocks:
    """`existing` (or a new list) with `batch` added."""
    if existing is None:
        return SortedBlocks(batch)
    existing.update(batch)
    return existing


@dataclass(frozen=True, slots=True)
class Page:
    locations: list[int]
    next_cursor: Cursor | None


class AuditIndex:
    """Every entry sits in one sorted list, and in one posting list per filterable field."""

    def __init__(self) -> None:
        self._all = SortedBlocks()
        self._postings: dict[str, dict[Any, SortedBlocks]] = {name: {} for name in FIELDS}

    def __len__(self) -> int:
        return len(self._all)

    def add(self, entry: Entry) -> None:
        self._all.add(entry)
        for name, position in FIELDS.items():
            postings = self._postings[name]
            value = entry[position]
            bucket = postings.get(value)
            if bucket is None:
                postings[value] = bucket = SortedBlocks()
            bucket.add(entry)

    def extend(self, entries: Iterable[Entry]) -> None:
        """Add many entries at once: a list that is empty or small next to the batch is
        rebuilt with one sort (nearly sorted input, so close to linear) rather than grown by
        one insertion per entry."""
        batch = list(entries)
        if len(batch) < 64:
            for entry in batch:
                self.add(entry)
            return
        self._all = _merged(self._all, batch)
        for name, position in FIELDS.items():
            groups: dict[Any, list[Entry]] = {}
            for entry in batch:
                value = entry[position]
                group = groups.get(value)
                if group is None:
                    groups[value] = group = []
                group.append(entry)
            postings = self._postings[name]
            for value, group in groups.items():
                postings[value] = _merged(postings.get(value), group)

    def discard(self, entries: Iterable[Entry]) -> None:
        """Forget entries (their file was deleted by retention)."""
        for entry in entries:
            self._all.discard(entry)
            for name, position in FIELDS.items():
                postings = self._postings[name]
                bucket = postings.get(entry[position])
                if bucket is not None:
                    bucket.discard(entry)
                    if not bucket:
                        del postings[entry[position]]

    def query(
        self,
        *,
        filters: dict[str, Any] | None = None,
        since: int | None = None,
        until: int | None = None,
        before: Cursor | None = None,
        limit: int = 100,
    ) -> Page:
        """Newest-first locations of matching entries, and a cursor when more match.

        Walks the shortest posting list among the filters, between the time bounds, so
        the cost is O(log n) plus the entries of that list it steps over.
        """
        filters = filters or {}
        source = self._all
        for name, value in filters.items():
            bucket = self._postings[name].get(value)
            if bucket is None:
                return Page([], None)
            if len(bucket) < len(source):
                source = bucket
        checks = [(FIELDS[name], value) for name, value in filters.items()]
        upper: tuple[Any, ...] | None = None if until is None else (until + 1,)
        if before is not None and (upper is None or before < upper):
            upper = before
        lower = None if since is None else (since,)
        found: list[int] = []
        last: Entry | None = None
        for entry in source.irange_descending(lower, upper):
            if checks and any(entry[position] != value for position, value in checks):
                continue
            if len(found) == limit:
                assert last is not None
                return Page(found, (last[0], last[1]))
            found.append(entry[2])
            last = entry
        return Page(found, None)
