"""combine_advantages: env token-level values where given, verl GRPO elsewhere (numbers by hand)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_adv_estimator_fn, get_policy_loss_fn

from recipe.atropos.algos.advantages import CombinedAdvantages, combine_advantages, normalize_and_clip_advantages


def rows(
    scores: Sequence[float],
    groups: Sequence[str],
    *,
    env: Sequence[Sequence[float] | None] | None = None,
    mask: Sequence[Sequence[int]] | None = None,
    zeroed: Sequence[bool] | None = None,
    width: int = 2,
) -> dict:
    """The tensors of one batch as the trainer passes them: the score sits on each row's last response token."""
    n = len(scores)
    response_mask = torch.ones(n, width) if mask is None else torch.tensor(mask, dtype=torch.float32)
    rewards = torch.zeros(n, width)
    for i, score in enumerate(scores):
        rewards[i, int(response_mask[i].nonzero().max())] = score
    env = env if env is not None else [None] * n
    return {
        "env_advantages": torch.tensor([a if a is not None else [0.0] * width for a in env]),
        "has_env_advantages": torch.tensor([a is not None for a in env]),
        "rewards": rewards,
        "response_mask": response_mask,
        "group_ids": np.array(groups, dtype=object),
        "zeroed": np.array(zeroed if zeroed is not None else [False] * n, dtype=bool),
    }


def test_grpo_fallback_matches_hand_computation() -> None:
    # scores 1, 0, 0: mean 1/3, unbiased std sqrt(1/3)
    out = combine_advantages(**rows([1.0, 0.0, 0.0], ["a"] * 3), epsilon=0.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    expected = [(1 - 1 / 3) / std, (0 - 1 / 3) / std, (0 - 1 / 3) / std]
    assert isinstance(out, CombinedAdvantages)
    assert out.advantages.dtype == torch.float32
    assert torch.allclose(out.advantages[:, 0], torch.tensor(expected), atol=1e-6)
    assert torch.equal(out.advantages[:, 0], out.advantages[:, 1])
    assert out.keep.tolist() == [True, True, True]
    assert out.metrics["atropos/env_advantage_fraction"] == 0.0
    assert out.metrics["atropos/grpo_sequences"] == 3.0
    assert out.metrics["atropos/trained_sequences"] == 3.0


def test_env_advantages_used_as_given_and_masked() -> None:
    batch = rows([1.0, 0.0], ["a", "a"], env=[[0.3, -0.7], [2.0, 5.0]], mask=[[1, 1], [1, 0]])
    out = combine_advantages(**batch)
    assert torch.allclose(out.advantages, torch.tensor([[0.3, -0.7], [2.0, 0.0]]))
    assert out.metrics["atropos/env_advantage_fraction"] == 1.0
    assert out.metrics["atropos/grpo_sequences"] == 0.0


def test_env_advantages_ignored_when_disabled() -> None:
    batch = rows([1.0, 0.0], ["a", "a"], env=[[9.0, 9.0], [9.0, 9.0]])
    out = combine_advantages(**batch, use_env_advantages=False)
    # GRPO over [1, 0]: mean 0.5, unbiased std sqrt(0.5)
    a = 0.5 / math.sqrt(0.5)
    assert out.advantages[:, 0].tolist() == pytest.approx([a, -a], rel=1e-5)
    assert out.metrics["atropos/env_advantage_fraction"] == 0.0


def test_mixed_batch_each_sequence_follows_its_rule() -> None:
    env = [[0.25, 0.25], [-0.25, -0.25], None, None]
    out = combine_advantages(**rows([1.0, 0.0, 3.0, 1.0], ["e", "e", "g", "g"], env=env), norm_adv_by_std_in_grpo=False)
    expected = torch.tensor([[0.25, 0.25], [-0.25, -0.25], [1.0, 1.0], [-1.0, -1.0]])
    assert torch.allclose(out.advantages, expected)
    assert out.metrics["atropos/env_advantage_fraction"] == 0.5
    assert out.metrics["atropos/grpo_sequences"] == 2.0


def test_grpo_rows_match_verl_grpo_over_the_same_rows() -> None:
    torch.manual_seed(0)
    groups = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    env = [[0.1 * i, -0.1 * i, 0.2] for i in range(4)] + [None] * 8
    zeroed = [False] * 9 + [True] + [False] * 2
    mask = (torch.rand(12, 3) > 0.3).int()
    mask[:, 0] = 1
    batch = rows(torch.randn(12).tolist(), groups, env=env, mask=mask.tolist(), zeroed=zeroed, width=3)
    out = combine_advantages(**batch)
    grpo = [4, 5, 6, 7, 8, 10, 11]  # neither env nor zeroed
    expected, _ = compute_grpo_outcome_advantage(
        token_level_rewards=batch["rewards"][grpo],
        response_mask=batch["response_mask"][grpo],
        index=batch["group_ids"][grpo],
    )
    torch.testing.assert_close(out.advantages[grpo], expected)
    assert torch.equal(out.advantages[9], torch.zeros(3))
    assert torch.allclose(out.advantages[:4], batch["env_advantages"][:4] * batch["response_mask"][:4])


def test_zeroed_sequences_get_zero_and_stay_out_of_group_statistics() -> None:
    # Without the zeroed row (score 100) the group is [1, 0]: mean 0.5 → advantages ±0.5 (no std scaling).
    batch = rows([1.0, 0.0, 100.0], ["a"] * 3, zeroed=[False, False, True])
    out = combine_advantages(**batch, norm_adv_by_std_in_grpo=False)
    assert out.advantages[:, 0].tolist() == pytest.approx([0.5, -0.5, 0.0])
    assert out.advantages[2].tolist() == [0.0, 0.0]
    assert out.keep.tolist() == [True, True, True]
    assert out.metrics["atropos/zeroed_advantage_count"] == 1.0
    assert out.metrics["atropos/grpo_sequences"] == 2.0
    assert out.metrics["atropos/trained_sequences"] == 2.0


def test_zeroed_env_sequence_gets_zero() -> None:
    batch = rows([0.0, 0.0], ["a", "a"], env=[[1.0, 2.0], [3.0, 4.0]])
    out = combine_advantages(**{**batch, "zeroed": torch.tensor([False, True])})  # a tensor works as well as an array
    assert torch.allclose(out.advantages, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))


