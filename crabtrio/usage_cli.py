"""`python -m crabtrio usage`: the admin usage report (GET /v1/admin/usage) as a table, its
CSV, or a PNG chart of spend per group over time.

A client of the HTTP API only: it runs against any gateway it can reach, so it shares no code
with the serving side (what it shares with `logs` is in crabtrio/cli.py). Failures are one line
on stderr: exit 2 for bad arguments, 1 for an unreachable gateway, an API error or an
unwritable chart.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

from .cli import (
    DAY_MS,
    DEFAULT_URL,
    HOUR_MS,
    TIMES_HELP,
    TOKEN_ENV,
    URL_ENV,
    AdminClient,
    CliError,
    admin_token,
    base_url,
    fail,
    now_ms,
    time_arg,
    usd,
)

PROG = "crabtrio usage"
ROUTE = "/v1/admin/usage"
# The API's names: its group_by dimensions and its figures per row (see crabtrio/usage.py).
DIMENSIONS = ("key", "model", "provider", "status")
_COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_micros")
_LATENCIES = ("latency_ms_p50", "latency_ms_p95")
HOURLY_UP_TO_MS = 2 * DAY_MS  # the default interval: hours up to 48 bars, then days
MAX_SERIES = 10  # the chart draws the groups that spent most; the rest as one "other" series
_ADVERBS = {"hour": "hourly", "day": "daily"}
_SIZES = {"hour": HOUR_MS, "day": DAY_MS}
NONE_SHOWN = "(none)"  # a group value that is empty: e.g. a request refused before its key


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    now = now_ms()
    since = time_arg(parser, "--since", args.since, now)
    until = now if args.until is None else time_arg(parser, "--until", args.until, now)
    interval = args.interval or ("hour" if until - since <= HOURLY_UP_TO_MS else "day")
    if args.png is not None and interval == "none":
        parser.error("--png draws a time series: give --interval hour or day")
    token = admin_token(parser)
    if args.png is not None:
        try:
            import matplotlib  # noqa: F401  (`draw` imports its parts: fail before the request)
        except ImportError:
            return fail(PROG, "--png needs matplotlib: pip install matplotlib")
    params: dict[str, str] = {"since": str(since), "until": str(until)}
    if args.group_by:
        params["group_by"] = ",".join(args.group_by)
    if interval != "none":
        params["interval"] = interval
    for name in ("key", "model", "provider", "status", "scope"):
        if getattr(args, name) is not None:
            params[name] = str(getattr(args, name))
    if args.csv:
        params["format"] = "csv"
    try:
        with AdminClient(args.url, token) as client:
            answer = client.get(ROUTE, params)
        if args.csv:
            sys.stdout.write(answer.text)
            return 0
        found = rows(answer, interval != "none")
        if args.png is not None:
            draw(args.png, found, args.group_by, interval, since, until)
            print(f"wrote {args.png}")
        elif found:
            print(table(found, args.group_by, interval != "none"))
        else:
            print(f"no requests from {_shown_time(since)} to {_shown_time(until)} UTC")
    except CliError as exc:
        return fail(PROG, str(exc), token)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Usage of the gateway per group (default: per key) over time, from "
        f"GET {ROUTE}. The admin token is read from ${TOKEN_ENV}.",
    )
    parser.add_argument(
        "--url",
        type=base_url,
        default=os.environ.get(URL_ENV) or DEFAULT_URL,
        help=f"the gateway (default ${URL_ENV} or {DEFAULT_URL})",
    )
    parser.add_argument("--since", default="24h", help=f"{TIMES_HELP} (default 24h)")
    parser.add_argument("--until", help=f"{TIMES_HELP} (default now)")
    parser.add_argument(
        "--group-by",
        type=_group_by,
        default=("key",),
        help="comma-separated among key, model, provider, status; '' for totals (default key)",
    )
    parser.add_argument(
        "--interval",
        choices=("hour", "day", "none"),
        help="buckets (default: hour for ranges up to 2 days, else day); none: one row per group",
    )
    parser.add_argument("--key", help="only this virtual key's requests")
    parser.add_argument("--model", help="only this model's requests")
    parser.add_argument("--provider", help="only this provider's requests")
    parser.add_argument("--status", type=int, help="only requests that ended with this status")
    parser.add_argument("--scope", choices=("local", "fleet"), help="fleet: every replica")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--png", metavar="FILE", help="draw spend per group over time to FILE")
    output.add_argument("--csv", action="store_true", help="print the API's CSV")
    return parser


def _group_by(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",")) if text.strip() else ()
    if any(name not in DIMENSIONS for name in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: distinct names among {', '.join(DIMENSIONS)}, separated by commas"
        )
    return names


def rows(response: httpx.Response, bucketed: bool) -> list[dict[str, Any]]:
    """The report's rows, checked to have the figures (and bucket) this module reads."""
    try:
        data = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        data = None
    if not isinstance(data, list) or not all(_well_formed(row, bucketed) for row in data):
        raise CliError(f"unexpected answer from {ROUTE}: not a usage report")
    return data


