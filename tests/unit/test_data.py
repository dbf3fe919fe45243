"""scored_data_to_dataproto: every rule checked against values written out by hand."""

from __future__ import annotations

import pytest
import torch

from recipe.atropos.trainer.dataproto import first_trained_position, scored_data_to_dataproto
from tests.factories import X

PAD = 0


def convert(groups: list[dict], p: int = 4, r: int = 4):
    return scored_data_to_dataproto(groups, max_prompt_length=p, max_response_length=r, pad_token_id=PAD)


def test_prompt_left_padded_response_right_padded_score_on_last_trained_token() -> None:
    group = {"tokens": [[11, 12, 21, 22]], "masks": [[X, X, 21, 22]], "scores": [0.5]}
    data = convert([group])
    assert data.batch["prompts"].tolist() == [[0, 0, 11, 12]]
    assert data.batch["responses"].tolist() == [[21, 22, 0, 0]]
    assert data.batch["input_ids"].tolist() == [[0, 0, 11, 12, 21, 22, 0, 0]]
    assert data.batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 0, 0]]
    assert data.batch["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 3, 3]]
    assert data.batch["response_mask"].tolist() == [[1, 1, 0, 0]]
    assert data.batch["token_level_scores"].tolist() == [[0.0, 0.5, 0.0, 0.0]]


def test_multi_turn_env_tokens_are_never_trained() -> None:
    # prompt | assistant turn 1 | tool output (masked) | assistant turn 2
    tokens = [1, 2, 31, 32, 41, 42, 51]
    masks = [X, X, 31, 32, X, X, 51]
    data = convert([{"tokens": [tokens], "masks": [masks], "scores": [1.0]}], p=2, r=5)
    assert data.batch["responses"].tolist() == [[31, 32, 41, 42, 51]]
    assert data.batch["response_mask"].tolist() == [[1, 1, 0, 0, 1]]
    assert data.batch["attention_mask"][0, 2:].tolist() == [1, 1, 1, 1, 1]  # env tokens stay in context
    assert data.batch["token_level_scores"].tolist() == [[0.0, 0.0, 0.0, 0.0, 1.0]]


def test_truncation_cuts_prompt_left_and_response_right_and_is_counted() -> None:
    group = {"tokens": [[1, 2, 3, 4, 5, 6, 7, 8, 9]], "masks": [[X, X, X, X, X, X, 7, 8, 9]], "scores": [2.0]}
    data = convert([group], p=4, r=2)
    assert data.batch["prompts"].tolist() == [[3, 4, 5, 6]]
    assert data.batch["responses"].tolist() == [[7, 8]]
    assert data.batch["token_level_scores"].tolist() == [[0.0, 2.0]]
    counts = data.meta_info["atropos_metrics"]
    assert counts["atropos/truncated_prompts"] == 1.0 and counts["atropos/truncated_responses"] == 1.0


def test_env_advantages_and_inference_logprobs_align_to_responses() -> None:
    group = {
        "tokens": [[1, 2, 3], [1, 4, 5]],
        "masks": [[X, 2, 3], [X, X, 5]],
        "scores": [1.0, 0.0],
        "advantages": [[9.0, 0.5, -0.5], [9.0, 9.0, 2.0]],
        "inference_logprobs": [[1.0, -0.1, -0.2], [1.0, 1.0, -0.3]],
    }
    data = convert([group], p=3, r=3)
    assert data.batch["has_env_advantages"].tolist() == [True, True]
    # sequence 2's response window starts at its first trained token (5): token 4 is prompt there
    assert data.batch["token_level_advantages"].tolist() == [[0.5, -0.5, 0.0], [2.0, 0.0, 0.0]]
    assert torch.allclose(data.batch["rollout_log_probs"], torch.tensor([[-0.1, -0.2, 0.0], [-0.3, 0.0, 0.0]]))


def test_groups_get_one_uid_each_and_overrides_become_advantage_zeroed() -> None:
    g1 = {"tokens": [[1, 2], [1, 3]], "masks": [[X, 2], [X, 3]], "scores": [1, 0], "env_id": 4}
    g2 = {
        "tokens": [[5, 6]],
        "masks": [[X, 6]],
        "scores": [1],
        "overrides": [{"set_advantage_to_zero": True}],
    }
    data = convert([g1, g2])
    uid = data.non_tensor_batch["uid"]
    assert uid[0] == uid[1] != uid[2]
    assert data.non_tensor_batch["advantage_zeroed"].tolist() == [False, False, True]
    assert data.non_tensor_batch["env_id"].tolist() == [4, 4, -1]
    assert data.batch["has_env_advantages"].tolist() == [False, False, False]


def test_rollout_log_probs_only_when_every_sequence_has_them() -> None:
    with_lp = {"tokens": [[1, 2]], "masks": [[X, 2]], "scores": [1], "inference_logprobs": [[1.0, -0.5]]}
    without = {"tokens": [[1, 3]], "masks": [[X, 3]], "scores": [0]}
    data = convert([with_lp, without])
    assert "rollout_log_probs" not in data.batch.keys()
    assert data.batch["has_rollout_log_probs"].tolist() == [True, False]


def test_all_masked_sequence_is_counted_and_kept_untrained() -> None:
    data = convert([{"tokens": [[1, 2]], "masks": [[X, X]], "scores": [1.0]}])
    assert data.batch["response_mask"].sum() == 0
    assert data.batch["token_level_scores"].sum() == 0
    assert data.meta_info["atropos_metrics"]["atropos/empty_response_count"] == 1.0


def test_malformed_dict_group_is_rejected_naming_the_field() -> None:
    with pytest.raises(ValueError, match="masks"):
        convert([{"tokens": [[1, 2]], "masks": [[X]], "scores": [1.0]}])


def test_first_trained_position() -> None:
    assert first_trained_position([X, X, 5, X]) == 2
    assert first_trained_position([X, X]) == 2
    assert first_trained_position([7]) == 0


def test_empty_lists_from_basenv_collect_trajectories_mean_not_given() -> None:
    """atroposlib's BaseEnv.collect_trajectories (every stock env built on collect_trajectory, e.g. blackjack) posts
    ``[]`` for the per-sequence fields its items did not fill: they are absent, not 0 sequences; a partial list is
    not."""
    group = {
        "tokens": [[5, 6, 7], [5, 6, 8]],
        "masks": [[X, 6, 7], [X, 6, 8]],
        "scores": [1.0, -1.0],
        **{name: [] for name in ("advantages", "inference_logprobs", "ref_logprobs", "overrides", "messages")},
        "group_overrides": {},
        "images": [],
    }
    data = convert([group])
    assert data.batch["has_env_advantages"].tolist() == [False, False]
    assert "rollout_log_probs" not in data.batch.keys()
    with pytest.raises(ValueError, match="advantages: 1 sequences, but tokens has 2"):
        convert([{**group, "advantages": [[0.0, 1.0, 1.0]]}])
