"""compute_atropos_advantages: env token-level values where given, verl GRPO elsewhere (numbers by hand)."""

from __future__ import annotations

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn

from recipe.atropos.algos.advantages import (
    check_advantage_options,
    compute_atropos_advantages,
    normalize_and_clip_advantages,
)
from recipe.atropos.trainer.dataproto import scored_data_to_dataproto

X = -100


def batch(*groups: dict):
    return scored_data_to_dataproto(list(groups), max_prompt_length=2, max_response_length=2, pad_token_id=0)


def seqs(scores: list[float], advantages: list[list[float]] | None = None, overrides: list[dict] | None = None) -> dict:
    group = {
        "tokens": [[1, 2, 3] for _ in scores],
        "masks": [[X, 2, 3] for _ in scores],
        "scores": scores,
    }
    if advantages is not None:
        group["advantages"] = [[0.0, *a] for a in advantages]
    if overrides is not None:
        group["overrides"] = overrides
    return group


def test_grpo_fallback_matches_hand_computation() -> None:
    # scores 1, 0, 0: mean 1/3, unbiased std sqrt(1/3)
    out = compute_atropos_advantages(batch(seqs([1.0, 0.0, 0.0])), epsilon=0.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    expected = [(1 - 1 / 3) / std, (0 - 1 / 3) / std, (0 - 1 / 3) / std]
    assert torch.allclose(out.batch["advantages"][:, 0], torch.tensor(expected), atol=1e-6)
    assert torch.equal(out.batch["advantages"][:, 0], out.batch["advantages"][:, 1])
    assert out.meta_info["atropos_metrics"]["atropos/env_advantage_fraction"] == 0.0


def test_env_advantages_used_as_given_and_masked() -> None:
    out = compute_atropos_advantages(batch(seqs([1.0, 0.0], advantages=[[0.3, -0.7], [2.0, 5.0]])))
    assert torch.allclose(out.batch["advantages"], torch.tensor([[0.3, -0.7], [2.0, 5.0]]))
    assert out.meta_info["atropos_metrics"]["atropos/env_advantage_fraction"] == 1.0


def test_env_advantages_ignored_when_disabled() -> None:
    data = batch(seqs([1.0, 0.0], advantages=[[9.0, 9.0], [9.0, 9.0]]))
    out = compute_atropos_advantages(data, use_env_advantages=False)
    # GRPO over [1, 0]: mean 0.5, unbiased std sqrt(0.5)
    a = 0.5 / math.sqrt(0.5)
    assert out.batch["advantages"][:, 0].tolist() == pytest.approx([a, -a], rel=1e-5)


def test_mixed_batch_each_sequence_follows_its_rule() -> None:
    with_env = seqs([1.0, 0.0], advantages=[[0.25, 0.25], [-0.25, -0.25]])
    plain = seqs([3.0, 1.0])
    out = compute_atropos_advantages(batch(with_env, plain), norm_adv_by_std_in_grpo=False)
    expected = torch.tensor([[0.25, 0.25], [-0.25, -0.25], [1.0, 1.0], [-1.0, -1.0]])
    assert torch.allclose(out.batch["advantages"], expected)
    assert out.meta_info["atropos_metrics"]["atropos/env_advantage_fraction"] == 0.5


def test_zeroed_sequences_get_zero_and_stay_out_of_group_statistics() -> None:
    # Without the zeroed item (score 100) the group is [1, 0]: mean 0.5 → advantages ±0.5 (no std scaling).
    group = seqs([1.0, 0.0, 100.0], overrides=[{}, {}, {"set_advantage_to_zero": True}])
    out = compute_atropos_advantages(batch(group), norm_adv_by_std_in_grpo=False)
    assert out.batch["advantages"][:, 0].tolist() == pytest.approx([0.5, -0.5, 0.0])
    assert out.meta_info["atropos_metrics"]["atropos/zeroed_advantage_count"] == 1.0


def test_singleton_group_follows_verl_grpo() -> None:
    # verl: a group of one has mean 0 and std 1 → advantage = score / (1 + epsilon)
    out = compute_atropos_advantages(batch(seqs([2.0])), epsilon=0.0)
    assert out.batch["advantages"][0].tolist() == pytest.approx([2.0, 2.0])


def test_no_fallback_drops_groups_without_env_advantages_and_counts_them() -> None:
    with_env = seqs([1.0, 0.0], advantages=[[0.5, 0.5], [-0.5, -0.5]])
    out = compute_atropos_advantages(batch(with_env, seqs([1.0, 0.0]), seqs([0.0, 1.0])), fallback_to_grpo=False)
    assert len(out) == 2
    assert torch.allclose(out.batch["advantages"], torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))
    assert out.meta_info["atropos_metrics"]["atropos/dropped_groups"] == 2.0


def test_advantages_are_zero_outside_the_response_mask() -> None:
    group = {"tokens": [[1, 2, 3], [1, 4, 5]], "masks": [[X, 2, X], [X, 4, 5]], "scores": [1.0, 0.0]}
    out = compute_atropos_advantages(batch(group))
    assert out.batch["advantages"][0, 1] == 0.0 and out.batch["advantages"][0, 0] != 0.0


