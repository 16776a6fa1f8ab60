"""Usage reports from the audit trail's per-hour rollups: GET /v1/admin/usage (admin token)
and GET /v1/usage (a virtual key: its own usage only), as JSON or CSV."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson

from .audit import AuditLog
from .audit.rollups import (
    BUCKETS,
    COMPLETION,
    COST,
    DAY_MS,
    DIMENSIONS,
    ERRORS,
    HISTOGRAM,
    HOUR_MS,
    LATENCY_BOUNDS_MS,
    PROMPT,
    REQUESTS,
    utc_text,
)
from .audit.sums import Sums
from .auth import check_admin
from .dispatch import Answer, Receive, Scope, Send, header, serve_get
from .errors import InvalidRequest, Unauthorized
from .params import SELECTION_PARAMS, filter_params, query_args, scope_params, time_params
from .services import Services

ADMIN_USAGE = "/v1/admin/usage"
KEY_USAGE = "/v1/usage"
DEFAULT_RANGE_MS = 24 * HOUR_MS
INTERVALS = {"hour": HOUR_MS, "day": DAY_MS}
FORMATS = ("json", "csv")
_KNOWN = {*SELECTION_PARAMS, "group_by", "interval", "format"}
FIGURES = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "latency_ms_p50",
    "latency_ms_p95",
)
# Each histogram bucket's lower and upper bound (ms); the last one is open: its lower bound.
_LOWER = np.concatenate(([0], LATENCY_BOUNDS_MS))
_UPPER = np.concatenate((LATENCY_BOUNDS_MS, LATENCY_BOUNDS_MS[-1:]))


@dataclass(frozen=True, slots=True)
class UsageQuery:
    since: int
    until: int
    filters: dict[str, Any]
    group_by: tuple[str, ...]
    interval: int | None
    format: str
    fleet: bool = False  # scope=fleet: every instance's records, from PostgreSQL
    instance: str | None = None


def parse_usage_query(
    pairs: Iterable[tuple[str, str]], *, now_ms: int, own_key: str | None = None
) -> UsageQuery:
    """Validate the parameters (a 400 naming the bad one). With `own_key` (GET /v1/usage)
    the report is that key's only, and `key` cannot be given."""
    pairs = list(pairs)
    if own_key is not None and any(name == "key" for name, _ in pairs):
        raise InvalidRequest(
            "'key' is not accepted here: /v1/usage reports the calling key's own usage",
            param="key",
        )
    args = query_args(pairs, _KNOWN)
    filters = filter_params(args)
    if own_key is not None:
        filters["key"] = own_key
    times = time_params(args)
    until = times.get("until", now_ms)
    since = times.get("since", until - DEFAULT_RANGE_MS)
    if since > until:
        raise InvalidRequest("'since' must not be after 'until'", param="since")
    group_by: tuple[str, ...] = ()
    if "group_by" in args:  # an empty value is an error, as for every parameter
        group_by = tuple(args["group_by"].split(","))
        unknown = [name for name in group_by if name not in DIMENSIONS]
        if unknown or len(set(group_by)) != len(group_by):
            raise InvalidRequest(
                "'group_by' takes distinct names among key, model, provider, status, "
                "separated by commas",
                param="group_by",
            )
    interval_name = args.get("interval")
    if interval_name is not None and interval_name not in INTERVALS:
        raise InvalidRequest("'interval' must be 'hour' or 'day' (or absent)", param="interval")
    fleet, instance = scope_params(args)
    fmt = args.get("format", "json")
    if fmt not in FORMATS:
        raise InvalidRequest("'format' must be 'json' or 'csv'", param="format")
    return UsageQuery(
        since=since,
        until=until,
        filters=filters,
        group_by=group_by,
        interval=INTERVALS[interval_name] if interval_name else None,
        format=fmt,
        fleet=fleet,
        instance=instance,
    )


def rows(sums: Sums) -> list[dict[str, Any]]:
    """Report rows from rollup sums grouped by (bucket, *group_by), in order. Columns until
    the rows themselves: a month per key per day is 1,550 rows."""
    if not len(sums):
        return []
    order = _order(sums)
    values = sums.values.take(order, axis=1)
    histograms = values[HISTOGRAM : HISTOGRAM + BUCKETS].T.astype(np.float64)
    listed: dict[str, list[Any]] = {}
    if sums.starts is not None:
        starts = sums.starts[order].tolist()
        texts = {start: utc_text(start) for start in set(starts)}  # a month is 31 of them
        listed["bucket"] = [texts[start] for start in starts]
    for name, column in zip(sums.group_by, sums.groups, strict=True):
        codes = column[order].tolist()
        listed[name] = codes if name == "status" else [sums.names[code] for code in codes]
    for name, row in _FIGURES:
        listed[name] = values[row].tolist()
    listed["latency_ms_p50"] = percentiles(histograms, 0.50)
    listed["latency_ms_p95"] = percentiles(histograms, 0.95)
    header = list(listed)
    return [dict(zip(header, row, strict=True)) for row in zip(*listed.values(), strict=True)]


