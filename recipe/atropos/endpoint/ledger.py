"""Which policy version produced each completion: the ledger the trainer reads to measure policy lag.

With a ``path`` (the trainer keeps it beside the spool: :func:`recipe.atropos.transport.spool.ledger_file`) every
record is also appended to that JSON-lines file as it is made (one ``write`` per line, so a killed trainer loses none),
and a new ledger on the same path starts with what it holds: a resumed run measures the lag of groups an earlier run's
endpoint produced exactly, not as a lower bound. When the file holds twice ``max_entries`` lines it is rewritten with
the entries kept (atomically).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from recipe.atropos.records import read_jsonl, write_atomic


def _sequence_key(token_ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(json.dumps(list(token_ids)).encode(), digest_size=16).digest()


class CompletionLedger:
    """Which policy version produced each full sequence (prompt + completion), bounded, thread-safe, optionally kept
    in a file (see the module docstring)."""

    def __init__(self, max_entries: int = 200_000, path: str | Path | None = None) -> None:
        self._versions: OrderedDict[bytes, int] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()
        self.path = Path(path) if path else None
        self._lines = 0
        self._file = None
        if self.path is not None:
            for row in read_jsonl(self.path):
                self._put(bytes.fromhex(row["k"]), int(row["v"]))
                self._lines += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - line-buffered: one write per record
            if self._file.tell() and not self.path.read_bytes().endswith(b"\n"):
                self._file.write("\n")  # a record cut short by a kill: the next one starts on its own line

    def _put(self, key: bytes, version: int) -> None:
        self._versions[key] = version
        self._versions.move_to_end(key)
        while len(self._versions) > self._max:
            self._versions.popitem(last=False)

    def record(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], version: int) -> None:
        key = _sequence_key([*prompt_ids, *completion_ids])
        with self._lock:
            self._put(key, version)
            if self._file is None:
                return
            self._file.write(json.dumps({"k": key.hex(), "v": version}) + "\n")
            self._lines += 1
            if self._lines >= 2 * self._max:
                self._file.close()
                rows = "".join(json.dumps({"k": k.hex(), "v": v}) + "\n" for k, v in self._versions.items())
                write_atomic(self.path, rows)
                self._lines = len(self._versions)
                self._file = open(self.path, "a", buffering=1)  # noqa: SIM115

    def version_of(self, token_ids: Sequence[int]) -> int | None:
        """The policy version that generated ``token_ids`` (a trajectory's tokens), or None if unknown."""
        with self._lock:
            return self._versions.get(_sequence_key(token_ids))

    def __len__(self) -> int:
        with self._lock:
            return len(self._versions)
