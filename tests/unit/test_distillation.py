"""On-policy distillation the environments' way: the teacher tensors built from ``distill_token_ids`` /
``distill_logprobs`` and verl's own distillation losses on them, against values written out by hand.

The example (2 sequences, prompt token 1, 3 response tokens, the last token of the second untrained; top-2 entries;
position 0 has none, as vLLM gives none for the first token)::

    position                 1 (y=11 | 21)         2 (y=12 | 22)          3 (y=13 | 23, untrained)
    seq 0 ids / log-probs    [11, 5] [-0.2, -1.8]  [6, 12] [-2.0, -0.1]   [13, 7] [-0.5, -1.0]
    seq 1 ids / log-probs    [21, 8] [-0.3, -1.5]  [9, 4] [-0.4, -1.2]    [23, 9] [-0.7, -0.9]

Seq 1's sampled token 22 is not in its top-2: the single-sample estimators have no teacher log-prob for it.

Student log-probs of the sampled tokens (``ACTOR``): [[-1.0, -0.5, -2.0], [-0.3, -0.7, -9.0]].
k3 = exp(d) - d - 1 with d = log teacher - log student, on the tokens with a teacher:
    seq 0: d = 0.8, 0.4, 1.5 → 0.4255409, 0.0918247, 1.9816891;  seq 1: d = 0 → 0 (token 22: no teacher)
k1 = log student - log teacher: seq 0: -0.8, -0.4, -1.5;  seq 1: 0.
"""

from __future__ import annotations

import math

import pytest
import torch
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

import recipe.atropos.algos.losses  # noqa: F401  (the recipe's policy loss, registered as in every worker)
from recipe.atropos.algos.distillation import response_to_sequence_values, teacher_masked_distillation_ppo_loss
from recipe.atropos.schema import validate_group
from recipe.atropos.trainer.dataproto import scored_data_to_dataproto
from recipe.atropos.trainer.distillation import (
    TAKEN_KEY,
    DistillationPlan,
    attach_teacher,
    distill_step_metrics,
    distillation_plan,
    take_distillation,
    teacher_tensors,
    verl_update_flags,
)
from tests.factories import X, distillation_run_config

IDS = [
    [[], [11, 5], [6, 12], [13, 7]],
    [[], [21, 8], [9, 4], [23, 9]],
]
LPS = [
    [[], [-0.2, -1.8], [-2.0, -0.1], [-0.5, -1.0]],
    [[], [-0.3, -1.5], [-0.4, -1.2], [-0.7, -0.9]],
]
ACTOR = [[-1.0, -0.5, -2.0], [-0.3, -0.7, -9.0]]
K3 = [math.exp(0.8) - 1.8, math.exp(0.4) - 1.4, math.exp(1.5) - 2.5]  # seq 0; seq 1's one teacher token: 0
K1 = [-0.8, -0.4, -1.5]


def raw(with_teacher: bool = True) -> dict:
    g = {"tokens": [[1, 11, 12, 13], [1, 21, 22, 23]], "masks": [[X, 11, 12, 13], [X, 21, 22, X]], "scores": [1.0, 0.0]}
    if with_teacher:
        g.update(distill_token_ids=IDS, distill_logprobs=LPS)
    return g


as_run = distillation_run_config


def plan_of(*overrides: str) -> DistillationPlan:
    plan = distillation_plan(as_run(*overrides))
    assert plan is not None
    return plan


def close(tensor: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype))


# ---- the conversion ----------------------------------------------------------------------------------------------
def build(groups: list[dict], top_k: int | None, p: int = 1, r: int = 3):
    return teacher_tensors(
        [validate_group(g) for g in groups], max_prompt_length=p, max_response_length=r, pad_token_id=0, top_k=top_k
    )


def test_top_k_rows_hold_the_next_tokens_entries_highest_first_and_verls_dummy_last() -> None:
    t = build([raw()], top_k=2)
    # row j predicts the token at j + 1; the last real row is verl's dummy (id 0, log-prob 0)
    assert t.ids.tolist() == [
        [[11, 5], [12, 6], [13, 7], [0, 0]],
        [[21, 8], [9, 4], [23, 9], [0, 0]],
    ]
    close(
        t.logprobs,
        [
            [[-0.2, -1.8], [-0.1, -2.0], [-0.5, -1.0], [0.0, 0.0]],
            [[-0.3, -1.5], [-0.4, -1.2], [-0.7, -0.9], [0.0, 0.0]],
        ],
    )
    assert t.ids.dtype == torch.int32 and t.logprobs.dtype == torch.float32  # verl's teacher manager's dtypes
    assert t.mask.tolist() == [[1, 1, 1], [1, 1, 0]]  # the untrained token is out
    assert t.metrics["atropos/distill/teacher_token_share"] == 1.0
    assert t.metrics["atropos/distill/sampled_token_coverage"] == pytest.approx(4 / 5)  # 22 is not in its top-2


