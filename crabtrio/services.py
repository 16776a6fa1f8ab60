"""Services: the one owner of the gateway's long-lived resources, opened for serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
from quart import current_app

from .audit import AuditLogger, AuditReader, AuditStatistics
from .auth import KeyRing
from .config import Config
from .providers import Upstreams
from .routing import Router
from .upstream import Scrubber, UpstreamClient


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    router: Router
    keys: KeyRing
    audit: AuditLogger
    reader: AuditReader | None
    upstream: Upstreams

    def audit_statistics(self) -> AuditStatistics:
        stats = self.audit.statistics()
        if self.reader is not None:
            stats.corrupt_lines_skipped = self.reader.corrupt_lines
            stats.indexed_records = len(self.reader.index)
            stats.sidecars_loaded = self.reader.sidecars["loaded"]
            stats.sidecars_rebuilt = self.reader.sidecars["rebuilt"]
            if self.reader.failure is not None:
                stats.index_state, stats.index_reason = "degraded", self.reader.failure
        return stats


@asynccontextmanager
async def open_services(
    config: Config, *, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[Services]:
    """Open the audit log (writer, then reader) and the upstream client; close in reverse.

    Raises OSError when the audit file cannot be opened for appending.
    """
    async with AsyncExitStack() as stack:
        audit = await stack.enter_async_context(AuditLogger.open(config.audit))
        reader = None
        if audit.enabled:
            reader = await stack.enter_async_context(AuditReader.open(config.audit.path))
            audit.on_written = reader.nudge
        client = await stack.enter_async_context(
            UpstreamClient.open(config.providers.values(), transport=transport)
        )
        # Kept out of every upstream text that is relayed or recorded.
        secrets = [p.api_key for p in config.providers.values()]
        secrets += [k.key for k in config.keys] + [config.admin_token]
        upstream = Upstreams(client, Scrubber(secrets))
        yield Services(
            config=config,
            router=Router(config),
            keys=KeyRing(config.keys),
            audit=audit,
            reader=reader,
            upstream=upstream,
        )


def current_services() -> Services:
    """The Services of the app serving the current request."""
    return current_app.extensions["crabtrio"]  # type: ignore[no-any-return]
