"""The audit file's hash chain: each kind of tampering is a break at the right file, line and
byte; a torn tail, rotation and retention are not; concurrent writers make one chain; the key
matters; the CLI says the same; the keyed digest is HMAC-SHA256."""

from __future__ import annotations

import errno
import hashlib
import hmac
import itertools
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import trio

from crabtrio.audit import AuditFile, AuditLog, AuditRecord, store
from crabtrio.audit.chain import CHAIN_FIELD, GENESIS, Chain, Link
from crabtrio.audit.record import encode_batch
from crabtrio.audit.rotation import rotated_siblings
from crabtrio.audit.verify import Report, verify
from crabtrio.config import AuditConfig

from .records import record

KEY = "chain-key-for-tests"
OTHER = "another-chain-key"


def append(
    path: Path,
    batches: Sequence[Sequence[AuditRecord]],
    key: str | None = KEY,
    *,
    rotate_at: int | None = None,
) -> None:
    """Append each batch as one worker's writer does (one AuditFile, one append a batch)."""
    audit = AuditFile(str(path), Chain(key))
    try:
        for batch in batches:
            audit.append(encode_batch(batch), rotate_at=rotate_at)
    finally:
        audit.close()


def batches(count: int, size: int, start: int = 1) -> list[list[AuditRecord]]:
    return [[record(start + b * size + i) for i in range(size)] for b in range(count)]


def lines_of(path: Path | str) -> list[bytes]:
    return Path(path).read_bytes().splitlines(keepends=True)


def offset(lines: Sequence[bytes], index: int) -> int:
    """The byte offset of `lines[index]`."""
    return sum(len(line) for line in lines[:index])


def all_records(path: Path) -> list[dict[str, object]]:
    """Every record of every segment, oldest first."""
    files = [*rotated_siblings(str(path)), str(path)]
    return [orjson.loads(line) for file in files for line in lines_of(file)]


def where(report: Report) -> tuple[str, int, int, str]:
    """(file, line, byte offset, kind) of the first break."""
    assert report.broken is not None, f"no break found: {report}"
    broken = report.broken
    return broken.path, broken.line, broken.offset, broken.kind


def spec_digest(key: str | None, previous: str, line: bytes) -> str:
    """The chain of a stored line after `previous`, computed from the documented rule alone:
    the line without its newline and without its last member `,"chain":"..."`."""
    line = line.rstrip(b"\n")
    canonical = line[: line.rfind(CHAIN_FIELD)] + b"}"
    if key is None:
        return hashlib.sha256(previous.encode() + canonical).hexdigest()
    return hmac.new(key.encode(), previous.encode() + canonical, hashlib.sha256).hexdigest()


def forged(lines: Sequence[bytes], index: int, key: str | None) -> bytes:
    """A fresh record a forger holding `key` links after `lines[index - 1]`, with the seq
    that comes next."""
    previous = orjson.loads(lines[index - 1])
    data, _ = Chain(key).link(
        encode_batch([record(99, key="forged")]), Link(previous["seq"], previous["chain"])
    )
    return data


# --- an untouched file ------------------------------------------------------------------------


def test_records_link_one_after_another_from_genesis_by_the_documented_rule(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, batches(3, 4))
    lines = lines_of(path)
    previous = GENESIS
    for seq, line in enumerate(lines, 1):
        stored = orjson.loads(line)
        assert stored["seq"] == seq
        assert stored["chain"] == spec_digest(KEY, previous, line)
        assert line.endswith(b',"seq":%d,"chain":"%s"}\n' % (seq, stored["chain"].encode()))
        previous = stored["chain"]
    report = verify(str(path), [KEY])
    assert report.ok, report.broken
    assert (report.records, report.segments, report.unchained, report.torn_tail) == (
        12,
        1,
        0,
        False,
    )
    assert report.head == previous


# --- tampering inside a file -------------------------------------------------------------------


def edit_one_byte(line: bytes) -> bytes:
    edited = line.replace(b'"model":"m"', b'"model":"n"')
    assert edited != line and orjson.loads(edited)  # one byte of a value: still valid JSON
    return edited


def break_json(line: bytes) -> bytes:
    broken = line.replace(b'"model":"m"', b'"model";"m"')
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(broken)
    return broken