def test_singleton_group_follows_verl_grpo() -> None:
    # verl: a group of one has mean 0 and std 1 → advantage = score / (1 + epsilon)
    out = combine_advantages(**rows([2.0], ["a"]), epsilon=0.0)
    assert out.advantages[0].tolist() == pytest.approx([2.0, 2.0])


def test_no_fallback_drops_whole_groups_without_env_advantages_and_counts_them() -> None:
    # groups: e (env), b and c (no env; c holds a zeroed row), m (one env row, one without) → b, c, m dropped whole
    batch = rows(
        [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 5.0, 1.0, 0.0],
        ["e", "e", "b", "b", "c", "c", "c", "m", "m"],
        env=[[0.5, 0.5], [-0.5, -0.5], None, None, None, None, None, [2.0, 2.0], None],
        zeroed=[False] * 6 + [True] + [False] * 2,
    )
    out = combine_advantages(**batch, fallback_to_grpo=False)
    assert out.keep.tolist() == [True, True] + [False] * 7
    assert torch.allclose(out.advantages[:2], torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))
    assert torch.equal(out.advantages[2:], torch.zeros(7, 2))
    assert out.metrics["atropos/dropped_groups"] == 3.0
    assert out.metrics["atropos/grpo_sequences"] == 0.0
    assert out.metrics["atropos/env_advantage_fraction"] == pytest.approx(3 / 9)


def test_no_fallback_keeps_everything_when_every_row_has_env_advantages() -> None:
    batch = rows([1.0, 0.0], ["a", "a"], env=[[1.0, 1.0], [2.0, 2.0]])
    out = combine_advantages(**batch, fallback_to_grpo=False)
    assert out.keep.tolist() == [True, True]
    assert out.metrics["atropos/dropped_groups"] == 0.0


def test_advantages_are_zero_outside_the_response_mask() -> None:
    out = combine_advantages(**rows([1.0, 0.0], ["a", "a"], mask=[[1, 0], [1, 1]]))
    assert out.advantages[0, 1] == 0.0 and out.advantages[0, 0] != 0.0


def test_row_counts_must_agree() -> None:
    batch = rows([1.0, 0.0], ["a", "a"])
    with pytest.raises(ValueError, match="group_ids"):
        combine_advantages(**{**batch, "group_ids": np.array(["a"], dtype=object)})
    with pytest.raises(ValueError, match="zeroed"):
        combine_advantages(**{**batch, "zeroed": np.zeros(3, dtype=bool)})
    with pytest.raises(ValueError, match="env_advantages"):
        combine_advantages(**{**batch, "env_advantages": torch.zeros(2, 3)})


def test_extensions_register_the_policy_loss_and_no_estimator() -> None:
    import recipe.atropos.algos.extensions  # noqa: F401
    from recipe.atropos.algos.losses import POLICY_LOSS_NAME, compute_policy_loss_advantage_weighted_ce

    assert get_policy_loss_fn(POLICY_LOSS_NAME) is compute_policy_loss_advantage_weighted_ce
    with pytest.raises(ValueError):  # verl's estimators never see env advantages: the trainer combines them itself
        get_adv_estimator_fn("atropos")


# ---- normalize / clip ----------------------------------------------------------------------------------------------


