"""Files the recipe writes: atomic JSON replacement, JSON-lines appends, and the rejected-groups log.

Used by every process that keeps a record (the API guard, the trainer's client, spool and offline reader, the
launcher). Invariants:

- :func:`write_atomic` never leaves a half-written file: a temporary file is written and fsynced, renamed over the
  target, and the directory is fsynced so the rename survives a power loss.
- :func:`append_jsonl` writes whole lines in one ``write`` (readers skip at most a half-written last line) and, with
  ``fsync``, returns only once they are on disk.
- A rejected group is one line ``{"reason", "field", "group", "time"}`` (plus ``"source"`` when it came from a file):
  what :class:`RejectedGroupLog` writes and the offline reader reads back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from recipe.atropos.schema import GroupValidationError

logger = logging.getLogger(__name__)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """:func:`write_atomic` of ``payload`` as one JSON document."""
    write_atomic(path, json.dumps(payload, default=str))


def append_jsonl(path: Path, records: Iterable[Any], *, fsync: bool = False) -> None:
    """Append one JSON line per record (one ``write``); with ``fsync`` they are on disk when this returns."""
    text = "".join(json.dumps(record, default=str) + "\n" for record in records)
    if not text:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(text)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[Any]:
    """Every whole JSON line of ``path`` ([] when it does not exist; a half-written or bad line is skipped)."""
    rows: list[Any] = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def rejection_record(raw: Any, error: GroupValidationError, source: str | None = None) -> dict[str, Any]:
    """The line a rejected group is kept as (``source``: ``path:line`` when it came from a file)."""
    record = {"reason": str(error), "field": error.field, "group": raw, "time": time.time()}
    if source is not None:
        record["source"] = source
    return record


class RejectedGroupLog:
    """Counts rejected groups by field and keeps each one, with its reason, in a JSON-lines file (when given)."""

    def __init__(self, path: str | Path | None, what: str = "a ScoredData group") -> None:
        self.path = Path(path) if path else None
        self.what = what
        self.counts: Counter[str] = Counter()

    def reject(self, raw: Any, error: GroupValidationError, source: str | None = None, *, write: bool = True) -> dict:
        """Count, log and (with ``write`` and a path) append the record; returns it."""
        self.counts[error.field] += 1
        record = rejection_record(raw, error, source)
        logger.warning("rejected %s%s: %s", self.what, f" ({source})" if source else "", error)
        if write:
            self.write([record])
        return record

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        if self.path is not None:
            append_jsonl(self.path, records)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def metrics(self, prefix: str) -> dict[str, float]:
        """``<prefix>`` (the total) and ``<prefix>/<field>`` per field."""
        out = {prefix: float(self.total)}
        out.update({f"{prefix}/{field}": float(n) for field, n in self.counts.items()})
        return out
