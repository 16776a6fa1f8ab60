"""How `python -m crabtrio logs` prints audit records: a table, the lines as stored (json,
ndjson) or CSV; and the spool that holds every match when they must all be seen first."""

from __future__ import annotations

import csv
import dataclasses
import io
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import IO, Any, cast

import msgspec
import orjson

from . import cli
from .audit.record import AuditRecord, decode_fields

CHUNK = 1000  # lines written (and spooled) at a time
MAX_CELL = 40  # table cells of key, model, provider and endpoint beyond this are clipped
_COLUMNS = "time key model provider status tokens cost_usd latency_ms endpoint stream error"
_RIGHT = frozenset({"status", "tokens", "cost_usd", "latency_ms"})
# Followed tables are laid out before most of their rows exist: at least these widths.
_FOLLOW_WIDTHS = {"key": 12, "model": 16, "provider": 10, "endpoint": 12}


def _known_fields() -> tuple[str, ...]:
    """Every field of a record, in the order the writer puts them: a record with all its
    optional fields set (`to_dict` leaves out only those that are None)."""
    names = [field.name for field in dataclasses.fields(AuditRecord)]
    return tuple(AuditRecord(**cast(dict[str, Any], dict.fromkeys(names, 0))).to_dict())


CSV_FIELDS = _known_fields()


class Spool:
    """Lines kept in a temporary file (every match may not fit in memory) and read back in
    pages: in order, or in reverse (the API's pages come newest first). Closed by `close`."""

    def __init__(self, *, reverse: bool) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115  (closed by `close`)
        self._pages: list[tuple[int, int]] = []  # (offset, size)
        self._reverse = reverse

    def extend(self, lines: Iterable[bytes]) -> None:
        page: list[bytes] = []
        for line in lines:
            page.append(line)
            if len(page) == CHUNK:
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


class Printer:
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
            write_lines(self.out, lines)
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


def write_lines(out: IO[bytes], lines: Iterable[bytes]) -> None:
    """Each line, as it is, and a newline."""
    chunk: list[bytes] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == CHUNK:
            out.write(b"\n".join(chunk) + b"\n")
            chunk = []
    if chunk:
        out.write(b"\n".join(chunk) + b"\n")


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
        if i % CHUNK == CHUNK - 1:
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
