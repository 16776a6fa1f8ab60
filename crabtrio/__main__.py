"""`python -m crabtrio [hypercorn options]`: hypercorn with crabtrio's defaults and exit codes
(and `python -m crabtrio usage ...`: the usage report, see crabtrio/usage_cli.py).

It checks the config and the audit file before any worker starts, so a bad config (exit 2) or
an unwritable audit directory (exit 3) ends the process at once with one line. hypercorn
0.18's master exits 0 even when a worker failed (pgjones/hypercorn#269), which hides failures
from supervisors; so each worker reports start, clean stop or failure to a file, and this
process exits 3 if a worker failed to start and 1 if one died without a clean stop. SIGHUP
reloads the keys in every worker (see `reload`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import tempfile

import hypercorn.run
from hypercorn.__main__ import main as hypercorn_main

from . import logs_cli, usage_cli, verify_cli
from .app import EXIT_STARTUP_FAILED, WORKER_REPORT_ENV, configure_logging
from .audit.store import AuditFile
from .config import ConfigError, load_config
from .reload import pass_sighup_to_workers

EXIT_BAD_CONFIG = 2
EXIT_WORKER_DIED = 1
DEFAULTS = {
    "--worker-class": "trio",
    "--bind": "127.0.0.1:8080",
    # Below the 10 s that `docker stop` and most supervisors allow (see the README).
    "--graceful-timeout": "8",
}

log = logging.getLogger("crabtrio")


def available_cores() -> int:
    """The cores this process may run on (its affinity, as a container's cpuset limits it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _with_defaults(args: list[str]) -> list[str]:
    """hypercorn's arguments: crabtrio's defaults for what `args` leave out, one worker per
    available core among them (hypercorn's own default is one)."""
    given = {arg.split("=", 1)[0] for arg in args if arg.startswith("-")}
    aliases = {"--worker-class": "-k", "--bind": "-b", "--workers": "-w"}
    defaults = {**DEFAULTS, "--workers": str(available_cores())}
    extra: list[str] = []
    for flag, value in defaults.items():
        if flag not in given and aliases.get(flag) not in given:
            extra += [flag, value]
    return ["crabtrio:app", *extra, *args]


def _workers(args: list[str]) -> str:
    """The worker count hypercorn is given (the last --workers / -w wins)."""
    found = "1"
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in ("--workers", "-w"):
            found = value or (args[i + 1] if i + 1 < len(args) else found)
    return found


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["usage"]:  # `python -m crabtrio usage ...`: a client, not the gateway
        return usage_cli.main(args[1:])
    if args[:1] == ["logs"]:  # `python -m crabtrio logs ...`: a reader of the audit log
        return logs_cli.main(args[1:])
    if args[:1] == ["verify"]:  # `python -m crabtrio verify [PATH]`: checks its hash chain
        return verify_cli.main(args[1:])
    configure_logging()
    try:
        config = load_config()
    except ConfigError as exc:
        log.critical("crabtrio: config error: %s", exc)
        return EXIT_BAD_CONFIG
    if config.audit.enabled:
        try:
            AuditFile(config.audit.path).close()
        except OSError as exc:
            path = os.path.abspath(config.audit.path)
            log.critical("crabtrio: cannot open audit file %s: %s", path, exc.strerror or exc)
            return EXIT_STARTUP_FAILED
    with tempfile.NamedTemporaryFile(prefix="crabtrio-workers-", suffix=".txt") as report:
        os.environ[WORKER_REPORT_ENV] = report.name  # spawned workers inherit it
        pass_sighup_to_workers(hypercorn.run)  # a live reload of the keys, not a restart
        hypercorn_args = _with_defaults(args)
        log.info(
            "crabtrio: starting %s worker(s) (%d core(s) available; --workers to choose)",
            _workers(hypercorn_args),
            available_cores(),
        )
        code = hypercorn_main(hypercorn_args)
        # hypercorn returns once one worker has exited, and SIGTERMs the rest; they finish
        # their drain (crabtrio workers ignore SIGTERM): wait for them.
        for worker in multiprocessing.active_children():
            worker.join()
        with open(report.name) as file:
            lines = file.read().splitlines()
    return code or exit_code_from(lines)


def exit_code_from(report: list[str]) -> int:
    """0 if every worker that started also stopped cleanly; else 3 or 1, saying why."""
    started, stopped, failed = set(), set(), False
    for line in report:
        event, _, rest = line.partition(" ")
        pid = rest.split(" ", 1)[0]
        if event == "start":
            started.add(pid)
        elif event == "stop":
            stopped.add(pid)
        elif event == "fail":
            failed = True
    if failed:
        return EXIT_STARTUP_FAILED
    died = sorted(started - stopped)
    if died:
        log.critical("crabtrio: worker(s) %s died without a clean shutdown", ", ".join(died))
        return EXIT_WORKER_DIED
    return 0


if __name__ == "__main__":
    sys.exit(main())
