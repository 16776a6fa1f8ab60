"""Sidecar index files: a sealed segment's run and rollups, next to it as `<segment>.idx`.

Loaded with mmap, so the workers of a host share one copy through the page cache instead of
each parsing the JSONL and holding its own. Never trusted blindly: a sidecar is used only if
its version is ours, its checksum holds and it describes the segment as it is now (size and a
digest of its first and last 64 KiB); anything else is reported and the caller rebuilds it.

Layout (little-endian): a header; the run's columns (`columns.COLUMNS`), then the hourly and
the daily rollup cells (keys, and values stored by column), each array at an offset aligned
to 64 bytes; a JSON block (the string table); a trailer holding the CRC-32 of everything
before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
import zlib

import numpy as np
import orjson

from .columns import COLUMNS, NAMES, Run, Strings
from .index import Segment
from .rollups import KEY_WIDTH, VALUES_DTYPE, WIDTH, Rollups, by_day, merged
from .rotation import sidecar_path
from .store import write_all

MAGIC = b"CRABIDX\x00"
VERSION = 2  # 2: rollup values stored by column
# magic, version, flags, entries, hourly and daily rollup cells, segment size, segment
# digest, meta offset and length
_HEADER = struct.Struct("<8sIIQQQQ32sQQ")
_TRAILER = struct.Struct("<I8s")  # crc32, end magic
END = b"CRABEND\x00"
ALIGN = 64
EDGE = 64 * 1024  # bytes of the segment's head and tail in its identity digest


class SidecarError(Exception):
    """The sidecar cannot be used; the message says why, in a few words."""


def identity(fd: int, size: int) -> bytes:
    """A digest of a segment's size, first and last EDGE bytes."""
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    digest.update(os.pread(fd, min(EDGE, size), 0))
    if size > EDGE:
        tail = max(EDGE, size - EDGE)
        digest.update(os.pread(fd, size - tail, tail))
    return digest.digest()


# Every array a sidecar holds: (name, dtype, items per row, rows from "entries" or "cells").
_ARRAYS = [
    *((name, dtype, 1, "entries") for name, dtype in COLUMNS),
    ("cell_keys", np.dtype("<i8"), KEY_WIDTH, "cells"),
    ("cell_values", VALUES_DTYPE, WIDTH, "cells"),
    ("day_keys", np.dtype("<i8"), KEY_WIDTH, "days"),
    ("day_values", VALUES_DTYPE, WIDTH, "days"),
]


def _layout(entries: int, cells: int, days: int) -> tuple[list[int], int]:
    offsets, at = [], _HEADER.size
    rows = {"entries": entries, "cells": cells, "days": days}
    for _, dtype, width, counted in _ARRAYS:
        at += -at % ALIGN
        offsets.append(at)
        at += rows[counted] * width * dtype.itemsize
    return offsets, at


class Snapshot:
    """What a sidecar stores, fixed at one moment: the entries of the first `size` bytes of a
    file, its string table and its rollup cells. It holds the index's current arrays, which
    later batches replace rather than change, so a worker thread can merge and write them
    while the live index goes on growing."""

    def __init__(self, segment: Segment, size: int) -> None:
        self.size = size
        self.strings = list(segment.strings.values)
        segment.flush()
        self._runs = list(segment.runs)
        self._cells = segment.rollups.parts()

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """The rollup cells as one part (merged here, in the writing thread)."""
        return merged(self._cells)

    def run(self) -> Run | None:
        """The entries as one run (merged here, in the writing thread)."""
        if len(self._runs) > 1:
            self._runs = [Run.merged(self._runs)]
        return self._runs[0] if self._runs else None


