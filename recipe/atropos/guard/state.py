"""State of the guarded API (``python -m recipe.atropos.guard.app``): counters, the rejected groups, the queue file.

Invariants: the stats file always holds the current counters, replaced whole after every change, so they survive an
API restart (``starts`` counts the processes that used it); a rejected group is one line of the rejected-groups file
(:class:`recipe.atropos.records.RejectedGroupLog`); the groups the API holds at a clean stop are written to the queue
file in one atomic replacement and put back at the front of the next API's queue, once, after the trainer registers
(the file is then renamed, never restored twice).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from recipe.atropos.records import RejectedGroupLog, read_jsonl, write_atomic, write_json_atomic
from recipe.atropos.schema import GroupValidationError

logger = logging.getLogger("atropos_api_guard")


class GuardState:
    """Counters of the guard (optionally persisted across restarts), the rejected-groups log and the queue file."""

    def __init__(
        self,
        *,
        vocab_size: int | None,
        batch_size: int | None,
        rejected_file: str | None = None,
        stats_file: str | None = None,
        queue_file: str | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.queue_file = Path(queue_file) if queue_file else None
        self.restored_groups = 0
        self.dumped_groups = 0
        self.batch_size = batch_size
        self.rejected_log = RejectedGroupLog(rejected_file, what="a ScoredData group (422)")
        self.stats_file = Path(stats_file) if stats_file else None
        self.accepted_groups = 0
        self.accepted_sequences = 0
        self.starts = 1
        self.unpackable_envs: list[dict[str, Any]] = []
        self.refused_requests = 0  # clients outside atropos.launcher.api_allow (403, recipe.atropos.access)
        # Per env id (as posted in ScoredData.env_id), this API process only: groups received (accepted + rejected),
        # rejected, the Unix time of its last post and the reason of its last rejection.
        self.envs: dict[str, dict[str, Any]] = {}
        if self.stats_file is not None and self.stats_file.exists():
            old = json.loads(self.stats_file.read_text())
            self.accepted_groups = int(old.get("accepted_groups", 0))
            self.accepted_sequences = int(old.get("accepted_sequences", 0))
            self.rejected.update({k: int(v) for k, v in old.get("rejected", {}).items()})
            self.starts = int(old.get("starts", 0)) + 1
            self.restored_groups = int(old.get("restored_groups", 0))
            self.dumped_groups = int(old.get("dumped_groups", 0))
            self.refused_requests = int(old.get("refused_requests", 0))
        self.to_restore: list[dict[str, Any]] = []
        if self.queue_file is not None:
            self.to_restore = read_jsonl(self.queue_file)
        self.save()

    @property
    def rejected(self) -> Counter[str]:
        """Rejected groups by the field named in the rejection (persisted with the other counters)."""
        return self.rejected_log.counts

    def counters(self) -> dict[str, Any]:
        return {
            "accepted_groups": self.accepted_groups,
            "accepted_sequences": self.accepted_sequences,
            "rejected_groups": sum(self.rejected.values()),
            "rejected": dict(self.rejected),
            "starts": self.starts,
            "restored_groups": self.restored_groups,
            "dumped_groups": self.dumped_groups,
            "unpackable_envs": self.unpackable_envs,
            "refused_requests": self.refused_requests,
            "envs": self.envs,
        }

    def count_refused(self) -> None:
        self.refused_requests += 1
        self.save()

    def save(self) -> None:
        if self.stats_file is not None:
            write_json_atomic(self.stats_file, self.counters())

    def reject(self, raw: Any, error: GroupValidationError) -> None:
        """Count ``raw`` by field, keep it with the reason in the rejected-groups file, persist the counters."""
        self.rejected_log.reject(raw, error)
        env = self._env(raw.get("env_id") if isinstance(raw, dict) else None)
        env["rejected"] += 1
        env["last_rejection"] = str(error)[:300]
        self.save()

    def _env(self, env_id: Any) -> dict[str, Any]:
        """The counters of ``env_id`` (``"none"`` when the group named none), its last post now."""
        env = self.envs.setdefault(str(env_id) if env_id is not None else "none", {"received": 0, "rejected": 0})
        env["received"] += 1
        env["last_post"] = time.time()
        return env

    def restore_into_queue(self) -> None:
        """Put the groups of an earlier API (``queue_file``) at the front of the queue; once, after /register."""
        if not self.to_restore:
            return
        api = _api_state()
        api.queue[:0] = self.to_restore
        self.restored_groups += len(self.to_restore)
        logger.info("restored %d groups left by the previous API from %s", len(self.to_restore), self.queue_file)
        self.to_restore = []
        self.queue_file.rename(self.queue_file.with_name(f"{self.queue_file.name}.restored-{self.starts}"))
        self.save()

    def dump_queue(self) -> int:
        """Write every group the API still holds to ``queue_file`` (atomically); how many."""
        if self.queue_file is None:
            return 0
        api = _api_state()
        groups = [g for batch in getattr(api, "curr_batch", []) for g in batch]
        groups += list(getattr(api, "queue", []))
        groups += [g for buffered in getattr(api, "buffer", {}).values() for g in buffered]
        groups += self.to_restore  # never restored (no trainer registered): keep them for the next start
        write_atomic(self.queue_file, "".join(json.dumps(g) + "\n" for g in groups))
        self.dumped_groups += len(groups)
        self.save()
        logger.info("wrote the %d groups the API still held to %s", len(groups), self.queue_file)
        return len(groups)

    def accept(self, n_groups: int, n_sequences: int, env_ids: list[Any] = ()) -> None:
        """Count accepted groups; ``env_ids``: the ``env_id`` of each (per-env counters)."""
        self.accepted_groups += n_groups
        self.accepted_sequences += n_sequences
        for env_id in env_ids:
            self._env(env_id)
        self.save()


def _api_state() -> Any:
    from atroposlib.api import server

    return server.app.state


def current_batch_size(state: GuardState) -> int | None:
    """The batch size registered by the trainer, else the one given on the command line."""
    registered = getattr(_api_state(), "batchsize", None)
    if isinstance(registered, int) and registered > 0:
        return registered
    return state.batch_size


def queue_report(batch_size: int | None) -> dict[str, Any]:
    """Group sizes waiting in the API's queue and whether atroposlib can form a batch from them."""
    from atroposlib.api.utils import grab_exact_from_heterogeneous_queue

    api = _api_state()
    queue = list(getattr(api, "queue", []))
    sizes = Counter(len(item.get("tokens", [])) for item in queue)
    can_form = None  # unknown, or too few sequences to tell
    if batch_size and sum(size * n for size, n in sizes.items()) >= batch_size:
        can_form = grab_exact_from_heterogeneous_queue(list(queue), batch_size)[0] is not None
    return {
        "queue_groups": len(queue),
        "queue_sequences": sum(size * n for size, n in sizes.items()),
        "queue_group_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "cached_batches": len(getattr(api, "curr_batch", [])),
        "cached_groups": sum(len(batch) for batch in getattr(api, "curr_batch", [])),
        "batch_size": batch_size,
        "can_form_batch": can_form,
    }
