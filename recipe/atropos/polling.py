"""One way to wait: ask a condition again every ``interval_s`` until it holds or ``timeout_s`` s have passed.

Every wait of the recipe is this loop — a service answering, an env registering, the final evaluation in the metrics
file, the endpoint's server thread starting, the bundled env waiting for the endpoint or for a weight update, the
launcher's supervision and watchdog — and so are the tests' waits. The condition may raise to end a wait early (a
process that died). Standard library only: every process may import it, the environments' interpreter included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _pause(interval_s: float, deadline: float | None, now: float) -> float:
    """The sleep before the next look: ``interval_s``, cut short so the last look falls at the deadline."""
    return interval_s if deadline is None else max(0.0, min(interval_s, deadline - now))


def poll_until(
    ready: Callable[[], T],
    timeout_s: float | None,
    interval_s: float = 0.25,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> T | None:
    """``ready()``'s first truthy answer, asked every ``interval_s``; None once ``timeout_s`` has passed (None: no
    limit). ``ready`` is asked at least once, and once at the deadline, so a condition that holds by then counts."""
    deadline = None if timeout_s is None else clock() + timeout_s
    while True:
        answer = ready()
        if answer:
            return answer
        now = clock()
        if deadline is not None and now >= deadline:
            return None
        sleep(_pause(interval_s, deadline, now))


async def poll_until_async(
    ready: Callable[[], Awaitable[T]],
    timeout_s: float | None,
    interval_s: float = 0.25,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> T | None:
    """:func:`poll_until` on an event loop: ``await ready()`` every ``interval_s`` (``asyncio.sleep`` between)."""
    deadline = None if timeout_s is None else clock() + timeout_s
    while True:
        answer = await ready()
        if answer:
            return answer
        now = clock()
        if deadline is not None and now >= deadline:
            return None
        await asyncio.sleep(_pause(interval_s, deadline, now))
