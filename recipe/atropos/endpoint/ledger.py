"""Which policy version produced each completion: the ledger the trainer reads to measure policy lag."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence


def _sequence_key(token_ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(json.dumps(list(token_ids)).encode(), digest_size=16).digest()


class CompletionLedger:
    """Which policy version produced each full sequence (prompt + completion), bounded, thread-safe."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._versions: OrderedDict[bytes, int] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def record(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], version: int) -> None:
        key = _sequence_key([*prompt_ids, *completion_ids])
        with self._lock:
            self._versions[key] = version
            self._versions.move_to_end(key)
            while len(self._versions) > self._max:
                self._versions.popitem(last=False)

    def version_of(self, token_ids: Sequence[int]) -> int | None:
        """The policy version that generated ``token_ids`` (a trajectory's tokens), or None if unknown."""
        with self._lock:
            return self._versions.get(_sequence_key(token_ids))

    def __len__(self) -> int:
        with self._lock:
            return len(self._versions)
