"""Model resolution and the order in which providers are tried (weighted, then by weight)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .config import Config, ProviderConfig

BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 10.0


class Router:
    """Maps requested names (aliases included) to canonical models and their providers."""

    def __init__(self, config: Config) -> None:
        served: dict[str, list[ProviderConfig]] = {}
        for provider in config.providers.values():
            for model in provider.models:
                served.setdefault(model, []).append(provider)
        # Sorted once by descending weight: the fallback order after the weighted first pick.
        self._providers = {
            model: tuple(sorted(providers, key=lambda p: -p.weight))
            for model, providers in served.items()
        }
        self._aliases = dict(config.aliases)
        self._speaking: dict[tuple[str, tuple[str, ...]], tuple[ProviderConfig, ...]] = {}

    def resolve(self, requested: str) -> str | None:
        """The canonical model for a requested name, or None when nothing serves it."""
        if requested in self._providers:
            return requested
        return self._aliases.get(requested)

    def providers(self, model: str) -> Sequence[ProviderConfig]:
        return self._providers[model]

    def speaking(self, model: str, kinds: tuple[str, ...]) -> Sequence[ProviderConfig]:
        """The model's providers of these kinds (the ones that speak a route's API)."""
        found = self._speaking.get((model, kinds))
        if found is None:
            found = tuple(p for p in self._providers[model] if p.kind in kinds)
            self._speaking[(model, kinds)] = found
        return found

    def plan(
        self, model: str, kinds: tuple[str, ...], rng: random.Random | None = None
    ) -> list[ProviderConfig]:
        """Providers of these kinds to try: one picked at random by weight, then the rest by
        descending weight. Empty when none of the model's providers is of these kinds."""
        providers = self.speaking(model, kinds)
        if len(providers) <= 1:
            return list(providers)
        pick = (rng or random).choices(providers, weights=[p.weight for p in providers])[0]
        return [pick, *(p for p in providers if p is not pick)]


def backoff_delay(retry: int, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before retry number `retry` (0-based): U(0, base * 2^n)."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * (2**retry))
    return (rng or random).uniform(0, ceiling)