def test_estimator_rows_hold_the_sampled_token_and_its_teacher_log_prob() -> None:
    t = build([raw()], top_k=None)
    assert t.ids.squeeze(-1).tolist() == [[11, 12, 13, 0], [21, 22, 23, 0]]
    close(t.logprobs.squeeze(-1), [[-0.2, -0.1, -0.5, 0.0], [-0.3, 0.0, -0.7, 0.0]])
    assert t.mask.tolist() == [[1, 1, 1], [1, 0, 0]]  # no teacher log-prob for 22
    assert t.metrics["atropos/distill/teacher_token_share"] == pytest.approx(4 / 5)


def test_a_top_k_smaller_than_the_losss_leaves_the_rows_out_and_is_counted() -> None:
    t = build([raw()], top_k=3)
    assert t.mask.sum() == 0 and t.metrics["atropos/distill/rows_short_top_k"] == 2.0


def test_rows_of_groups_without_the_fields_have_no_teacher() -> None:
    t = build([raw(), raw(with_teacher=False)], top_k=None)
    assert t.mask[2:].sum() == 0 and t.ids[2:].eq(0).all() and t.logprobs[2:].eq(0).all()
    assert t.metrics["atropos/distill/rows_with_teacher"] == 0.5
    assert t.metrics["atropos/distill/teacher_token_share"] == pytest.approx(4 / 10)


def test_the_layout_follows_the_dataprotos_padding_and_truncation() -> None:
    """Prompt [1, 2, 3] cut to its last 2 tokens, response [41, 42, 43] cut to its first 2 (P = R = 2): the rows
    line up with ``input_ids`` = [2, 3, 41, 42]."""
    tokens, masks = [1, 2, 3, 41, 42, 43], [X, X, X, 41, 42, 43]
    ids = [[], [2], [3], [41], [42], [43]]
    lps = [[], [-0.1], [-0.2], [-0.3], [-0.4], [-0.5]]
    g = {"tokens": [tokens], "masks": [masks], "scores": [0.0], "distill_token_ids": [ids], "distill_logprobs": [lps]}
    data = scored_data_to_dataproto([g], max_prompt_length=2, max_response_length=2, pad_token_id=0)
    assert data.batch["input_ids"].tolist() == [[2, 3, 41, 42]]
    t = build([g], top_k=None, p=2, r=2)
    # column 0 (token 2) predicts 3, column 1 (3) predicts 41, column 2 (41) predicts 42, column 3: verl's dummy
    assert t.ids.squeeze(-1).tolist() == [[3, 41, 42, 0]]
    close(t.logprobs.squeeze(-1), [[-0.2, -0.3, -0.4, 0.0]])
    assert t.mask.tolist() == [[1, 1]]


# ---- the switch ----------------------------------------------------------------------------------------------------
def test_the_switch_is_hidden_from_verls_trainer_once_and_the_plan_stays() -> None:
    config = as_run("distillation.distillation_loss.loss_mode=forward_kl_topk", "distillation.distillation_loss.topk=2")
    plan = take_distillation(config)
    assert plan is not None and plan.use_topk and plan.top_k == 2
    assert config.distillation.enabled is False and config.distillation[TAKEN_KEY] is True
    again = take_distillation(config)  # the trainer calls it too: the same plan
    assert again is not None and again.top_k == 2 and config.distillation.enabled is False
    assert plan.config.enabled and plan.config.teacher_models["default"].num_replicas == 0  # nothing is started


