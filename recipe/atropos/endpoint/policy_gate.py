"""The endpoint's gate around weight updates: requests pass while it is open; closing it waits for the in-flight
ones, so no completion mixes two policy versions, and every completion is tagged with the version it entered under."""

from __future__ import annotations

import asyncio
import time


class PolicyGate:
    """Lets requests through while open; ``close`` waits for in-flight ones. Lives on the endpoint's event loop.
    ``closed_s``: seconds it has held new requests back, summed over closures (the current one included)."""

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self._open = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0
        self._open.set()
        self._closed_total = 0.0
        self._closed_at: float | None = None

    @property
    def closed_s(self) -> float:
        current = time.monotonic() - self._closed_at if self._closed_at is not None else 0.0
        return self._closed_total + current

    async def enter(self) -> int:
        await self._open.wait()
        self._inflight += 1
        self._idle.clear()
        return self.version

    def exit(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def close(self) -> None:
        if self._closed_at is None:
            self._closed_at = time.monotonic()
        self._open.clear()
        await self._idle.wait()

    async def open(self, version: int) -> None:
        self.version = version
        if self._closed_at is not None:
            self._closed_total += time.monotonic() - self._closed_at
            self._closed_at = None
        self._open.set()

    @property
    def is_open(self) -> bool:
        """False while a weight update holds new requests back."""
        return self._open.is_set()
