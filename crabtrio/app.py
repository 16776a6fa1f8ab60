"""create_app(): the QuartTrio app, its serving lifetime, routes and error handlers."""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import NoReturn

import httpx
import trio
from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import admin, api, proxy, usage
from .apis import Api
from .audit.chain import Link
from .config import Config, ConfigError, load_config
from .dispatch import ASGIApp, Receive, RequestDispatch, Scope, Send
from .errors import GatewayError, error_body
from .limits import LimitsFileError
from .reload import ignore_until_watched
from .services import Services, open_services

log = logging.getLogger("crabtrio")

# Deadline quart-trio puts on the app's nursery at shutdown: the audit drain runs under it.
SHUTDOWN_DRAIN_SECONDS = 10
# Exit code of a worker that could not start (bad config, unwritable audit file).
EXIT_STARTUP_FAILED = 3
# Exit code of a worker whose owned task (the audit writer or reader) died while serving.
EXIT_TASK_DIED = 1
# Set by `python -m crabtrio`: a file where each worker notes that it started, stopped
# cleanly, or failed, so the master can exit with a code that says what happened.
WORKER_REPORT_ENV = "CRABTRIO_WORKER_REPORT"

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class StartupError(Exception):
    """Startup cannot go on; the message is the one line an operator needs."""


def configure_logging() -> None:
    logger = logging.getLogger("crabtrio")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def create_app(
    config: Config | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    exit_on_startup_error: bool = False,
    clock: Callable[[], float] = time.time,
) -> QuartTrio:
    """Build the app. The config is loaded when serving starts unless one is given.

    With `exit_on_startup_error` (the module-level app that hypercorn serves), a startup
    failure prints one line and ends the worker process with exit code 3, no traceback; and
    a services task that dies while serving ends the worker with exit code 1, so
    `python -m crabtrio` exits non-zero and a supervisor restarts it. Without it (an app in
    a test), the app stays up refusing work, with /health saying why; and SIGHUP reloads
    the keys only in the module-level app. `clock` is what budgets and rate limits read.
    """
    app = QuartTrio("crabtrio")
    # `//v1/models` must be a 404, not a redirect built from the client's Host header.
    app.url_map.merge_slashes = False
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = SHUTDOWN_DRAIN_SECONDS
    app.register_blueprint(api.bp)
    _register_error_handlers(app)
    stop, stopped = trio.Event(), trio.Event()

    async def host(
        config: Config, *, task_status: trio.TaskStatus[Services] = trio.TASK_STATUS_IGNORED
    ) -> None:
        opened: Services | None = None
        try:
            async with open_services(
                config, transport=transport, clock=clock, reload_on_sighup=exit_on_startup_error
            ) as opened:
                task_status.started(opened)
                await stop.wait()
        except Exception as exc:
            if opened is not None:  # a task the services own died: never serve half-alive
                opened.audit.fail(f"a services task died: {type(exc).__name__}")
                _task_died(exc, exit_process=exit_on_startup_error)
                return
            if isinstance(exc, LimitsFileError):
                raise StartupError(str(exc)) from None
            if not isinstance(exc, OSError):
                raise
            path = os.path.abspath(config.audit.path)
            raise StartupError(f"cannot open audit file {path}: {exc.strerror or exc}") from None
        finally:
            stopped.set()

    @app.before_serving
    async def _start() -> None:
        configure_logging()
        if exit_on_startup_error:
            ignore_until_watched()
            _raise_open_files_limit()
        try:
            loaded = config if config is not None else _load()
            app.extensions["crabtrio"] = await app.nursery.start(host, loaded)
        except StartupError as exc:
            if exit_on_startup_error:
                _exit(str(exc))
            raise
        if multiprocessing.parent_process() is not None:  # a hypercorn worker
            _ignore_sigterm_in_worker()
            _freeze_startup_objects()
        audit = app.extensions["crabtrio"].audit
        head = await audit.head() if audit.enabled else None
        _log_startup(loaded, head)
        report_to_master("start")

    @app.after_serving
    async def _stop() -> None:
        stop.set()
        await stopped.wait()
        report_to_master("stop")

    def services() -> Services:
        return app.extensions["crabtrio"]  # type: ignore[no-any-return]

    def cors_origins() -> tuple[str, ...]:
        svc = app.extensions.get("crabtrio")
        return svc.config.cors_origins if svc is not None else ()

    handlers: dict[str, ASGIApp] = {
        path: partial(_serve_proxied, services, api) for path, api in proxy.ROUTES.items()
    }
    handlers[admin.LOGS] = partial(_serve_admin, admin.serve_logs, services)
    handlers[admin.CHAIN] = partial(_serve_admin, admin.serve_chain, services)
    handlers[usage.ADMIN_USAGE] = partial(_serve_usage, services, admin=True)
    handlers[usage.KEY_USAGE] = partial(_serve_usage, services, admin=False)
    app.asgi_app = RequestDispatch(app.asgi_app, handlers, cors_origins)  # type: ignore[method-assign, assignment, arg-type]
    return app


