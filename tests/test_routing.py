"""Routing: alias resolution, weighted first pick, fallback by weight, jittered backoff."""

from __future__ import annotations

import random
from collections import Counter

from crabtrio.config import parse_config
from crabtrio.routing import Router, backoff_delay

CONFIG = parse_config(
    """
[providers.heavy]
kind = "mock"
models = ["m", "only-heavy"]
weight = 3
[providers.light]
kind = "mock"
models = ["m"]
weight = 1
[providers.mid]
kind = "mock"
models = ["m"]
weight = 2
[aliases]
alias = "m"
"""
)


def test_resolve_models_and_aliases() -> None:
    router = Router(CONFIG)
    assert router.resolve("m") == "m"
    assert router.resolve("alias") == "m"
    assert router.resolve("unknown") is None


def test_plan_picks_by_weight_then_falls_back_by_descending_weight() -> None:
    router = Router(CONFIG)
    rng = random.Random(7)
    firsts = Counter()
    for _ in range(6000):
        plan = [p.name for p in router.plan("m", ("openai", "mock"), rng)]
        firsts[plan[0]] += 1
        rest = [name for name in ["heavy", "mid", "light"] if name != plan[0]]
        assert plan[1:] == rest
    assert 2700 < firsts["heavy"] < 3300
    assert 1700 < firsts["mid"] < 2300
    assert 800 < firsts["light"] < 1200


def test_single_provider_plan() -> None:
    assert [p.name for p in Router(CONFIG).plan("only-heavy", ("openai", "mock"))] == ["heavy"]


def test_backoff_is_full_jitter_exponential() -> None:
    rng = random.Random(1)
    for retry, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8)]:
        samples = [backoff_delay(retry, rng) for _ in range(500)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.9 and min(samples) < ceiling * 0.1
    assert backoff_delay(30, rng) <= 10.0