def test_batch_normalization_whitens_over_trained_tokens_of_both_rules() -> None:
    # GRPO without std on [3, 1] → ±1; env ±0.25; 8 trained tokens, mean 0, unbiased var (4·1 + 4·0.0625) / 7
    env = [[0.25, 0.25], [-0.25, -0.25], None, None]
    batch = rows([1.0, 0.0, 3.0, 1.0], ["e", "e", "g", "g"], env=env)
    out = combine_advantages(**batch, norm_adv_by_std_in_grpo=False, normalize="batch")
    std = math.sqrt(4.25 / 7 + 1e-8)
    expected = torch.tensor([[0.25, 0.25], [-0.25, -0.25], [1.0, 1.0], [-1.0, -1.0]]) / std
    assert torch.allclose(out.advantages, expected, atol=1e-6)
    assert out.metrics["atropos/advantage_raw_mean"] == pytest.approx(0.0)
    assert out.metrics["atropos/advantage_raw_std"] == pytest.approx(math.sqrt(4.25 / 7))


def test_batch_normalization_shifts_the_mean_and_leaves_zeroed_and_untrained_tokens_at_zero() -> None:
    # trained: row 0 (both tokens) A=4, row 1 (first token only) A=1 → values 4, 4, 1: mean 3, unbiased var 3
    batch = rows(
        [0.0, 0.0, 0.0],
        ["a"] * 3,
        env=[[4.0, 4.0], [1.0, 7.0], [9.0, 9.0]],
        mask=[[1, 1], [1, 0], [1, 1]],
        zeroed=[False, False, True],
    )
    out = combine_advantages(**batch, normalize="batch")
    s = math.sqrt(3 + 1e-8)
    assert out.advantages[0].tolist() == pytest.approx([1 / s, 1 / s], rel=1e-6)
    assert out.advantages[1].tolist() == pytest.approx([-2 / s, 0.0], rel=1e-6)
    assert out.advantages[2].tolist() == [0.0, 0.0]


def test_batch_normalization_leaves_dropped_rows_out() -> None:
    # kept: env ±0.5 on 4 tokens → mean 0, unbiased var 1/3. The dropped group's env row (A=6) and its other row
    # (A=0) would change both statistics if they counted.
    batch = rows([0.0] * 4, ["e", "e", "m", "m"], env=[[0.5, 0.5], [-0.5, -0.5], [6.0, 6.0], None])
    out = combine_advantages(**batch, fallback_to_grpo=False, normalize="batch")
    a = 0.5 / math.sqrt(1 / 3 + 1e-8)
    assert out.keep.tolist() == [True, True, False, False]
    assert out.advantages[:2].tolist() == [[pytest.approx(a), pytest.approx(a)], [pytest.approx(-a)] * 2]
    assert torch.equal(out.advantages[2:], torch.zeros(2, 2))
    assert out.metrics["atropos/advantage_raw_std"] == pytest.approx(math.sqrt(1 / 3))


def test_clip_clamps_trained_tokens_and_reports_the_share() -> None:
    # scores 1, 0, 0 (epsilon 0): advantages 2/√3 ≈ 1.155 and −1/√3 ≈ −0.577 on 2 tokens each
    out = combine_advantages(**rows([1.0, 0.0, 0.0], ["a"] * 3), epsilon=0.0, clip=[-1.0, 1.0])
    assert out.advantages[:, 0].tolist() == pytest.approx([1.0, -1 / math.sqrt(3), -1 / math.sqrt(3)])
    assert out.metrics["atropos/advantage_clip_fraction"] == pytest.approx(2 / 6)


def test_normalization_comes_before_clipping() -> None:
    # env advantages 4 and 0: whitened ±2/√(16/3) = ±0.866, then clipped to [-0.5, 0.5] → ±0.5.
    # (Clipping first would give 0.5 and 0, whitened to ±0.866.)
    batch = rows([0.0, 0.0], ["a", "a"], env=[[4.0, 4.0], [0.0, 0.0]])
    out = combine_advantages(**batch, normalize="batch", clip=(-0.5, 0.5))
    assert torch.allclose(out.advantages, torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))


def test_normalization_with_fewer_than_two_trained_tokens_is_skipped_and_counted() -> None:
    out = combine_advantages(**rows([1.0], ["a"], env=[[0.7, 0.3]], mask=[[1, 0]]), normalize="batch")
    assert out.advantages[0].tolist() == pytest.approx([0.7, 0.0])
    assert out.metrics["atropos/advantage_normalization_skipped"] == 1.0


@pytest.mark.parametrize(
    ("normalize", "clip", "match"),
    [
        ("group", None, "normalize='group'.*'none' or 'batch'"),
        ("none", [1.0], "clip"),
        ("none", [2.0, -2.0], "lo < hi"),
        ("none", 3.0, "clip"),
        ("none", ["a", "b"], "clip"),
    ],
)
def test_bad_advantage_options_are_refused(normalize: str, clip: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normalize_and_clip_advantages(torch.zeros(1, 2), torch.ones(1, 2), normalize=normalize, clip=clip)
    with pytest.raises(ValueError, match=match):
        combine_advantages(**rows([1.0], ["a"]), normalize=normalize, clip=clip)
