"""The masked advantage-weighted cross-entropy, standalone and as a registered verl policy loss.

``compute_advantage_weighted_sft_loss``: tokens, advantages and loss masks of one shape [B, T] (advantages may be
[B]) → token-level CE scaled by the advantages, masked, reduced; differentiable. The cross-entropy runs in chunks of
tokens, forward and backward, so no float32 copy of the whole [B, T, V] logits tensor is ever made.

``advantage_weighted_ce`` (``POLICY_LOSS_NAME``) is the same objective inside verl's actor:
``agg_loss(-A · log π · w, mask)`` with ``w`` truncated importance weights (:func:`behaviour_is_weights`; 1 without
rollout correction); on policy its gradient equals REINFORCE/GRPO's. Select it with
``actor_rollout_ref.actor.policy_loss.loss_mode=advantage_weighted_ce``.

:func:`is_weight_metrics` renames verl's ``rollout_corr/`` IS metrics to the recipe's ``atropos/is_*`` names, for the
driver (decoupled mode) and the actor (bypass mode) alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

from recipe.atropos.algos.advantages import normalize_and_clip_advantages

POLICY_LOSS_NAME = "advantage_weighted_ce"
REDUCTIONS = ("token-mean", "seq-mean-token-mean", "sum", "none")
DEFAULT_CHUNK_TOKENS = 512

# verl's rollout-correction metric names (``rollout_corr/`` prefix) → the recipe's short names.
IS_METRIC_NAMES = {
    "rollout_corr/rollout_is_mean": "atropos/is_weight_mean",
    "rollout_corr/rollout_is_max": "atropos/is_weight_max",
    "rollout_corr/rollout_is_ratio_fraction_high": "atropos/is_truncated_fraction",
}


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row ``-log_softmax(logits / temperature)[target]`` for logits [N, V] in any dtype → float32 [N]
    (float64 for float64 logits).

    Forward and backward walk ``chunk`` rows at a time in float32; the gradient is written into one buffer of the
    logits' dtype (the only [N, V] allocation).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
        nll = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        lse = torch.empty_like(nll)
        for start in range(0, logits.shape[0], chunk):
            stop = start + chunk
            z = logits[start:stop].to(dtype, copy=True)  # the chunk's only full-width temporary
            if temperature != 1.0:
                z.div_(temperature)
            lse[start:stop] = torch.logsumexp(z, dim=-1)
            nll[start:stop] = lse[start:stop] - z.gather(1, targets[start:stop, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            probs = logits[start:stop].to(lse.dtype, copy=True)  # softmax(z / T) = exp(z / T - lse), built in place
            if ctx.temperature != 1.0:
                probs.div_(ctx.temperature)
            probs.sub_(lse[start:stop, None]).exp_()
            probs.scatter_add_(1, targets[start:stop, None], torch.full_like(probs[:, :1], -1.0))
            probs.mul_(grad_nll[start:stop, None] / ctx.temperature)
            grad[start:stop] = probs
        return grad, None, None, None


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """``-log softmax(logits / temperature)[targets]``: logits [..., V], targets [...] → float32 [...]."""
    flat = logits.reshape(-1, logits.shape[-1])  # a view for contiguous logits: no copy
    return ChunkedCrossEntropy.apply(flat, targets.reshape(-1), float(temperature), int(chunk)).view(targets.shape)


def compute_advantage_weighted_sft_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    reduction: str = "token-mean",
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    advantage_normalization: str = "none",
    advantage_clipping: Sequence[float] | None = None,
) -> torch.Tensor:
    """Token-level CE scaled by advantages, masked, reduced.

    Shapes: ``logits`` [B, T, V]; ``input_ids``, ``loss_mask`` [B, T]; ``advantages`` [B, T] or [B] (one per
    sequence, broadcast). Causal alignment: ``logits[:, t-1]`` predicts ``input_ids[:, t]``; ``advantages[:, t]`` and
    ``loss_mask[:, t]`` refer to token t, so position 0 is never trained.

    Per token: ``A[b,t] · CE[b,t] · mask[b,t]``. ``reduction``: ``"token-mean"`` (Σ loss / Σ mask),
    ``"seq-mean-token-mean"`` (mean, over sequences with at least one masked-in token, of each one's token mean),
    ``"sum"``, ``"none"`` ([B, T] float32, zeros where masked out and at t = 0).

    ``advantage_normalization`` (``"none"`` | ``"batch"``) and ``advantage_clipping`` (None | ``(lo, hi)``) act on the
    advantages of the trained tokens (``loss_mask`` = 1, t ≥ 1) before weighting, as ``atropos.advantage`` does in
    the trainer: whiten ``(A − mean) / sqrt(var + 1e-8)`` (unbiased variance), then clamp to ``[lo, hi]``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: use one of {REDUCTIONS}")
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"shapes: logits {tuple(logits.shape)} must be [B, T, V] and input_ids {tuple(input_ids.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)} must be [B, T]"
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    B, T = input_ids.shape
    if advantages.dim() == 1:
        if advantages.shape[0] != B:
            raise ValueError(f"advantages {tuple(advantages.shape)}: per-sequence advantages must have shape [{B}]")
        advantages = advantages[:, None].expand(B, T)
    elif advantages.shape != input_ids.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B, T] = {tuple(input_ids.shape)} or [B]")

    if advantage_normalization != "none" or advantage_clipping is not None:
        advantages = _normalized_advantages(advantages, loss_mask, advantage_normalization, advantage_clipping)

    # targets[:, t] = input_ids[:, t+1]; the last position predicts nothing (its weight is 0 below).
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    nll = token_cross_entropy(logits, targets, temperature, chunk_tokens)  # [B, T]: nll[:, t] is about token t+1
    mask = torch.zeros((B, T), dtype=nll.dtype, device=logits.device)
    mask[:, 1:] = loss_mask[:, 1:].float()
    weights = torch.zeros_like(mask)
    weights[:, 1:] = advantages[:, 1:].to(nll.dtype) * mask[:, 1:]
    per_token = torch.zeros_like(mask)
    per_token[:, 1:] = nll[:, :-1] * weights[:, 1:]

    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "token-mean":
        return per_token.sum() / mask.sum().clamp(min=1.0)
    tokens_per_seq = mask.sum(dim=1)
    has_tokens = tokens_per_seq > 0
    seq_means = per_token.sum(dim=1)[has_tokens] / tokens_per_seq[has_tokens]
    return seq_means.mean() if seq_means.numel() else per_token.sum() * 0.0