def test_no_switch_no_plan() -> None:
    config = as_run("distillation.enabled=false")
    assert take_distillation(config) is None and TAKEN_KEY not in config.distillation


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["distillation.distillation_loss.loss_mode=k1"], "use_policy_gradient=true"),
        (["distillation.distillation_loss.loss_mode=kl"], "use_policy_gradient=true"),
        (["distillation.distillation_loss.loss_mode=nope"], "distillation.distillation_loss"),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_fix(overrides: list[str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        distillation_plan(as_run(*overrides))


def test_verls_update_sees_the_switch_only_inside_the_update() -> None:
    config = as_run("distillation.distillation_loss.loss_mode=forward_kl_topk", "distillation.distillation_loss.topk=2")
    plan = take_distillation(config)

    class Trainer:
        distillation_config = None

    trainer = Trainer()
    trainer.config = config
    with verl_update_flags(trainer, plan):
        assert config.distillation.enabled is True
        assert trainer.distillation_config.distillation_loss.loss_settings.use_topk
    assert config.distillation.enabled is False and trainer.distillation_config is None


# ---- verl's losses on the tensors, restricted to the teacher tokens -----------------------------------------------
def micro_batch(groups: list[dict], plan: DistillationPlan, actor_log_probs: torch.Tensor):
    """The batch as the actor's loss sees it (as RayPPOTrainer._update_actor and the FSDP engine prepare it)."""
    parsed = [validate_group(g) for g in groups]
    batch = scored_data_to_dataproto(parsed, max_prompt_length=1, max_response_length=3, pad_token_id=0)
    metrics = attach_teacher(batch, parsed, plan, pad_token_id=0)
    batch.batch["old_log_probs"] = actor_log_probs.detach().clone()
    batch.batch["advantages"] = torch.zeros_like(actor_log_probs)
    data = left_right_2_no_padding(batch.to_tensordict())
    n_tokens = int(data["loss_mask"].sum())
    tu.assign_non_tensor(data, global_batch_size=len(batch), dp_size=1, batch_num_tokens=n_tokens)
    return batch, data, metrics


def loss_of(
    plan: DistillationPlan, groups: list[dict], actor: list[list[float]], **extra
) -> tuple[float, torch.Tensor]:
    """(loss, its gradient w.r.t. the student's log-probs of the sampled tokens) through the wrapper."""
    student = torch.tensor(actor, requires_grad=True)
    _, data, _ = micro_batch(groups, plan, student)
    offsets = data["input_ids"].offsets()
    log_probs = torch.nested.nested_tensor_from_jagged(response_to_sequence_values(student, data), offsets=offsets)
    actor_config = omega_conf_to_dataclass(as_run().actor_rollout_ref.actor)
    loss, _ = teacher_masked_distillation_ppo_loss(
        actor_config, plan.config, model_output={"log_probs": log_probs, **extra}, data=data
    )
    loss.backward()
    return float(loss), student.grad


def test_response_values_land_where_verl_reads_them() -> None:
    plan = plan_of()
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    _, data, _ = micro_batch([raw()], plan, values)
    nested = torch.nested.nested_tensor_from_jagged(
        response_to_sequence_values(values, data), data["input_ids"].offsets()
    )
    assert torch.equal(no_padding_2_padding(nested, data), values)


def test_k3_supervised_is_the_token_mean_over_the_teacher_tokens_by_hand() -> None:
    plan = plan_of("distillation.distillation_loss.use_task_rewards=false")
    loss, grad = loss_of(plan, [raw()], ACTOR)
    assert loss == pytest.approx(sum(K3) / 5, abs=1e-6)  # 5 trained tokens; token 22 has no teacher: 0
    assert grad[1, 1] == 0.0 and grad[1, 2] == 0.0  # no teacher, untrained
    # d k3 / d log student = 1 - exp(d), over the 5 trained tokens
    assert grad[0].tolist() == pytest.approx([(1 - math.exp(d)) / 5 for d in (0.8, 0.4, 1.5)], abs=1e-6)


def test_k1_policy_gradient_is_ppo_with_advantage_minus_k1_by_hand() -> None:
    plan = plan_of(
        "distillation.distillation_loss.loss_mode=k1",
        "distillation.distillation_loss.use_policy_gradient=true",
        "distillation.distillation_loss.use_task_rewards=false",
    )
    loss, grad = loss_of(plan, [raw()], ACTOR)
    # ratio 1 (old = current): -A * ratio = k1 per token, token-mean over 5
    assert loss == pytest.approx(sum(K1) / 5, abs=1e-6)
    assert grad[0].tolist() == pytest.approx([k / 5 for k in K1], abs=1e-6)
    assert grad[1].tolist() == [0.0, 0.0, 0.0]  # seq 1: k1 = 0 on 21, no teacher on 22, 23 untrained


def test_a_mixed_batch_weights_the_term_by_the_teacher_tokens_share() -> None:
    """Rows without a teacher add 0 to the numerator and count in the denominator: token-mean over all 10 trained
    tokens = teacher_token_share (4/10) x the mean over the 4 teacher tokens."""
    plan = plan_of("distillation.distillation_loss.use_task_rewards=false")
    loss, grad = loss_of(plan, [raw(), raw(with_teacher=False)], ACTOR + ACTOR)
    assert loss == pytest.approx(sum(K3) / 10, abs=1e-6)
    assert grad[2:].abs().sum() == 0.0


def test_with_task_rewards_the_rl_loss_is_added_unchanged() -> None:
    plan = plan_of("distillation.distillation_loss.distillation_loss_coef=0.5")  # use_task_rewards defaults true
    loss, _ = loss_of(plan, [raw()], ACTOR)
    # advantages 0: the recipe's RL loss is 0, so the loss is coef x the distillation term
    assert loss == pytest.approx(0.5 * sum(K3) / 5, abs=1e-6)


def test_forward_kl_top_k_by_hand() -> None:
    """Student logits over a vocabulary of 32; KL over the teacher's top-2 = sum_k p_k (log p_k - log q_k), per
    trained token with a teacher, token-mean over the 5 trained tokens (the untrained one is out)."""
    plan = plan_of(
        "distillation.distillation_loss.loss_mode=forward_kl_topk",
        "distillation.distillation_loss.topk=2",
        "distillation.distillation_loss.use_task_rewards=false",
    )
    torch.manual_seed(0)
    _, data, _ = micro_batch([raw()], plan, torch.tensor(ACTOR))
    total = int(data["input_ids"].offsets()[-1])
    logits = torch.randn(1, total, 32, requires_grad=True)
    outputs = teacher_masked_distillation_ppo_loss(
        omega_conf_to_dataclass(as_run().actor_rollout_ref.actor), plan.config, data=data, student_logits=logits
    )
    offsets = data["input_ids"].offsets()
    model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets) for k, v in outputs.items()}
    loss, _ = teacher_masked_distillation_ppo_loss(
        omega_conf_to_dataclass(as_run().actor_rollout_ref.actor), plan.config, model_output=model_output, data=data
    )
    log_q = torch.log_softmax(logits[0].detach(), dim=-1)
    expected = 0.0
    # sequence positions (4 per row): row 0's predicting positions 0, 1, 2; row 1's 4 and 5 (6 predicts 23, untrained)
    teacher = {0: ([11, 5], [-0.2, -1.8]), 1: ([12, 6], [-0.1, -2.0]), 2: ([13, 7], [-0.5, -1.0])}
    teacher |= {4: ([21, 8], [-0.3, -1.5]), 5: ([9, 4], [-0.4, -1.2])}
    for pos, (ids, lps) in teacher.items():
        expected += max(0.0, sum(math.exp(lp) * (lp - float(log_q[pos, i])) for i, lp in zip(ids, lps, strict=True)))
    assert float(loss) == pytest.approx(expected / 5, abs=1e-5)


