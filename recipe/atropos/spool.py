"""A durable on-disk spool of fetched ScoredData groups: written before use, deleted only once trained and saved.

Written by the trainer driver (its group source); read by the launcher's accounting (:func:`spool_ids`).

``GET /batch`` pops groups from the API's in-memory queue: a trainer that crashes or is interrupted after fetching
them would lose them. The group source writes every fetched group here first (one JSON file per group, temporary file
+ fsync + rename), the trainer marks the groups it trained, and files are deleted when a checkpoint that includes that
training is saved (right away when the run saves no checkpoints). A resumed run takes the spooled groups back, oldest
first; those past the policy-lag cap go to ``stale.jsonl`` with the reason (kept for offline use, counted), never
silently dropped. Layout under ``<trainer.default_local_dir>/spool/`` (names: :class:`recipe.atropos.rundir.SpoolDir`)::

    pending/<seq>.json   {"seq", "fetched_step", "group": ScoredData}
    stale.jsonl          one line per group set aside, with "reason"
    trained.jsonl        {"ids": [...], "step"}: the guard ids of the groups trained and saved (their files deleted)
    ledger.jsonl         the endpoint's completion ledger (:class:`recipe.atropos.endpoint.ledger.CompletionLedger`)
    counters.json        written / trained / deleted / stale / recovered / duplicates totals over every run sharing
                         this directory (nothing fetched is lost: written == deleted + stale + pending files), and the
                         files being removed ("removing")

De-duplication: a group carrying a guard id (:func:`recipe.atropos.schema.group_id`) that is pending, trained or set
aside already is not written again (``put`` returns None, ``duplicates`` counts it): the guarded API delivers at least
once, the spool makes it exactly once. A pending file whose id is in ``trained.jsonl`` (a kill between the two
writes) is deleted on resume, not trained again.

A file leaves ``pending/`` only after the counters that account for it are on disk together with its name under
``removing``; a spool opened after a crash in between finishes those removals, so the identity above holds at any
kill point.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recipe.atropos.records import append_jsonl, read_jsonl, write_json_atomic
from recipe.atropos.rundir import SpoolDir
from recipe.atropos.rundir import spool_dir as spool_path
from recipe.atropos.schema import GroupValidationError, ScoredGroup, group_id, validate_group
from recipe.atropos.staleness import lag_lower_bound

if TYPE_CHECKING:  # the typed config imports verl: the launcher's accounting reads a spool without it
    from recipe.atropos.config import AtroposConfig

logger = logging.getLogger(__name__)

COUNTERS = ("written", "trained", "deleted", "stale", "recovered", "duplicates")
LagsOf = Callable[[ScoredGroup, int], "list[int | None]"]  # a group's per-sequence lags at a step (None: unknown)


def spool_dir(atropos: AtroposConfig, trainer_cfg: Any) -> Path | None:
    """``atropos.spool.dir``, else ``<trainer.default_local_dir>/spool``; None when the spool is off."""
    if not atropos.spool.enable:
        return None
    return spool_path(str(trainer_cfg.default_local_dir), atropos.spool.dir)


def ledger_file(atropos: AtroposConfig, trainer_cfg: Any) -> Path | None:
    """Where the completion ledger is kept beside the spool (None: spool off, the ledger lives in memory only)."""
    directory = spool_dir(atropos, trainer_cfg)
    return None if directory is None else SpoolDir(directory).ledger


class GroupSpool:
    """Fetched groups on disk until trained; see the module docstring."""

    def __init__(self, directory: str | Path, *, delete_on_checkpoint: bool = True) -> None:
        self.files = SpoolDir(directory)
        self.dir = self.files.root
        self.pending_dir = self.files.pending
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.stale_file = self.files.stale
        self.counters_file = self.files.counters
        self.trained_file = self.files.trained
        self.delete_on_checkpoint = delete_on_checkpoint
        self.counters = dict.fromkeys(COUNTERS, 0)
        if self.counters_file.exists():
            self.counters.update(json.loads(self.counters_file.read_text()))
        for seq in self.counters.pop("removing", []):  # accounted for before a crash cut the removal short
            self._path(seq).unlink(missing_ok=True)
        existing = [int(p.stem) for p in self.pending_dir.glob("*.json")]
        self._next_seq = max([self.counters.get("last_seq", -1), *existing], default=-1) + 1
        # Handed out, neither trained nor set aside yet: seq -> the group object. Holding the object keeps its id()
        # unique while it is out, so the groups the trainer hands back are matched by identity.
        self._out: dict[int, ScoredGroup] = {}
        self._trained: dict[int, int] = {}  # seq -> step it was trained in (awaiting a checkpoint)
        # Guard ids: of the pending files (seq -> id), trained and saved, set aside; together the ids already seen.
        self._ids: dict[int, str] = {}
        for path in self.pending_dir.glob("*.json"):
            gid = group_id(json.loads(path.read_text()).get("group") or {})
            if gid:
                self._ids[int(path.stem)] = gid
        self.trained_ids = {i for row in read_jsonl(self.trained_file) for i in row.get("ids", [])}
        self.seen = {*self._ids.values(), *self.trained_ids}
        self.seen.update(gid for row in read_jsonl(self.stale_file) if (gid := group_id(row.get("group") or {})))

    @classmethod
    def from_config(cls, atropos: AtroposConfig, trainer_cfg: Any) -> GroupSpool | None:
        """``<trainer.default_local_dir>/spool`` (or ``atropos.spool.dir``); None when ``atropos.spool.enable`` off."""
        directory = spool_dir(atropos, trainer_cfg)
        if directory is None:
            return None
        return cls(directory, delete_on_checkpoint=int(trainer_cfg.get("save_freq", -1)) > 0)

    def _seqs(self, groups: Iterable[Any]) -> set[int]:
        """Sequence numbers of the handed-out groups among ``groups`` (by identity; others are ignored)."""
        by_id = {id(group): seq for seq, group in self._out.items()}
        return {by_id[id(g)] for g in groups if id(g) in by_id}

    # ---- bookkeeping --------------------------------------------------------------------------------------
    def _path(self, seq: int) -> Path:
        return self.files.pending_file(seq)

    def _save_counters(self) -> None:
        self._save_counters_removing([])

    def _save_counters_removing(self, removing: list[int]) -> None:
        write_json_atomic(self.counters_file, {**self.counters, "last_seq": self._next_seq - 1, "removing": removing})

    def _remove(self, seqs: list[int], counter: str) -> None:
        """Count ``seqs`` under ``counter``, durably, then delete their files (see the module docstring)."""
        if not seqs:
            return
        ids = [self._ids[seq] for seq in seqs if seq in self._ids]
        if counter == "deleted" and ids:  # trained and saved: the record de-duplicates and accounts by id
            append_jsonl(self.trained_file, [{"ids": ids, "time": time.time()}], fsync=True)
            self.trained_ids.update(ids)
        for seq in seqs:
            self._ids.pop(seq, None)
        self.counters[counter] += len(seqs)
        self._save_counters_removing(seqs)
        for seq in seqs:
            self._path(seq).unlink(missing_ok=True)

    def pending_count(self) -> int:
        return sum(1 for _ in self.pending_dir.glob("*.json"))

    def metrics(self) -> dict[str, float]:
        out = {f"atropos/spool_{k}": float(self.counters[k]) for k in COUNTERS}
        out["atropos/spool_pending"] = float(self.pending_count())
        return out

    # ---- the life of a group ------------------------------------------------------------------------------
    def put(self, group: ScoredGroup, *, fetched_step: int) -> int | None:
        """Write ``group`` durably and hand it out; returns its sequence number (None: a duplicate, dropped)."""
        gid = group_id(group)
        if gid is not None and gid in self.seen:
            self.counters["duplicates"] += 1
            self._save_counters()
            logger.info("spool: group %s was delivered again; already spooled, trained or set aside: dropped", gid)
            return None
        seq = self._next_seq
        self._next_seq += 1
        record = {"seq": seq, "fetched_step": fetched_step, "time": time.time(), "group": group.model_dump()}
        write_json_atomic(self._path(seq), record)
        self._out[seq] = group
        if gid is not None:
            self._ids[seq] = gid
            self.seen.add(gid)
        self.counters["written"] += 1
        self._save_counters()
        return seq

    def _set_aside(self, seq: int, reason: str, record: dict[str, Any] | None = None) -> None:
        path = self._path(seq)
        if record is None:
            try:
                record = json.loads(path.read_text())
            except FileNotFoundError:
                return
        append_jsonl(self.stale_file, [{**record, "reason": reason, "set_aside_at": time.time()}], fsync=True)
        self._out.pop(seq, None)
        self._remove([seq], "stale")
        logger.info("spool: group %d set aside (%s)", seq, reason)

    def trained(self, groups: Iterable[Any], step: int, carried: Iterable[Any] = ()) -> None:
        """``groups`` were trained at ``step``; handed-out groups in neither list were dropped as stale."""
        trained, kept = self._seqs(groups), self._seqs(carried)
        for seq in sorted(set(self._out) - trained - kept):
            self._set_aside(seq, f"dropped at step {step}: policy lag over atropos.max_policy_lag")
        for seq in trained:
            self._out.pop(seq, None)
            self.counters["trained"] += 1
            if self.delete_on_checkpoint:
                self._trained[seq] = step
        if self.delete_on_checkpoint:
            self._save_counters()
        else:
            self._remove(sorted(trained), "deleted")

    def checkpointed(self, step: int) -> int:
        """A checkpoint of ``step`` is saved: delete the groups trained up to it; returns how many."""
        done = sorted(seq for seq, trained_at in self._trained.items() if trained_at <= step)
        for seq in done:
            del self._trained[seq]
        self._remove(done, "deleted")
        return len(done)

    def resume(self, step: int, max_policy_lag: int | None, lags_of: LagsOf | None = None) -> list[ScoredGroup]:
        """Groups left by an earlier run, oldest first, to train after resuming at ``step``.

        A group's lag at the next step is its largest known lag (``lags_of``: the endpoint's ledger, kept on disk, so
        exact), else at least :func:`~recipe.atropos.staleness.lag_lower_bound` of the step it was fetched at; groups
        over ``max_policy_lag`` (None = no cap) are set aside. A group already trained and saved is deleted.
        """
        out = []
        for path in sorted(self.pending_dir.glob("*.json")):
            seq = int(path.stem)
            if seq in self._out or seq in self._trained:
                continue
            if self._ids.get(seq) in self.trained_ids:
                self._remove([seq], "deleted")  # its removal was cut short after the trained record
                continue
            record = json.loads(path.read_text())
            try:
                group = validate_group(record["group"])
            except GroupValidationError as error:
                self._set_aside(seq, f"on resume: invalid group ({error})", record)
                continue
            known = [lag for lag in (lags_of(group, step + 1) if lags_of else []) if lag is not None]
            lag = max(known) if known else lag_lower_bound(step + 1, int(record["fetched_step"]))
            if max_policy_lag is not None and lag > max_policy_lag:
                how = "" if known else ">= "
                self._set_aside(seq, f"on resume at step {step}: policy lag {how}{lag} > {max_policy_lag}", record)
                continue
            self._out[seq] = group
            out.append(group)
        self.counters["recovered"] += len(out)
        self._save_counters()
        if out:
            logger.info("spool: %d groups from an earlier run will be trained first", len(out))
        return out


def spool_ids(directory: str | Path) -> tuple[set[str], dict[str, str], set[str]]:
    """Guard ids in the spool at ``directory``: (trained and saved, set aside -> reason, pending), from its files."""
    files = SpoolDir(directory)
    trained = {i for row in read_jsonl(files.trained) for i in row.get("ids", [])}
    set_aside = {}
    for row in read_jsonl(files.stale):
        gid = group_id(row.get("group") or {})
        if gid:
            set_aside[gid] = str(row.get("reason", ""))
    pending = set()
    for path in files.pending.glob("*.json"):
        try:
            gid = group_id(json.loads(path.read_text()).get("group") or {})
        except (OSError, ValueError):
            continue  # removed meanwhile
        if gid:
            pending.add(gid)
    return trained, set_aside, pending
