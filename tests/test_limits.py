"""The shared rate-limit windows: against a naive sliding-window oracle, across processes,
across restarts (kept, or rebuilt from the trail), and their headers."""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path

import pytest

from crabtrio.config import KeyConfig
from crabtrio.limits import BUCKETS, WINDOW_SECONDS, Windows, duration

T0 = 1_793_491_200.25  # a quarter second into 2026-11-01T00:00:00Z


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def nothing_recent(since: int) -> list[tuple[int, str, int]]:
    return []


def key(name: str = "k", rpm: int | None = None, tpm: int | None = None) -> KeyConfig:
    return KeyConfig(name=name, key=f"sk-{name}", rpm=rpm, tpm=tpm)


def headers(verdict: object) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in verdict.headers}  # type: ignore[attr-defined]


class Oracle:
    """Every admitted request and counted token, by second: the window is summed naively."""

    def __init__(self) -> None:
        self.requests: list[int] = []
        self.tokens: list[tuple[int, int]] = []

    def used(self, second: int) -> tuple[int, int]:
        low = second - WINDOW_SECONDS
        return (
            sum(1 for s in self.requests if low <= s <= second),
            sum(n for s, n in self.tokens if low <= s <= second),
        )


@pytest.mark.parametrize("seed", range(6))
def test_decisions_and_headers_match_a_naive_window(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock()
    windows = Windows.open(str(tmp_path / "a.limits"), nothing_recent, clock)
    limited = key(rpm=rng.randint(1, 30), tpm=rng.randint(50, 5000))
    oracle = Oracle()
    for _ in range(2000):
        step = rng.random()
        if step < 0.45:
            second = int(clock.now)
            requests, tokens = oracle.used(second)
            verdict = windows.admit(limited)
            expected = requests < limited.rpm and tokens < limited.tpm  # type: ignore[operator]
            assert verdict.admitted == expected
            if expected:
                oracle.requests.append(second)
                requests += 1
            seen = headers(verdict)
            assert seen["x-ratelimit-remaining-requests"] == str(max(0, limited.rpm - requests))  # type: ignore[operator]
            assert seen["x-ratelimit-remaining-tokens"] == str(max(0, limited.tpm - tokens))  # type: ignore[operator]
            if not expected:
                # Waiting retry-after seconds frees the exceeded limit; a second less does not.
                wait = verdict.retry_after
                assert 1 <= wait <= BUCKETS
                later = int(clock.now + wait)
                again = oracle.used(later)
                assert again[0] < limited.rpm and (  # type: ignore[operator]
                    verdict.exceeded == "requests" or again[1] < limited.tpm  # type: ignore[operator]
                )
                if wait > 1:
                    before = oracle.used(int(clock.now + wait - 1))
                    index = 0 if verdict.exceeded == "requests" else 1
                    limit = limited.rpm if index == 0 else limited.tpm
                    assert before[index] >= limit  # type: ignore[operator]
        elif step < 0.75:
            tokens = rng.randint(1, 400)
            windows.count_tokens(limited.name, tokens)
            oracle.tokens.append((int(clock.now), tokens))
        else:
            clock.now += rng.choice([0.1, 0.5, 1, 1, 2, 7, 30, 59, 61, 62, 200])


def test_the_window_counts_61_buckets_so_no_minute_holds_more_than_rpm(tmp_path: Path) -> None:
    clock = Clock(T0 + 0.7)  # late in its second
    windows = Windows.open(str(tmp_path / "a.limits"), nothing_recent, clock)
    limited = key(rpm=2)
    assert windows.admit(limited).admitted
    clock.now += 30
    assert windows.admit(limited).admitted
    clock.now = T0 + 60.6  # 59.9 s after the first: a third would make 3 in one minute
    refused = windows.admit(limited)
    assert not refused.admitted and refused.exceeded == "requests"
    assert refused.retry_after == 1  # the first's second leaves at T0 + 61
    assert headers(refused)["retry-after"] == "1"
    clock.now = int(T0) + 61
    assert windows.admit(limited).admitted
    assert headers(windows.admit(limited, count=False))["x-ratelimit-reset-requests"] == "1m1s"


def test_idle_keys_and_a_clock_going_back_keep_the_totals_right(tmp_path: Path) -> None:
    clock = Clock()
    windows = Windows.open(str(tmp_path / "a.limits"), nothing_recent, clock)
    limited = key(rpm=3)
    for _ in range(3):
        assert windows.admit(limited).admitted
    clock.now += 3600  # idle: everything left the window
    for _ in range(3):
        assert windows.admit(limited).admitted
    assert not windows.admit(limited).admitted
    clock.now -= 30  # the clock was set back: the requests "ahead" still count
    assert not windows.admit(limited).admitted
    clock.now += 30 + BUCKETS
    assert windows.admit(limited).admitted
    assert headers(windows.admit(limited, count=False))["x-ratelimit-remaining-requests"] == "2"


def test_reset_headers_say_when_the_window_empties(tmp_path: Path) -> None:
    clock = Clock(T0)
    windows = Windows.open(str(tmp_path / "a.limits"), nothing_recent, clock)
    limited = key(rpm=10, tpm=100)
    first = headers(windows.admit(limited))
    assert first["x-ratelimit-reset-requests"] == "1m1s"  # 60.75 s, rounded up
    assert first["x-ratelimit-reset-tokens"] == "0ms"  # none counted
    windows.count_tokens(limited.name, 40)
    clock.now += 60.5
    later = headers(windows.admit(limited, count=False))
    assert later["x-ratelimit-reset-tokens"] == "250ms"
    assert later["x-ratelimit-remaining-tokens"] == "60"
    assert [duration(s) for s in (0, 0.25, 1, 59.2, 61, 125)] == [
        "0ms",
        "250ms",
        "1s",
        "1m0s",
        "1m1s",
        "2m5s",
    ]


def _burst(path: str, count: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    windows = Windows.open(path, nothing_recent)
    limited = key(rpm=60)
    results.put(sum(windows.admit(limited).admitted for _ in range(count)))


def test_two_processes_share_one_limit_exactly(tmp_path: Path) -> None:
    path = str(tmp_path / "a.limits")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_burst, args=(path, 500, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    admitted = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    # Both ran within the minute (the spawn and 1000 checks take a few seconds at most).
    assert sum(admitted) == 60


def test_the_file_survives_a_restart_and_is_rebuilt_when_it_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "a.limits"
    clock = Clock()
    limited = key(rpm=5, tpm=1000)
    windows = Windows.open(str(path), nothing_recent, clock)
    for _ in range(3):
        assert windows.admit(limited).admitted
    windows.count_tokens(limited.name, 700)
    windows.close()
    asked: list[int] = []

    def recent(since: int) -> list[tuple[int, str, int]]:
        asked.append(since)
        now = int(clock.now * 1000)
        return [
            (now - 1000, "k", 300),
            (now - 59_000, "k", 300),
            (now - 61_000, "k", 5000),  # before the window: ignored
            (now - 2000, "other", 0),
        ]

    kept = Windows.open(str(path), recent, clock)
    assert asked == []  # a valid file is used as it is
    state = headers(kept.admit(limited, count=False))
    assert state["x-ratelimit-remaining-requests"] == "2"
    assert state["x-ratelimit-remaining-tokens"] == "300"
    kept.close()
    path.write_bytes(b"not a limits file")
    rebuilt = Windows.open(str(path), recent, clock)
    assert asked == [(int(clock.now) - WINDOW_SECONDS) * 1000]
    state = headers(rebuilt.admit(limited, count=False))
    assert state["x-ratelimit-remaining-requests"] == "3"
    assert state["x-ratelimit-remaining-tokens"] == "400"
    assert (
        headers(rebuilt.admit(key("other", rpm=2), count=False))["x-ratelimit-remaining-requests"]
        == "1"
    )


def test_many_keys_get_their_own_entries_in_every_process(tmp_path: Path) -> None:
    path = str(tmp_path / "a.limits")
    clock = Clock()
    one = Windows.open(path, nothing_recent, clock)
    two = Windows.open(path, nothing_recent, clock)
    names = [f"team-{i}" for i in range(3000)]
    for i, name in enumerate(names):
        for _ in range(i % 3 + 1):
            assert one.admit(key(name, rpm=5)).admitted
    for i, name in enumerate(reversed(names)):
        i = len(names) - 1 - i
        state = headers(two.admit(key(name, rpm=5), count=False))
        assert state["x-ratelimit-remaining-requests"] == str(5 - (i % 3 + 1))
