"""`python -m crabtrio`'s hypercorn arguments: crabtrio's defaults, one worker per core."""

from __future__ import annotations

import os

from crabtrio.__main__ import _with_defaults, _workers, available_cores


def test_one_worker_per_available_core_unless_given() -> None:
    assert available_cores() == len(os.sched_getaffinity(0))
    args = _with_defaults([])
    assert args[0] == "crabtrio:app"
    assert _workers(args) == str(available_cores())
    assert args[args.index("--worker-class") :][:2] == ["--worker-class", "trio"]
    for given in (["--workers", "3"], ["-w", "3"], ["--workers=3"]):
        args = _with_defaults(given)
        assert _workers(args) == "3" and args.count("--workers") == (given[0] == "--workers")


def test_other_defaults_yield_to_what_is_given() -> None:
    args = _with_defaults(["-b", "0.0.0.0:9000", "--graceful-timeout", "2"])
    assert "--bind" not in args and "-b" in args
    assert args.count("--graceful-timeout") == 1
