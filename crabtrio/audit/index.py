"""The audit index: per file, sorted column runs (see `columns`) and per-hour rollups.

A sealed (rotated) file has one run, usually mapped from its sidecar. The active file
gathers new entries in a small buffer that becomes a run at the next query or when it fills;
runs are merged two by two as they grow (each entry is re-sorted O(log n) times in all), so a
query visits a handful of runs per file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import columns as col
from .columns import Page, Run, Strings, rid_key
from .record import IndexedFields
from .rollups import MAX_COST, MAX_TOKENS, Rollups

BUFFER_ENTRIES = 4096  # entries buffered before they become a run

__all__ = ["AuditIndex", "Page", "Segment"]


class Segment:
    """What the index knows of one file (a `source` of the reader)."""

    __slots__ = ("_buffer", "_buffered", "bulk", "rollups", "runs", "source", "strings")

    def __init__(
        self,
        source: int,
        strings: Strings | None = None,
        runs: list[Run] | None = None,
        rollups: Rollups | None = None,
    ) -> None:
        self.source = source
        self.strings = strings if strings is not None else Strings()
        self.runs: list[Run] = runs if runs is not None else []
        self.rollups = rollups if rollups is not None else Rollups(self.strings)
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffered = 0
        # While a whole file is read (replay), entries wait for one sort at its end rather
        # than being merged run by run.
        self.bulk = False

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs) + self._buffered

    def add(
        self,
        records: list[IndexedFields],
        offsets: Sequence[int] | np.ndarray,
        lengths: Sequence[int] | np.ndarray,
    ) -> None:
        """Index a batch of records found at these offsets (with these line lengths)."""
        n = len(records)
        if not n:
            return
        codes = self.strings.codes
        code = self.strings.code
        columns = {
            "ts": np.array([r.timestamp for r in records], np.int64),
            "rid": _rid_keys([r.request_id for r in records]),
            "offset": np.array(offsets, np.int64),
            "length": np.array(lengths, np.uint32),
            "key": _codes([r.key_name for r in records], codes, code),
            "model": _codes([r.model for r in records], codes, code),
            "provider": _codes([r.provider for r in records], codes, code),
            "status": np.array([r.status for r in records], np.uint16),
        }
        self.rollups.add(
            columns,
            _clipped([r.prompt_tokens or 0 for r in records], MAX_TOKENS),
            _clipped([r.completion_tokens or 0 for r in records], MAX_TOKENS),
            _clipped([r.cost_micros for r in records], MAX_COST),
            _clipped([r.latency_ms for r in records], 2**62),
        )
        self._buffer.append(columns)
        self._buffered += n
        if self._buffered >= BUFFER_ENTRIES and not self.bulk:
            self.flush()

    def flush(self) -> None:
        """Make the buffered entries a run; merge runs while the newest is as large as the
        one before it (a binary counter: O(log n) runs, each entry merged O(log n) times)."""
        if not self._buffer:
            return
        batches, self._buffer, self._buffered = self._buffer, [], 0
        arrays = {name: np.concatenate([b[name] for b in batches]) for name in col.NAMES}
        self.runs.append(Run.build(self.source, self.strings, arrays))
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            newer = self.runs.pop()
            self.runs[-1] = Run.merged([self.runs[-1], newer])

    def sealed(self) -> Run | None:
        """All entries as one run (the file was rotated: nothing more will come)."""
        self.flush()
        if len(self.runs) > 1:
            self.runs = [Run.merged(self.runs)]
        return self.runs[0] if self.runs else None


def _clipped(values: list[int], limit: int) -> np.ndarray:
    """int64 values within [0, limit] (a foreign record may hold any integer)."""
    try:
        return np.clip(np.array(values, np.int64), 0, limit)
    except OverflowError:
        return np.array([min(max(v, 0), limit) for v in values], np.int64)


def _rid_keys(ids: list[str]) -> np.ndarray:
    """Each id's first 16 bytes; numpy converts ASCII text itself (ours always is)."""
    try:
        return np.array(ids, "S16")
    except UnicodeEncodeError:
        return np.array([rid_key(i) for i in ids], "S16")


def _codes(values: list[str], codes: dict[str, int], code: Any) -> np.ndarray:
    return np.array([codes[v] if v in codes else code(v) for v in values], np.uint32)


class AuditIndex:
    def __init__(self) -> None:
        self.segments: dict[int, Segment] = {}

    def __len__(self) -> int:
        return sum(len(segment) for segment in self.segments.values())

    def segment(self, source: int) -> Segment:
        found = self.segments.get(source)
        if found is None:
            found = self.segments[source] = Segment(source)
        return found

    def put(self, segment: Segment) -> None:
        self.segments[segment.source] = segment

    def drop(self, source: int) -> None:
        """Forget a file's entries and rollups (its file was deleted by retention)."""
        self.segments.pop(source, None)

    def query(
        self,
        *,
        filters: dict[str, Any] | None = None,
        since: int | None = None,
        until: int | None = None,
        before: col.Cursor | None = None,
        limit: int = 100,
    ) -> Page:
        """Newest-first locations of matching entries, and a cursor when more match."""
        return col.query(
            self._runs(), filters=filters, since=since, until=until, before=before, limit=limit
        )

    def rollup_sources(self) -> Iterable[Rollups]:
        """Every file's rollups (see `sums.summed`)."""
        return (segment.rollups for segment in self.segments.values())

    def _runs(self) -> Iterable[Run]:
        for segment in self.segments.values():
            segment.flush()
            yield from segment.runs

    def memory(self) -> dict[str, int]:
        """Bytes held by runs in private memory and mapped from sidecars."""
        private = mapped = 0
        for segment in self.segments.values():
            for run in segment.runs:
                base = run.columns["ts"].base
                if base is not None and not isinstance(base, np.ndarray):
                    mapped += run.nbytes
                else:
                    private += run.nbytes
        return {"private_bytes": private, "mapped_bytes": mapped}