def _task_died(exc: Exception, *, exit_process: bool) -> None:
    """The services closed because one of their tasks died. The audit writer already refuses
    work (its state is "failed"); in a served worker, end the process so it is restarted."""
    reason = f"{type(exc).__name__}: {exc}"[:200]
    log.critical("crabtrio: a services task died while serving (%s)", reason, exc_info=exc)
    if exit_process:
        for handler in log.handlers:
            handler.flush()
        report_to_master("died", reason)
        os._exit(EXIT_TASK_DIED)


async def _serve_proxied(
    services: Callable[[], Services],
    api: Api,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    await proxy.serve(services(), api, scope, receive, send)


async def _serve_admin(
    route: Callable[[Services, Scope, Receive, Send], Awaitable[None]],
    services: Callable[[], Services],
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    await route(services(), scope, receive, send)


async def _serve_usage(
    services: Callable[[], Services], scope: Scope, receive: Receive, send: Send, *, admin: bool
) -> None:
    await usage.serve_usage(services(), scope, receive, send, admin=admin)


def _load() -> Config:
    try:
        return load_config()
    except ConfigError as exc:
        raise StartupError(f"config error: {exc}") from None


def report_to_master(event: str, detail: str = "") -> None:
    """Note `start`, `stop` or `fail` for `python -m crabtrio` (one short O_APPEND write)."""
    path = os.environ.get(WORKER_REPORT_ENV)
    if not path:
        return
    line = f"{event} {os.getpid()} {detail}".rstrip() + "\n"
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _exit(message: str) -> NoReturn:
    log.critical("crabtrio: %s", message)
    for handler in log.handlers:
        handler.flush()
    report_to_master("fail", message)
    os._exit(EXIT_STARTUP_FAILED)


def _raise_open_files_limit() -> None:
    """Lift this process's soft limit on open files to its hard limit, as Go's runtime does:
    every relayed stream holds a client and an upstream socket, and the usual soft limit of
    1024 would turn a busy worker's accepts and connects into EMFILE well below
    `max_connections`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _ignore_sigterm_in_worker() -> None:
    """In a hypercorn worker, leave SIGTERM to the master.

    systemd and `docker stop` signal the whole process group; the worker's default SIGTERM
    action would kill it on the spot, with no drain. Ignored, the signal reaches only the
    master, which asks every worker to finish in-flight requests and run the lifespan
    shutdown that flushes the audit log. (Forwarding it to the master instead deadlocked the
    master: its handler could re-enter while holding multiprocessing.Event's lock.)
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _freeze_startup_objects() -> None:
    """Keep what startup loaded (a replayed index may hold millions of entries) out of the
    cyclic GC's full passes: they live as long as the process, and scanning them again and
    again showed up as latency spikes on every request."""
    gc.collect()
    gc.freeze()


def _log_startup(config: Config, head: Link | None) -> None:
    for warning in config.warnings:
        log.warning("crabtrio: %s", warning)
    audit = config.audit
    if audit.enabled:
        crash = "a killed process loses at most the records of its last ~50 ms"
        window = {
            "interval": f"{crash}; power loss up to {audit.sync_interval_ms} ms more",
            "always": "none: each response waits for its record's fsync",
            "never": f"{crash}; power loss whatever the OS had not written back",
        }[audit.sync]
        audit_text = f"{os.path.abspath(audit.path)} (sync={audit.sync}, loss window: {window})"
        if audit.postgres is not None:  # never the DSN: it may hold a password
            pg = audit.postgres
            audit_text += f", shipped to PostgreSQL table {pg.table} as instance {pg.instance!r}"
        if head is not None:
            keyed = "HMAC-SHA256" if audit.chain_key else "SHA-256, no chain_key"
            audit_text += f", hash chain ({keyed}) at seq {head.seq}, head {head.chain}"
    else:
        audit_text = "DISABLED"
    metered = sum(key.metered for key in config.keys)
    auth = (
        f"on ({len(config.keys)} keys, {metered} with limits or budgets)"
        if config.keys
        else "off (no [[keys]] configured)"
    )
    admin_guard = "admin_token" if config.admin_token else "loopback clients only"
    log.info(
        "crabtrio: config %s; models %s; providers %s; audit %s; auth %s; admin %s",
        config.source,
        ", ".join([*config.models, *(f"{a}->{m}" for a, m in config.aliases.items())]),
        ", ".join(f"{p.name}({p.kind})" for p in config.providers.values()),
        audit_text,
        auth,
        admin_guard,
    )
    if not config.admin_token:
        log.warning("crabtrio: no admin_token set: /v1/admin/* answers loopback clients only")


def _register_error_handlers(app: QuartTrio) -> None:
    @app.errorhandler(GatewayError)
    async def _gateway_error(exc: GatewayError) -> Response:
        return Response(exc.body_bytes(), exc.status, content_type="application/json")

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        kind = "invalid_request_error" if status < 500 else "server_error"
        message = exc.description or exc.name
        body = error_body(status, message, kind, _HTTP_CODES.get(status))
        return Response(body, status, content_type="application/json")

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("crabtrio: unexpected error")
        body = error_body(500, "internal error; see the gateway's log", "server_error", None)
        return Response(body, 500, content_type="application/json")