_FIGURES = (
    ("requests", REQUESTS),
    ("errors", ERRORS),
    ("prompt_tokens", PROMPT),
    ("completion_tokens", COMPLETION),
    ("cost_micros", COST),
)


def _order(sums: Sums) -> np.ndarray:
    """The rows' order: by bucket, then by the group values in the order `group_by` names
    them (strings, which the columns hold as indices into `names`, as strings)."""
    rank = np.empty(len(sums.names), np.int64)
    rank[sorted(range(len(sums.names)), key=sums.names.__getitem__)] = np.arange(len(sums.names))
    keys = [] if sums.starts is None else [sums.starts]
    for name, column in zip(sums.group_by, sums.groups, strict=True):
        keys.append(column if name == "status" else rank[column])
    return np.lexsort(keys[::-1]) if keys else np.arange(len(sums))


def percentile(histogram: np.ndarray, q: float) -> int | None:
    """The q-quantile of the latencies a histogram counts (see `percentiles`)."""
    return percentiles(np.asarray(histogram, dtype=np.float64)[None, :], q)[0]


def percentiles(histograms: np.ndarray, q: float) -> list[int | None]:
    """Per histogram (a row), the q-quantile of the latencies it counts, interpolated
    linearly within its bucket: an estimate, within one bucket of the exact value. None
    for a histogram without requests."""
    totals = histograms.sum(axis=1)
    targets = q * totals
    cumulative = np.cumsum(histograms, axis=1)
    buckets = np.minimum((cumulative < targets[:, None]).sum(axis=1), histograms.shape[1] - 1)
    rows = np.arange(len(histograms))
    before = np.where(buckets > 0, cumulative[rows, np.maximum(buckets - 1, 0)], 0.0)
    inside = histograms[rows, buckets]
    low, high = _LOWER[buckets], _UPPER[buckets]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(inside > 0, (targets - before) / inside, 1.0)
    estimates = np.rint(low + (high - low) * share).astype(np.int64).tolist()
    return [None if total <= 0 else value for total, value in zip(totals, estimates, strict=True)]


def to_csv(report: list[dict[str, Any]], query: UsageQuery) -> bytes:
    columns = (["bucket"] if query.interval is not None else []) + [*query.group_by, *FIGURES]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in report:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return out.getvalue().encode()


async def report(audit: AuditLog, query: UsageQuery) -> list[dict[str, Any]]:
    """The report's rows: from this host's rollups, or with `scope=fleet` from PostgreSQL."""
    selection: dict[str, Any] = {
        "since": query.since,
        "until": query.until,
        "filters": query.filters,
    }
    if query.fleet:
        return await audit.fleet_usage(
            **selection, instance=query.instance, group_by=query.group_by, interval=query.interval
        )
    found = await audit.summed(**selection, group_by=query.group_by, interval=query.interval)
    return rows(found)


async def serve_usage(
    svc: Services, scope: Scope, receive: Receive, send: Send, *, admin: bool
) -> None:
    """GET /v1/admin/usage (admin) or /v1/usage (the calling key's own usage)."""

    async def answer() -> Answer:
        authorization = header(scope, b"authorization")
        own_key = None
        if admin:
            check_admin(svc.config.admin_token, authorization, scope.get("client"))
        else:
            key = svc.keys.authenticate(authorization)
            if key is None:
                raise Unauthorized(
                    "usage is reported per virtual key, and none are configured "
                    "(the admin report is /v1/admin/usage)",
                    code="no_virtual_keys",
                )
            own_key = key.name
        text = scope["query_string"].decode("latin-1")
        pairs = parse_qsl(text, keep_blank_values=True, errors="replace")
        query = parse_usage_query(pairs, now_ms=time.time_ns() // 1_000_000, own_key=own_key)
        found = await report(svc.audit, query)
        if query.format == "csv":
            disposition = b'attachment; filename="usage.csv"'
            return to_csv(found, query), [
                (b"content-type", b"text/csv; charset=utf-8"),
                (b"content-disposition", disposition),
            ]
        return orjson.dumps({"data": found}), []

    await serve_get(scope, send, ADMIN_USAGE if admin else KEY_USAGE, answer)
