"""A durable on-disk spool of fetched ScoredData groups: written before use, deleted only once trained and saved.

``GET /batch`` pops groups from the API's in-memory queue: a trainer that crashes or is interrupted after fetching
them would lose them. The client writes every fetched group here first (one JSON file per group, temporary file +
fsync + rename), the trainer marks the groups it trained, and files are deleted when a checkpoint that includes that
training is saved (right away when the run saves no checkpoints). A resumed run takes the spooled groups back, oldest
first; those past the policy-lag cap go to ``stale.jsonl`` with the reason (kept for offline use, counted), never
silently dropped. Layout under ``<trainer.default_local_dir>/spool/``::

    pending/<seq>.json   {"seq", "fetched_step", "group": ScoredData}
    stale.jsonl          one line per group set aside, with "reason"
    counters.json        written / trained / deleted / stale / recovered totals over every run sharing this directory
                         (nothing fetched is lost: written == deleted + stale + pending files)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from recipe.atropos.schema import GroupValidationError, ScoredGroup, validate_group

logger = logging.getLogger(__name__)

COUNTERS = ("written", "trained", "deleted", "stale", "recovered")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power loss
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class GroupSpool:
    """Fetched groups on disk until trained; see the module docstring."""

    def __init__(self, directory: str | Path, *, delete_on_checkpoint: bool = True) -> None:
        self.dir = Path(directory)
        self.pending_dir = self.dir / "pending"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.stale_file = self.dir / "stale.jsonl"
        self.counters_file = self.dir / "counters.json"
        self.delete_on_checkpoint = delete_on_checkpoint
        self.counters = dict.fromkeys(COUNTERS, 0)
        if self.counters_file.exists():
            self.counters.update(json.loads(self.counters_file.read_text()))
        existing = [int(p.stem) for p in self.pending_dir.glob("*.json")]
        self._next_seq = max([self.counters.get("last_seq", -1), *existing], default=-1) + 1
        self._out: set[int] = set()  # handed to the trainer, neither trained nor set aside yet
        self._trained: dict[int, int] = {}  # seq -> step it was trained in (awaiting a checkpoint)

    @classmethod
    def from_config(cls, config: Any) -> GroupSpool | None:
        """``<trainer.default_local_dir>/spool`` (or ``atropos.spool.dir``); None when ``atropos.spool.enable`` off."""
        scfg = config.atropos.get("spool") or {}
        if not scfg.get("enable", True):
            return None
        directory = scfg.get("dir") or Path(str(config.trainer.default_local_dir)) / "spool"
        return cls(directory, delete_on_checkpoint=int(config.trainer.get("save_freq", -1)) > 0)

    # ---- bookkeeping --------------------------------------------------------------------------------------
    def _path(self, seq: int) -> Path:
        return self.pending_dir / f"{seq:010d}.json"

    def _save_counters(self) -> None:
        _write_atomic(self.counters_file, json.dumps({**self.counters, "last_seq": self._next_seq - 1}))

    def pending_count(self) -> int:
        return sum(1 for _ in self.pending_dir.glob("*.json"))

    def metrics(self) -> dict[str, float]:
        out = {f"atropos/spool_{k}": float(self.counters[k]) for k in COUNTERS}
        out["atropos/spool_pending"] = float(self.pending_count())
        return out

    # ---- the life of a group ------------------------------------------------------------------------------
    def put(self, group: ScoredGroup, *, fetched_step: int) -> int:
        """Write ``group`` durably; its sequence number is set on ``group.spool_id`` and returned."""
        seq = self._next_seq
        self._next_seq += 1
        record = {"seq": seq, "fetched_step": fetched_step, "time": time.time(), "group": group.model_dump()}
        _write_atomic(self._path(seq), json.dumps(record))
        group.spool_id = seq
        self._out.add(seq)
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
        with open(self.stale_file, "a") as fh:
            fh.write(json.dumps({**record, "reason": reason, "set_aside_at": time.time()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        path.unlink(missing_ok=True)
        self._out.discard(seq)
        self.counters["stale"] += 1
        logger.info("spool: group %d set aside (%s)", seq, reason)

    def trained(self, groups: Iterable[Any], step: int, carried: Iterable[Any] = ()) -> None:
        """``groups`` were trained at ``step``; handed-out groups in neither list were dropped as stale."""
        trained = {g.spool_id for g in groups if getattr(g, "spool_id", None) is not None}
        kept = {g.spool_id for g in carried if getattr(g, "spool_id", None) is not None}
        for seq in sorted(self._out - trained - kept):
            self._set_aside(seq, f"dropped at step {step}: policy lag over atropos.max_policy_lag")
        for seq in trained:
            self._out.discard(seq)
            self.counters["trained"] += 1
            if self.delete_on_checkpoint:
                self._trained[seq] = step
            else:
                self._path(seq).unlink(missing_ok=True)
                self.counters["deleted"] += 1
        self._save_counters()

    def checkpointed(self, step: int) -> int:
        """A checkpoint of ``step`` is saved: delete the groups trained up to it; returns how many."""
        done = [seq for seq, trained_at in self._trained.items() if trained_at <= step]
        for seq in done:
            self._path(seq).unlink(missing_ok=True)
            del self._trained[seq]
        self.counters["deleted"] += len(done)
        self._save_counters()
        return len(done)

    def resume(self, step: int, max_policy_lag: int | None) -> list[ScoredGroup]:
        """Groups left by an earlier run, oldest first, to train after resuming at ``step``.

        A group fetched during step ``s`` came from a policy no newer than version ``s - 1``, so its lag at the next
        step is at least ``step - (s - 1)``; groups over ``max_policy_lag`` (None = no cap) are set aside.
        """
        out = []
        for path in sorted(self.pending_dir.glob("*.json")):
            seq = int(path.stem)
            if seq in self._out or seq in self._trained:
                continue
            record = json.loads(path.read_text())
            lag = step - (int(record["fetched_step"]) - 1)
            if max_policy_lag is not None and lag > max_policy_lag:
                self._set_aside(seq, f"on resume at step {step}: policy lag >= {lag} > {max_policy_lag}", record)
                continue
            try:
                group = validate_group(record["group"])
            except GroupValidationError as error:
                self._set_aside(seq, f"on resume: invalid group ({error})", record)
                continue
            group.spool_id = seq
            self._out.add(seq)
            out.append(group)
        self.counters["recovered"] += len(out)
        self._save_counters()
        if out:
            logger.info("spool: %d groups from an earlier run will be trained first", len(out))
        return out
