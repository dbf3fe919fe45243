"""Assemble one training step's batch from polled Atropos groups: whole groups, exact size, stale ones dropped.

The API builds batches of exactly ``batch_size`` sequences, but the trainer may drop groups (too stale, or rejected
as malformed by the client), so a step can need groups from more than one poll; groups that do not fit are carried
to the next step instead of being lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


def group_tokens(group: Any) -> list[list[int]]:
    """The ``tokens`` of a ScoredData group (pydantic model or plain dict)."""
    return list(group["tokens"] if isinstance(group, dict) else group.tokens)


def group_scores(group: Any) -> list[float]:
    """The ``scores`` of a ScoredData group (pydantic model or plain dict)."""
    return list(group["scores"] if isinstance(group, dict) else group.scores)


@dataclass
class GroupSelection:
    """Result of :func:`select_groups`: ``chosen`` holds ``n_sequences`` sequences; ``carry`` waits for later."""

    chosen: list[Any] = field(default_factory=list)
    carry: list[Any] = field(default_factory=list)
    n_sequences: int = 0
    lags: list[int] = field(default_factory=list)
    stale_groups_dropped: int = 0
    policy_lag_unknown: int = 0


def select_groups(
    pending: Iterable[Any],
    batch_size: int,
    lag_of: Callable[[Sequence[int]], int | None],
    max_policy_lag: int | None = None,
    already: GroupSelection | None = None,
) -> GroupSelection:
    """Add ``pending`` groups, in order, to ``already`` until it holds exactly ``batch_size`` sequences.

    ``lag_of(tokens)`` gives a sequence's policy lag (None = unknown). A group whose largest known lag exceeds
    ``max_policy_lag`` is dropped and counted; a group that would overflow the batch goes to ``carry``.
    """
    sel = already or GroupSelection()
    for group in pending:
        seqs = group_tokens(group)
        group_lags = [lag_of(tokens) for tokens in seqs]
        known = [lag for lag in group_lags if lag is not None]
        if max_policy_lag is not None and known and max(known) > max_policy_lag:
            sel.stale_groups_dropped += 1
        elif sel.n_sequences + len(seqs) <= batch_size:
            sel.chosen.append(group)
            sel.n_sequences += len(seqs)
            sel.lags.extend(known)
            sel.policy_lag_unknown += len(group_lags) - len(known)
        else:
            sel.carry.append(group)
    return sel
