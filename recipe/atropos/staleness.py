"""Policy lag: how many weight updates separate the policy that sampled a sequence from the one that trains on it.

Versions count weight updates: the endpoint serves version ``v`` after ``v`` updates, and training step ``s`` (1-based)
updates the weights of version ``s - 1``. So a sequence sampled by version ``v`` and trained at step ``s`` has lag
``(s - 1) - v`` (:func:`policy_lag`). Every lag in the recipe is computed here:

- the group sources measure each fetched sequence's lag from the endpoint's ledger (:class:`LagMeter`) and drop groups
  over ``atropos.max_policy_lag``;
- the spool bounds the lag of a group fetched in an earlier run from the step it was fetched at (the policy it came
  from is no newer than the one served during that step): :func:`lag_lower_bound`;
- the launcher keeps environments from generating further ahead than the cap allows
  (:func:`env_max_batches_offpolicy`).

The importance-sampling correction that makes lagging data trainable is verl's ``algorithm.rollout_correction``; the
rules for combining it with the cap are checked at start-up (:mod:`recipe.atropos.config.checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from recipe.atropos.schema import ScoredGroup, group_tokens

VersionLookup = Callable[[Sequence[int]], "int | None"]  # tokens of a full sequence -> the version that sampled it


def trained_version(step: int) -> int:
    """The policy version whose weights training step ``step`` updates (and which the endpoint serves meanwhile)."""
    return step - 1


def policy_lag(step: int, sampled_version: int) -> int:
    """Weight updates between the policy that sampled a sequence and the one training on it at ``step``."""
    return trained_version(step) - sampled_version


def lag_lower_bound(step: int, fetched_step: int) -> int:
    """Least possible lag at ``step`` of a group fetched during ``fetched_step``: it was sampled by a policy no newer
    than the one served then, version ``trained_version(fetched_step)``."""
    return policy_lag(step, trained_version(fetched_step))


def env_max_batches_offpolicy(max_policy_lag: int | None) -> int | None:
    """The envs' ``--env.max_batches_offpolicy`` for a lag cap: one batch of slack below the cap, since groups still in
    flight when an update starts are trained one version later (None: no cap, the env's own default)."""
    return None if max_policy_lag is None else max(1, max_policy_lag - 1)


class LagMeter:
    """Lags of fetched groups from the endpoint's record of which version sampled each completion.

    ``version_of(tokens)`` is :meth:`recipe.atropos.endpoint.ledger.CompletionLedger.version_of` (None = unknown: the
    sequence was not generated through this trainer's endpoint, or the ledger forgot it). A group is stale when its
    largest known lag exceeds ``max_policy_lag`` (None = no cap).
    """

    def __init__(self, version_of: VersionLookup, max_policy_lag: int | None) -> None:
        self.version_of = version_of
        self.max_policy_lag = max_policy_lag

    def lags(self, group: ScoredGroup | dict[str, Any], step: int) -> list[int | None]:
        """One entry per sequence of ``group``: its lag at ``step``, or None when unknown."""
        out: list[int | None] = []
        for tokens in group_tokens(group):
            version = self.version_of(tokens)
            out.append(None if version is None else policy_lag(step, version))
        return out

    def is_stale(self, group: ScoredGroup | dict[str, Any], step: int) -> bool:
        if self.max_policy_lag is None:
            return False
        known = [lag for lag in self.lags(group, step) if lag is not None]
        return bool(known) and max(known) > self.max_policy_lag

    def metrics(self, groups: Iterable[ScoredGroup | dict[str, Any]], step: int) -> dict[str, float]:
        """``atropos/policy_lag_{mean,max,0,1,2plus,unknown}`` over the sequences of ``groups`` (see
        :func:`lag_metrics`)."""
        return lag_metrics([lag for group in groups for lag in self.lags(group, step)])


def lag_metrics(lags: Sequence[int | None]) -> dict[str, float]:
    """Mean, max and the fractions trained 0, 1 and 2+ updates after sampling, over the known lags; and the count of
    sequences whose lag is unknown."""
    known = [lag for lag in lags if lag is not None]
    out = {"atropos/policy_lag_unknown": float(len(lags) - len(known))}
    if not known:
        return out
    n = float(len(known))
    out.update(
        {
            "atropos/policy_lag_mean": sum(known) / n,
            "atropos/policy_lag_max": float(max(known)),
            "atropos/policy_lag_0": sum(1 for lag in known if lag <= 0) / n,
            "atropos/policy_lag_1": sum(1 for lag in known if lag == 1) / n,
            "atropos/policy_lag_2plus": sum(1 for lag in known if lag >= 2) / n,
        }
    )
    return out
