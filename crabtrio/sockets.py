"""The stdlib socket under a trio socket, for the relay's hot path: a `send()` or `recv()` that
can complete at once is made directly, without trio's per-call layers (a conflict detector, a
wrapper, an async context manager and a scheduler pass each); waiting stays trio's
(`trio.lowlevel.wait_readable`/`wait_writable`)."""

from __future__ import annotations

import socket
from typing import Any


def stdlib_socket(trio_socket: Any) -> socket.socket | None:
    """trio keeps it as `_sock` (no public accessor); None if another trio version does not,
    and the callers then use trio's own calls."""
    sock = getattr(trio_socket, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