def _well_formed(row: Any, bucketed: bool) -> bool:
    return (
        isinstance(row, dict)
        and all(type(row.get(name)) is int for name in _COUNTS)
        and all(row.get(name) is None or type(row[name]) in (int, float) for name in _LATENCIES)
        and (not bucketed or _is_time(row.get("bucket")))
    )


def _is_time(text: Any) -> bool:
    try:
        return isinstance(text, str) and datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


def group_label(row: dict[str, Any], group_by: Sequence[str]) -> str:
    if not group_by:
        return "all"
    return " / ".join(_shown_value(row.get(name)) for name in group_by)


def _shown_value(value: Any) -> str:
    return NONE_SHOWN if value is None or value == "" else str(value)


def table(found: list[dict[str, Any]], group_by: Sequence[str], bucketed: bool) -> str:
    """An aligned table: one row per group (and bucket), the groups' rows together in time
    order; text columns aligned left, figures right."""
    columns = [*group_by, *(["bucket"] if bucketed else [])]
    header = [*columns, "requests", "errors", "prompt_tokens", "completion_tokens"]
    header += ["cost_usd", "p50_ms", "p95_ms"]
    ordered = sorted(found, key=lambda row: [_order(row.get(name)) for name in group_by])
    lines = [header]
    for row in ordered:
        line = [_shown_value(row.get(name)) for name in columns]
        line += [str(row[name]) for name in _COUNTS[:-1]]
        line += [usd(row["cost_micros"])]
        line += ["-" if row[name] is None else f"{row[name]:.0f}" for name in _LATENCIES]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i < len(columns) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _order(value: Any) -> tuple[bool, str, int]:
    """Group values in order: text, then numbers (status), then missing values."""
    if isinstance(value, int):
        return False, "", value
    return value is None or value == "", "" if value is None else str(value), 0


def series(
    found: list[dict[str, Any]], group_by: Sequence[str]
) -> tuple[list[str], dict[str, list[float]]]:
    """The buckets in time order, and per group (those that spent most first, at most
    MAX_SERIES, the rest summed as "other") its spend in USD in each bucket."""
    buckets = sorted({row["bucket"] for row in found})
    position = {bucket: i for i, bucket in enumerate(buckets)}
    micros: dict[str, list[int]] = {}
    for row in found:
        spent = micros.setdefault(group_label(row, group_by), [0] * len(buckets))
        spent[position[row["bucket"]]] += row["cost_micros"]
    ranked = sorted(micros, key=lambda label: (-sum(micros[label]), label))
    if len(ranked) > MAX_SERIES:
        rest = ranked[MAX_SERIES - 1 :]
        ranked = [*ranked[: MAX_SERIES - 1], "other"]
        micros["other"] = [sum(column) for column in zip(*(micros[r] for r in rest), strict=True)]
    return buckets, {label: [value / 1e6 for value in micros[label]] for label in ranked}


def draw(
    path: str,
    found: list[dict[str, Any]],
    group_by: Sequence[str],
    interval: str,
    since: int,
    until: int,
) -> None:
    """Spend per group over time as stacked bars, to a PNG file (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    buckets, spend = series(found, group_by)
    # datetime64: matplotlib draws it as dates, and its annotations accept arrays.
    starts = np.array([_bucket_ms(bucket) for bucket in buckets], dtype="datetime64[ms]")
    figure = Figure(figsize=(10, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width_days = _SIZES[interval] / DAY_MS * 0.85
    bottom = [0.0] * len(starts)
    for label, values in spend.items():
        axes.bar(starts, values, width=width_days, bottom=bottom, align="edge", label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    size = _SIZES[interval]
    first, last = since - since % size, until - until % size + size  # whole buckets
    # matplotlib converts datetimes itself (its units registry), but types only floats, and
    # matplotlib.dates has no annotations.
    axes.set_xlim(np.datetime64(first, "ms"), np.datetime64(last, "ms"))  # type: ignore[arg-type]
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_locator(locator)
    formatter = ConciseDateFormatter(locator, tz=UTC)  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_formatter(formatter)
    axes.set_xlabel("time (UTC)")
    axes.set_ylabel("spend (USD)")
    total = sum(row["cost_micros"] for row in found)
    what = " / ".join(group_by) or "all requests"
    axes.set_title(
        f"Spend per {what}, {_ADVERBS[interval]}: {_shown_time(since)} to {_shown_time(until)} UTC "
        f"(total ${usd(total)})"
    )
    if spend:
        axes.legend(title=what, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        axes.text(0.5, 0.5, "no requests", ha="center", va="center", transform=axes.transAxes)
    try:
        figure.savefig(path, format="png")
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def _bucket_ms(bucket: str) -> int:
    return int(datetime.fromisoformat(bucket).timestamp() * 1000)


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _shown_time(ms: int) -> str:
    return _utc(ms).strftime("%Y-%m-%d %H:%M")
