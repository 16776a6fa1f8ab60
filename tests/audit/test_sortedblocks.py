"""SortedBlocks against a plain sorted list, with blocks small enough to split often."""

from __future__ import annotations

import random

import pytest

from crabtrio.audit import sortedblocks
from crabtrio.audit.sortedblocks import SortedBlocks


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_sorted_list(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    monkeypatch.setattr(sortedblocks, "BLOCK", 8)
    rng = random.Random(seed)
    blocks = SortedBlocks(rng.sample(range(100_000), 50))
    expected = sorted(blocks)
    for step in range(3000):
        action = rng.random()
        if action < 0.6:  # mostly in order, like audit entries
            item = (
                (expected[-1] + rng.randrange(1, 5))
                if expected and rng.random() < 0.8
                else rng.randrange(200_000)
            )
            if item in expected:
                continue
            blocks.add(item)
            expected.append(item)
            expected.sort()
        elif action < 0.8 and expected:
            item = rng.choice(expected)
            blocks.discard(item)
            expected.remove(item)
            blocks.discard(-1)  # absent: no effect
        else:
            batch = list(
                {rng.randrange(300_000) for _ in range(rng.randrange(1, 40))} - set(expected)
            )
            blocks.update(batch)
            expected = sorted(expected + batch)
        if step % 100 == 0:
            assert list(blocks) == expected and len(blocks) == len(expected)
            low, high = sorted(rng.sample(range(300_000), 2))
            assert list(blocks.irange_descending(low, high)) == [
                x for x in reversed(expected) if low <= x < high
            ]
            assert list(blocks.irange_descending(None, high)) == [
                x for x in reversed(expected) if x < high
            ]
            assert list(blocks.irange_descending(low, None)) == [
                x for x in reversed(expected) if x >= low
            ]
    assert list(blocks.irange_descending(None, None)) == expected[::-1]
