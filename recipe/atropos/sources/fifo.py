"""FIFO batches: polled groups in arrival order, whole groups until exactly ``batch_size`` sequences.

The API forms batches of exactly ``batch_size`` sequences, but the trainer may drop groups (too stale, or rejected as
malformed by the client), so a step can need groups from more than one poll. Invariants of :meth:`FifoBatcher.select`:
groups keep their arrival order; a stale group is dropped and counted, never trained; a group that does not fit the
batch waits for a later step (in order, before newer groups); a batch is handed out only when exactly full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from recipe.atropos.schema import group_tokens

IsStale = Callable[[Any], bool]


class FifoBatcher:
    """The API's order, exact batch size; the no-mixture counterpart of
    :class:`~recipe.atropos.sources.mixture.MixtureBatcher` (same methods)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = int(batch_size)
        self.pending: list[Any] = []
        self.stale_dropped = 0  # cumulative
        self._dropped_at_last_batch = 0

    def refresh(self) -> None:
        return None

    def add(self, groups: Iterable[Any], front: bool = False) -> None:
        """Queue groups after the waiting ones (``front``: before them, in the given order)."""
        self.pending = [*groups, *self.pending] if front else [*self.pending, *groups]

    def pending_groups(self) -> list[Any]:
        return list(self.pending)

    def select(self, waited_s: float = 0.0, is_stale: IsStale = lambda group: False) -> list[Any] | None:
        """Exactly ``batch_size`` sequences of whole groups, greedily in order; None until enough have arrived."""
        chosen, waiting, fresh, n = [], [], [], 0
        for group in self.pending:
            size = len(group_tokens(group))
            if is_stale(group):
                self.stale_dropped += 1
                continue
            fresh.append(group)
            if n + size <= self.batch_size:
                chosen.append(group)
                n += size
            else:
                waiting.append(group)
        if n < self.batch_size:
            self.pending = fresh  # chosen ones stay first in line: the next poll's groups only fill the rest
            return None
        self.pending = waiting
        return chosen

    def metrics(self, chosen: Sequence[Any]) -> dict[str, float]:
        """Groups waiting for a later step, and stale groups dropped while filling this batch."""
        dropped = self.stale_dropped - self._dropped_at_last_batch
        self._dropped_at_last_batch = self.stale_dropped
        return {"atropos/carried_groups": float(len(self.pending)), "atropos/stale_groups_dropped": float(dropped)}

    def state_dict(self) -> dict[str, Any] | None:
        return None  # nothing cumulative: pending groups live in the spool, not in checkpoints

    def load_state_dict(self, state: Any) -> None:
        return None
