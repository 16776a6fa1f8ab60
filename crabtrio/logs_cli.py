"""`python -m crabtrio logs`: the audit records that match, oldest first, from the audit file
and its retained rotated segments or from a running gateway's admin API; as a table, the lines
as stored, CSV or NDJSON; and followed as they are written, through rotations.

Files are read with the gateway's own parsing (`decode_fields`: a line that is not a record is
skipped, as the index skips it) and rotation rules (`rotated_siblings`; a renamed file is
known by its inode and read to its end before the new one). Failures are one line on stderr:
exit 2 for bad arguments, 1 for an unreadable file, an unreachable gateway or an API error.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, cast

import msgspec
import orjson

from . import cli
from .audit.record import AuditRecord, IndexedFields, decode_fields
from .audit.rotation import rotated_name_pattern, rotated_siblings

PROG = "crabtrio logs"
ROUTE = "/v1/admin/logs"
PAGE = 1000  # the API's largest `limit`
DEFAULT_LIMIT = 100  # as the API's
FOLLOW_LIMIT = 10  # as tail's
POLL_S = 0.2  # as the gateway's own follower of the file (audit/reader.py)
API_POLL_S = 0.5
# With --url, each poll asks again for this much before the newest record seen: a record a
# worker indexes late (its follower polls every 0.2 s) is still found, and shown once.
LOOKBACK_MS = 5_000
# A segment rotated this long before --since holds nothing as recent (its records were all
# timestamped before it was renamed); the slack covers small clock steps.
ROTATION_SLACK_MS = 60_000
BLOCK = 1 << 20
MAX_CELL = 40  # table cells of key, model, provider and endpoint beyond this are clipped
_COLUMNS = "time key model provider status tokens cost_usd latency_ms endpoint stream error"
_RIGHT = frozenset({"status", "tokens", "cost_usd", "latency_ms"})
# Followed tables are laid out before most of their rows exist: at least these widths.
_FOLLOW_WIDTHS = {"key": 12, "model": 16, "provider": 10, "endpoint": 12}
_RAW_RECORDS = msgspec.json.Decoder(list[msgspec.Raw])
_NOT_RECORDS = f"unexpected answer from {ROUTE}: not a list of audit records"
Found = tuple[bytes, IndexedFields]  # a record's line and the fields the filters read


def _known_fields() -> tuple[str, ...]:
    """Every field of a record, in the order the writer puts them: a record with all its
    optional fields set (`to_dict` leaves out only those that are None)."""
    names = [field.name for field in dataclasses.fields(AuditRecord)]
    return tuple(AuditRecord(**cast(dict[str, Any], dict.fromkeys(names, 0))).to_dict())


CSV_FIELDS = _known_fields()


@dataclass(frozen=True, slots=True)
class Selection:
    """The filters of /v1/admin/logs, with its meaning: exact matches, both times inclusive."""

    key: str | None = None
    model: str | None = None
    provider: str | None = None
    status: int | None = None
    since: int | None = None
    until: int | None = None

    def admits(self, fields: IndexedFields) -> bool:
        return (
            (self.key is None or fields.key_name == self.key)
            and (self.model is None or fields.model == self.model)
            and (self.provider is None or fields.provider == self.provider)
            and (self.status is None or fields.status == self.status)
            and (self.since is None or fields.timestamp >= self.since)
            and (self.until is None or fields.timestamp <= self.until)
        )

    def matches(self, line: bytes) -> bool:
        fields = decode_fields(line)
        return fields is not None and self.admits(fields)

    def params(self) -> dict[str, str]:
        return {
            name: str(value)
            for name in ("key", "model", "provider", "status", "since", "until")
            if (value := getattr(self, name)) is not None
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    now = cli.now_ms()
    since = None if args.since is None else cli.time_arg(parser, "--since", args.since, now)
    until = None if args.until is None else cli.time_arg(parser, "--until", args.until, now)
    if args.path is not None and args.url is not None:
        parser.error("give the audit file's path or --url, not both")
    url = args.url
    if url is None and args.path is None:
        try:
            url = cli.base_url(os.environ.get(cli.URL_ENV, ""))
        except argparse.ArgumentTypeError:
            parser.error(f"give the audit file's path, or a gateway's --url (or ${cli.URL_ENV})")
    if args.follow and args.export:
        parser.error("--follow prints records as they come: use --json, not --export")
    if args.follow and until is not None:
        parser.error("--follow with --until: no new record would match")
    if args.scope is not None and url is None:
        parser.error("--scope asks a gateway: give --url")
    token = cli.admin_token(parser) if url is not None else None
    form = args.export or ("json" if args.json else "table")
    if not (args.json or args.table or args.export or sys.stdout.isatty()):
        form = "json"
    limit = args.limit
    if limit is None and not args.export:
        limit = FOLLOW_LIMIT if args.follow else DEFAULT_LIMIT
    selection = Selection(args.key, args.model, args.provider, args.status, since, until)
    out = sys.stdout.buffer
    try:
        if url is None:
            _from_files(args.path, selection, form, limit, args.follow, out)
        else:
            params = selection.params() | ({"scope": args.scope} if args.scope else {})
            with cli.AdminClient(url, token) as client:
                _from_api(client, params, selection.since, form, limit, args.follow, out)
        out.flush()
    except cli.CliError as exc:
        return cli.fail(PROG, str(exc), token)
    except KeyboardInterrupt:
        return 0 if args.follow else 130
    except BrokenPipeError:  # the reader went away (`| head`): stop, and say nothing at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The audit records that match, oldest first (like tail): from the audit "
        "file and its retained rotated segments (no gateway needed), or from a running "
        f"gateway's GET {ROUTE} (--url; the admin token is read from ${cli.TOKEN_ENV}).",
    )
    parser.add_argument(
        "path", nargs="?", help="the audit file ([audit] path), read with its rotated segments"
    )
    parser.add_argument(
        "--url",
        type=cli.base_url,
        help=f"a running gateway to ask instead (default ${cli.URL_ENV} when no path is given)",
    )
    parser.add_argument("--key", help="only this virtual key's records")
    parser.add_argument("--model", help="only this model's records")
    parser.add_argument("--provider", help="only this provider's records")
    parser.add_argument("--status", type=_status, help="only records with this status")
    parser.add_argument("--since", help=f"from this time on (inclusive): {cli.TIMES_HELP}")
    parser.add_argument("--until", help=f"up to this time (inclusive): {cli.TIMES_HELP}")
    parser.add_argument(
        "--limit",
        "-n",
        type=_count,
        metavar="N",
        help=f"the last N matches (default {DEFAULT_LIMIT}; {FOLLOW_LIMIT} with --follow; "
        "all with --export)",
    )
    parser.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="then print new matches as they are written, across rotations, until Ctrl-C",
    )
    parser.add_argument(
        "--scope", choices=("local", "fleet"), help="with --url: fleet: every replica's records"
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument(
        "--json", action="store_true", help="the lines as stored (default off a terminal)"
    )
    form.add_argument("--table", action="store_true", help="a table (default on a terminal)")
    form.add_argument(
        "--export",
        choices=("csv", "ndjson"),
        help="every match, streamed: CSV with a header (every known field, then any others "
        "sorted), or the lines as stored",
    )
    return parser


def _status(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 100 <= int(text) <= 599):
        raise argparse.ArgumentTypeError(f"{text!r} is not an HTTP status (100 to 599)")
    return int(text)


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return int(text)


# --- from the files ---------------------------------------------------------------------------


def _from_files(
    path: str, selection: Selection, form: str, limit: int | None, follow: bool, out: IO[bytes]
) -> None:
    with contextlib.ExitStack() as owned:
        files = _Files(path, selection.since)
        owned.callback(files.active.close)
        found: Iterable[bytes]
        if limit is not None:
            found = files.last(selection, limit)
        elif form == "ndjson":  # every match, straight from the files
            _write_lines(out, (line for line in files.oldest_first() if selection.matches(line)))
            return
        else:  # CSV: its header needs every match's fields first
            found = spool = _Spool(reverse=False)
            owned.callback(spool.close)
            spool.extend(line for line in files.oldest_first() if selection.matches(line))
        printer = _Printer(form, out, follow=follow)
        printer.write(found)
        if not follow:
            return
        while True:
            printer.write([line for line in files.active.read() if selection.matches(line)])
            time.sleep(POLL_S)


class _Files:
    """The audit file and its retained rotated segments, as they were when opened. The
    active file is opened first: if it is rotated meanwhile, the renamed file is known by its
    inode and read once, as the active file."""

    def __init__(self, path: str, since: int | None) -> None:
        self.active = _Tail(path)
        rotated = rotated_siblings(path)
        if self.active.fd is None and not rotated:
            raise cli.CliError(f"cannot read {path}: no such file")
        pattern = rotated_name_pattern(path)
        self.rotated = []  # oldest first
        for segment in rotated:
            match = pattern.match(os.path.basename(segment))
            if since is not None and match and _stamp_ms(match[1]) < since - ROTATION_SLACK_MS:
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted by retention meanwhile
                if _identity(os.stat(segment)) != self.active.identity:
                    self.rotated.append(segment)

    def oldest_first(self) -> Iterator[bytes]:
        """Every line, the oldest segment's first."""
        for segment in self.rotated:
            yield from _segment_lines(segment, backward=False)
        active = self.active
        if active.fd is not None:
            yield from _forward(active.fd, 0, active.offset, active.path)

    def newest_first(self) -> Iterator[bytes]:
        """Every line, the last one first."""
        active = self.active
        if active.fd is not None:
            yield from _backward(active.fd, active.offset, active.path)
        for segment in reversed(self.rotated):
            yield from _segment_lines(segment, backward=True)

    def last(self, selection: Selection, count: int) -> list[bytes]:
        """The last `count` matching lines, oldest first, read from the end (as tail does)."""
        found: list[bytes] = []
        if count:
            for line in self.newest_first():
                if selection.matches(line):
                    found.append(line)
                    if len(found) == count:
                        break
        return found[::-1]