# Each takes the file's ten lines and returns them tampered at index 4 (line 5).
TAMPERING = {
    "edited": lambda lines: [*lines[:4], edit_one_byte(lines[4]), *lines[5:]],
    "corrupt": lambda lines: [*lines[:4], break_json(lines[4]), *lines[5:]],
    "removed": lambda lines: [*lines[:4], *lines[5:]],
    "inserted a copy": lambda lines: [*lines[:4], lines[1], *lines[4:]],
    # A fresh record with the seq that comes next, linked without the key (SHA-256) or with
    # a guessed one: it does not link.
    "inserted a forgery without the key": lambda lines: [
        *lines[:4],
        forged(lines, 4, None),
        *lines[4:],
    ],
    "inserted a forgery with a wrong key": lambda lines: [
        *lines[:4],
        forged(lines, 4, OTHER),
        *lines[4:],
    ],
    "inserted a record without a link": lambda lines: [
        *lines[:4],
        record(99).to_line(),
        *lines[4:],
    ],
    "reordered": lambda lines: [*lines[:4], lines[5], lines[4], *lines[6:]],
}


@pytest.mark.parametrize("tamper", TAMPERING)
def test_tampering_with_a_middle_record_is_a_break_at_its_line(tmp_path, tamper: str) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, batches(2, 5))
    lines = lines_of(path)
    path.write_bytes(b"".join(TAMPERING[tamper](lines)))
    report = verify(str(path), [KEY])
    kind = tamper.split()[0]
    assert where(report) == (str(path), 5, offset(lines, 4), kind), report.broken
    assert report.records == 4  # the lines before it were checked


def test_without_a_key_a_recomputed_forgery_shows_at_the_line_after_it(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, batches(2, 5), key=None)
    lines = lines_of(path)
    tampered = [*lines[:4], forged(lines, 4, None), *lines[4:]]
    path.write_bytes(b"".join(tampered))
    # Without a key anyone can compute a SHA-256 link: the forged line (seq 5, linked to
    # line 4) passes on its own. The genuine seq 5 after it no longer follows, so the break is
    # reported one line later, at line 6, as inserted.
    assert where(verify(str(path))) == (str(path), 6, offset(tampered, 5), "inserted")
    # With a key, the same forger (who has no key) is caught at the forged line itself.
    keyed = tmp_path / "keyed.jsonl"
    append(keyed, batches(2, 5))
    lines = lines_of(keyed)
    keyed.write_bytes(b"".join([*lines[:4], forged(lines, 4, None), *lines[4:]]))
    assert where(verify(str(keyed), [KEY])) == (str(keyed), 5, offset(lines, 4), "inserted")


def test_removing_the_newest_records_shows_against_a_pinned_head(tmp_path) -> None:
    """Nothing follows the last record to notice it gone: that is what pinning the head
    (GET /v1/admin/chain) is for."""
    path = tmp_path / "audit.jsonl"
    append(path, batches(2, 5))
    pinned = verify(str(path), [KEY])
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[:-2]))
    report = verify(str(path), [KEY])
    assert report.ok and report.records == 8
    assert report.head != pinned.head
    assert report.head == orjson.loads(lines[-3])["chain"]


# --- segments ----------------------------------------------------------------------------------


def rotated_file(tmp_path: Path) -> tuple[Path, list[str]]:
    """Four rotated segments of five records (each batch fills one) and an empty active file."""
    path = tmp_path / "audit.jsonl"
    append(path, batches(4, 5), rotate_at=1000)
    segments = rotated_siblings(str(path))
    assert len(segments) == 4 and path.stat().st_size == 0
    return path, segments


def test_rotated_segments_verify_as_one_chain(tmp_path) -> None:
    path, _ = rotated_file(tmp_path)
    records = all_records(path)
    assert [r["seq"] for r in records] == list(range(1, 21))
    report = verify(str(path), [KEY])
    assert report.ok, report.broken
    assert (report.records, report.segments, report.head) == (20, 5, records[-1]["chain"])
    # Rotation is the writer's, not the chain's: the next batch links on in the new file.
    append(path, batches(1, 2, start=50))
    assert [r["seq"] for r in all_records(path)] == list(range(1, 23))
    assert verify(str(path), [KEY]).ok


def test_truncating_the_head_of_the_oldest_segment_is_a_break_at_its_first_line(
    tmp_path,
) -> None:
    path, segments = rotated_file(tmp_path)
    oldest = Path(segments[0])
    oldest.write_bytes(b"".join(lines_of(oldest)[2:]))
    assert where(verify(str(path), [KEY])) == (segments[0], 1, 0, "removed")


