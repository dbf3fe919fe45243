"""Groups from the live Atropos API: registration, polling, the spool, and batches FIFO or held to a mixture.

Invariants:

- every group the client fetches is written to the spool (when on) before anything else sees it, and every handed-out
  group ends trained, set aside as stale (with the reason), or still held for a later step — nothing fetched is lost;
- a step's batch holds exactly ``data.train_batch_size`` sequences of whole groups, none over the policy-lag cap;
- groups an earlier run fetched but did not train come first after a resume;
- a group from the guarded API (it carries an id) is acknowledged only after the spool holds it, and a group delivered
  again (the API restarted before it got the ack) is dropped by id, so each is trained once. Without the spool the
  ack follows the fetch and duplicates are dropped by the ids seen in this process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from recipe.atropos.schema import ScoredGroup, group_id
from recipe.atropos.sources.base import BaseGroupSource
from recipe.atropos.spool import GroupSpool
from recipe.atropos.staleness import LagMeter
from recipe.atropos.transport.client import AtroposAPIError, AtroposClient
from recipe.atropos.waiting import WaitReport

logger = logging.getLogger(__name__)


class Batcher(Protocol):
    """Fills batches from polled groups: :class:`~recipe.atropos.sources.fifo.FifoBatcher` or
    :class:`~recipe.atropos.sources.mixture.MixtureBatcher`."""

    def refresh(self) -> None: ...

    def add(self, groups: Iterable[Any], front: bool = False) -> None: ...

    def select(self, waited_s: float, is_stale: Any) -> list[Any] | None: ...

    def pending_groups(self) -> list[Any]: ...

    def metrics(self, chosen: Sequence[Any]) -> dict[str, float]: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class ApiGroupSource(BaseGroupSource):
    """Step batches from ``run-api`` through ``client``, assembled by ``batcher``.

    ``registration``: the keyword arguments of :meth:`AtroposClient.register` except ``starting_step``.
    ``drain_max_sequences``: after each weight push, batches the API already formed are fetched into the spool up to
    this many sequences (0 = only when a step needs data), so the API's in-memory queue stays small.
    ``waits``: marks each wait for data (the launcher's waiting line) and explains a poll timeout.
    """

    online = True

    def __init__(
        self,
        client: AtroposClient,
        batcher: Batcher,
        lag: LagMeter,
        *,
        registration: dict[str, Any],
        poll_timeout_s: float,
        spool: GroupSpool | None = None,
        drain_max_sequences: int = 0,
        waits: WaitReport | None = None,
    ) -> None:
        self.client = client
        self.batcher = batcher
        self.lag = lag
        self.registration = dict(registration)
        self.poll_timeout_s = float(poll_timeout_s)
        self.spool = spool
        self.drain_max_sequences = int(drain_max_sequences)
        self.waits = waits
        self.registered_step: int | None = None
        self._step = 0  # the step being assembled or trained: fetched groups are spooled under it
        self._seen: set[str] = set()  # guard ids fetched by this process (de-duplication without a spool)
        self.duplicates = 0

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        """Register at ``step``; environments are admitted once the API's first ``/batch`` answers, so ask at once
        (a queue restored by the guarded API answers it with groups: they are spooled under this step)."""
        self._step = int(step)
        self.client.register(starting_step=int(step), **self.registration)
        self.registered_step = int(step)
        self.batcher.add(self._spooled(self.client.get_batch() or []))

    def resume(self, step: int) -> None:
        if self.registered_step is None:  # start() was skipped (a subclass overrode the trainer's init_workers)
            self.start(step)
        elif self.registered_step != step:
            raise RuntimeError(
                f"registered with the Atropos API at step {self.registered_step} but the checkpoint load resumed at "
                f"step {step}: check trainer.resume_mode / trainer.resume_from_path"
            )
        if self.spool is not None:
            self.batcher.add(self.spool.resume(step, self.lag.max_policy_lag, self.lag.lags), front=True)

    def next_groups(self, step: int, metrics: dict[str, float]) -> list[ScoredGroup]:
        self._step = int(step)
        self.batcher.refresh()
        start, polls = time.monotonic(), 0
        while (chosen := self.batcher.select(time.monotonic() - start, lambda g: self.lag.is_stale(g, step))) is None:
            self.batcher.add(self._spooled(self._poll(step)))
            self.batcher.refresh()
            polls += 1
        if self.waits is not None:
            self.waits.done()
        metrics.update({"atropos/polls": float(polls), "atropos/poll_wait_s": time.monotonic() - start})
        metrics.update(self.lag.metrics(chosen, step))
        metrics.update(self.batcher.metrics(chosen))
        return chosen

    def _poll(self, step: int) -> list[ScoredGroup]:
        """One poll for a batch; the wait is marked for the launcher, a timeout says what every service saw."""
        if self.waits is None:
            return self.client.poll_batch(timeout=self.poll_timeout_s)
        self.waits.waiting(step)
        try:
            return self.client.poll_batch(timeout=self.poll_timeout_s)
        except AtroposAPIError as error:
            raise AtroposAPIError(f"{error}\n{self.waits.gave_up(step)}") from error

    def trained(self, groups: list[ScoredGroup], step: int) -> None:
        if self.spool is not None:
            self.spool.trained(groups, step, carried=self.batcher.pending_groups())

    def checkpointed(self, step: int) -> None:
        if self.spool is not None:
            self.spool.checkpointed(step)

    def prefetch(self, step: int) -> None:
        if self.spool is not None and self.drain_max_sequences > 0:
            self.batcher.add(self._spooled(self.client.drain(self.drain_max_sequences)))

    def _spooled(self, groups: list[ScoredGroup]) -> list[ScoredGroup]:
        """Spool ``groups`` (duplicates dropped), then acknowledge their ids to the guarded API."""
        kept = []
        for group in groups:
            gid = group_id(group)
            if self.spool is not None:
                if self.spool.put(group, fetched_step=self._step) is None:
                    continue
            elif gid is not None:
                if gid in self._seen:
                    self.duplicates += 1
                    continue
                self._seen.add(gid)
            kept.append(group)
        ids = [gid for group in groups if (gid := group_id(group))]
        if ids:
            self.client.ack(ids)
        return kept

    # ---- metrics and checkpoints ----------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        out = self.client.metrics()
        if self.spool is None:
            out["atropos/duplicate_groups"] = float(self.duplicates)
        if self.spool is not None:
            out.update(self.spool.metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        """The source and the mixture's cumulative counts (held groups are in the spool, not in checkpoints)."""
        return {"source": "atropos", "mixture": self.batcher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mixture"):
            self.batcher.load_state_dict(state["mixture"])