class _Tail:
    """The active file, from its last complete line when opened, followed as the gateway's
    reader follows it: by inode, so a rotated file is read to its end before the new one is
    read from its start; never a line twice."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = _open(path)
        self.identity = None if self.fd is None else _identity(os.fstat(self.fd))
        with _reading(path):
            self.offset = (
                0 if self.fd is None else _complete_end(self.fd, _file_size(self.fd, path))
            )

    def read(self) -> list[bytes]:
        """The complete lines written since the last call."""
        lines = self._read()
        with _reading(self.path):
            try:
                info = os.stat(self.path)
            except FileNotFoundError:  # deleted, or between a rename and the new file
                return lines
        if self.fd is not None and _identity(info) == self.identity:
            return lines
        lines += self._read()  # the path names another file now: finish this one first
        finished = self.identity
        self.close()
        self.fd, self.offset = _open(self.path), 0  # None: rotated again already; next call
        self.identity = None if self.fd is None else _identity(os.fstat(self.fd))
        return lines + self._rotated_since(finished) + self._read()

    def _rotated_since(self, finished: tuple[int, int] | None) -> list[bytes]:
        """The lines of segments rotated after `finished` and before the file now open: the
        file was rotated more than once between two calls."""
        found = []
        for segment in rotated_siblings(self.path):  # oldest first
            with contextlib.suppress(FileNotFoundError):
                found.append((segment, _identity(os.stat(segment))))
        identities = [identity for _, identity in found]
        if finished is None or finished not in identities:
            return []  # deleted, or moved elsewhere: nothing tells which came after it
        return [
            line
            for segment, identity in found[identities.index(finished) + 1 :]
            if identity != self.identity
            for line in _segment_lines(segment, backward=False)
        ]

    def _read(self) -> list[bytes]:
        if self.fd is None:
            return []
        with _reading(self.path):
            size = os.fstat(self.fd).st_size
            if size < self.offset:  # truncated from outside: read it again, as the gateway does
                self.offset = 0
            end = _complete_end(self.fd, size, self.offset)
        lines = list(_forward(self.fd, self.offset, end, self.path))
        self.offset = end
        return lines

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """OSError as CliError: one line that names the file."""
    try:
        yield
    except OSError as exc:
        raise cli.CliError(f"cannot read {path}: {exc.strerror or exc}") from None


def _open(path: str) -> int | None:
    """A descriptor to read `path`; None if there is no such file."""
    with _reading(path):
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None


def _segment_lines(path: str, *, backward: bool) -> Iterator[bytes]:
    """A rotated segment's lines, first or last first; none if retention deleted it."""
    fd = _open(path)
    if fd is None:
        return
    try:
        with _reading(path):
            end = _complete_end(fd, _file_size(fd, path))
        yield from _backward(fd, end, path) if backward else _forward(fd, 0, end, path)
    finally:
        os.close(fd)