def test_registered_estimator_is_verl_grpo_on_the_generic_path() -> None:
    fn = get_adv_estimator_fn("atropos")
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.ones(2, 2)
    adv, ret = fn(token_level_rewards=rewards, response_mask=mask, index=["a", "a"], config=None)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert adv[:, 0].tolist() == pytest.approx([a, -a])
    assert torch.equal(adv, ret)


# ---- atropos.advantage.normalize / clip ---------------------------------------------------------------------------


def test_batch_normalization_whitens_over_trained_tokens_of_both_rules() -> None:
    # GRPO without std on [3, 1] → ±1; env ±0.25; 8 trained tokens, mean 0, unbiased var (4·1 + 4·0.0625) / 7
    with_env = seqs([1.0, 0.0], advantages=[[0.25, 0.25], [-0.25, -0.25]])
    data = batch(with_env, seqs([3.0, 1.0]))
    out = compute_atropos_advantages(data, norm_adv_by_std_in_grpo=False, normalize="batch")
    std = math.sqrt(4.25 / 7 + 1e-8)
    expected = torch.tensor([[0.25, 0.25], [-0.25, -0.25], [1.0, 1.0], [-1.0, -1.0]]) / std
    assert torch.allclose(out.batch["advantages"], expected, atol=1e-6)
    assert torch.equal(out.batch["returns"], out.batch["advantages"])
    metrics = out.meta_info["atropos_metrics"]
    assert metrics["atropos/advantage_raw_mean"] == pytest.approx(0.0)
    assert metrics["atropos/advantage_raw_std"] == pytest.approx(math.sqrt(4.25 / 7))


def test_batch_normalization_shifts_the_mean_and_leaves_zeroed_and_untrained_tokens_at_zero() -> None:
    # trained: seq 0 (both tokens) A=4, seq 1 (first token only) A=1 → values 4, 4, 1: mean 3, unbiased var 3
    group = {
        "tokens": [[1, 2, 3], [1, 2, 3], [1, 2, 3]],
        "masks": [[X, 2, 3], [X, 2, X], [X, 2, 3]],
        "scores": [0.0, 0.0, 0.0],
        "advantages": [[0.0, 4.0, 4.0], [0.0, 1.0, 7.0], [0.0, 9.0, 9.0]],
        "overrides": [{}, {}, {"set_advantage_to_zero": True}],
    }
    out = compute_atropos_advantages(batch(group), normalize="batch")
    s = math.sqrt(3 + 1e-8)
    assert out.batch["advantages"][0].tolist() == pytest.approx([1 / s, 1 / s], rel=1e-6)
    assert out.batch["advantages"][1].tolist() == pytest.approx([-2 / s, 0.0], rel=1e-6)
    assert out.batch["advantages"][2].tolist() == [0.0, 0.0]


def test_clip_clamps_trained_tokens_and_reports_the_share() -> None:
    # scores 1, 0, 0 (epsilon 0): advantages 2/√3 ≈ 1.155 and −1/√3 ≈ −0.577 on 2 tokens each
    out = compute_atropos_advantages(batch(seqs([1.0, 0.0, 0.0])), epsilon=0.0, clip=[-1.0, 1.0])
    assert out.batch["advantages"][:, 0].tolist() == pytest.approx([1.0, -1 / math.sqrt(3), -1 / math.sqrt(3)])
    assert out.meta_info["atropos_metrics"]["atropos/advantage_clip_fraction"] == pytest.approx(2 / 6)


def test_normalization_comes_before_clipping() -> None:
    # env advantages 4 and 0: whitened ±2/√(16/3) = ±0.866, then clipped to [-0.5, 0.5] → ±0.5.
    # (Clipping first would give 0.5 and 0, whitened to ±0.866.)
    group = seqs([0.0, 0.0], advantages=[[4.0, 4.0], [0.0, 0.0]])
    out = compute_atropos_advantages(batch(group), normalize="batch", clip=(-0.5, 0.5))
    assert torch.allclose(out.batch["advantages"], torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))


def test_normalization_with_fewer_than_two_trained_tokens_is_skipped_and_counted() -> None:
    group = {"tokens": [[1, 2, 3]], "masks": [[X, 2, X]], "scores": [1.0], "advantages": [[0.0, 0.7, 0.0]]}
    out = compute_atropos_advantages(batch(group), normalize="batch")
    assert out.batch["advantages"][0].tolist() == pytest.approx([0.7, 0.0])
    assert out.meta_info["atropos_metrics"]["atropos/advantage_normalization_skipped"] == 1.0


@pytest.mark.parametrize(
    ("normalize", "clip", "match"),
    [("group", None, "normalize='group'"), ("none", [1.0], "clip"), ("none", [2.0, -2.0], "lo must be below hi")],
)
def test_bad_advantage_options_name_the_key(normalize: str, clip: list | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_advantage_options(normalize, clip)
    with pytest.raises(ValueError, match="atropos.advantage"):
        normalize_and_clip_advantages(torch.zeros(1, 2), torch.ones(1, 2), normalize=normalize, clip=clip)
