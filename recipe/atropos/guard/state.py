"""State of the guarded API (``python -m recipe.atropos.guard.app``): counters, the rejected groups, the journal.

Invariants: the stats file holds the current counters, replaced whole after every change (accepted groups: as the
journal's fsync covering them starts, before they are answered), so they survive an API restart, a SIGKILL too
(``starts`` counts the processes that used it). It is not fsynced: the page cache outlives a killed process, and
fsyncing the file and its directory held the event loop 8 ms a request (p50, up to 240 ms on the 2-core test box);
the journal, which must survive a power loss, is fsynced. A rejected group is one line of the
rejected-groups file (:class:`recipe.atropos.records.RejectedGroupLog`); an accepted group is in the journal
(:class:`recipe.atropos.guard.journal.GroupJournal`) until the trainer acknowledges it, and atroposlib's memory holds
at most :meth:`GuardState.bound` sequences of them (the rest wait on disk).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe.atropos.guard.journal import GroupCommit, GroupJournal
from recipe.atropos.records import RejectedGroupLog
from recipe.atropos.schema import GroupValidationError

logger = logging.getLogger("atropos_api_guard")

PERSISTED = ("accepted_groups", "accepted_sequences", "acked_groups", "unknown_acks", "requeued_groups")
DEFAULT_BOUND_BATCHES = 4  # without --max-queued-sequences: this many batches in memory


def _option(kind: type, help_text: str) -> Any:
    """A setting that is also a command-line option: None by default; ``kind`` and ``help_text`` for argparse."""
    return field(default=None, metadata={"type": kind, "help": help_text})


@dataclass(frozen=True)
class GuardSettings:
    """What a guard starts with: :class:`GuardState`'s inputs, and the options of its command line
    (``--vocab-size`` ... ``--max-queued-sequences``, :func:`recipe.atropos.guard.app.guard_argv`)."""

    vocab_size: int | None = _option(int, "token ids must be below this")
    batch_size: int | None = _option(int, "until the trainer registers its own")
    rejected_file: str | Path | None = _option(str, "append rejected groups (JSONL) here")
    stats_file: str | Path | None = _option(str, "counters, kept across restarts")
    journal_dir: str | Path | None = _option(str, "accepted groups until acknowledged (default: a temporary directory)")
    max_queued_sequences: int | None = _option(
        int, f"most sequences in memory (default: {DEFAULT_BOUND_BATCHES} batches)"
    )


class GuardState:
    """Counters of the guard (optionally persisted across restarts), the rejected-groups log and the journal
    (``settings.journal_dir``; None = a temporary directory, so nothing survives the process)."""

    def __init__(self, settings: GuardSettings) -> None:
        vocab_size, batch_size = settings.vocab_size, settings.batch_size
        rejected_file, stats_file, journal_dir = settings.rejected_file, settings.stats_file, settings.journal_dir
        max_queued_sequences = settings.max_queued_sequences
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.max_queued_sequences = max_queued_sequences
        self.rejected_log = RejectedGroupLog(rejected_file, what="a ScoredData group (422)")
        self.stats_file = Path(stats_file) if stats_file else None
        self.counts = dict.fromkeys(PERSISTED, 0)
        self.starts = 1
        self.unpackable_envs: list[dict[str, Any]] = []
        self.refused_requests = 0  # clients outside atropos.launcher.api_allow (403, recipe.atropos.access)
        # Per env id (as posted in ScoredData.env_id), this API process only: groups received (accepted + rejected),
        # rejected, the Unix time of its last post and the reason of its last rejection.
        self.envs: dict[str, dict[str, Any]] = {}
        if self.stats_file is not None:
            self.stats_file.parent.mkdir(parents=True, exist_ok=True)
        if self.stats_file is not None and self.stats_file.exists():
            old = json.loads(self.stats_file.read_text())
            self.counts.update({k: int(old.get(k, 0)) for k in PERSISTED})
            self.rejected.update({k: int(v) for k, v in old.get("rejected", {}).items()})
            self.starts = int(old.get("starts", 0)) + 1
            self.refused_requests = int(old.get("refused_requests", 0))
        self.journal = GroupJournal(journal_dir or tempfile.mkdtemp(prefix="atropos_guard_journal_"))
        self.commit = GroupCommit(self.journal, before_fsync=self.save)
        self.resumed_groups = len(self.journal.entries)  # unacknowledged groups found at start
        self.save()

    @property
    def rejected(self) -> Counter[str]:
        """Rejected groups by the field named in the rejection (persisted with the other counters)."""
        return self.rejected_log.counts

    def bound(self, batch_size: int | None) -> int | None:
        """Most sequences atroposlib's memory holds (None: no batch size known yet, nothing can be queued)."""
        if self.max_queued_sequences:
            return max(int(self.max_queued_sequences), batch_size or 0)
        return DEFAULT_BOUND_BATCHES * batch_size if batch_size else None

    def counters(self) -> dict[str, Any]:
        return {
            **self.counts,
            "rejected_groups": sum(self.rejected.values()),
            "rejected": dict(self.rejected),
            "starts": self.starts,
            "resumed_groups": self.resumed_groups,
            "journal": str(self.journal.dir),
            "journal_groups": len(self.journal.entries),
            **{k: v for k, v in self.journal.depth().items() if k != "backlog_sequences_by_env"},
            "max_queued_sequences": self.bound(current_batch_size(self)),
            "unpackable_envs": self.unpackable_envs,
            "refused_requests": self.refused_requests,
            "envs": self.envs,
        }

    def count_refused(self) -> None:
        self.refused_requests += 1
        self.save()

    def save(self) -> None:
        """Replace the stats file whole (a reader never sees half of it), without fsync (module docstring)."""
        if self.stats_file is not None:
            tmp = self.stats_file.with_name(f".{self.stats_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.counters(), default=str))
            os.replace(tmp, self.stats_file)

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

    async def accept(self, groups: list[dict[str, Any]], posted: list[bytes | None] | None = None) -> list[str]:
        """Journal and count ``groups`` (``posted``: see :meth:`GroupJournal.append`); their ids once they are durable.
        One fsync, off the event loop, covers the posts written meanwhile, and the stats file is saved as it starts
        (once per fsync, not once per post)."""
        ids = self.journal.append(groups, durable=False, posted=posted)
        self.counts["accepted_groups"] += len(groups)
        self.counts["accepted_sequences"] += sum(len(g["tokens"]) for g in groups)
        for group in groups:
            self._env(group.get("env_id"))
        await self.commit.durable(self.commit.wrote())
        return ids

    def ack(self, ids: list[str]) -> tuple[int, int]:
        acked, unknown = self.journal.ack(ids)
        self.counts["acked_groups"] += acked
        self.counts["unknown_acks"] += unknown
        self.save()
        return acked, unknown

    def requeue_out(self) -> int:
        n = self.journal.requeue_out()
        if n:
            self.counts["requeued_groups"] += n
            logger.info(
                "a trainer registered: %d groups handed to an earlier one and never acknowledged are queued again", n
            )
            self.save()
        return n


def api_state() -> Any:
    from atroposlib.api import server

    return server.app.state


def current_batch_size(state: GuardState) -> int | None:
    """The batch size registered by the trainer, else the one given on the command line."""
    registered = getattr(api_state(), "batchsize", None)
    if isinstance(registered, int) and registered > 0:
        return registered
    return state.batch_size


def queue_report(batch_size: int | None) -> dict[str, Any]:
    """Group sizes waiting in the API's queue and whether atroposlib can form a batch from them."""
    from atroposlib.api.utils import grab_exact_from_heterogeneous_queue

    api = api_state()
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