@pytest.mark.parametrize("deleted", [0, 1], ids=["oldest", "middle"])
def test_deleting_a_segment_by_hand_is_a_break_at_the_next_ones_first_line(
    tmp_path, deleted: int
) -> None:
    path, segments = rotated_file(tmp_path)
    os.unlink(segments[deleted])
    report = verify(str(path), [KEY])
    assert where(report) == (segments[deleted + 1], 1, 0, "removed")
    assert report.records == 5 * deleted


def test_a_torn_last_line_of_the_active_file_is_no_break_and_the_next_write_cuts_it(
    tmp_path,
) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, batches(2, 3))
    whole = path.read_bytes()
    with open(path, "ab") as file:  # what a writer killed in the middle of its write leaves
        file.write(lines_of(path)[-1][:57])
    report = verify(str(path), [KEY])
    assert report.ok, report.broken
    assert report.torn_tail and report.records == 6
    append(path, batches(1, 2, start=20))
    assert path.read_bytes().startswith(whole)
    assert [r["seq"] for r in all_records(path)] == list(range(1, 9))
    report = verify(str(path), [KEY])
    assert report.ok and not report.torn_tail and report.records == 8


def test_a_torn_line_at_the_end_of_a_rotated_segment_is_corrupt(tmp_path) -> None:
    path, segments = rotated_file(tmp_path)
    size = os.path.getsize(segments[1])
    with open(segments[1], "ab") as file:
        file.write(b'{"request_id":"req-0')
    assert where(verify(str(path), [KEY])) == (segments[1], 6, size, "corrupt")


async def write(audit: AuditLog, group: list[AuditRecord]) -> None:
    """Queue `group` and wait until it is written (sync "always": settled means written)."""
    sequences = [audit.record(r) for r in group]
    with trio.fail_after(5):
        await audit.settle(sequences[-1])


GROUPS = [[record(i) for i in range(n, n + 25)] for n in (0, 25, 50)]


