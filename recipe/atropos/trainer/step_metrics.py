"""Per-step metrics the trainer adds to verl's own: the step's groups and scores, rollout vs trainer log-probs, IS
weights computed in the actor, and the rollout servers' counters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from verl import DataProto

from recipe.atropos.algos.losses import IS_METRIC_NAMES
from recipe.atropos.schema import group_scores


def group_score_metrics(groups: Sequence[Any]) -> dict[str, float]:
    """``atropos/groups``, ``sequences``, ``mean_score`` and ``identical_score_rate`` (groups whose scores are all
    equal: GRPO gives them zero advantage) of one step's groups."""
    scores = [s for g in groups for s in group_scores(g)]
    identical = [len(set(group_scores(g))) == 1 for g in groups]
    return {
        "atropos/groups": float(len(groups)),
        "atropos/sequences": float(len(scores)),
        "atropos/mean_score": float(np.mean(scores)),
        "atropos/identical_score_rate": float(np.mean(identical)),
    }


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


class OverlapMeter:
    """How much generation and training overlapped in each step, from the endpoint's cumulative counters
    (``paused_s``: seconds its gate held requests; ``completions``), the replicas' cumulative ``weight_load_s`` and the
    step's timing (``step``, ``poll``, ``update_weights`` seconds).

    ``count_replica_holds``: add the replicas' weight-load time to the held time — true when swaps do not close the
    endpoint (split placement with a version-tagging rollout, whose loads hold the replica's generation instead);
    otherwise the endpoint was closed during the loads already.
    """

    def __init__(self, count_replica_holds: bool) -> None:
        self.count_replica_holds = count_replica_holds
        self._paused_s = 0.0
        self._load_s = 0.0
        self._served_at_update = 0.0
        self.served_during_update = 0.0

    def update_started(self, completions: float) -> None:
        self._served_at_update = float(completions)

    def update_ended(self, completions: float) -> None:
        self.served_during_update = float(completions) - self._served_at_update

    def step_metrics(
        self, timing: dict[str, float], endpoint_stats: dict[str, float], server_metrics: dict[str, float]
    ) -> dict[str, float]:
        paused_total = float(endpoint_stats.get("paused_s", 0.0))
        load_total = sum(v for k, v in server_metrics.items() if k.endswith("/weight_load_s"))
        paused, load = paused_total - self._paused_s, load_total - self._load_s
        self._paused_s, self._load_s = paused_total, load_total
        held = paused + (load if self.count_replica_holds else 0.0)
        step = max(float(timing.get("step", 0.0)), 1e-9)
        wait = float(timing.get("poll", 0.0))
        return {
            "atropos/endpoint/held_s": held,
            "atropos/endpoint/paused_fraction": min(held / step, 1.0),
            "atropos/endpoint/completions_during_update": self.served_during_update,
            "atropos/trainer/wait_s": wait,
            "atropos/trainer/wait_fraction": wait / step,
            "atropos/weight_swap_s": float(timing.get("update_weights", 0.0)),
        }
