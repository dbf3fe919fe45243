"""The one wait loop (recipe/atropos/polling.py), on a fake clock: what it returns, how often it asks, how long it
sleeps."""

from __future__ import annotations

import asyncio

import pytest

from recipe.atropos.polling import poll_until, poll_until_async


class FakeClock:
    """Time that moves only when the loop sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_returns_the_first_truthy_answer_without_sleeping_after_it() -> None:
    clock, answers = FakeClock(), iter([0, None, "ready"])
    assert poll_until(lambda: next(answers), 10, 0.5, clock=clock, sleep=clock.sleep) == "ready"
    assert clock.sleeps == [0.5, 0.5]  # two misses, two sleeps


def test_gives_none_at_the_deadline_after_a_last_look_at_it() -> None:
    clock, looks = FakeClock(), []
    assert poll_until(lambda: looks.append(clock()) and False, 1.2, 0.5, clock=clock, sleep=clock.sleep) is None
    assert looks == [100.0, 100.5, 101.0, 101.2]  # the last sleep is cut to 0.2 s: one look at the deadline
    assert clock.sleeps == [0.5, 0.5, pytest.approx(0.2)]


def test_a_zero_timeout_looks_once() -> None:
    clock, looks = FakeClock(), []
    assert poll_until(lambda: looks.append(1) and False, 0, 0.5, clock=clock, sleep=clock.sleep) is None
    assert looks == [1] and clock.sleeps == []


def test_no_timeout_waits_as_long_as_it_takes() -> None:
    clock, answers = FakeClock(), iter([False] * 1000 + [True])
    assert poll_until(lambda: next(answers), None, 60, clock=clock, sleep=clock.sleep) is True
    assert len(clock.sleeps) == 1000 and set(clock.sleeps) == {60}


def test_an_error_in_the_condition_ends_the_wait() -> None:
    def dead() -> bool:
        raise RuntimeError("the process exited")

    clock = FakeClock()
    with pytest.raises(RuntimeError, match="exited"):
        poll_until(dead, 10, 0.5, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []


def test_the_async_loop_awaits_the_condition_and_keeps_the_deadline() -> None:
    looks: list[int] = []

    async def ready() -> bool:
        looks.append(1)
        return len(looks) == 3

    assert asyncio.run(poll_until_async(ready, 5, 0.001)) is True
    assert len(looks) == 3

    async def never() -> bool:
        return False

    assert asyncio.run(poll_until_async(never, 0.01, 0.001)) is None
