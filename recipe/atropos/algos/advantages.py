"""Advantages for Atropos batches: the environment's token-level values where given, verl's GRPO elsewhere.

Rules, per sequence of a batch built by :func:`recipe.atropos.trainer.dataproto.scored_data_to_dataproto`:

- ``has_env_advantages`` and ``use_env_advantages``: the environment's ``token_level_advantages``, masked;
- otherwise verl's :func:`compute_grpo_outcome_advantage` over the sequence's group (``uid``) — called, not
  re-implemented — among the group's sequences that also take this rule;
- ``advantage_zeroed`` (``set_advantage_to_zero`` override): advantage 0, and the sequence is left out of its group's
  mean and std (zeroing the *score* first, as the public implementation does, would shift the group's statistics);
- ``fallback_to_grpo=False``: sequences without env advantages are dropped (whole groups; counted), not trained on 0.

Then, on the combined advantages, in this order (:func:`normalize_and_clip_advantages`):

1. ``normalize="batch"``: whiten over the batch's trained tokens ``T`` (``response_mask`` = 1, zeroed sequences left
   out): ``A ← (A − mean_T(A)) / sqrt(var_T(A) + 1e-8)`` with the unbiased variance (verl's ``masked_whiten``);
   ``"none"`` leaves them as they are. Fewer than two trained tokens: left as they are (counted).
2. ``clip=[lo, hi]``: ``A ← min(max(A, lo), hi)`` on trained tokens (the share clipped is logged).
3. Untrained tokens and zeroed sequences stay exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from verl import DataProto
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, register_adv_est
from verl.utils.torch_functional import masked_whiten

ESTIMATOR_NAME = "atropos"
NORMALIZATIONS = ("none", "batch")


def check_advantage_options(normalize: str, clip: Sequence[float] | None) -> tuple[float, float] | None:
    """Validate ``atropos.advantage.{normalize,clip}``; the clip range as a float pair (None = no clipping)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"atropos.advantage.normalize={normalize!r}: use 'none' or 'batch' (whiten over the batch's trained tokens)"
        )
    if clip is None:
        return None
    bounds = list(clip)
    if len(bounds) != 2 or not all(isinstance(b, int | float) and math.isfinite(b) for b in bounds):
        raise ValueError(f"atropos.advantage.clip={bounds!r}: use null or two finite numbers [lo, hi], e.g. [-3, 3]")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo < hi:
        raise ValueError(f"atropos.advantage.clip=[{lo}, {hi}]: lo must be below hi, e.g. [-3.0, 3.0]")
    return lo, hi


