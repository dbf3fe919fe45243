"""The guarded API's journal: every accepted group is on disk before the API answers, until the trainer acknowledges it.

Layout under the journal directory::

    meta.json     {"journal": <hex>, "next_seq": n}: the id namespace, and a floor for the next sequence number
    groups.jsonl  one line per accepted group: {"id", "seq", "env_id", "size", "group"} (appended, then fsynced)
    acks.jsonl    one line per acknowledgement: {"ids": [...], "time"} (appended, then fsynced)

A group's id is ``<journal>-<seq>``, unique across every API process sharing the directory; ``seq`` counts from 0, so
the groups ever accepted are exactly the sequence numbers below ``next_seq`` (:func:`journal_ids`). The id rides in
the group itself (:data:`recipe.atropos.schema.GROUP_ID_KEY` in its ``group_overrides``): :meth:`GroupJournal.append`
puts it there, and :meth:`GroupJournal.read` puts it back into a group journaled as it was posted (its JSON written
unchanged, so the id is in the row only).

Invariants:

- an accepted group is fsynced before the API answers: :meth:`GroupJournal.append` fsyncs before it returns, or
  (the guard's way) writes only, and :class:`GroupCommit` runs one fsync in a worker thread for all the appends
  written meanwhile; an acknowledged group leaves the journal (compaction drops it from ``groups.jsonl`` later), an
  unacknowledged one never does;
- each unacknowledged group is in exactly one place: the *backlog* (on disk only), atroposlib's *memory* (its queue,
  buffers or formed batches), or *out* (answered in a ``GET /batch``, awaiting the trainer's ack);
- a journal opened again (a restarted API, after SIGKILL too) puts every unacknowledged group in the backlog, in the
  order accepted; groups out when a trainer registers again go back to the front of the backlog.

Compaction (when at least ``compact_min_acked`` acknowledged groups are still in the file and they outnumber the
others) rewrites ``groups.jsonl`` with the unacknowledged lines only, atomically, then empties ``acks.jsonl`` (a kill
in between leaves acks of ids no longer in the file: harmless).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic_core

from recipe.atropos.records import append_jsonl, read_jsonl, write_atomic, write_json_atomic
from recipe.atropos.schema import GROUP_ID_KEY

logger = logging.getLogger("atropos_api_guard")

BACKLOG, MEMORY, OUT = "backlog", "memory", "out"


@dataclass
class Entry:
    offset: int  # of its line in groups.jsonl
    length: int
    size: int  # sequences
    env_id: int | None
    where: str = BACKLOG


# Line breaks to str.splitlines() that JSON leaves unescaped in strings (pydantic-core writes them raw, json.dumps
# escaped all non-ASCII); read_jsonl (journal_ids) splits on them, so they are written escaped.
_RAW_BREAKS = tuple((ch.encode(), f"\\u{ord(ch):04x}".encode()) for ch in ("\x85", "\u2028", "\u2029"))


def json_line(row: dict[str, Any], document: bytes | None = None) -> bytes:
    """``row`` as one JSON line (pydantic-core: about 7x faster than ``json.dumps`` on a group of numbers); with
    ``document`` (the JSON ``row["group"]`` was parsed from), that as the group, unless it spans lines."""
    if document is None or b"\n" in document or b"\r" in document:
        line = pydantic_core.to_json(row)
    else:
        head = pydantic_core.to_json({k: v for k, v in row.items() if k != "group"})
        line = b"".join((head[:-1], b',"group":', document, b"}"))
    for raw, escaped in _RAW_BREAKS:
        if raw in line:
            line = line.replace(raw, escaped)
    return line + b"\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupJournal:
    """Accepted, unacknowledged groups on disk, and where each one is (see the module docstring)."""

    def __init__(self, directory: str | Path, *, compact_min_acked: int = 1000) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta_file = self.dir / "meta.json"
        self.groups_file = self.dir / "groups.jsonl"
        self.acks_file = self.dir / "acks.jsonl"
        self.compact_min_acked = int(compact_min_acked)
        meta = json.loads(self.meta_file.read_text()) if self.meta_file.exists() else {}
        self.name = str(meta.get("journal") or uuid.uuid4().hex[:12])
        self.next_seq = int(meta.get("next_seq", 0))
        if not meta:
            write_json_atomic(self.meta_file, {"journal": self.name, "next_seq": 0})
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # seq -> entry, unacknowledged only, in seq order
        self.backlog: deque[int] = deque()
        self.acked_in_file = 0  # acknowledged lines still in groups.jsonl
        self.acked_total = 0  # acknowledged by this process
        self.memory_sequences = 0  # sequences of the groups in atroposlib's memory
        # (groups, sequences) by where they are, and the backlog's sequences per env id: kept as they move (O(1))
        self.tally = {w: [0, 0] for w in (BACKLOG, MEMORY, OUT)}
        self.backlog_by_env: dict[int | None, int] = {}
        self._load()
        self._reader = open(self.groups_file, "rb")  # noqa: SIM115 - reopened on compaction, closed in close()

    # ---- opening ------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        acked = {i for row in read_jsonl(self.acks_file) for i in row.get("ids", [])}
        self.groups_file.touch()
        good_end = 0
        with open(self.groups_file, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # a line cut short by a kill: never answered 200, so never accepted
                try:
                    row = pydantic_core.from_json(line, allow_inf_nan=True)  # a posted document may hold NaN
                except ValueError:
                    break
                seq = int(row["seq"])
                self.next_seq = max(self.next_seq, seq + 1)
                if row["id"] in acked:
                    self.acked_in_file += 1
                else:
                    self.entries[seq] = Entry(good_end, len(line), int(row["size"]), row.get("env_id"))
                good_end += len(line)
        if good_end != self.groups_file.stat().st_size:
            logger.warning(
                "journal %s: dropping %d bytes after offset %d of groups.jsonl (a line cut short by a kill, never "
                "answered 200)",
                self.dir,
                self.groups_file.stat().st_size - good_end,
                good_end,
            )
            with open(self.groups_file, "r+b") as fh:  # the next append must start on a fresh line
                fh.truncate(good_end)
                os.fsync(fh.fileno())
        self.backlog.extend(self.entries)
        for entry in self.entries.values():
            self._count(entry, +1)
        if self.entries:
            logger.info("journal %s: %d unacknowledged groups will be served again", self.dir, len(self.entries))

    def _count(self, entry: Entry, sign: int) -> None:
        self.tally[entry.where][0] += sign
        self.tally[entry.where][1] += sign * entry.size
        if entry.where == BACKLOG:
            self.backlog_by_env[entry.env_id] = self.backlog_by_env.get(entry.env_id, 0) + sign * entry.size
        if entry.where == MEMORY:
            self.memory_sequences += sign * entry.size

    def _move(self, entry: Entry, where: str) -> None:
        self._count(entry, -1)
        entry.where = where
        self._count(entry, +1)

    def close(self) -> None:
        self._reader.close()

    # ---- ids ----------------------------------------------------------------------------------------------------
    def group_id(self, seq: int) -> str:
        return f"{self.name}-{seq}"

    def _seq(self, group_id: str) -> int | None:
        name, _, seq = str(group_id).rpartition("-")
        return int(seq) if name == self.name and seq.isdigit() else None

    # ---- the life of a group ------------------------------------------------------------------------------------
    def append(
        self, groups: list[dict[str, Any]], *, durable: bool = True, posted: list[bytes | None] | None = None
    ) -> list[str]:
        """Give each group an id (in its ``group_overrides``), write them, put them in the backlog. With ``durable``
        they are fsynced when this returns; without, :meth:`sync` (or :class:`GroupCommit`) must run before anyone is
        told they are (a killed process loses nothing written, a power loss would). ``posted``: the JSON document each
        group was parsed from, where the caller has it; written as it came instead of serialised again."""
        lines, ids = [], []
        for group, document in zip(groups, posted or [None] * len(groups), strict=True):
            seq = self.next_seq
            self.next_seq += 1
            gid = self.group_id(seq)
            group["group_overrides"] = {**(group.get("group_overrides") or {}), GROUP_ID_KEY: gid}
            row = {"id": gid, "seq": seq, "env_id": group.get("env_id"), "size": len(group["tokens"]), "group": group}
            lines.append((seq, json_line(row, document), row))
            ids.append(gid)
        with open(self.groups_file, "ab") as fh:
            offset = fh.tell()
            fh.write(b"".join(line for _, line, _ in lines))
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        for seq, line, row in lines:
            self.entries[seq] = Entry(offset, len(line), row["size"], row["env_id"])
            self._count(self.entries[seq], +1)
            self.backlog.append(seq)
            offset += len(line)
        return ids

    def sync(self) -> None:
        """fsync ``groups.jsonl``: every line appended before this call is on disk when it returns. Safe in a worker
        thread while the event loop appends or compacts: the file is opened by path, and a compaction meanwhile wrote
        and fsynced every unacknowledged line into the file that replaced it."""
        fd = os.open(self.groups_file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def take(self, room_sequences: int, *, at_least_one: bool) -> list[dict[str, Any]]:
        """Groups from the front of the backlog holding at most ``room_sequences`` sequences (at least one group with
        ``at_least_one``), read back from disk and now in memory."""
        return [self.read(seq) for seq in self.take_seqs(room_sequences, at_least_one=at_least_one)]

    def take_seqs(self, room_sequences: int, *, at_least_one: bool) -> list[int]:
        """:meth:`take` without reading the groups back (a caller that still holds them; else :meth:`read`)."""
        out: list[int] = []
        while self.backlog:
            entry = self.entries[self.backlog[0]]
            if entry.size > room_sequences and not (at_least_one and not out):
                break
            out.append(self.backlog.popleft())
            self._move(entry, MEMORY)
            room_sequences -= entry.size
        return out

    def read(self, seq: int) -> dict[str, Any]:
        """The group of unacknowledged ``seq`` as journaled (its id in ``group_overrides``), parsed from disk."""
        entry = self.entries[seq]
        self._reader.seek(entry.offset)
        row = pydantic_core.from_json(self._reader.read(entry.length), allow_inf_nan=True)
        group = row["group"]
        group["group_overrides"] = {**(group.get("group_overrides") or {}), GROUP_ID_KEY: row["id"]}
        return group

    def handed_out(self, ids: Iterable[str]) -> int:
        """Groups answered in a ``GET /batch``: memory -> out. Returns how many were known."""
        n = 0
        for gid in ids:
            seq = self._seq(gid)
            entry = self.entries.get(seq) if seq is not None else None
            if entry is not None and entry.where == MEMORY:
                self._move(entry, OUT)
                n += 1
        return n

    def requeue_out(self) -> int:
        """A trainer registered: groups out with an earlier one go back to the front of the backlog; how many."""
        out = [seq for seq, entry in self.entries.items() if entry.where == OUT]
        for seq in reversed(out):
            self._move(self.entries[seq], BACKLOG)
            self.backlog.appendleft(seq)
        return len(out)

    def ack(self, ids: Iterable[str]) -> tuple[int, int]:
        """The trainer holds these groups durably: they leave the journal. Returns (acknowledged, unknown)."""
        known, unknown = [], 0
        for gid in ids:
            seq = self._seq(gid)
            if seq is None or seq not in self.entries:
                unknown += 1
                continue
            known.append(gid)
            entry = self.entries.pop(seq)
            self._count(entry, -1)
            if entry.where == BACKLOG:
                self.backlog.remove(seq)
        if known:
            append_jsonl(self.acks_file, [{"ids": known, "time": time.time()}], fsync=True)
            self.acked_in_file += len(known)
            self.acked_total += len(known)
            if self.acked_in_file >= self.compact_min_acked and self.acked_in_file > len(self.entries):
                self.compact()
        return len(known), unknown

    def compact(self) -> None:
        """Rewrite ``groups.jsonl`` with the unacknowledged lines only (atomically; see the module docstring)."""
        write_json_atomic(self.meta_file, {"journal": self.name, "next_seq": self.next_seq})
        tmp = self.groups_file.with_name(f".{self.groups_file.name}.{os.getpid()}.tmp")
        offset = 0
        with open(tmp, "wb") as fh:
            for entry in self.entries.values():
                self._reader.seek(entry.offset)
                fh.write(self._reader.read(entry.length))
                entry.offset, offset = offset, offset + entry.length
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.groups_file)
        _fsync_dir(self.dir)
        write_atomic(self.acks_file, "")  # every line left is unacknowledged
        self._reader.close()
        self._reader = open(self.groups_file, "rb")  # noqa: SIM115
        logger.info("journal compacted: %d acknowledged groups dropped", self.acked_in_file)
        self.acked_in_file = 0

    # ---- depth --------------------------------------------------------------------------------------------------
    def depth(self) -> dict[str, Any]:
        """Unacknowledged groups and sequences by where they are, and the backlog's sequences per env id."""
        out: dict[str, Any] = {}
        for where, (groups, sequences) in self.tally.items():
            out[f"{where}_groups"], out[f"{where}_sequences"] = groups, sequences
        out["backlog_sequences_by_env"] = {k: v for k, v in self.backlog_by_env.items() if v}
        return out


