"""Where every group of a run went, by the id the guarded API gave it: posted, trained, set aside, pending, lost.

Read from the run's files only (the API's journal, its counters, the trainer's spool and rejected-groups file), so it
works after any kill. Definitions (each a set of ids, disjoint, in this order of precedence):

- *posted*: every group the guarded API answered: the ids its journal ever issued, plus the groups it refused with 422
  (those have no id; they are set aside as ``rejected by the API (<field>)``);
- *trained*: in the spool's ``trained.jsonl`` (trained, and saved by a checkpoint when the run saves them);
- *set aside*: by the spool (``stale.jsonl``: over the policy-lag cap, invalid on resume) or refused by the trainer's
  client (its rejected-groups file), each with the reason;
- *pending*: not acknowledged in the API's journal (the next API serves it) or in the spool's ``pending/`` (the next
  trainer trains it);
- *lost*: posted with an id and in none of the above, computed as a set difference, never assumed.

So ``posted = trained + set aside + pending + lost`` holds by construction, and ``lost`` names real ids.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from recipe.atropos.guard.journal import journal_ids
from recipe.atropos.records import read_jsonl
from recipe.atropos.schema import group_id
from recipe.atropos.spool import spool_ids


@dataclass
class GroupAccount:
    posted: int
    trained: int
    set_aside: Counter[str] = field(default_factory=Counter)  # reason -> groups
    pending: int = 0
    lost_ids: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return len(self.lost_ids)

    @property
    def set_aside_total(self) -> int:
        return sum(self.set_aside.values())

    def line(self) -> str:
        """``groups: posted P, trained T, set aside S, pending N, lost L``."""
        return (
            f"groups: posted {self.posted}, trained {self.trained}, set aside {self.set_aside_total}, "
            f"pending {self.pending}, lost {self.lost}"
        )

    def reasons(self) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in sorted(self.set_aside.items()))


def _reason(text: str) -> str:
    """A spool reason without its step numbers: the kind of set-aside."""
    if "policy lag" in text:
        return "over the policy-lag cap"
    return "invalid on resume" if "invalid" in text else text


def account_groups(journal_dir: Path, guard_stats: Path, spool_dir: Path, trainer_rejected: Path) -> GroupAccount:
    """The account of a run from its files (see the module docstring); ``journal_dir`` must exist."""
    posted_ids, unacked = journal_ids(journal_dir)
    stats = json.loads(guard_stats.read_text()) if guard_stats.exists() else {}
    refused = {f"rejected by the API ({k})": int(v) for k, v in (stats.get("rejected") or {}).items()}
    trained_ids, stale, spooled = spool_ids(spool_dir)
    aside = {gid: _reason(reason) for gid, reason in stale.items()}
    for row in read_jsonl(trainer_rejected):
        gid = group_id(row.get("group") or {}) if isinstance(row.get("group"), dict) else None
        if gid:
            aside.setdefault(gid, f"rejected by the trainer ({row.get('field')})")
    trained = posted_ids & trained_ids
    aside_ids = (set(aside) & posted_ids) - trained
    pending = ((unacked | spooled) & posted_ids) - trained - aside_ids
    lost = posted_ids - trained - aside_ids - pending
    reasons = Counter(aside[gid] for gid in aside_ids)
    reasons.update(refused)
    return GroupAccount(
        posted=len(posted_ids) + sum(refused.values()),
        trained=len(trained),
        set_aside=reasons,
        pending=len(pending),
        lost_ids=sorted(lost),
    )
