"""`python -m crabtrio [hypercorn options]`: hypercorn with crabtrio's defaults and exit codes.

It checks the config and the audit file before any worker starts, so a bad config or an
unwritable audit directory ends the process at once with one line and a non-zero code. It
also passes on a worker's startup failure as exit code 3: hypercorn 0.18's master exits 0
when a worker fails (pgjones/hypercorn#269), which hides the failure from supervisors.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from hypercorn.__main__ import main as hypercorn_main

from .app import EXIT_STARTUP_FAILED, FAILURE_FILE_ENV, configure_logging
from .audit.store import AuditFile
from .config import ConfigError, load_config

EXIT_BAD_CONFIG = 2
DEFAULTS = {
    "--worker-class": "trio",
    "--bind": "127.0.0.1:8080",
    # Below the 10 s that `docker stop` and most supervisors allow (see the README).
    "--graceful-timeout": "8",
}

log = logging.getLogger("crabtrio")


def _with_defaults(args: list[str]) -> list[str]:
    given = {arg.split("=", 1)[0] for arg in args if arg.startswith("-")}
    aliases = {"--worker-class": "-k", "--bind": "-b"}
    extra: list[str] = []
    for flag, value in DEFAULTS.items():
        if flag not in given and aliases.get(flag) not in given:
            extra += [flag, value]
    return ["crabtrio:app", *extra, *args]


def main(argv: list[str] | None = None) -> int:
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
    with tempfile.NamedTemporaryFile(prefix="crabtrio-startup-", suffix=".txt") as marker:
        os.environ[FAILURE_FILE_ENV] = marker.name  # spawned workers inherit it
        code = hypercorn_main(_with_defaults(list(sys.argv[1:] if argv is None else argv)))
        if os.path.getsize(marker.name) > 0 and code == 0:
            code = EXIT_STARTUP_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
