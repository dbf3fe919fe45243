"""Offline training data: scored groups saved as JSON lines, served in step batches like the live API's.

``JsonlGroupSource`` reads files (or globs) of one ScoredData group per line — what atroposlib writes with
``--env.data_path_to_save_groups`` (``BaseEnv.handle_send_to_api`` → ``jsonlines``; the ``process`` command), and the
trainer's own ``rejected_groups_file`` records (``{"reason", "field", "group", "time"}``, the group is taken from
``"group"``). Every line goes through :func:`recipe.atropos.schema.validate_group`, as the live client's groups do.

- Bad lines (not JSON, not a valid group, or a group size that ``data.train_batch_size`` is not a multiple of) are
  rejected once, when the files are indexed: counted (``atropos/offline/rejected_lines`` and ``.../<field>``), logged
  and kept (appended with their reason and ``source`` = ``path:line`` to ``rejected_groups_file`` when set).
- Order: file order (globs sorted), line order; or, with ``shuffle``, a permutation per epoch seeded by
  ``seed + epoch``. Each step takes whole groups until exactly ``batch_size`` sequences; a group that does not fit
  is carried to the next step (before newer ones).
- ``epochs``: passes over the data; ``None`` cycles as long as the trainer asks. :meth:`steps_available` counts the
  steps that ``epochs`` passes allow (same assembly, sizes only).
- :meth:`state_dict` / :meth:`load_state_dict` hold the position (epoch, cursor, carried groups): verl stores it in
  each checkpoint (``data.pt``), so a resumed run continues at the next unread group.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.atropos.config import AtroposConfig
from recipe.atropos.records import RejectedGroupLog
from recipe.atropos.schema import GroupValidationError, ScoredGroup, validate_group
from recipe.atropos.sources.base import BaseGroupSource

logger = logging.getLogger(__name__)


class OfflineDataError(ValueError):
    """The JSONL source cannot serve a batch (no files, no valid group, or the data ran out)."""


@dataclass(frozen=True)
class IndexedLine:
    """A valid line: file index, byte offset of the line, line number (1-based), sequences in its group."""

    file: int
    offset: int
    line: int
    size: int


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs; each glob sorted), in order, without duplicates."""
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(Path(m).is_file() for m in matches):
            missing = pattern if not matches else next(m for m in matches if not Path(m).is_file())
            raise OfflineDataError(f"atropos.jsonl_paths: {missing!r} matches no file")
        files.extend(Path(m) for m in matches if Path(m) not in files)
    if not files:
        raise OfflineDataError("atropos.jsonl_paths is empty: give files or globs of saved ScoredData groups")
    return files


