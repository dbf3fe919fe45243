"""The masked advantage-weighted CE: values by hand, reductions, gradients, the registered verl loss, IS metrics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from recipe.atropos.algos.losses import compute_advantage_weighted_sft_loss, is_weight_metrics, token_cross_entropy


def uniform_case() -> tuple[torch.Tensor, ...]:
    """Zero logits over V=4 → every token's CE is log 4, so the expected values are easy to write down."""
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    ids = torch.tensor([[0, 1, 2], [3, 2, 1]])
    advantages = torch.tensor([[9.0, 1.0, 2.0], [9.0, -1.0, 3.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    return logits, ids, advantages, mask


LOG4 = math.log(4)


def test_token_mean_by_hand() -> None:
    logits, ids, adv, mask = uniform_case()
    # position 0 is never trained; kept tokens: (0,1) A=1, (1,1) A=-1, (1,2) A=3 → (1 - 1 + 3) log4 / 3
    loss = compute_advantage_weighted_sft_loss(logits, ids, adv, mask)
    assert loss.item() == pytest.approx(3 * LOG4 / 3)


def test_none_sum_and_seq_mean_token_mean_by_hand() -> None:
    logits, ids, adv, mask = uniform_case()
    per_token = compute_advantage_weighted_sft_loss(logits, ids, adv, mask, reduction="none")
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 3.0]]) * LOG4
    assert torch.allclose(per_token, expected)
    assert compute_advantage_weighted_sft_loss(logits, ids, adv, mask, reduction="sum").item() == pytest.approx(
        3 * LOG4
    )
    # seq 0: 1·log4 over 1 token; seq 1: 2·log4 over 2 tokens → mean(log4, log4)
    seq_mean = compute_advantage_weighted_sft_loss(logits, ids, adv, mask, reduction="seq-mean-token-mean")
    assert seq_mean.item() == pytest.approx(LOG4)


def test_seq_mean_skips_sequences_without_trained_tokens() -> None:
    logits, ids, adv, _ = uniform_case()
    mask = torch.tensor([[1, 0, 0], [0, 1, 1]])  # sequence 0 has only position 0, which never trains
    loss = compute_advantage_weighted_sft_loss(logits, ids, adv, mask, reduction="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-1 + 3) * LOG4 / 2)


def test_per_sequence_advantages_broadcast() -> None:
    logits, ids, _, mask = uniform_case()
    loss = compute_advantage_weighted_sft_loss(logits, ids, torch.tensor([2.0, -1.0]), mask, reduction="sum")
    assert loss.item() == pytest.approx((2 - 1 - 1) * LOG4)


def test_matches_naive_cross_entropy_with_temperature() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    ids = torch.randint(0, 11, (3, 6))
    adv = torch.randn(3, 6)
    mask = (torch.rand(3, 6) > 0.3).long()
    t = 0.7
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11) / t, ids[:, 1:].reshape(-1), reduction="none").view(3, 5)
    expected = (ce * adv[:, 1:] * mask[:, 1:]).sum() / mask[:, 1:].sum()
    got = compute_advantage_weighted_sft_loss(logits, ids, adv, mask, temperature=t, chunk_tokens=4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_chunked_gradient_equals_naive_gradient_in_bf16() -> None:
    torch.manual_seed(1)
    base = torch.randn(2, 5, 9)
    targets = torch.randint(0, 9, (2, 5))
    weights = torch.randn(2, 5)
    chunked = base.clone().to(torch.bfloat16).requires_grad_()
    (token_cross_entropy(chunked, targets, chunk=3) * weights).sum().backward()
    naive = base.clone().to(torch.bfloat16).requires_grad_()
    ce = F.cross_entropy(naive.float().view(-1, 9), targets.view(-1), reduction="none").view(2, 5)
    (ce * weights).sum().backward()
    assert chunked.grad.dtype == torch.bfloat16
    assert torch.allclose(chunked.grad.float(), naive.grad.float(), atol=1e-2)


def test_gradcheck_double() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4))
    adv = torch.randn(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])

    def loss(x: torch.Tensor) -> torch.Tensor:
        return compute_advantage_weighted_sft_loss(x, ids, adv, mask, temperature=1.3, chunk_tokens=3)

    assert torch.autograd.gradcheck(loss, (logits,))