async def test_retention_deleting_the_oldest_segments_is_no_break(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    # Each group of 25 chained records (~7.5 KB) fills a file; 9 KB keep one rotated file.
    config = AuditConfig(
        path=str(path), sync="always", max_file_mb=0.005, max_total_mb=0.009, chain_key=KEY
    )
    async with AuditLog.open(config) as audit:
        for group in GROUPS:
            await write(audit, group)
        head = await audit.head()
    retained = rotated_siblings(str(path))
    assert len(retained) == 1 and path.stat().st_size == 0
    assert Path(f"{path}.chain").exists()
    report = verify(str(path), [KEY])
    assert report.ok, report.broken
    assert (report.records, report.segments, report.head) == (25, 2, head.chain)
    assert head.seq == 75
    # The note of the deleted segments' last link is what tells retention from removal.
    os.unlink(f"{path}.chain")
    assert where(verify(str(path), [KEY])) == (retained[0], 1, 0, "removed")


async def test_after_retention_deleted_every_segment_the_new_file_links_on(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    # Less than one file: each rotated file is deleted as soon as it is rotated.
    config = AuditConfig(
        path=str(path), sync="always", max_file_mb=0.005, max_total_mb=0.001, chain_key=KEY
    )
    async with AuditLog.open(config) as audit:
        for group in [*GROUPS, [record(80), record(81)]]:
            await write(audit, group)
    assert rotated_siblings(str(path)) == []
    assert [r["seq"] for r in all_records(path)] == [76, 77]
    report = verify(str(path), [KEY])
    assert report.ok, report.broken
    assert (report.records, report.segments) == (2, 1)


class Killed(BaseException):
    """The process dies here."""


def test_a_crash_between_noting_and_deleting_a_segment_is_no_break(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, segments = rotated_file(tmp_path)
    audit = AuditFile(str(path), Chain(KEY))
    real_unlink = os.unlink

    def killed_before_the_second(name: str) -> None:
        if name == segments[1]:
            raise Killed
        real_unlink(name)

    monkeypatch.setattr(store.os, "unlink", killed_before_the_second)
    try:
        with pytest.raises(Killed):  # 3 KB allowed: the two oldest segments go
            audit.prune(retention_days=None, max_total_bytes=3000)
    finally:
        audit.close()
        monkeypatch.undo()
    assert rotated_siblings(str(path)) == segments[1:]
    report = verify(str(path), [KEY])
    assert report.ok, report.broken


async def test_a_note_that_cannot_be_written_does_not_write_the_batch_twice(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_note = store.note_deleted
    failed: list[str] = []

    def disk_full_once(path: str, segment: str) -> None:
        if not failed:
            failed.append(segment)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_note(path, segment)

    monkeypatch.setattr(store, "note_deleted", disk_full_once)
    path = tmp_path / "audit.jsonl"
    config = AuditConfig(
        path=str(path), sync="always", max_file_mb=0.005, max_total_mb=0.009, chain_key=KEY
    )
    async with AuditLog.open(config) as audit:
        for group in GROUPS:
            await write(audit, group)
        head = await audit.head()
    assert failed  # retention could not note a segment once
    assert head.seq == 75  # as many links as records written


# --- unchained records from before the chain ------------------------------------------------


def test_an_older_unchained_file_verifies_with_its_unchained_records_counted(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(encode_batch([record(i) for i in range(1, 6)]))  # before the chain
    append(path, batches(2, 3, start=10))
    records = [orjson.loads(line) for line in lines_of(path)]
    assert ["seq" in r for r in records] == [False] * 5 + [True] * 6
    assert [r["seq"] for r in records[5:]] == list(range(1, 7))  # a chain from genesis
    report = verify(str(path), [KEY])
    assert report.ok, report.broken
    assert (report.records, report.unchained) == (11, 5)
    assert report.head == records[-1]["chain"]


def bytes_read() -> int:
    """What this process has read with read(2) and friends so far (Linux)."""
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith("rchar:")).split()[1])


def test_verify_reads_an_unchained_file_about_once(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(encode_batch([record(i) for i in range(1000)]))
    append(path, batches(1, 3, start=2000))
    before = bytes_read()
    report = verify(str(path), [KEY])
    read = bytes_read() - before
    assert report.ok and report.unchained == 1000
    size = path.stat().st_size
    assert read <= 10 * size, f"read {read} bytes of a {size}-byte file"


# --- keys ----------------------------------------------------------------------------------------


def test_a_keyed_file_does_not_verify_with_a_wrong_key_or_none(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, batches(2, 3))
    for keys in ([OTHER], [None], [OTHER, None]):
        report = verify(str(path), keys)
        assert where(report) == (str(path), 1, 0, "edited"), keys
        assert report.records == 0
    assert verify(str(path), [KEY]).ok
    assert verify(str(path), [OTHER, KEY]).ok  # the key given as an older one


def test_after_a_key_change_both_keys_are_needed(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, batches(1, 3), key=OTHER)  # the old key
    append(path, batches(1, 3, start=10), key=KEY)  # the new one links on after it
    assert [r["seq"] for r in all_records(path)] == list(range(1, 7))
    report = verify(str(path), [KEY, OTHER])
    assert report.ok and report.records == 6
    assert where(verify(str(path), [KEY])) == (str(path), 1, 0, "edited")
    lines = lines_of(path)
    assert where(verify(str(path), [OTHER])) == (str(path), 4, offset(lines, 3), "edited")


KEYS = [
    "k",
    "x" * 32,
    "x" * 63,
    "x" * 64,  # one SHA-256 block exactly
    "x" * 65,  # longer than a block: HMAC hashes the key first
    "x" * 200,
    "é" * 32,  # 64 bytes of UTF-8
    "é" * 33,  # 66 bytes of UTF-8
    "ключ-🔑-鍵",
]


@pytest.mark.parametrize(
    "key", KEYS, ids=[f"{'ascii' if k.isascii() else 'utf8'}-{len(k.encode())}-bytes" for k in KEYS]
)
def test_the_keyed_digest_is_hmac_sha256(key: str) -> None:
    chain = Chain(key)
    messages = [(GENESIS.encode(), b'{"a":1,"seq":1}'), (b"f" * 64, bytes(range(256)) * 8)]
    for _ in range(2):  # the padded key states are copied for each digest, never used up
        for previous, canonical in messages:
            expected = hmac.digest(key.encode(), previous + canonical, "sha256").hex()
            assert chain.digest(previous, canonical) == expected.encode()


def test_the_digest_without_a_key_is_sha256() -> None:
    previous, canonical = GENESIS.encode(), b'{"a":1,"seq":1}'
    expected = hashlib.sha256(previous + canonical).hexdigest().encode()
    assert Chain(None).digest(previous, canonical) == expected
    assert Chain("").digest(previous, canonical) == expected  # an empty key is no key


# --- concurrent writers ------------------------------------------------------------------------


def test_two_writers_taking_turns_link_after_each_other(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    first, second = AuditFile(str(path), Chain(KEY)), AuditFile(str(path), Chain(KEY))
    try:
        for n in range(3):
            first.append(encode_batch([record(n, key="first")]))
            second.append(encode_batch([record(n, key="second")]))
    finally:
        first.close()
        second.close()
    assert [r["seq"] for r in all_records(path)] == list(range(1, 7))
    assert verify(str(path), [KEY]).ok


def test_two_writers_appending_at_once_make_one_chain(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    rounds, size = 40, 3
    writers = [AuditFile(str(path), Chain(KEY)) for _ in range(2)]
    start = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def run(n: int, audit: AuditFile) -> None:
        try:
            for r in range(rounds):
                start.wait()  # both append in every round: the file interleaves them
                batch = [record(r * size + i, key=f"w{n}") for i in range(size)]
                audit.append(encode_batch(batch), rotate_at=4000)
        except BaseException as exc:  # the test thread reports it
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=run, args=(n, w)) for n, w in enumerate(writers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for audit in writers:
            audit.close()
    assert not errors and not any(thread.is_alive() for thread in threads)
    records = all_records(path)
    total = 2 * rounds * size
    assert [r["seq"] for r in records] == list(range(1, total + 1))
    writer = [r["key_name"] for r in records]
    assert Counter(writer) == {"w0": total // 2, "w1": total // 2}
    assert sum(a != b for a, b in itertools.pairwise(writer)) >= rounds
    report = verify(str(path), [KEY])
    assert report.ok, report.broken
    assert report.records == total
    assert report.segments == len(rotated_siblings(str(path))) + 1 > 2


# --- the CLI -----------------------------------------------------------------------------------


def run_cli(cwd: Path, *args: str, key: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m crabtrio verify ...` with $CRABTRIO_CHAIN_KEY set to `key` ("": none) and
    no config file of the gateway's to find."""
    env = {**os.environ, "CRABTRIO_CHAIN_KEY": key, "CRABTRIO_CONFIG": ""}
    command = [sys.executable, "-m", "crabtrio", "verify", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_the_cli_prints_the_head_or_the_first_break_and_exits_accordingly(tmp_path) -> None:
    unchained = tmp_path / "unchained" / "audit.jsonl"
    unchained.parent.mkdir()
    unchained.write_bytes(encode_batch([record(i) for i in range(1, 3)]))
    append(unchained, batches(2, 2, start=10))
    with open(unchained, "ab") as file:
        file.write(b'{"request_id":"torn')
    tampered = tmp_path / "tampered" / "audit.jsonl"
    tampered.parent.mkdir()
    append(tampered, batches(2, 3))
    lines = lines_of(tampered)
    tampered.write_bytes(b"".join([*lines[:2], edit_one_byte(lines[2]), *lines[3:]]))
    config = tmp_path / "gateway.toml"  # the path and the keys from the config
    config.write_text(
        '[providers.mock]\nkind = "mock"\nmodels = ["m"]\n'
        f'[audit]\npath = "{unchained}"\nchain_key = "{OTHER}"\nchain_old_keys = ["{KEY}"]\n'
    )
    runs = [
        (str(unchained),),  # with the key
        (str(unchained),),  # with a wrong key
        (str(unchained),),  # without a key (the embedded default config has none)
        (str(tampered),),
        ("--config", str(config)),
        (str(tmp_path / "missing.jsonl"),),
    ]
    keys = [KEY, OTHER, "", KEY, "", KEY]
    with ThreadPoolExecutor(3) as pool:  # each start imports the gateway: ~1.5 s
        ok, wrong, keyless, edited, configured, missing = pool.map(
            lambda args, key: run_cli(tmp_path, *args, key=key), runs, keys
        )
    head = verify(str(unchained), [KEY]).head
    assert (ok.returncode, ok.stdout) == (0, f"ok: 6 records, 1 segments, chain head {head}\n")
    assert "HMAC-SHA256" in ok.stderr
    assert "2 records from before the chain" in ok.stderr
    assert "a torn last line" in ok.stderr
    first_chained = offset(lines_of(unchained), 2)
    for run in (wrong, keyless):
        assert run.returncode == 1, run
        assert run.stdout.startswith(f"break: {unchained}:3 (byte {first_chained}): edited: ")
        assert run.stdout.count("\n") == 1
        assert "verified 2 records before it" in run.stderr
    assert edited.returncode == 1
    assert edited.stdout.startswith(f"break: {tampered}:3 (byte {offset(lines, 2)}): edited: ")
    assert (configured.returncode, configured.stdout) == (
        0,
        f"ok: 6 records, 1 segments, chain head {head}\n",
    )
    assert (missing.returncode, missing.stdout) == (1, "")
    assert "no such audit file" in missing.stderr
    for run in (ok, wrong, keyless, edited, configured, missing):
        assert KEY not in run.stdout + run.stderr