class GroupCommit:
    """One fsync for the appends of concurrent requests, run in a worker thread: the event loop checks and writes other
    posts meanwhile, and every append written before an fsync started is durable when that fsync returns.

    ``await commit.durable(commit.wrote())`` after ``journal.append(groups, durable=False)`` returns once those groups
    are on disk (an fsync error is raised to every waiter whose groups it should have covered). ``before_fsync`` runs
    on the event loop as each fsync starts (the guard saves its stats file there: once per fsync, not once per post).
    """

    def __init__(self, journal: GroupJournal, before_fsync: Callable[[], None] | None = None) -> None:
        self.journal = journal
        self.before_fsync = before_fsync
        self.written = 0  # appends so far
        self.synced = 0  # appends covered by a finished fsync
        self._fsync: asyncio.Task[None] | None = None

    def wrote(self) -> int:
        """Count an append just written; its number for :meth:`durable`."""
        self.written += 1
        return self.written

    async def durable(self, append: int) -> None:
        while self.synced < append:
            if self._fsync is None:
                self._fsync = asyncio.create_task(self._sync())
            await asyncio.shield(self._fsync)

    async def _sync(self) -> None:
        upto = self.written  # as the fsync starts: the appends of the posts that ran before this task covered too
        try:
            if self.before_fsync is not None:
                self.before_fsync()
            await asyncio.to_thread(self.journal.sync)
            self.synced = max(self.synced, upto)
        finally:
            self._fsync = None


def journal_ids(directory: str | Path) -> tuple[set[str], set[str]]:
    """(every id the journal at ``directory`` ever accepted, those not acknowledged), read from its files."""
    directory = Path(directory)
    meta_file = directory / "meta.json"
    if not meta_file.exists():
        return set(), set()
    meta = json.loads(meta_file.read_text())
    name, next_seq = meta["journal"], int(meta.get("next_seq", 0))
    acked = {i for row in read_jsonl(directory / "acks.jsonl") for i in row.get("ids", [])}
    in_file = [row for row in read_jsonl(directory / "groups.jsonl") if "seq" in row]
    next_seq = max([next_seq, *(int(row["seq"]) + 1 for row in in_file)])
    unacked = {row["id"] for row in in_file if row["id"] not in acked}
    return {f"{name}-{seq}" for seq in range(next_seq)}, unacked
