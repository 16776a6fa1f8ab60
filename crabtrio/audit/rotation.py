"""Names of rotated audit files, and the retention rules that delete the oldest of them."""

from __future__ import annotations

import contextlib
import os
import re
import time

_STAMP = r"(\d{8}T\d{6}\.\d{3}Z)(?:-(\d+))?"


def rotated_name_pattern(path: str) -> re.Pattern[str]:
    """Rotated siblings are `<stem>-<UTC timestamp>[-n]<suffix>` (see `rotated_siblings`)."""
    stem, suffix = os.path.splitext(os.path.basename(path))
    return re.compile(rf"^{re.escape(stem)}-{_STAMP}{re.escape(suffix)}$")


def sidecar_path(segment: str) -> str:
    """Where a segment's index sidecar lives (see `sidecar`); retention deletes it too."""
    return segment + ".idx"


def rotated_siblings(path: str) -> list[str]:
    """The rotated files of `path`, oldest first."""
    directory = os.path.dirname(os.path.abspath(path))
    pattern = rotated_name_pattern(path)
    try:
        found = [(pattern.match(name), name) for name in os.listdir(directory)]
    except FileNotFoundError:
        return []
    # By stamp, then by the `-n` of rotations within one millisecond (none comes first):
    # as plain names, `...000Z-1.jsonl` would sort before `...000Z.jsonl`.
    keyed = sorted((m.group(1), int(m.group(2) or 0), name) for m, name in found if m)
    return [os.path.join(directory, name) for _, _, name in keyed]


def rotated_name(path: str, now: float) -> str:
    """A free name for `path` rotated at `now`, e.g. audit-20261127T051201.123Z.jsonl."""
    stem, suffix = os.path.splitext(os.path.abspath(path))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    candidate, n = f"{stem}-{stamp}{suffix}", 1
    while os.path.exists(candidate):
        candidate, n = f"{stem}-{stamp}-{n}{suffix}", n + 1
    return candidate


def expired(
    path: str, *, retention_days: float | None, max_total_bytes: int | None, now: float
) -> list[str]:
    """Rotated files to delete: older than `retention_days`, then the oldest until the
    rotated and active files together fit in `max_total_bytes`."""
    sizes: dict[str, int] = {}
    ages: dict[str, float] = {}
    for sibling in rotated_siblings(path):
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(sibling)
            sizes[sibling], ages[sibling] = info.st_size, now - info.st_mtime
    doomed = []
    if retention_days is not None:
        doomed = [f for f in sizes if ages[f] > retention_days * 86400]
    if max_total_bytes is not None:
        try:
            total = os.stat(path).st_size
        except FileNotFoundError:
            total = 0
        total += sum(size for f, size in sizes.items() if f not in doomed)
        for sibling in sizes:  # oldest first
            if total <= max_total_bytes:
                break
            if sibling not in doomed:
                doomed.append(sibling)
                total -= sizes[sibling]
    return doomed
