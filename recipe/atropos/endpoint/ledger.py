"""Which policy version produced each completion: the ledger the trainer reads to measure policy lag.

Every completion the endpoint serves is recorded under three keys: the full sequence (prompt + completion token ids),
the completion's token ids alone, and its text (``decode`` of the completion, stripped; only with a ``decode``). A
trained sequence is then matched (:meth:`CompletionLedger.sequence_version`):

1. by its full token ids: a ``/generate`` (ManagedServer) trajectory, whose tokens are what the endpoint returned;
2. else span by span: each run of trained tokens (``masks`` != -100) is one completion the env re-tokenised
   (``tokenize_for_trainer`` over chat messages, several turns of a multi-turn episode). A span matches a completion
   by its token ids, else by its text (``decode`` of the span, stripped: the chat template's end-of-turn tokens and
   the env's ``.strip()`` of the message content fall away). The sequence's version is its oldest span's.
3. Where a span matches nothing the version is *bounded*, never assumed current: the oldest completion the endpoint
   served that no trained sequence has claimed yet (the unmatched span came from one of those, if from this endpoint).
   Served completions expire ``horizon`` versions after they were produced (the trainer passes the lag cap + 1: data
   that old is over the cap whatever it matches), so completions whose groups the env dropped do not hold the bound
   down for ever.

Identical completions (a one-word answer sampled by several policies, or for several prompts) are claimed oldest
first, one per trained sequence: a lag is never under-estimated by a newer twin, and a span whose twins are all claimed
is bounded. Lookups are idempotent (a queued group is looked up at every
poll): a matched sequence's answer is remembered; a bound is worked out again at each lookup.

With a ``path`` (the trainer keeps it beside the spool: :func:`recipe.atropos.spool.ledger_file`) every
record is also appended to that JSON-lines file as it is made (one ``write`` per line, so a killed trainer loses none),
and a new ledger on the same path starts with what it holds: a resumed run matches the groups an earlier run's
endpoint produced. When the file holds twice ``max_entries`` lines it is rewritten with the entries kept (atomically).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from pathlib import Path

from recipe.atropos.records import read_jsonl, write_atomic
from recipe.atropos.staleness import SequenceVersion

MASKED = -100  # ScoredData's mask value for a token that is not trained (prompt, env and tool turns)

Decode = Callable[[Sequence[int]], str]  # token ids -> text (the tokenizer's decode, special tokens skipped)


def _key(kind: bytes, payload: object) -> bytes:
    return kind + hashlib.blake2b(json.dumps(payload).encode(), digest_size=16).digest()


def _full_key(token_ids: Sequence[int]) -> bytes:
    return _key(b"f", list(token_ids))


def _span_key(token_ids: Sequence[int]) -> bytes:
    return _key(b"s", list(token_ids))


def _text_key(text: str) -> bytes:
    return _key(b"t", text.strip())


def trained_spans(tokens: Sequence[int], masks: Sequence[int]) -> list[list[int]]:
    """The runs of trained tokens of one sequence (``masks[i] != -100``), in order: one per generated turn."""
    spans: list[list[int]] = []
    current: list[int] = []
    for token, mask in zip(tokens, masks, strict=False):
        if mask == MASKED:
            if current:
                spans.append(current)
                current = []
        else:
            current.append(int(token))
    if current:
        spans.append(current)
    return spans


class _Served:
    """One served completion: its version, its keys, whether a trained sequence has claimed it."""

    __slots__ = ("version", "keys", "claimed")

    def __init__(self, version: int, keys: tuple[bytes, ...]) -> None:
        self.version, self.keys, self.claimed = version, keys, False


class CompletionLedger:
    """Which policy version produced each completion, bounded, thread-safe, optionally kept in a file (see the module
    docstring). ``decode`` enables text matching; ``horizon`` (versions) expires unclaimed completions."""

    def __init__(
        self,
        max_entries: int = 200_000,
        path: str | Path | None = None,
        *,
        decode: Decode | None = None,
        horizon: int | None = None,
    ) -> None:
        self._max = max_entries
        self.decode = decode  # may be set after construction (the trainer's tokenizer exists later)
        self.horizon = horizon
        self._lock = threading.Lock()
        self._served: deque[_Served] = deque()  # serving order, unclaimed or not yet expired
        self._by_key: dict[bytes, deque[_Served]] = {}  # full / span / text key -> served, in serving order
        self._last: dict[bytes, int] = {}  # key -> version of the latest completion under it (recent records only)
        self._recent: deque[tuple[tuple[bytes, ...], int]] = deque()  # the last max_entries records, oldest first
        self._refs: Counter[bytes] = Counter()  # key -> how many recent records have it
        self._answers: OrderedDict[bytes, SequenceVersion] = OrderedDict()  # sequence -> answer (idempotent)
        self._newest = 0
        self.path = Path(path) if path else None
        self._lines = 0
        self._file = None
        if self.path is not None:
            for row in read_jsonl(self.path):
                keys = tuple(bytes.fromhex(row[k]) for k in ("k", "s", "t") if row.get(k))
                self._put(keys, int(row["v"]))
                self._lines += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - line-buffered: one write per record
            if self._file.tell() and not self.path.read_bytes().endswith(b"\n"):
                self._file.write("\n")  # a record cut short by a kill: the next one starts on its own line

    # ---- recording (the endpoint's thread) ------------------------------------------------------------------------
    def record(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], version: int) -> None:
        """One completion ``completion_ids`` [L] of ``prompt_ids`` [P], produced by policy ``version``."""
        keys = [_full_key([*prompt_ids, *completion_ids]), _span_key(completion_ids)]
        if self.decode is not None:
            keys.append(_text_key(self.decode(list(completion_ids))))
        with self._lock:
            self._put(tuple(keys), version)
            if self._file is None:
                return
            self._file.write(self._row(keys, version) + "\n")
            self._lines += 1
            if self._lines >= 2 * self._max:
                self._compact()

    @staticmethod
    def _row(keys: Sequence[bytes], version: int) -> str:
        return json.dumps({**{name: k.hex() for name, k in zip(("k", "s", "t"), keys, strict=False)}, "v": version})

    def _put(self, keys: tuple[bytes, ...], version: int) -> None:
        served = _Served(version, keys)
        self._served.append(served)
        for key in keys:
            self._by_key.setdefault(key, deque()).append(served)
            self._last[key] = version
        self._recent.append((keys, version))
        self._refs.update(keys)
        while len(self._recent) > self._max:
            old_keys, _ = self._recent.popleft()
            self._refs.subtract(old_keys)
            for key in old_keys:
                if self._refs[key] <= 0:
                    del self._refs[key], self._last[key]
        self._newest = max(self._newest, version)
        self._expire()

    def _expire(self) -> None:
        """Forget served completions past the horizon or the size bound, and claimed ones at the front."""
        while self._served:
            first = self._served[0]
            too_old = self.horizon is not None and first.version < self._newest - self.horizon
            if not (first.claimed or too_old or len(self._served) > self._max):
                return
            self._served.popleft()
            for key in first.keys:  # serving order: the first served is the first under each of its keys
                queue = self._by_key.get(key)
                if queue and queue[0] is first:
                    queue.popleft()
                    if not queue:
                        del self._by_key[key]

    def _compact(self) -> None:
        self._file.close()
        write_atomic(self.path, "".join(self._row(keys, version) + "\n" for keys, version in self._recent))
        self._lines = len(self._recent)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115

    # ---- lookups (the trainer's thread) ---------------------------------------------------------------------------
    def version_of(self, token_ids: Sequence[int]) -> int | None:
        """The policy version that generated the full sequence ``token_ids`` (prompt + completion), or None."""
        with self._lock:
            return self._last.get(_full_key(token_ids))

    def sequence_version(self, tokens: Sequence[int], masks: Sequence[int] | None = None) -> SequenceVersion:
        """The version that sampled a trained sequence ``tokens`` [T] with ``masks`` [T] (see the module docstring)."""
        answer_key = _key(b"a", [list(tokens), list(masks) if masks is not None else None])
        with self._lock:
            if (known := self._answers.get(answer_key)) is not None:
                return known
            answer = self._match(tokens, masks)
            if answer.matched:  # what it claimed stays its own; a bound is worked out again (it only gets tighter)
                self._answers[answer_key] = answer
                while len(self._answers) > self._max:
                    self._answers.popitem(last=False)
            self._expire()
            return answer

    def _match(self, tokens: Sequence[int], masks: Sequence[int] | None) -> SequenceVersion:
        full = self._claim(_full_key(tokens))
        if full is not None:
            return SequenceVersion(full, True)
        spans = trained_spans(tokens, masks) if masks is not None else []
        versions = []
        for span in spans:
            version = self._claim(_span_key(span))
            if version is None and self.decode is not None:
                version = self._claim(_text_key(self.decode(span)))
            if version is None:
                return SequenceVersion(self._oldest_unclaimed(), False)
            versions.append(version)
        if not versions:
            return SequenceVersion(self._oldest_unclaimed(), False)
        return SequenceVersion(min(versions), True)

    def _claim(self, key: bytes) -> int | None:
        """The version of the oldest unclaimed completion under ``key`` (claimed now), else None: a span whose every
        twin is claimed by other sequences was not served as such (it is bounded, not given a twin's version)."""
        for served in self._by_key.get(key, ()):
            if not served.claimed:
                served.claimed = True
                return served.version
        return None

    def _oldest_unclaimed(self) -> int | None:
        return next((s.version for s in self._served if not s.claimed), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._recent)
