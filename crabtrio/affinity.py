"""Which provider served a Responses API response, by its id, for `previous_response_id`.

A response's stored state lives with the provider that made it, so a request that continues
it must go to that provider entry, not to whichever the weights pick. The gateway remembers
the provider of each response it relays, in a bounded table: a file every worker maps
(`<audit path>.responses`, 512 KB, made at the first Responses request), since the next turn
of a conversation may reach any worker.
Each slot holds one id's digest and its provider's; a newer id that hashes to the same slot
replaces the older one (the table forgets, it never grows). Slots are read and written under
a POSIX record lock on their 32 bytes. Without an audit file, or when that file cannot be
made (a full disk), the table is this process's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable

SLOTS = 16_384
_MAGIC = b"CRABRSP1"
_HEADER = 64
_SLOT = struct.Struct("<16s8s8x")  # id digest, provider digest
_SIZE = _HEADER + SLOTS * _SLOT.size

log = logging.getLogger("crabtrio")


def _digest(text: str, size: int) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=size).digest()


class ResponseAffinity:
    def __init__(self, providers: Iterable[str], path: str | None) -> None:
        self._providers = {_digest(name, 8): name for name in providers}
        self._map: mmap.mmap | None = None
        self._fd = -1
        self._local: OrderedDict[str, str] = OrderedDict()
        self._path = path  # opened at first use

    def _opened(self) -> mmap.mmap | None:
        if self._map is None and self._path is not None:
            path, self._path = self._path, None
            try:
                self._open(path)
            except OSError as exc:
                log.warning(
                    "crabtrio: cannot use %s (%s): previous_response_id routing is kept per worker",
                    path,
                    exc.strerror or exc,
                )
        return self._map

    def _open(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, _HEADER, 0)
            try:
                if os.pread(fd, len(_MAGIC), 0) != _MAGIC or os.fstat(fd).st_size != _SIZE:
                    os.ftruncate(fd, 0)
                    os.posix_fallocate(fd, 0, _SIZE)  # no SIGBUS from a full disk later
                    os.pwrite(fd, _MAGIC, 0)
                self._map = mmap.mmap(fd, _SIZE)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, _HEADER, 0)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            os.close(self._fd)
            self._map = None

    def remember(self, response_id: str, provider: str) -> None:
        mapped = self._opened()
        if mapped is None:
            self._local[response_id] = provider
            self._local.move_to_end(response_id)
            if len(self._local) > SLOTS:
                self._local.popitem(last=False)
            return
        key = _digest(response_id, 16)
        at = self._slot(key)
        fcntl.lockf(self._fd, fcntl.LOCK_EX, _SLOT.size, at)
        try:
            _SLOT.pack_into(mapped, at, key, _digest(provider, 8))
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, _SLOT.size, at)

    def provider(self, response_id: str) -> str | None:
        """The provider that served `response_id`, if it is remembered."""
        mapped = self._opened()
        if mapped is None:
            return self._local.get(response_id)
        key = _digest(response_id, 16)
        at = self._slot(key)
        fcntl.lockf(self._fd, fcntl.LOCK_SH, _SLOT.size, at)
        try:
            held, provider = _SLOT.unpack_from(mapped, at)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, _SLOT.size, at)
        return self._providers.get(provider) if held == key else None

    @staticmethod
    def _slot(key: bytes) -> int:
        return _HEADER + (int.from_bytes(key[:8], "little") % SLOTS) * _SLOT.size