def test_bad_shapes_and_options_name_the_problem() -> None:
    logits, ids, adv, mask = uniform_case()
    with pytest.raises(ValueError, match="advantages"):
        compute_advantage_weighted_sft_loss(logits, ids, adv[:, :2], mask)
    with pytest.raises(ValueError, match="reduction"):
        compute_advantage_weighted_sft_loss(logits, ids, adv, mask, reduction="mean")
    with pytest.raises(ValueError, match="temperature"):
        compute_advantage_weighted_sft_loss(logits, ids, adv, mask, temperature=0.0)


def test_registered_policy_loss_is_reinforce() -> None:
    fn = get_policy_loss_fn("advantage_weighted_ce")
    log_prob = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    old = log_prob.detach().clone()
    adv = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    config = SimpleNamespace(global_batch_info={})
    loss, metrics = fn(old, log_prob, adv, mask, loss_agg_mode="token-mean", config=config)
    # token-mean of -A·logπ over the 3 kept tokens: (-(1)(-1) - (-2)(-0.5) - (-2)(-3)) / 3
    assert loss.item() == pytest.approx((1.0 - 1.0 - 6.0) / 3)
    loss.backward()
    assert torch.allclose(log_prob.grad, -adv * mask / 3)
    assert metrics["actor/ppo_kl"] == 0.0


def test_registered_policy_loss_applies_rollout_is_weights() -> None:
    fn = get_policy_loss_fn("advantage_weighted_ce")
    log_prob = torch.tensor([[-1.0, -1.0]])
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    weights = torch.tensor([[0.5, 2.0]])
    config = SimpleNamespace(global_batch_info={})
    loss, _ = fn(log_prob, log_prob, adv, mask, config=config, rollout_is_weights=weights)
    assert loss.item() == pytest.approx((0.5 + 2.0) / 2)


def test_batch_normalization_of_advantages_by_hand() -> None:
    logits, ids, adv, mask = uniform_case()
    # trained advantages 1, -1, 3 (position 0 never counts): mean 1, unbiased var 4 → 0, -1, 1
    per_token = compute_advantage_weighted_sft_loss(
        logits, ids, adv, mask, reduction="none", advantage_normalization="batch"
    )
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.0, -1.0, 1.0]]) * LOG4
    assert torch.allclose(per_token, expected, atol=1e-6)


def test_advantage_clipping_by_hand() -> None:
    logits, ids, adv, mask = uniform_case()
    # 1, -1, 3 clamped to [-0.5, 2] → 1, -0.5, 2
    loss = compute_advantage_weighted_sft_loss(logits, ids, adv, mask, reduction="sum", advantage_clipping=(-0.5, 2.0))
    assert loss.item() == pytest.approx(2.5 * LOG4)
    # whitened first (0, -1, 1), then clamped to [-0.5, 0.5] → 0, -0.5, 0.5
    both = compute_advantage_weighted_sft_loss(
        logits, ids, adv, mask, reduction="none", advantage_normalization="batch", advantage_clipping=(-0.5, 0.5)
    )
    assert torch.allclose(both, torch.tensor([[0.0, 0.0, 0.0], [0.0, -0.5, 0.5]]) * LOG4, atol=1e-6)


def test_bad_advantage_options_on_the_loss_name_the_fix() -> None:
    logits, ids, adv, mask = uniform_case()
    with pytest.raises(ValueError, match="'none' or 'batch'"):
        compute_advantage_weighted_sft_loss(logits, ids, adv, mask, advantage_normalization="group")


def test_is_weight_metrics_rename_verls_three_and_drop_the_rest() -> None:
    verl_metrics = {
        "rollout_corr/rollout_is_mean": 1.25,
        "rollout_corr/rollout_is_max": 2,
        "rollout_corr/rollout_is_ratio_fraction_high": 0.5,
        "rollout_corr/rollout_is_min": 0.5,
    }
    assert is_weight_metrics(verl_metrics) == {
        "atropos/is_weight_mean": 1.25,
        "atropos/is_weight_max": 2.0,
        "atropos/is_truncated_fraction": 0.5,
    }
    assert is_weight_metrics({}) == {}
