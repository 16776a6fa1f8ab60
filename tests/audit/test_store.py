"""The append side: whole lines, torn tails cut, failed writes rolled back, path replaced."""

from __future__ import annotations

import os

import pytest

from crabtrio.audit import store
from crabtrio.audit.store import AuditFile


def test_appends_whole_lines_and_creates_the_file(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    audit = AuditFile(str(path))
    try:
        audit.append(b'{"a":1}\n')
        result = audit.append(b'{"b":2}\n{"c":3}\n')
        assert result.size == path.stat().st_size
        assert path.read_bytes() == b'{"a":1}\n{"b":2}\n{"c":3}\n'
        assert (tmp_path / "a.jsonl.lock").exists()
    finally:
        audit.close()


def test_torn_tail_is_cut_on_open_and_before_an_append(tmp_path, caplog) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":')
    audit = AuditFile(str(path))
    try:
        assert path.read_bytes() == b'{"a":1}\n'
        assert "cut a torn trailing line of 5 bytes" in caplog.text
        with open(path, "ab") as other:  # another writer dies mid-line
            other.write(b'{"torn')
        audit.append(b'{"c":3}\n')
        assert path.read_bytes() == b'{"a":1}\n{"c":3}\n'
    finally:
        audit.close()


def test_a_file_without_any_newline_is_emptied(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"x" * 100_000)
    AuditFile(str(path)).close()
    assert path.read_bytes() == b""


def test_failed_write_leaves_no_fragment(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.jsonl"
    audit = AuditFile(str(path))
    try:
        audit.append(b'{"a":1}\n')
        real_write = os.write
        calls = []

        def short_then_full(fd: int, data: bytes) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, bytes(data[:5]))
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store.os, "write", short_then_full)
        with pytest.raises(OSError):
            audit.append(b'{"b":2}\n{"c":3}\n')
        assert path.read_bytes() == b'{"a":1}\n'
        monkeypatch.setattr(store.os, "write", real_write)
        audit.append(b'{"b":2}\n')
        assert path.read_bytes() == b'{"a":1}\n{"b":2}\n'
    finally:
        audit.close()


def test_deleted_or_renamed_path_is_recreated_before_the_next_write(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    audit = AuditFile(str(path))
    try:
        audit.append(b'{"a":1}\n')
        os.rename(path, tmp_path / "a.jsonl.1")
        assert audit.replaced()
        assert audit.append(b'{"b":2}\n').reopened
        assert path.read_bytes() == b'{"b":2}\n'
        assert (tmp_path / "a.jsonl.1").read_bytes() == b'{"a":1}\n'
        os.unlink(path)
        assert audit.append(b'{"c":3}\n').reopened
        assert path.read_bytes() == b'{"c":3}\n'
        assert not audit.replaced()
    finally:
        audit.close()


def test_unwritable_directory_raises(tmp_path) -> None:
    if os.geteuid() == 0:
        missing = tmp_path / "no" / "such" / "dir" / "a.jsonl"
        with pytest.raises(OSError):
            AuditFile(str(missing))
        return
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    with pytest.raises(PermissionError):
        AuditFile(str(locked / "a.jsonl"))