def test_without_the_mask_it_is_verls_loss_unchanged() -> None:
    from verl.trainer.distillation.losses import distillation_ppo_loss

    plan = plan_of("distillation.distillation_loss.use_task_rewards=false")
    student = torch.tensor(ACTOR)
    _, data, _ = micro_batch([raw()], plan, student)
    del data["teacher_mask"]
    log_probs = torch.nested.nested_tensor_from_jagged(
        response_to_sequence_values(student, data), data["input_ids"].offsets()
    )
    actor = omega_conf_to_dataclass(as_run().actor_rollout_ref.actor)
    ours, _ = teacher_masked_distillation_ppo_loss(actor, plan.config, model_output={"log_probs": log_probs}, data=data)
    verls, _ = distillation_ppo_loss(actor, plan.config, model_output={"log_probs": log_probs}, data=data)
    assert float(ours) == float(verls)


# ---- the step's metrics --------------------------------------------------------------------------------------------
def test_reverse_kl_on_sampled_tokens_by_hand() -> None:
    plan = plan_of("distillation.distillation_loss.loss_mode=forward_kl_topk", "distillation.distillation_loss.topk=2")
    batch, _, metrics = micro_batch([raw()], plan, torch.tensor(ACTOR))
    assert metrics["atropos/distill/rows_with_teacher"] == 1.0
    # k1 on the 4 trained tokens found in the teacher's top-2: -0.8, -0.4, -1.5, 0.0
    assert distill_step_metrics(batch)["atropos/distill/reverse_kl_sampled"] == pytest.approx(-2.7 / 4, abs=1e-6)