def normalize_and_clip_advantages(
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalize: str = "none",
    clip: Sequence[float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Batch whitening then clipping of advantages over trained tokens (see the module doc for formulas and order).

    ``advantages`` [N, T], ``mask`` [N, T] (1/True = trained token) → (float32 [N, T] (float64 for float64 input),
    metrics).
    Entries outside ``mask`` come back as 0.
    """
    bounds = check_advantage_options(normalize, clip)
    keep = mask.to(torch.bool)
    adv = advantages.to(torch.promote_types(advantages.dtype, torch.float32)) * keep
    n_tokens = int(keep.sum().item())
    metrics: dict[str, float] = {}
    if normalize == "batch":
        if n_tokens >= 2:
            trained = adv[keep]
            metrics["atropos/advantage_raw_mean"] = float(trained.mean().item())
            metrics["atropos/advantage_raw_std"] = float(trained.std().item())
            adv = masked_whiten(adv, keep.to(adv.dtype)) * keep
        else:
            metrics["atropos/advantage_normalization_skipped"] = 1.0
    if bounds is not None:
        lo, hi = bounds
        clipped = keep & ((adv < lo) | (adv > hi))
        metrics["atropos/advantage_clip_fraction"] = float(clipped.sum().item()) / max(n_tokens, 1)
        adv = adv.clamp(lo, hi) * keep
    return adv, metrics


def compute_atropos_advantages(
    data: DataProto,
    *,
    use_env_advantages: bool = True,
    fallback_to_grpo: bool = True,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
    normalize: str = "none",
    clip: Sequence[float] | None = None,
) -> DataProto:
    """Fill ``advantages`` and ``returns`` [N, R] (0 outside ``response_mask``); may drop groups (see module doc).

    ``normalize`` / ``clip``: see :func:`normalize_and_clip_advantages` (applied after combining, before dropping).
    Reads ``token_level_rewards`` (``token_level_scores`` when absent), ``response_mask``, ``token_level_advantages``,
    ``has_env_advantages`` and the non-tensors ``uid`` and ``advantage_zeroed``. Counters go to
    ``meta_info["atropos_metrics"]``.
    """
    batch = data.batch
    mask = batch["response_mask"].to(torch.float32)
    rewards = batch["token_level_rewards"] if "token_level_rewards" in batch.keys() else batch["token_level_scores"]
    n = mask.shape[0]
    uid = np.asarray(data.non_tensor_batch["uid"], dtype=object)
    zeroed = torch.as_tensor(
        np.asarray(data.non_tensor_batch.get("advantage_zeroed", np.zeros(n, dtype=bool)), dtype=bool)
    )
    has_env = "has_env_advantages" in batch.keys()
    env = batch["has_env_advantages"].bool() if has_env else torch.zeros(n, dtype=torch.bool)
    use_env = env & use_env_advantages
    grpo = ~use_env & ~zeroed

    advantages = torch.zeros_like(mask)
    if use_env.any():
        advantages[use_env] = batch["token_level_advantages"][use_env].to(torch.float32) * mask[use_env]
    dropped_groups: set[Any] = set()
    if grpo.any():
        if fallback_to_grpo:
            rows = torch.nonzero(grpo).squeeze(-1)
            grpo_adv, _ = compute_grpo_outcome_advantage(
                token_level_rewards=rewards[rows],
                response_mask=mask[rows],
                index=uid[rows.numpy()],
                epsilon=epsilon,
                norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
            )
            advantages[rows] = grpo_adv.to(torch.float32)
        else:
            dropped_groups = set(uid[grpo.numpy()])

    trained = mask * (~zeroed).to(mask.dtype)[:, None]
    if dropped_groups:
        trained = trained * torch.as_tensor([u not in dropped_groups for u in uid], dtype=mask.dtype)[:, None]
    advantages, norm_metrics = normalize_and_clip_advantages(advantages, trained, normalize=normalize, clip=clip)
    data.batch["advantages"] = advantages
    data.batch["returns"] = advantages.clone()
    counted = (~zeroed).sum().item()
    metrics = {
        "atropos/env_advantage_fraction": float(use_env.sum().item()) / max(n, 1),
        "atropos/zeroed_advantage_count": float(zeroed.sum().item()),
        "atropos/dropped_groups": float(len(dropped_groups)),
        "atropos/grpo_sequences": float(grpo.sum().item()) if fallback_to_grpo else 0.0,
        "atropos/trained_sequences": float(counted),
        **norm_metrics,
    }
    if dropped_groups:
        keep = np.array([u not in dropped_groups for u in uid], dtype=bool)
        data = data.select_idxs(keep)
    data.meta_info.setdefault("atropos_metrics", {}).update(metrics)
    return data


@register_adv_est(ESTIMATOR_NAME)
def compute_atropos_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``algorithm.adv_estimator=atropos`` in verl's generic ``compute_advantage``: [N, R] → ([N, R], [N, R]).

    verl's generic path hands estimators only rewards, mask and uid, so this is the GRPO fallback of
    :func:`compute_atropos_advantages`; ``RayAtroposTrainer`` calls the full function, which also sees the
    environments' token-level advantages and ``set_advantage_to_zero`` overrides.
    """
    norm = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    return compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm,
    )
