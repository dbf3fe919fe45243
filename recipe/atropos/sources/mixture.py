"""Assemble one training step's batch from polled Atropos groups: whole groups, exact size, stale ones dropped;
optionally held to a mixture of environments by weight (:class:`MixtureBatcher`).

The API builds batches of exactly ``batch_size`` sequences, but the trainer may drop groups (too stale, or rejected
as malformed by the client), so a step can need groups from more than one poll; groups that do not fit are carried
to the next step instead of being lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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


# ---- exact mixtures of environments ---------------------------------------------------------------------------------


def group_env_id(group: Any) -> int | None:
    """The ``env_id`` the API stamped on a group (None when the env did not register)."""
    return group.get("env_id") if isinstance(group, dict) else getattr(group, "env_id", None)


def mixture_quotas(
    batch_size: int, weights: Mapping[str, float], group_sizes: Mapping[str, int], trained: Mapping[str, int]
) -> dict[str, int]:
    """Sequences per env for the next batch: whole groups summing to ``batch_size``, closest to the weights.

    Each env's ideal share is its cumulative deficit ``w/Σw · (T + batch_size) − trained[env]`` (T = sequences trained
    so far over these envs), scaled to sum to ``batch_size``, so rounding errors of earlier steps are paid back and
    the trained mixture converges to the weights. Rounding is largest-remainder in whole groups: ``floor(ideal / g)``
    groups each, then one more group at a time to the env with the largest remaining ``ideal − quota`` whose group
    still fits. ``ValueError`` when the group sizes cannot sum to ``batch_size``.
    """
    total_w = sum(weights.values())
    if total_w <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError(f"mixture weights {dict(weights)} must be >= 0 with a positive sum")
    after = sum(trained.get(name, 0) for name in weights) + batch_size
    deficit = {name: max(0.0, after * w / total_w - trained.get(name, 0)) for name, w in weights.items()}
    scale = sum(deficit.values())
    ideal = {name: batch_size * d / scale for name, d in deficit.items()}
    quota = {name: int(ideal[name] // group_sizes[name]) * group_sizes[name] for name in weights}
    left = batch_size - sum(quota.values())
    while left > 0:
        fits = [name for name in weights if weights[name] > 0 and group_sizes[name] <= left]
        if not fits:
            raise ValueError(
                f"batch of {batch_size} sequences cannot be split into whole groups of sizes {dict(group_sizes)} "
                f"({left} left over): use a data.train_batch_size those sizes sum to"
            )
        name = max(fits, key=lambda n: ideal[n] - quota[n])
        quota[name] += group_sizes[name]
        left -= group_sizes[name]
    return quota


@dataclass
class MixtureBatcher:
    """Holds the trained mixture of environments: pending groups per env, filled into batches by the weights.

    ``weights``: env name → weight (only these envs count towards the mixture); ``names``: env id → name (the
    API's registration order). Groups of other envs are used only to fill a share that an env could not deliver.
    Surplus groups wait for later steps, at most ``max_pending`` sequences per env (oldest dropped beyond, counted)
    and within the lag cap of :meth:`select`.

    An env short of its quota is waited for up to ``wait_s`` per step; then its missing share goes to the others
    (counted in ``reassigned_sequences`` and ``short_steps[env]``), it is marked *lagging* and later steps do not wait
    for it again until it delivers a full quota. A reassigned share is forgiven (``credited``): it is not paid back
    later, so one slow phase does not skew the following batches.
    """

    weights: dict[str, float]
    batch_size: int
    wait_s: float
    names: dict[int, str] = field(default_factory=dict)
    group_sizes: dict[str, int] = field(default_factory=dict)
    max_pending: int | None = None
    pending: dict[str, list[Any]] = field(default_factory=dict)
    trained: dict[str, int] = field(default_factory=dict)
    credited: dict[str, int] = field(default_factory=dict)
    lagging: set[str] = field(default_factory=set)
    received: dict[str, int] = field(default_factory=dict)
    reassigned_sequences: int = 0
    surplus_dropped: int = 0
    stale_dropped: int = 0
    short_steps: dict[str, int] = field(default_factory=dict)

    def name_of(self, group: Any) -> str:
        env_id = group_env_id(group)
        return self.names.get(env_id, f"env_{env_id}") if env_id is not None else "env_unknown"

    def add(self, groups: Iterable[Any]) -> None:
        """Queue polled groups under their env's name (FIFO); learn group sizes; bound each env's backlog."""
        for group in groups:
            name = self.name_of(group)
            self.pending.setdefault(name, []).append(group)
            self.group_sizes.setdefault(name, len(group_tokens(group)))
            self.received[name] = self.received.get(name, 0) + len(group_tokens(group))
        if self.max_pending is not None:
            for queue in self.pending.values():
                while sum(len(group_tokens(g)) for g in queue) > self.max_pending:
                    self.surplus_dropped += 1
                    queue.pop(0)

    def _drop_stale(self, lag_of: Callable[[Sequence[int]], int | None], max_policy_lag: int | None) -> None:
        if max_policy_lag is None:
            return
        for name, queue in self.pending.items():
            fresh = []
            for group in queue:
                known = [lag for lag in (lag_of(t) for t in group_tokens(group)) if lag is not None]
                if known and max(known) > max_policy_lag:
                    self.stale_dropped += 1
                else:
                    fresh.append(group)
            self.pending[name] = fresh

    def _take(self, name: str, limit: int, chosen: list[Any], taken: dict[str, int]) -> None:
        queue = self.pending.get(name, [])
        while queue and taken.get(name, 0) + len(group_tokens(queue[0])) <= limit:
            group = queue.pop(0)
            chosen.append(group)
            taken[name] = taken.get(name, 0) + len(group_tokens(group))

    def select(
        self,
        waited_s: float,
        lag_of: Callable[[Sequence[int]], int | None] = lambda tokens: None,
        max_policy_lag: int | None = None,
    ) -> list[Any] | None:
        """One batch of exactly ``batch_size`` sequences by the weights, or None (poll more and call again)."""
        self._drop_stale(lag_of, max_policy_lag)
        weighted = [n for n, w in self.weights.items() if w > 0]
        unseen = [n for n in weighted if n not in self.group_sizes]  # group size (and so the quota) not known yet
        known = {n: self.weights[n] for n in weighted if n in self.group_sizes}
        before = {n: w for n, w in known.items() if n in self.credited}
        for name in known:  # an env seen for the first time starts level with the others: no catch-up for the past
            if name not in self.credited:
                past = sum(self.credited[n] for n in before)
                self.credited[name] = round(past * known[name] / sum(before.values())) if before else 0
        quota = mixture_quotas(self.batch_size, known, self.group_sizes, self.credited) if known else {}
        available = {n: sum(len(group_tokens(g)) for g in self.pending.get(n, [])) for n in quota}
        short = [n for n, q in quota.items() if available[n] < q] + unseen
        if any(n not in self.lagging for n in short) and waited_s < self.wait_s:
            return None
        chosen: list[Any] = []
        taken: dict[str, int] = {}
        for name, q in quota.items():
            self._take(name, q, chosen, taken)
        room = self.batch_size - sum(taken.values())
        if room:  # the share of envs that could not keep up goes to the others (weighted first, by deficit)
            order = sorted(
                (n for n in self.pending if self.pending[n]),
                key=lambda n: (n in quota, quota.get(n, 0) - taken.get(n, 0)),
                reverse=True,
            )
            for name in order:
                self._take(name, taken.get(name, 0) + room, chosen, taken)
                room = self.batch_size - sum(taken.values())
            if room:
                for group in reversed(chosen):  # not enough whole groups yet: put them back, poll more
                    self.pending[self.name_of(group)].insert(0, group)
                return None
        for name in short:
            self.short_steps[name] = self.short_steps.get(name, 0) + 1
            self.lagging.add(name)
        for name in quota:
            if name not in short:
                self.lagging.discard(name)
        for name, n in taken.items():
            self.trained[name] = self.trained.get(name, 0) + n
        for name, q in quota.items():
            # the quota counts as delivered: a missing share is forgiven, a share filled for others is not repaid
            self.credited[name] = self.credited.get(name, 0) + q
            self.reassigned_sequences += max(0, q - taken.get(name, 0))
        return chosen

    def metrics(self, chosen: Sequence[Any]) -> dict[str, float]:
        """Per env of this batch ``atropos/env/<name>/{fraction,mean_score,sequences}``, plus cumulative counters."""
        out: dict[str, float] = {}
        by_env: dict[str, list[float]] = {}
        for group in chosen:
            by_env.setdefault(self.name_of(group), []).extend(group_scores(group))
        total = sum(len(s) for s in by_env.values()) or 1
        for name in sorted(set(self.weights) | set(by_env)):
            scores = by_env.get(name, [])
            out[f"atropos/env/{name}/sequences"] = float(len(scores))
            out[f"atropos/env/{name}/fraction"] = len(scores) / total
            if scores:
                out[f"atropos/env/{name}/mean_score"] = sum(scores) / len(scores)
            out[f"atropos/env/{name}/short_steps"] = float(self.short_steps.get(name, 0))
        trained_total = sum(self.trained.values()) or 1
        received_total = sum(self.received.values()) or 1
        for name in sorted(set(self.weights) | set(self.trained) | set(self.received)):
            out[f"atropos/env/{name}/trained_fraction"] = self.trained.get(name, 0) / trained_total
            # what the API delivered (its FIFO batches follow env speed): compare with trained_fraction
            out[f"atropos/env/{name}/received_fraction"] = self.received.get(name, 0) / received_total
        out["atropos/mixture/reassigned_sequences"] = float(self.reassigned_sequences)
        out["atropos/mixture/surplus_dropped"] = float(self.surplus_dropped)
        out["atropos/mixture/stale_dropped"] = float(self.stale_dropped)
        out["atropos/mixture/pending_groups"] = float(sum(len(q) for q in self.pending.values()))
        out["atropos/mixture/lagging_envs"] = float(len(self.lagging))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Cumulative counts (pending groups are not kept: like the API's queue, they do not survive a restart)."""
        return {
            "trained": dict(self.trained),
            "credited": dict(self.credited),
            "short_steps": dict(self.short_steps),
            "reassigned": self.reassigned_sequences,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.trained = dict(state.get("trained", {}))
        self.credited = dict(state.get("credited", {}))
        self.short_steps = dict(state.get("short_steps", {}))
        self.reassigned_sequences = int(state.get("reassigned", 0))


def mixture_from_config(config: Any) -> MixtureBatcher | None:
    """The mixture to hold, or None.

    Weights: ``atropos.mixture`` (name → weight), else — when the launcher runs the envs (it sets
    ``atropos.env_ids_file``) — the weights of two or more ``atropos.launcher.envs``. Env ids map to names in this
    order until ``atropos.env_ids_file`` (written as each env registers) says otherwise.
    """
    atropos = config.atropos
    weights = {str(k): float(v) for k, v in (atropos.get("mixture") or {}).items()}
    sizes: dict[str, int] = {}
    launcher_envs = list((atropos.get("launcher") or {}).get("envs") or [])
    for i, env in enumerate(launcher_envs):
        name = str(env.get("name") or f"env{i}")
        if name in weights or not atropos.get("mixture"):
            sizes[name] = int(env.get("group_size", 8))
    if not weights and len(launcher_envs) >= 2 and atropos.get("env_ids_file"):  # the launcher started them
        weights = {str(e.get("name") or f"env{i}"): float(e.get("weight", 1.0)) for i, e in enumerate(launcher_envs)}
    if not weights:
        return None
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"atropos.mixture / launcher env weights {weights}: use weights >= 0 with a positive sum")
    batch_size = int(config.data.train_batch_size)
    pending_batches = atropos.get("mixture_max_pending_batches")
    return MixtureBatcher(
        weights=weights,
        batch_size=batch_size,
        wait_s=float(atropos.get("mixture_wait_s", 120.0)),
        names=dict(enumerate(weights)),
        group_sizes=sizes,
        max_pending=None if pending_batches is None else int(pending_batches) * batch_size,
    )


def fill_mixture_batch(
    batcher: MixtureBatcher,
    poll: Callable[[], Iterable[Any]],
    *,
    lag_of: Callable[[Sequence[int]], int | None] = lambda tokens: None,
    max_policy_lag: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[Any], int]:
    """Poll (``poll()`` blocks until the API has a batch) until ``batcher`` can select one; (groups, polls)."""
    start, polls = clock(), 0
    while (chosen := batcher.select(clock() - start, lag_of, max_policy_lag)) is None:
        batcher.add(poll())
        polls += 1
    return chosen, polls
