"""Services: the one owner of the gateway's long-lived resources, opened for serving."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
import trio
from quart import current_app

from .admission import Admission
from .affinity import ResponseAffinity
from .audit import AuditLog
from .auth import KeyRing
from .config import Config
from .providers import Upstreams
from .routing import Router
from .upstream import Scrubber, UpstreamClient


@dataclass(frozen=True, slots=True)
class Services:
    config: Config  # as loaded at startup: a reload replaces only the keys (see `reload`)
    router: Router
    keys: KeyRing
    audit: AuditLog
    upstream: Upstreams
    admission: Admission
    affinity: ResponseAffinity  # which provider served a Responses API response


@asynccontextmanager
async def open_services(
    config: Config,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
    reload_on_sighup: bool = False,
) -> AsyncIterator[Services]:
    """Open the audit log (writer, then reader), the admission checks and the upstream
    client; close in reverse. With `reload_on_sighup`, SIGHUP re-reads the keys.

    Raises OSError when the audit file (or the rate limits' file) cannot be opened.
    """
    async with AsyncExitStack() as stack:
        audit = await stack.enter_async_context(AuditLog.open(config.audit))
        admission = Admission(audit, clock)
        stack.callback(admission.close)
        admission.configure(config.keys)
        client = await stack.enter_async_context(
            UpstreamClient.open(config.providers.values(), transport=transport)
        )
        # Kept out of every upstream text that is relayed or recorded.
        secrets = [p.api_key for p in config.providers.values()]
        secrets += [k.key for k in config.keys] + [config.admin_token]
        secrets += [config.audit.chain_key, *config.audit.chain_old_keys]
        upstream = Upstreams(client, Scrubber(secrets))
        affinity_path = os.path.abspath(config.audit.path) + ".responses"
        affinity = ResponseAffinity(
            config.providers, affinity_path if config.audit.enabled else None
        )
        stack.callback(affinity.close)
        services = Services(
            config=config,
            router=Router(config),
            keys=KeyRing(config.keys),
            audit=audit,
            upstream=upstream,
            admission=admission,
            affinity=affinity,
        )
        nursery = await stack.enter_async_context(trio.open_nursery())
        if reload_on_sighup:
            from .reload import watch  # here: reload imports this module

            await nursery.start(watch, services)
        yield services
        nursery.cancel_scope.cancel()


def current_services() -> Services:
    """The Services of the app serving the current request."""
    return current_app.extensions["crabtrio"]  # type: ignore[no-any-return]
