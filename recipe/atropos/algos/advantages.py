"""Advantages for Atropos batches: the environment's token-level values where given, verl's GRPO elsewhere.

Rules, per sequence (row) of a batch, in :func:`combine_advantages`:

- ``has_env_advantages`` and ``use_env_advantages``: the environment's token-level advantages, masked;
- otherwise verl's :func:`compute_grpo_outcome_advantage` over the row's group (``group_ids``) — called, not
  re-implemented — among the group's rows that also take this rule;
- ``zeroed`` (the ``set_advantage_to_zero`` override): advantage 0, and the row is left out of its group's mean and
  std, so it does not shift the advantages of the group's other rows;
- ``fallback_to_grpo=False``: every group with a row that would take the GRPO rule is dropped whole (``keep`` is
  False on all its rows; the groups are counted), rather than trained on 0.

Then, on the combined advantages, in this order (:func:`normalize_and_clip_advantages`):

1. ``normalize="batch"``: whiten over the batch's trained tokens ``T`` (``response_mask`` = 1, zeroed and dropped
   rows left out): ``A ← (A − mean_T(A)) / sqrt(var_T(A) + 1e-8)`` with the unbiased variance (verl's
   ``masked_whiten``); ``"none"`` leaves them as they are. Fewer than two trained tokens: left as they are (counted).
2. ``clip=(lo, hi)``: ``A ← min(max(A, lo), hi)`` on trained tokens (the share clipped is logged).
3. Untrained tokens, zeroed rows and dropped rows are exactly 0.

This module depends on torch, numpy and verl only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
from verl.utils.torch_functional import masked_whiten


@dataclass(frozen=True)
class CombinedAdvantages:
    """What :func:`combine_advantages` returns.

    ``advantages``: [N, R] float32, 0 outside trained tokens (``response_mask`` = 0, zeroed or dropped rows);
    ``keep``: [N] bool, the rows to train (False exactly on the rows of dropped groups);
    ``metrics``: ``atropos/...`` counters for the step's log.
    """

    advantages: torch.Tensor
    keep: torch.Tensor
    metrics: dict[str, float]


def _check_options(normalize: str, clip: Sequence[float] | None) -> tuple[float, float] | None:
    """The clip range as a float pair (None = no clipping); ValueError for options that cannot be applied."""
    if normalize not in ("none", "batch"):
        raise ValueError(f"normalize={normalize!r}: use 'none' or 'batch' (whiten over the trained tokens)")
    if clip is None:
        return None
    try:
        lo, hi = (float(b) for b in clip)
    except (TypeError, ValueError):
        lo, hi = 0.0, 0.0
    if not lo < hi:
        raise ValueError(f"clip={clip!r}: use None or two numbers (lo, hi) with lo < hi, e.g. (-3.0, 3.0)")
    return lo, hi


def normalize_and_clip_advantages(
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalize: str = "none",
    clip: Sequence[float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Batch whitening then clipping of advantages over trained tokens (see the module doc for formulas and order).

    Args:
        advantages: [N, T] any float dtype.
        mask: [N, T], 1/True = trained token.
        normalize: ``"none"`` | ``"batch"``.
        clip: None | ``(lo, hi)`` with ``lo < hi``.

    Returns:
        (advantages [N, T] float32 (float64 for float64 input), 0 outside ``mask``; metrics).

    Raises:
        ValueError: for an unknown ``normalize`` or a ``clip`` that is not an increasing pair.
    """
    bounds = _check_options(normalize, clip)
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


def _row_flags(flags: torch.Tensor | np.ndarray | Sequence[bool], n: int, name: str) -> torch.Tensor:
    """[N] bool CPU tensor from a tensor, an array or a list."""
    if isinstance(flags, torch.Tensor):
        out = flags.detach().to(device="cpu", dtype=torch.bool)
    else:
        out = torch.as_tensor(np.asarray(flags, dtype=bool))
    if tuple(out.shape) != (n,):
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected [{n}] (one flag per row)")
    return out


