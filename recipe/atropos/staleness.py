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
from dataclasses import dataclass
from typing import Any

from recipe.atropos.schema import ScoredGroup, group_masks, group_tokens


@dataclass(frozen=True)
class SequenceVersion:
    """The policy version that sampled a trained sequence: ``matched`` (found in the endpoint's ledger) or a
    conservative bound (``matched=False``: the oldest version it can come from). ``version=None``: unknown."""

    version: int | None
    matched: bool


UNKNOWN = SequenceVersion(None, False)

# (tokens [T], masks [T] or None) of one trained sequence -> the version that sampled it, matched or bounded:
# :meth:`recipe.atropos.endpoint.ledger.CompletionLedger.sequence_version`.
SequenceLookup = Callable[[Sequence[int], "Sequence[int] | None"], SequenceVersion]


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

    ``lookup(tokens, masks)`` is :meth:`recipe.atropos.endpoint.ledger.CompletionLedger.sequence_version`: a sequence's
    version is matched (its tokens, or each trained span by ids or text), or bounded by the oldest completion nobody
    has claimed (never assumed current), or unknown (not generated through this trainer's endpoint, and nothing to
    bound it by). A group is stale when its largest known lag, matched or bounded, exceeds ``max_policy_lag``
    (None = no cap).
    """

    def __init__(self, lookup: SequenceLookup, max_policy_lag: int | None) -> None:
        self.lookup = lookup
        self.max_policy_lag = max_policy_lag

    def versions(self, group: ScoredGroup | dict[str, Any]) -> list[SequenceVersion]:
        """One entry per sequence of ``group``: the version that sampled it (see :class:`SequenceVersion`)."""
        masks = group_masks(group)
        tokens = group_tokens(group)
        if masks is None or len(masks) != len(tokens):
            masks = [None] * len(tokens)
        return [self.lookup(seq, mask) for seq, mask in zip(tokens, masks, strict=True)]

    def lags(self, group: ScoredGroup | dict[str, Any], step: int) -> list[int | None]:
        """One entry per sequence of ``group``: its lag at ``step`` (matched or bounded), or None when unknown."""
        return [None if v.version is None else policy_lag(step, v.version) for v in self.versions(group)]

    def is_stale(self, group: ScoredGroup | dict[str, Any], step: int) -> bool:
        if self.max_policy_lag is None:
            return False
        known = [lag for lag in self.lags(group, step) if lag is not None]
        return bool(known) and max(known) > self.max_policy_lag

    def metrics(self, groups: Iterable[ScoredGroup | dict[str, Any]], step: int) -> dict[str, float]:
        """``atropos/policy_lag_{mean,max,0,1,2plus,unknown}`` over the sequences of ``groups`` (see
        :func:`lag_metrics`) and ``atropos/lag/unmatched_fraction``: the share of sequences whose lag was bounded or
        unknown rather than matched to a served completion."""
        versions = [v for group in groups for v in self.versions(group)]
        out = lag_metrics([None if v.version is None else policy_lag(step, v.version) for v in versions])
        if versions:
            out["atropos/lag/unmatched_fraction"] = sum(1 for v in versions if not v.matched) / len(versions)
        return out


def no_ledger(tokens: Sequence[int], masks: Sequence[int] | None = None) -> SequenceVersion:
    """A lookup for sources without an endpoint (offline data): every version unknown."""
    return UNKNOWN


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
