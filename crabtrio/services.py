"""Services: the one owner of the gateway's long-lived resources, opened for serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
from quart import current_app

from .audit import AuditLog
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
    audit: AuditLog
    upstream: Upstreams


@asynccontextmanager
async def open_services(
    config: Config, *, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[Services]:
    """Open the audit log (writer, then reader) and the upstream client; close in reverse.

    Raises OSError when the audit file cannot be opened for appending.
    """
    async with AsyncExitStack() as stack:
        audit = await stack.enter_async_context(AuditLog.open(config.audit))
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
            upstream=upstream,
        )


def current_services() -> Services:
    """The Services of the app serving the current request."""
    return current_app.extensions["crabtrio"]  # type: ignore[no-any-return]
