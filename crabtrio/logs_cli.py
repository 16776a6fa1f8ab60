"""`python -m crabtrio logs`: the audit records that match, oldest first, from the audit file
and its retained rotated segments or from a running gateway's admin API; as a table, the lines
as stored, CSV or NDJSON; and followed as they are written, through rotations.

Files are read as the gateway reads them (see audit/segments), with its own parsing
(`decode_fields`: a line that is not a record is skipped, as the index skips it); printed as
logs_output prints. Failures are one line on stderr: exit 2 for bad arguments, 1 for an
unreadable file, an unreachable gateway or an API error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import msgspec

from . import cli
from .audit.record import IndexedFields, decode_fields
from .audit.segments import Retained, SegmentError
from .logs_output import Printer, Spool, write_lines

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
_RAW_RECORDS = msgspec.json.Decoder(list[msgspec.Raw])
_NOT_RECORDS = f"unexpected answer from {ROUTE}: not a list of audit records"
Found = tuple[bytes, IndexedFields]  # a record's line and the fields the filters read


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
    except (cli.CliError, SegmentError) as exc:
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
        files = Retained(path, selection.since)
        owned.callback(files.close)
        found: Iterable[bytes]
        if limit is not None:
            found = files.last(selection.matches, limit)
        elif form == "ndjson":  # every match, straight from the files
            write_lines(out, (line for line in files.oldest_first() if selection.matches(line)))
            return
        else:  # CSV: its header needs every match's fields first
            found = spool = Spool(reverse=False)
            owned.callback(spool.close)
            spool.extend(line for line in files.oldest_first() if selection.matches(line))
        printer = Printer(form, out, follow=follow)
        printer.write(found)
        if not follow:
            return
        while True:
            printer.write([line for line in files.active.read() if selection.matches(line)])
            time.sleep(POLL_S)


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
    printer = Printer(form, out, follow=follow)
    if follow:
        _follow_api(client, params, since, printer, limit or 0)
    elif limit is None:  # every match, newest first from the API: spooled, then oldest first
        spool = Spool(reverse=True)
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
    printer: Printer,
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
