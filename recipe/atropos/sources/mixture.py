"""An exact mixture of environments: each batch filled to the envs' weights in whole groups (:class:`MixtureBatcher`).

The API's FIFO batches follow the speed of each environment; the batcher queues polled groups per env and hands out a
batch only when it can meet every env's quota (or an env has been waited for long enough), so the trained mixture
converges to the weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe.atropos.config import AtroposConfig
from recipe.atropos.schema import group_env_id, group_scores, group_tokens

IsStale = Callable[[Any], bool]


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
    env_ids_file: str | None = None  # JSON {env_id: name}, written by the launcher as each env registers
    _env_ids_mtime: int | None = None

    def refresh(self) -> None:
        """Env id → name from ``env_ids_file``, read again only when the file changed."""
        if not self.env_ids_file or not Path(self.env_ids_file).exists():
            return
        mtime = Path(self.env_ids_file).stat().st_mtime_ns
        if mtime != self._env_ids_mtime:
            self.names.update({int(k): str(v) for k, v in json.loads(Path(self.env_ids_file).read_text()).items()})
            self._env_ids_mtime = mtime

    def pending_groups(self) -> list[Any]:
        """Polled groups waiting for a later batch (surplus per env)."""
        return [group for queue in self.pending.values() for group in queue]

    def name_of(self, group: Any) -> str:
        env_id = group_env_id(group)
        return self.names.get(env_id, f"env_{env_id}") if env_id is not None else "env_unknown"

    def add(self, groups: Iterable[Any], front: bool = False) -> None:
        """Queue polled groups under their env's name (FIFO; ``front``: before the queued ones, in order); learn group
        sizes; bound each env's backlog."""
        groups = list(groups)
        for i, group in enumerate(groups):
            name = self.name_of(group)
            queue = self.pending.setdefault(name, [])
            if front:
                queue.insert(sum(1 for g in groups[:i] if self.name_of(g) == name), group)
            else:
                queue.append(group)
            self.group_sizes.setdefault(name, len(group_tokens(group)))
            self.received[name] = self.received.get(name, 0) + len(group_tokens(group))
        if self.max_pending is not None:
            for queue in self.pending.values():
                while sum(len(group_tokens(g)) for g in queue) > self.max_pending:
                    self.surplus_dropped += 1
                    queue.pop(0)

    def _drop_stale(self, is_stale: IsStale) -> None:
        for name, queue in self.pending.items():
            fresh = [group for group in queue if not is_stale(group)]
            self.stale_dropped += len(queue) - len(fresh)
            self.pending[name] = fresh

    def _take(self, name: str, limit: int, chosen: list[Any], taken: dict[str, int]) -> None:
        queue = self.pending.get(name, [])
        while queue and taken.get(name, 0) + len(group_tokens(queue[0])) <= limit:
            group = queue.pop(0)
            chosen.append(group)
            taken[name] = taken.get(name, 0) + len(group_tokens(group))

    def select(self, waited_s: float, is_stale: IsStale = lambda group: False) -> list[Any] | None:
        """One batch of exactly ``batch_size`` sequences by the weights, or None (poll more and call again).

        ``waited_s``: how long this step has polled so far; stale groups (``is_stale``) are dropped and counted."""
        self._drop_stale(is_stale)
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


def mixture_from_config(atropos: AtroposConfig, batch_size: int) -> MixtureBatcher | None:
    """The mixture to hold, or None.

    Weights: ``atropos.mixture`` (name → weight), else — when the launcher runs the envs (it sets
    ``atropos.env_ids_file``) — the weights of two or more ``atropos.launcher.envs``. Env ids map to names in this
    order until ``atropos.env_ids_file`` (written as each env registers) says otherwise.
    """
    envs = dict(zip(atropos.launcher.env_names(), atropos.launcher.envs, strict=True))
    weights = {str(k): float(v) for k, v in atropos.mixture.items()}
    if not weights and len(envs) >= 2 and atropos.env_ids_file:  # the launcher started them
        weights = {name: float(env.weight) for name, env in envs.items()}
    if not weights:
        return None  # (the typed config has checked both kinds of weights)
    pending_batches = atropos.mixture_max_pending_batches
    return MixtureBatcher(
        weights=weights,
        batch_size=batch_size,
        wait_s=atropos.mixture_wait_s,
        names=dict(enumerate(weights)),
        group_sizes={name: int(env.group_size) for name, env in envs.items() if name in weights},
        max_pending=None if pending_batches is None else int(pending_batches) * batch_size,
        env_ids_file=atropos.env_ids_file,
    )