def combine_advantages(
    *,
    env_advantages: torch.Tensor,
    has_env_advantages: torch.Tensor | np.ndarray,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: np.ndarray,
    zeroed: torch.Tensor | np.ndarray,
    use_env_advantages: bool = True,
    fallback_to_grpo: bool = True,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
    normalize: str = "none",
    clip: Sequence[float] | None = None,
) -> CombinedAdvantages:
    """Per-row advantages: env token-level values or verl GRPO, then normalize/clip (rules in the module doc).

    Args:
        env_advantages: [N, R] the environments' token-level advantages (read only where ``has_env_advantages``).
        has_env_advantages: [N] bool, the row's group carries token-level advantages.
        rewards: [N, R] token-level rewards; GRPO scores a row by their sum.
        response_mask: [N, R] 1 = response token to train.
        group_ids: [N] object array, the GRPO group of each row (verl's ``uid``).
        zeroed: [N] bool, the row's ``set_advantage_to_zero`` override.
        use_env_advantages: False = GRPO for every row, env advantages ignored.
        fallback_to_grpo: False = drop the groups that would need GRPO instead of computing it.
        norm_adv_by_std_in_grpo, epsilon: passed to verl's GRPO.
        normalize, clip: see :func:`normalize_and_clip_advantages`.

    Returns:
        :class:`CombinedAdvantages` (``advantages`` [N, R] float32 on ``response_mask``'s device, ``keep`` [N] bool
        on CPU, metrics). The caller selects ``keep`` rows; the normalization statistics already exclude the others.

    Metrics: ``atropos/env_advantage_fraction`` (rows on the env rule / N), ``atropos/zeroed_advantage_count``,
    ``atropos/dropped_groups``, ``atropos/grpo_sequences`` (rows on the GRPO rule; 0 without fallback),
    ``atropos/trained_sequences`` (rows kept and not zeroed), and those of :func:`normalize_and_clip_advantages`.
    """
    mask = response_mask.to(torch.float32)
    n = mask.shape[0]
    if env_advantages.shape != mask.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"env_advantages {tuple(env_advantages.shape)} and rewards {tuple(rewards.shape)} must have the shape of "
            f"response_mask {tuple(mask.shape)}"
        )
    uid = np.asarray(group_ids, dtype=object)
    if uid.shape != (n,):
        raise ValueError(f"group_ids has shape {uid.shape}, expected [{n}] (one group id per row)")
    zero = _row_flags(zeroed, n, "zeroed")
    use_env = _row_flags(has_env_advantages, n, "has_env_advantages") & bool(use_env_advantages)
    grpo = ~use_env & ~zero

    advantages = torch.zeros_like(mask)
    if use_env.any():
        env_rows = use_env.to(mask.device)
        advantages[env_rows] = env_advantages[env_rows].to(torch.float32)  # masked by normalize_and_clip below
    dropped_groups: set[object] = set()
    if grpo.any():
        rows = torch.nonzero(grpo).squeeze(-1)
        if fallback_to_grpo:
            grpo_adv, _ = compute_grpo_outcome_advantage(
                token_level_rewards=rewards[rows.to(rewards.device)],
                response_mask=mask[rows.to(mask.device)],
                index=uid[rows.numpy()],
                epsilon=epsilon,
                norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
            )
            advantages[rows.to(mask.device)] = grpo_adv.to(device=mask.device, dtype=torch.float32)
        else:
            dropped_groups = set(uid[rows.numpy()])

    keep = torch.as_tensor([u not in dropped_groups for u in uid], dtype=torch.bool)
    trained = mask * (keep & ~zero).to(device=mask.device, dtype=mask.dtype)[:, None]
    advantages, norm_metrics = normalize_and_clip_advantages(advantages, trained, normalize=normalize, clip=clip)
    metrics = {
        "atropos/env_advantage_fraction": float(use_env.sum().item()) / max(n, 1),
        "atropos/zeroed_advantage_count": float(zero.sum().item()),
        "atropos/dropped_groups": float(len(dropped_groups)),
        "atropos/grpo_sequences": float(grpo.sum().item()) if fallback_to_grpo else 0.0,
        "atropos/trained_sequences": float((keep & ~zero).sum().item()),
        **norm_metrics,
    }
    return CombinedAdvantages(advantages=advantages, keep=keep, metrics=metrics)
