"""Shared fixtures."""

from __future__ import annotations

import random

import pytest
from trio.testing import MockClock

from crabtrio import routing


@pytest.fixture
def idle_jump_clock() -> MockClock:
    """Virtual time that jumps ahead once the loop has been idle for 50 ms of real time.

    Unlike `autojump_clock`, it does not jump while a worker thread (the audit writer's
    disk I/O) is running, so timeouts only fire when everything is really waiting.
    """
    return MockClock(autojump_threshold=0.05)


class _HeaviestFirst(random.Random):
    """Routing's weighted pick, made deterministic: always the heaviest provider."""

    def choices(self, population, weights=None, **_):  # type: ignore[override]
        return [
            max(
                zip(
                    weights or [1] * len(population),
                    range(len(population)),
                    population,
                    strict=True,
                )
            )[2]
        ]


@pytest.fixture(autouse=True)
def heaviest_provider_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """App tests see the heaviest provider tried first (test_routing passes its own rng)."""
    monkeypatch.setattr(routing, "random", _HeaviestFirst())
