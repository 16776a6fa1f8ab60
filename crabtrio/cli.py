"""What the command-line clients (`usage`, `logs`; `verify` its failures) share: times given as
ISO 8601 or a time ago, the admin API over HTTP with its token, and failures as one line on
stderr."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from types import TracebackType
from urllib.parse import urlsplit

import httpx

URL_ENV, TOKEN_ENV = "CRABTRIO_URL", "CRABTRIO_ADMIN_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
TIMES_HELP = "ISO 8601 (UTC unless it has an offset) or a time ago: 90m, 24h, 7d, 2w"
TIMEOUT_S = 60.0  # a month of fleet-wide rollups is one PostgreSQL query of a few seconds
MAX_MESSAGE_CHARS = 300
_AGO = re.compile(r"(\d{1,9})([mhdw])")
_UNITS = {"m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS, "w": 7 * DAY_MS}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class CliError(Exception):
    """A failure worth one line and exit 1: the gateway unreachable, an API error, a bad
    answer, a file that cannot be read or written."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def epoch_ms(text: str, now: int) -> int:
    """ms since the epoch of `text`: ISO 8601 (UTC unless it has an offset), or `90m`, `24h`,
    `7d`, `2w`: that long before `now`. Raises ValueError with a message for the user."""
    ago = _AGO.fullmatch(text.strip())
    try:
        if ago:
            value = now - int(ago[1]) * _UNITS[ago[2]]
        else:
            moment = datetime.fromisoformat(text.strip())
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            # Exact: int(timestamp() * 1000) is 1 ms short for about 1 in 160 times in ms.
            value = (moment - _EPOCH) // _MS
    except (ValueError, OverflowError):
        raise ValueError(
            f"{text!r} is neither ISO 8601 (2026-03-10T14:00Z) nor a time ago (90m, 24h, 7d, 2w)"
        ) from None
    if value < 0:
        raise ValueError(f"{text!r} is before 1970")
    return value


def time_arg(parser: argparse.ArgumentParser, option: str, text: str, now: int) -> int:
    """`epoch_ms(text)`, or the parser's error (exit 2) naming the option."""
    try:
        return epoch_ms(text, now)
    except ValueError as exc:
        parser.error(f"{option}: {exc}")


def base_url(text: str) -> str:
    """An argparse type: an http(s) URL with a host, without its trailing slash."""
    parts = urlsplit(text)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port out of range
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text.rstrip("/")


def admin_token(parser: argparse.ArgumentParser) -> str | None:
    """The admin token from the environment only (a flag would show in `ps`)."""
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    if token is not None and not (token.isascii() and token.isprintable()):
        parser.error(f"${TOKEN_ENV} must be printable ASCII")
    return token


class AdminClient:
    """One gateway's admin API: GETs that return a 200 response, or raise CliError saying why
    not in one line. Closed by `with`."""

    def __init__(self, base: str, token: str | None, timeout: float = TIMEOUT_S) -> None:
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        self.base = base
        self.timeout = timeout
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._client.close()

    def get(self, route: str, params: dict[str, str]) -> httpx.Response:
        shown = shown_url(self.base)
        try:
            response = self._client.get(self.base + route, params=params)
        except httpx.ConnectError as exc:
            raise CliError(
                f"cannot connect to {shown} ({exc}): is the gateway running? (--url or ${URL_ENV})"
            ) from None
        except httpx.TimeoutException:
            raise CliError(f"no answer from {shown} within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise CliError(f"request to {shown} failed: {exc}") from None
        if response.status_code != 200:
            raise CliError(f"{response.status_code} {api_message(response)}")
        return response


def api_message(response: httpx.Response) -> str:
    """The API's error message, or the reason phrase when the body is not the API's error
    (a proxy's page, say)."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    return message if isinstance(message, str) and message else response.reason_phrase


def shown_url(url: str) -> str:
    """scheme://host:port only: credentials in a URL are not echoed."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def fail(prog: str, message: str, token: str | None = None) -> int:
    """Print `message` as one line of at most MAX_MESSAGE_CHARS, the admin token never among
    them, and return exit code 1."""
    if token:
        message = message.replace(token, "***")
    line = "".join(c if c.isprintable() else " " for c in message)
    if len(line) > MAX_MESSAGE_CHARS:
        line = line[: MAX_MESSAGE_CHARS - 3] + "..."
    print(f"{prog}: {line}", file=sys.stderr)
    return 1


def usd(micros: int) -> str:
    """micro-USD as exact dollars: 19000 -> '0.019000'."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"