def parse_group_line(text: str) -> ScoredGroup:
    """One JSONL line → a validated group; a rejected-groups record yields its ``"group"``."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GroupValidationError("json", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(raw, dict) and "tokens" not in raw and "group" in raw and "reason" in raw:
        raw = raw["group"]  # a record of the trainer's rejected_groups_file
    return validate_group(raw)


class JsonlGroupSource(BaseGroupSource):
    """Step batches of whole groups from JSONL files (see the module doc); nothing generates, so ``online`` is False."""

    def __init__(
        self,
        paths: Sequence[str],
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        epochs: int | None = None,
        rejected_groups_file: str | None = None,
    ) -> None:
        self.files = expand_paths(paths)
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.epochs = bool(shuffle), int(seed), epochs
        self.rejected = RejectedGroupLog(rejected_groups_file, what="a JSONL line")
        self._pending_rejections: list[dict[str, Any]] = []  # written once per run, at the first batch
        self.lines = self._index()
        if not self.lines:
            raise OfflineDataError(
                f"no valid group in {[str(f) for f in self.files]} ({self.rejected.total} lines rejected: "
                f"{dict(self.rejected.counts)}); see the log or atropos.rejected_groups_file for the reasons"
            )
        self.epoch, self.cursor, self.carry = 0, 0, []  # carry: indices into self.lines
        self.groups_read = 0
        self.rejections_reported = False
        self._orders: dict[int, list[int]] = {}

    # ---- indexing ---------------------------------------------------------------------------------------------
    def _index(self) -> list[IndexedLine]:
        lines: list[IndexedLine] = []
        for f, path in enumerate(self.files):
            with open(path, "rb") as fh:
                offset, number = 0, 0
                for raw in fh:
                    number += 1
                    start, offset = offset, offset + len(raw)
                    text = raw.decode("utf-8", errors="replace").strip()
                    if not text:
                        continue
                    try:
                        group = parse_group_line(text)
                        if self.batch_size % group.size:
                            raise GroupValidationError(
                                "group_size",
                                f"{group.size} sequences: data.train_batch_size={self.batch_size} is not a multiple "
                                "of it (set a batch size every group size divides)",
                            )
                    except GroupValidationError as error:
                        self._reject(text, error, f"{path}:{number}")
                        continue
                    lines.append(IndexedLine(f, start, number, group.size))
        logger.info(
            "offline source: %d groups (%d sequences) from %d files, %d lines rejected",
            len(lines),
            sum(line.size for line in lines),
            len(self.files),
            self.rejected.total,
        )
        return lines

    def _reject(self, text: str, error: GroupValidationError, source: str) -> None:
        try:
            group: Any = json.loads(text)
        except json.JSONDecodeError:
            group = text
        self._pending_rejections.append(self.rejected.reject(group, error, source, write=False))

    def _report_rejections(self) -> None:
        """Append the indexing's rejections to the file once per run (not again after a resume)."""
        if not self.rejections_reported:
            self.rejections_reported = True
            self.rejected.write(self._pending_rejections)

    # ---- order and assembly -----------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.lines)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            self._orders = {epoch: order}  # only the current epoch's order is kept
        return self._orders[epoch]

    def _assemble(self, epoch: int, cursor: int, carry: list[int]) -> tuple[list[int], int, int, list[int]] | None:
        """Indices of one batch and the position after it; None when ``epochs`` passes cannot fill another."""
        chosen, n, waiting = [], 0, []
        for idx in carry:
            if n + self.lines[idx].size <= self.batch_size:
                chosen.append(idx)
                n += self.lines[idx].size
            else:
                waiting.append(idx)
        looked = 0
        while n < self.batch_size:
            if cursor >= len(self.lines):
                epoch, cursor = epoch + 1, 0
            if self.epochs is not None and epoch >= self.epochs:
                return None
            if looked > len(self.lines) + self.batch_size:
                raise OfflineDataError(
                    f"cannot fill a batch of {self.batch_size} sequences from whole groups of sizes "
                    f"{sorted({line.size for line in self.lines})}: use a data.train_batch_size they sum to"
                )
            idx = self._order(epoch)[cursor]
            cursor += 1
            looked += 1
            if n + self.lines[idx].size <= self.batch_size:
                chosen.append(idx)
                n += self.lines[idx].size
            else:
                waiting.append(idx)
        return chosen, epoch, cursor, waiting

    def steps_available(self) -> int | None:
        """Batches ``epochs`` passes give (None when ``epochs`` is None: unbounded)."""
        if self.epochs is None:
            return None
        steps, epoch, cursor, carry = 0, self.epoch, self.cursor, list(self.carry)
        while (batch := self._assemble(epoch, cursor, carry)) is not None:
            _, epoch, cursor, carry = batch
            steps += 1
        return steps

    def _read(self, idx: int) -> ScoredGroup:
        entry = self.lines[idx]
        with open(self.files[entry.file], "rb") as fh:
            fh.seek(entry.offset)
            return parse_group_line(fh.readline().decode("utf-8", errors="replace"))

    def next_groups(self, step: int, metrics: dict[str, float]) -> list[ScoredGroup]:
        groups = self.next_batch()
        metrics.update(self.metrics())
        return groups

    def next_batch(self) -> list[ScoredGroup]:
        """Whole groups holding exactly ``batch_size`` sequences; :class:`OfflineDataError` when the data ran out."""
        self._report_rejections()
        batch = self._assemble(self.epoch, self.cursor, self.carry)
        if batch is None:
            raise OfflineDataError(
                f"the JSONL data ran out after atropos.offline.epochs={self.epochs} passes: lower "
                "trainer.total_training_steps or raise the epochs"
            )
        chosen, self.epoch, self.cursor, self.carry = batch
        self.groups_read += len(chosen)
        return [self._read(idx) for idx in chosen]

    def metrics(self) -> dict[str, float]:
        out = {
            "atropos/offline/epoch": float(self.epoch),
            "atropos/offline/position": float(self.cursor),
            "atropos/offline/groups_read": float(self.groups_read),
            "atropos/offline/carried_groups": float(len(self.carry)),
        }
        out.update(self.rejected.metrics("atropos/offline/rejected_lines"))
        return out

    # ---- verl dataloader protocol -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "source": "jsonl",
            "files": [str(f) for f in self.files],
            "epoch": self.epoch,
            "cursor": self.cursor,
            "carry": [(self.lines[i].file, self.lines[i].offset) for i in self.carry],
            "groups_read": self.groups_read,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "rejections_reported": self.rejections_reported,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position; the files, shuffle and seed must be those of the saved run."""
        if state.get("source") != "jsonl":
            raise OfflineDataError(
                f"the checkpoint's data source is {state.get('source')!r}, not jsonl: resume with the same "
                "atropos.source, or start a fresh trainer.default_local_dir"
            )
        saved = (state["files"], state["shuffle"], state["seed"])
        if saved != ([str(f) for f in self.files], self.shuffle, self.seed):
            raise OfflineDataError(
                f"atropos.jsonl_paths / atropos.offline.shuffle / seed differ from the checkpoint's {saved}: resume "
                "with the same files and order, or start a fresh trainer.default_local_dir"
            )
        by_position = {(line.file, line.offset): i for i, line in enumerate(self.lines)}
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.carry = [by_position[tuple(pos)] for pos in state["carry"]]
        self.groups_read = int(state["groups_read"])
        self.rejections_reported = bool(state["rejections_reported"])
        logger.info("offline source resumed at epoch %d, group %d of %d", self.epoch, self.cursor, len(self.lines))


def make_jsonl_source(atropos: AtroposConfig, batch_size: int) -> JsonlGroupSource:
    """The source for ``atropos.source=jsonl`` (``atropos.jsonl_paths``, ``atropos.offline``)."""
    return JsonlGroupSource(
        atropos.jsonl_paths,
        batch_size=batch_size,
        shuffle=atropos.offline.shuffle,
        seed=atropos.offline.seed,
        epochs=atropos.offline.epochs,
        rejected_groups_file=atropos.rejected_groups_file,
    )


def offline_training_steps(requested: int | None, source: JsonlGroupSource) -> int:
    """Steps of an offline run: ``trainer.total_training_steps``, at most what ``epochs`` passes give."""
    available = source.steps_available()
    if available is None:
        if not requested:
            raise OfflineDataError(
                "atropos.source=jsonl needs trainer.total_training_steps or atropos.offline.epochs to end the run"
            )
        return int(requested)
    if available == 0:
        raise OfflineDataError(
            f"atropos.offline.epochs={source.epochs} passes hold less than one batch of "
            f"{source.batch_size} sequences: raise the epochs or lower data.train_batch_size"
        )
    if requested and int(requested) > available:
        logger.warning(
            "trainer.total_training_steps=%s but %d passes over the JSONL data give %d steps: training %d",
            requested,
            source.epochs,
            available,
            available,
        )
    return min(int(requested), available) if requested else available