def write(target: str, fd: int, snapshot: Snapshot) -> None:
    """Write a sidecar for the file at `fd` (atomically: a temporary file, then a rename)."""
    run = snapshot.run()
    size = snapshot.size
    count = len(run) if run is not None else 0
    cell_keys, cell_values = snapshot.cells()
    cells = len(cell_keys)
    day_keys, day_values = by_day(cell_keys, cell_values)
    days = len(day_keys)
    arrays = {"cell_keys": cell_keys, "cell_values": cell_values}
    arrays |= {"day_keys": day_keys, "day_values": day_values}
    if run is not None:
        arrays.update(run.columns)
    offsets, meta_at = _layout(count, cells, days)
    meta = orjson.dumps({"strings": snapshot.strings})
    digest = identity(fd, size)
    header = _HEADER.pack(MAGIC, VERSION, 0, count, cells, days, size, digest, meta_at, len(meta))
    temporary = f"{target}.{os.getpid()}.tmp"
    out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        crc = 0
        at = 0

        def put(data: bytes | memoryview) -> None:
            nonlocal crc, at
            crc = zlib.crc32(data, crc)
            write_all(out, data)
            at += len(data)

        put(header)
        for (name, dtype, _, _), offset in zip(_ARRAYS, offsets, strict=True):
            put(b"\x00" * (offset - at))
            if name in arrays:
                put(np.ascontiguousarray(arrays[name], dtype=dtype).data.cast("B"))
        put(meta)
        trailer = _TRAILER.pack(crc, END)
        put(trailer)
        os.fsync(out)
    except BaseException:
        os.close(out)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    os.close(out)
    os.replace(temporary, target)


def load(
    segment_path: str, fd: int, size: int, source: int, *, prefix: bool = False
) -> tuple[Segment, int]:
    """The segment a valid sidecar describes, its columns mapped, and the size of the file
    it describes; SidecarError otherwise. `prefix`: the sidecar may describe the file's
    first bytes only (a checkpoint of the active file), not necessarily all `size` of them."""
    try:
        with open(sidecar_path(segment_path), "rb") as file:
            _check_crc(file.fileno())
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise SidecarError("missing") from None
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise SidecarError(f"unreadable ({exc})") from None
    try:
        return _parse(mapped, fd, size, source, prefix)
    except SidecarError:
        mapped.close()
        raise


def _check_crc(sidecar_fd: int) -> None:
    """Read through the page cache rather than through a mapping, so checking does not make
    every page resident in this process (only the pages queries touch become so)."""
    total = os.fstat(sidecar_fd).st_size
    if total < _HEADER.size + _TRAILER.size:
        raise SidecarError("truncated")
    end = total - _TRAILER.size
    crc, end_magic = _TRAILER.unpack(os.pread(sidecar_fd, _TRAILER.size, end))
    computed, at = 0, 0
    while at < end:
        chunk = os.pread(sidecar_fd, min(1 << 20, end - at), at)
        if not chunk:
            raise SidecarError("truncated")
        computed = zlib.crc32(chunk, computed)
        at += len(chunk)
    if end_magic != END or computed != crc:
        raise SidecarError("checksum mismatch")


def _parse(mapped: mmap.mmap, fd: int, size: int, source: int, prefix: bool) -> tuple[Segment, int]:
    header = _HEADER.unpack_from(mapped, 0)
    magic, version, _, count, cells, days, described, digest, meta_at, meta_length = header
    if magic != MAGIC:
        raise SidecarError("not a crabtrio index")
    if version != VERSION:
        raise SidecarError(f"version {version}, not {VERSION}")
    end = len(mapped) - _TRAILER.size
    if (described > size if prefix else described != size) or digest != identity(fd, described):
        raise SidecarError("describes another file")
    offsets, expected_meta_at = _layout(count, cells, days)
    if meta_at != expected_meta_at or meta_at + meta_length != end:
        raise SidecarError("inconsistent layout")
    try:
        strings = Strings(orjson.loads(mapped[meta_at:end])["strings"])
    except (ValueError, TypeError, KeyError) as exc:
        raise SidecarError(f"bad metadata ({exc})") from None
    rows = {"entries": count, "cells": cells, "days": days}
    arrays = {}
    for (name, dtype, width, counted), offset in zip(_ARRAYS, offsets, strict=True):
        items = rows[counted] * width
        array = (
            np.frombuffer(mapped, dtype=dtype, count=items, offset=offset)
            if items
            else (np.zeros(0, dtype))
        )
        if name in ("cell_values", "day_values"):  # one row per value column
            array = array.reshape(width, -1)
        elif width > 1:
            array = array.reshape(-1, width)
        arrays[name] = array
    runs = [Run(source, strings, {name: arrays[name] for name in NAMES})] if count else []
    days_cells = (arrays["day_keys"], arrays["day_values"])
    rollups = Rollups(strings, arrays["cell_keys"], arrays["cell_values"], days_cells)
    segment = Segment(source, strings, runs, rollups)
    return segment, described
