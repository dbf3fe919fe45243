"""Per-step metrics the trainer adds to verl's own: rollout vs trainer log-probs, IS weights computed in the actor,
and the rollout servers' counters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from verl import DataProto

from recipe.atropos.algos.losses import IS_METRIC_NAMES


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


def promote_actor_is_metrics(metrics: dict[str, Any]) -> None:
    """Bypass mode computes the IS weights inside the actor, whose metrics come back as ``actor/atropos/...``:
    expose them under the same ``atropos/is_weight_*`` names as the decoupled mode's (in place)."""
    for name in IS_METRIC_NAMES.values():
        if f"actor/{name}" in metrics and name not in metrics:
            metrics[name] = metrics[f"actor/{name}"]


def rollout_server_metrics(server_handles: Sequence[Any]) -> dict[str, float]:
    """``rollout/<replica>/<key>`` from every rollout server that has a ``stats()`` method (hf_cpu, vllm_cpu)."""
    import ray

    metrics: dict[str, float] = {}
    for i, handle in enumerate(server_handles):
        if not hasattr(handle, "stats"):  # Ray handles raise AttributeError for methods the actor lacks
            continue
        for key, value in ray.get(handle.stats.remote()).items():
            metrics[f"rollout/{i}/{key}"] = float(value)
    return metrics
