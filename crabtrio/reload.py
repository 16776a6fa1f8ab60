"""Reloading keys, limits and budgets on SIGHUP, without a restart.

hypercorn's master answers SIGHUP by stopping every worker and starting new ones: in-flight
streams are cut, the index is loaded again, and a worker that meets a bad config exits, which
ends the whole server. Under `python -m crabtrio` the master instead checks the config file
and, if it is valid, passes SIGHUP on to each worker, which re-reads it and takes the
`[[keys]]` (names, secrets, models, rpm, tpm, budgets). A bad file is refused with one line,
by the master and by each worker, and the running config stays.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from types import FrameType, ModuleType
from typing import Any

import trio

from .config import Config, ConfigError, load_config
from .limits import LimitsFileError
from .services import Services

log = logging.getLogger("crabtrio")

# Sections a reload does not apply (they need a restart); a change to one is warned about.
_RESTART_ONLY = (
    *("providers", "aliases", "pricing", "audit", "admin_token"),
    *("max_body_mb", "cors_origins"),
)


async def watch(
    svc: Services, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Reload at each SIGHUP to this process, until cancelled. A SIGHUP that came while the
    worker was starting (ignored then) is caught up on by comparing the file once now."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        reload(svc, quiet_if_unchanged=True)
        async for _ in signals:
            reload(svc)


def reload(svc: Services, *, quiet_if_unchanged: bool = False) -> bool:
    """Re-read the config file and apply its keys; False (and one line) if it is refused."""
    source = svc.config.source
    try:
        config = load_config(None if source.startswith("<") else source)
    except ConfigError as exc:
        log.error("crabtrio: config reload refused, the running config stays: %s", exc)
        return False
    if quiet_if_unchanged and config.keys == svc.keys.configured:
        return True
    try:
        svc.admission.configure(config.keys)
    except LimitsFileError as exc:
        log.error("crabtrio: config reload refused, the running config stays: %s", exc)
        return False
    svc.keys.replace(config.keys)
    svc.upstream.scrubber.add(key.key for key in config.keys)
    limited = sum(key.metered for key in config.keys)
    log.info(
        "crabtrio: config reloaded from %s: %d keys (%d with limits or budgets)",
        config.source,
        len(config.keys),
        limited,
    )
    for warning in config.warnings:
        log.warning("crabtrio: %s", warning)
    stale = [name for name in _RESTART_ONLY if getattr(config, name) != getattr(svc.config, name)]
    if stale:
        log.warning(
            "crabtrio: %s changed in %s: a reload applies only [[keys]]; restart to apply them",
            ", ".join(stale),
            config.source,
        )
    return True


def ignore_until_watched() -> None:
    """In a worker, until `watch` runs: SIGHUP's default action would end the process."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def pass_sighup_to_workers(hypercorn_run: ModuleType) -> None:
    """Make hypercorn's master (module `hypercorn.run`, which installs its SIGHUP handler each
    time it starts workers) check the config and signal the workers instead."""
    hypercorn_run.signal = _MasterSignals()  # type: ignore[attr-defined]


class _MasterSignals:
    """The `signal` module as hypercorn's master sees it: SIGHUP handlers become ours."""

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    def signal(self, signum: int, handler: Any) -> Any:
        if signum == signal.SIGHUP:
            handler = _master_sighup
        return signal.signal(signum, handler)


def _master_sighup(signum: int, frame: FrameType | None) -> None:
    try:
        config: Config = load_config()
    except ConfigError as exc:
        log.error("crabtrio: config reload refused, the running config stays: %s", exc)
        return
    workers = multiprocessing.active_children()
    for worker in workers:
        if worker.pid is not None:
            os.kill(worker.pid, signal.SIGHUP)
    log.info("crabtrio: asked %d worker(s) to reload %s", len(workers), config.source)