def _file_size(fd: int, path: str) -> int:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise cli.CliError(f"cannot read {path}: not a file")
    return info.st_size


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_ino, info.st_dev


def _stamp_ms(stamp: str) -> int:
    """ms since the epoch of a rotated segment's stamp, e.g. 20261127T051201.123Z."""
    moment = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _complete_end(fd: int, size: int, floor: int = 0) -> int:
    """Where the last complete line before `size` ends; `floor` if none ends after it. What
    follows is a line still being written (or a torn one): the gateway does not index it."""
    position = size
    while position > floor:
        start = max(floor, position - BLOCK)
        found = os.pread(fd, position - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        position = start
    return floor


def _forward(fd: int, start: int, end: int, path: str) -> Iterator[bytes]:
    """The lines between two line boundaries, first to last."""
    rest, position = b"", start
    while position < end:
        with _reading(path):
            data = os.pread(fd, min(BLOCK, end - position), position)
        if not data:  # shrunk from outside
            return
        position += len(data)
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        yield from lines


def _backward(fd: int, end: int, path: str) -> Iterator[bytes]:
    """The lines before the line boundary `end`, last to first."""
    rest, position = b"", end
    while position > 0:
        start = max(0, position - BLOCK)
        with _reading(path):
            data = os.pread(fd, position - start, start)
        lines = (data + rest).split(b"\n")
        rest = lines[0]  # continues in the block before, unless this one began the file
        position = start
        yield from reversed(lines[1:])
    if rest:
        yield rest


# --- from the admin API -----------------------------------------------------------------------


def _from_api(
    client: cli.AdminClient,
    params: dict[str, str],
    since: int | None,
    form: str,
    limit: int | None,
    follow: bool,
    out: IO[bytes],
) -> None:
    printer = _Printer(form, out, follow=follow)
    if follow:
        _follow_api(client, params, since, printer, limit or 0)
    elif limit is None:  # every match, newest first from the API: spooled, then oldest first
        spool = _Spool(reverse=True)
        try:
            for page in _pages(client, params, None):
                spool.extend(line for line, _ in page)
            printer.write(spool)
        finally:
            spool.close()
    else:
        found = [line for page in _pages(client, params, limit) for line, _ in page]
        printer.write(found[::-1])


def _follow_api(
    client: cli.AdminClient,
    params: dict[str, str],
    since: int | None,
    printer: _Printer,
    count: int,
) -> None:
    """Print the last `count` matches, then poll for new ones. Each poll asks for everything
    since LOOKBACK_MS before the newest record seen and shows the records not seen yet."""
    kept: list[Found] = []
    for page in _pages(client, params, None):
        kept += page
        if len(kept) >= count and page[-1][1].timestamp < kept[0][1].timestamp - LOOKBACK_MS:
            break
    printer.write([line for line, _ in kept[:count][::-1]])
    seen = {_identity_of(fields) for _, fields in kept}
    newest = kept[0][1].timestamp if kept else None
    while True:
        time.sleep(API_POLL_S)
        floor = since if newest is None else max(since or 0, newest - LOOKBACK_MS)
        asked = params if floor is None else params | {"since": str(floor)}
        fresh = [
            found
            for page in _pages(client, asked, None)
            for found in page
            if _identity_of(found[1]) not in seen
        ][::-1]
        printer.write([line for line, _ in fresh])
        for _, fields in fresh:
            seen.add(_identity_of(fields))
            newest = max(newest or 0, fields.timestamp)
        if newest is not None:
            seen = {found for found in seen if found[1] >= newest - LOOKBACK_MS}


def _identity_of(fields: IndexedFields) -> tuple[str, int]:
    return fields.request_id, fields.timestamp


def _pages(
    client: cli.AdminClient, params: dict[str, str], limit: int | None
) -> Iterator[list[Found]]:
    """Matching records from the API, page by page, newest first; at most `limit`."""
    left = limit
    asked = dict(params)
    while left is None or left > 0:
        asked["limit"] = str(PAGE if left is None else min(PAGE, left))
        response = client.get(ROUTE, asked)
        page = _records(response.content)
        if page:
            yield page
        if left is not None:
            left -= len(page)
        cursor = response.headers.get("x-next-cursor")
        if not cursor or not page:
            return
        asked["before"] = cursor


def _records(body: bytes) -> list[Found]:
    """The API's records, each as its bytes (the line as stored) and its decoded fields."""
    try:
        raws = _RAW_RECORDS.decode(body)
    except msgspec.DecodeError:
        raise cli.CliError(_NOT_RECORDS) from None
    found = []
    for raw in raws:
        line = bytes(raw)
        fields = decode_fields(line)
        if fields is None:
            raise cli.CliError(_NOT_RECORDS)
        if b"\n" in line or b"\r" in line:  # not the gateway's compact JSON: one line of it
            line = line.replace(b"\r", b" ").replace(b"\n", b" ")  # JSON strings hold none
        found.append((line, fields))
    return found


# --- output -----------------------------------------------------------------------------------


class _Spool:
    """Lines kept in a temporary file (every match may not fit in memory) and read back in
    pages: in order, or in reverse (the API's pages come newest first)."""

    def __init__(self, *, reverse: bool) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115  (closed by `close`)
        self._pages: list[tuple[int, int]] = []  # (offset, size)
        self._reverse = reverse

    def extend(self, lines: Iterable[bytes]) -> None:
        page: list[bytes] = []
        for line in lines:
            page.append(line)
            if len(page) == PAGE:
                self._add(page)
                page = []
        if page:
            self._add(page)

    def _add(self, page: list[bytes]) -> None:
        data = b"\n".join(page) + b"\n"
        self._file.seek(0, io.SEEK_END)
        self._pages.append((self._file.tell(), len(data)))
        self._file.write(data)

    def __iter__(self) -> Iterator[bytes]:
        for offset, size in reversed(self._pages) if self._reverse else self._pages:
            self._file.seek(offset)
            lines = self._file.read(size).split(b"\n")[:-1]
            yield from reversed(lines) if self._reverse else lines

    def close(self) -> None:
        self._file.close()


class _Printer:
    """Writes records as a table, their lines (json, ndjson) or CSV. The first batch lays the
    table out; a followed table keeps that layout (and its error column) for later rows."""

    def __init__(self, form: str, out: IO[bytes], *, follow: bool) -> None:
        self.form = form
        self.out = out
        self.follow = follow
        self.widths: dict[str, int] | None = None

    def write(self, lines: Iterable[bytes]) -> None:
        """`lines` are iterated twice for CSV (its columns depend on every record)."""
        if self.form == "csv":
            _write_csv(self.out, lines)
        elif self.form == "table":
            self._table([_cells(line) for line in lines])
        else:
            _write_lines(self.out, lines)
        self.out.flush()

    def _table(self, rows: list[dict[str, str]]) -> None:
        if self.widths is None:
            if not rows and not self.follow:
                self.out.write(b"no matching records\n")
                return
            shown = [
                c
                for c in _COLUMNS.split()
                if c != "error" or self.follow or any(r[c] for r in rows)
            ]
            least = _FOLLOW_WIDTHS if self.follow else {}
            self.widths = {
                c: max(len(c), least.get(c, 0), *(len(row[c]) for row in rows)) for c in shown
            }
            rows = [dict(zip(shown, shown, strict=True)), *rows]
        widths = self.widths
        text = "".join(
            "  ".join(
                row[c].rjust(width) if c in _RIGHT else row[c].ljust(width)
                for c, width in widths.items()
            ).rstrip()
            + "\n"
            for row in rows
        )
        self.out.write(text.encode("utf-8", "replace"))


def _fields(line: bytes) -> dict[str, Any]:
    """A record's fields. Its line passed `decode_fields`, so the filter fields are there and
    typed; a line that only those decode (a number beyond a float in an added field) has only
    those."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        record = None
    if isinstance(record, dict):
        return record
    fields = decode_fields(line)
    return {} if fields is None else msgspec.structs.asdict(fields)


def _cells(line: bytes) -> dict[str, str]:
    """A record's table row."""
    record = _fields(line)
    prompt, completion = record.get("prompt_tokens"), record.get("completion_tokens")
    tokens = "-"
    if prompt is not None or completion is not None:
        tokens = f"{_count_cell(prompt)}/{_count_cell(completion)}"
    stream = record.get("stream")
    return {
        "time": _shown_time(record["timestamp"]),
        "key": _shown(record["key_name"]),
        "model": _shown(record["model"]),
        "provider": _shown(record["provider"]),
        "status": str(record["status"]),
        "tokens": tokens,
        "cost_usd": cli.usd(record["cost_micros"]),
        "latency_ms": str(record["latency_ms"]),
        "endpoint": _shown(record.get("endpoint")),
        "stream": "yes" if stream is True else "no" if stream is False else "-",
        "error": _shown(record.get("error"), None) if record.get("error") else "",
    }


def _count_cell(value: Any) -> str:
    return str(value) if type(value) is int else "-"


def _shown_time(ms: int) -> str:
    """UTC, ISO 8601 to the ms: 2026-03-10T13:40:00.123Z."""
    try:
        moment = datetime.fromtimestamp(ms // 1000, UTC)
    except (OverflowError, ValueError, OSError):  # beyond year 9999
        return str(ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def _shown(value: Any, most: int | None = MAX_CELL) -> str:
    """Text from a record, safe for a terminal: control and bidi characters as '?'."""
    if not isinstance(value, str) or not value:
        return "-"
    text = "".join(c if c.isprintable() else "?" for c in value)
    return text if most is None or len(text) <= most else text[: most - 1] + "…"


def _write_lines(out: IO[bytes], lines: Iterable[bytes]) -> None:
    chunk: list[bytes] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == PAGE:
            out.write(b"\n".join(chunk) + b"\n")
            chunk = []
    if chunk:
        out.write(b"\n".join(chunk) + b"\n")


def _write_csv(out: IO[bytes], lines: Iterable[bytes]) -> None:
    """A header row (every known field in the writer's order, then any other field found,
    sorted), then a row per record: integers as digits, booleans as true/false, a missing
    field empty, anything else as JSON."""
    found = {name for line in lines for name in _fields(line)}
    columns = [*CSV_FIELDS, *sorted(found.difference(CSV_FIELDS))]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(columns)
    for i, line in enumerate(lines):
        record = _fields(line)
        writer.writerow([_csv_value(record.get(name)) for name in columns])
        if i % PAGE == PAGE - 1:
            out.write(text.getvalue().encode())
            text.seek(0)
            text.truncate()
    out.write(text.getvalue().encode())


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    return msgspec.json.encode(value).decode()  # orjson refuses integers beyond 64 bits
