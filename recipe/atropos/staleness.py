"""Training correctly on stale rollouts: the config rules, the policy-lag histogram, the importance-weight metrics.

Atropos environments generate ahead of the trainer (up to ``max_batches_offpolicy`` batches queued), so a group can be
trained one or more weight updates after the policy that sampled it. The recipe corrects for that with truncated
importance sampling (verl's ``algorithm.rollout_correction``), in one of two modes:

- bypass (``bypass_mode: true``): ``old_log_probs`` = the rollout's log-probs (``inference_logprobs``), no old-log-prob
  pass. ``advantage_weighted_ce`` then weights each token by ``min(π_θ / π_rollout, C)``; ``vanilla`` is PPO-clip
  against the behaviour policy (verl's ``bypass_ppo_clip``).
- decoupled (``bypass_mode: false``): the actor recomputes ``old_log_probs`` and the trainer adds token weights
  ``min(π_old / π_rollout, C)`` (``rollout_is_weights``) that every policy loss multiplies in.

``advantage_weighted_ce`` (``-A·log π``) has no ratio to the old policy, so it is only correct for a single update per
batch: :func:`check_staleness_config` refuses it with several mini-batches or epochs and names ``vanilla``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from verl import DataProto

ADVANTAGE_WEIGHTED_CE = "advantage_weighted_ce"

# verl's rollout-correction metric names (``rollout_corr/`` prefix) → the recipe's short names.
IS_METRIC_NAMES = {
    "rollout_corr/rollout_is_mean": "atropos/is_weight_mean",
    "rollout_corr/rollout_is_max": "atropos/is_weight_max",
    "rollout_corr/rollout_is_ratio_fraction_high": "atropos/is_truncated_fraction",
}


def updates_per_step(config: DictConfig) -> int:
    """Optimizer steps the actor takes per training batch: mini-batches × epochs."""
    actor = config.actor_rollout_ref.actor
    batch = int(config.data.train_batch_size)
    mini = int(actor.ppo_mini_batch_size) * int(config.actor_rollout_ref.rollout.get("n", 1) or 1)
    mini_batches = max(1, -(-batch // mini)) if mini > 0 else 1
    return mini_batches * int(actor.get("ppo_epochs", 1) or 1)


def check_staleness_config(config: DictConfig) -> None:
    """Refuse combinations that would train incorrectly on the lags the config allows; errors name the fix."""
    actor = config.actor_rollout_ref.actor
    loss_mode = str(actor.policy_loss.get("loss_mode", "vanilla"))
    if loss_mode == ADVANTAGE_WEIGHTED_CE and updates_per_step(config) > 1:
        raise ValueError(
            f"actor_rollout_ref.actor.policy_loss.loss_mode={ADVANTAGE_WEIGHTED_CE} takes "
            f"{updates_per_step(config)} updates per batch (data.train_batch_size={config.data.train_batch_size}, "
            f"ppo_mini_batch_size={actor.ppo_mini_batch_size}, ppo_epochs={actor.get('ppo_epochs', 1)}), but -A·log π "
            "has no ratio or clip against the old policy, so every update after the first trains off-policy "
            "uncorrected. Use policy_loss.loss_mode=vanilla (PPO clip) or ppo_mini_batch_size=data.train_batch_size "
            "and ppo_epochs=1."
        )
    max_lag = config.atropos.get("max_policy_lag")
    if max_lag is not None and int(max_lag) < 0:
        raise ValueError(f"atropos.max_policy_lag={max_lag} must be >= 0 (or null for no limit)")
    corr = config.algorithm.get("rollout_correction") or {}
    bypass = bool(corr.get("bypass_mode", False))
    has_is = corr.get("rollout_is") is not None
    allows_lag = max_lag is None or int(max_lag) > 0
    if allows_lag and not bypass and not has_is:
        raise ValueError(
            f"atropos.max_policy_lag={max_lag} lets groups from older policies into training, but neither "
            "algorithm.rollout_correction.rollout_is nor .bypass_mode is set, so they would train without "
            "importance-sampling correction. Set algorithm.rollout_correction.rollout_is=token (truncated IS from "
            "inference_logprobs) or atropos.max_policy_lag=0."
        )
    if (bypass or has_is) and not config.actor_rollout_ref.rollout.get("calculate_log_probs", False):
        raise ValueError(
            "algorithm.rollout_correction needs the rollout's log-probs: set "
            "actor_rollout_ref.rollout.calculate_log_probs=true"
        )
    if bypass and loss_mode == ADVANTAGE_WEIGHTED_CE and not has_is and allows_lag:
        raise ValueError(
            f"bypass_mode with loss_mode={ADVANTAGE_WEIGHTED_CE} weights tokens by π_θ/π_rollout only when "
            "algorithm.rollout_correction.rollout_is is set: set rollout_is=token, or atropos.max_policy_lag=0"
        )


def share_rollout_correction_with_actor(config: DictConfig) -> None:
    """Copy ``algorithm.rollout_correction`` into ``actor.policy_loss.rollout_correction``.

    The actor workers get their own copy of the config when they are built: this is how the policy loss, running
    there, learns the IS level and threshold it applies in bypass mode. Call before the workers start.
    """
    corr = config.algorithm.get("rollout_correction")
    if corr is None:
        return
    plain = OmegaConf.to_container(corr, resolve=True)
    plain.pop("_target_", None)
    with open_dict(config):
        config.actor_rollout_ref.actor.policy_loss.rollout_correction = plain


def lag_histogram(lags: Sequence[int]) -> dict[str, float]:
    """Fractions of sequences (with a known lag) trained 0, 1, and 2+ weight updates after they were sampled."""
    if not lags:
        return {}
    n = float(len(lags))
    return {
        "atropos/policy_lag_0": sum(1 for lag in lags if lag <= 0) / n,
        "atropos/policy_lag_1": sum(1 for lag in lags if lag == 1) / n,
        "atropos/policy_lag_2plus": sum(1 for lag in lags if lag >= 2) / n,
    }


def is_weight_metrics(rollout_corr_metrics: Mapping[str, Any]) -> dict[str, float]:
    """verl's ``rollout_corr/rollout_is_{mean,max,ratio_fraction_high}`` as ``atropos/is_weight_{mean,max}``,
    ``atropos/is_truncated_fraction`` (the fraction of tokens whose raw ratio exceeded the threshold)."""
    return {
        new: float(rollout_corr_metrics[old]) for old, new in IS_METRIC_NAMES.items() if old in rollout_corr_metrics
    }


def promote_actor_is_metrics(metrics: dict[str, Any]) -> None:
    """Bypass mode computes the IS weights inside the actor, whose metrics come back as ``actor/atropos/...``:
    expose them under the same ``atropos/is_weight_*`` names as the decoupled mode's (in place)."""
    for name in IS_METRIC_NAMES.values():
        if f"actor/{name}" in metrics and name not in metrics:
            metrics[name] = metrics[f"actor/{name}"]


def rollout_logprob_diff(batch: DataProto) -> dict[str, float]:
    """Max and mean of |rollout log-prob - trainer log-prob| over response tokens (``rollout_log_probs`` and
    ``old_log_probs`` [B, T_resp], masked by ``response_mask`` [B, T_resp]); verl's ``training/rollout_probs_diff_*``
    compare probabilities instead."""
    mask = batch.batch["response_mask"].bool()
    if not mask.any():
        return {}
    diff = (batch.batch["rollout_log_probs"] - batch.batch["old_log_probs"]).abs()[mask]
    return {
        "atropos/rollout_logprob_diff_max": float(diff.max()),
        "atropos/rollout_logprob_diff_mean": float(diff.mean()),
    }