def is_weight_metrics(rollout_corr_metrics: Mapping[str, Any]) -> dict[str, float]:
    """verl's ``rollout_corr/rollout_is_{mean,max,ratio_fraction_high}`` as ``atropos/is_weight_{mean,max}``,
    ``atropos/is_truncated_fraction`` (the fraction of tokens whose raw ratio exceeded the threshold)."""
    return {
        new: float(rollout_corr_metrics[old]) for old, new in IS_METRIC_NAMES.items() if old in rollout_corr_metrics
    }


def behaviour_is_weights(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor, rollout_correction: Any
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """Truncated importance weights ``π_θ / π_old`` (detached), verl's rollout correction applied in the loss.

    In bypass mode ``old_log_prob`` is the rollout's log-probs, so these are the weights that correct for the policy
    lag: token level ``min(exp(log π_θ - log π_rollout), C)`` with ``C`` = ``rollout_is_threshold`` (or sequence level,
    or with rejection sampling, as configured). All tensors [bs, response_length]; returns (weights or None when
    neither ``rollout_is`` nor ``rollout_rs`` is set, the response mask after rejection sampling, metrics named by
    :func:`is_weight_metrics`).
    """
    if rollout_correction is None or not bool(response_mask.any()):
        return None, response_mask, {}
    rollout_is = rollout_correction.get("rollout_is", None)
    rollout_rs = rollout_correction.get("rollout_rs", None)
    if rollout_is is None and rollout_rs is None:
        return None, response_mask, {}
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    with torch.no_grad():
        weights_proto, mask, corr_metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob.detach(),  # verl's name for the policy being trained
            rollout_log_prob=old_log_prob,  # the behaviour policy
            response_mask=response_mask,
            rollout_is=rollout_is,
            rollout_is_threshold=rollout_correction.get("rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=rollout_correction.get("rollout_is_batch_normalize", False),
            rollout_rs=rollout_rs,
            rollout_rs_threshold=rollout_correction.get("rollout_rs_threshold", None),
        )
    weights = None if weights_proto is None else weights_proto.batch["rollout_is_weights"]
    return weights, mask.to(response_mask.dtype), is_weight_metrics(corr_metrics)


def _normalized_advantages(
    advantages: torch.Tensor, loss_mask: torch.Tensor, normalization: str, clipping: Sequence[float] | None
) -> torch.Tensor:
    """[B, T] advantages whitened/clipped over the trained tokens (``loss_mask`` = 1 at t ≥ 1); 0 elsewhere."""
    trained = loss_mask.to(torch.bool).clone()
    trained[:, 0] = False  # position 0 is never trained
    adv, _ = normalize_and_clip_advantages(advantages, trained, normalize=normalization, clip=clipping)
    return adv


@register_policy_loss(POLICY_LOSS_NAME)
def compute_policy_loss_advantage_weighted_ce(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss: ``agg_loss(-A · log π · w, mask)``, all tensors [bs, response_length].

    ``w`` = the trainer's rollout-correction weights ``min(π_old / π_rollout, C)`` when given (decoupled mode); else,
    when ``policy_loss.rollout_correction.rollout_is`` is set, ``min(π_θ / π_old, C)`` computed here (bypass mode,
    where ``π_old`` is the rollout policy); else 1. ``w`` is detached: the gradient is ``-A · w · ∇log π`` per token,
    truncated-IS REINFORCE/GRPO. Correct for one update per batch (``check_staleness_config`` refuses more).
    """
    metrics: dict[str, Any] = {}
    if rollout_is_weights is None:
        policy_loss_cfg = getattr(config, "policy_loss", None)
        corr = policy_loss_cfg.get("rollout_correction", None) if policy_loss_cfg is not None else None
        rollout_is_weights, response_mask, metrics = behaviour_is_weights(old_log_prob, log_prob, response_mask, corr)
    losses = -advantages * log_prob
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights
    batch_info = getattr(config, "global_batch_info", None) or {}
    loss = agg_loss(loss_mat=losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
    with torch.no_grad():
        mask = response_mask.bool()
        approx_kl = (old_log_prob - log_prob)[mask].mean() if mask.any() else torch.zeros(())
    metrics.update({"actor/ppo_kl": float(approx_kl), "actor/pg_clipfrac": 0.0, "actor/pg_clipfrac_lower": 0.0})
    return loss, metrics
