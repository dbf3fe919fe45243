"""Offline training end to end, with the environments' way of on-policy distillation: groups saved by atroposlib's
own writer train the tiny model through main_atropos (Ray, verl workers) with atropos.source=jsonl — no run-api, env
or endpoint — and a resumed run continues at the next unread group.

Every step's batch is two groups of 4: one carries a teacher's top-2 ``distill_token_ids`` / ``distill_logprobs``
(the teacher a second tiny model, seed 1, so the KL is not zero; its rows built through the teacher endpoint's own
code and the env mixin's row builder), the other the env's token-level advantages and no teacher. Both runs train with
``distillation.enabled=true`` and verl's ``forward_kl_topk``: the distillation term covers the teacher's rows only,
the RL loss every row. The single-sample estimators (k3, k1) are the unit tests' hand-computed cases; verl's own
teacher replica trains in test_e2e_trainer.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from recipe.atropos.launcher.processes import ManagedProcess, tail
from recipe.atropos.metrics_file import read_metrics
from recipe.atropos.rundir import RunDir
from tests.helpers import offline_trainer_argv, save_with_atroposlib, teacher_fields, wait_exit

REPLIES = ("Blue", "It is blue", "Paris", "A cat")
STEPS = 3
DISTILL = (
    "distillation.enabled=true",
    "distillation.distillation_loss.loss_mode=forward_kl_topk",
    "distillation.distillation_loss.topk=2",
    "distillation.distillation_loss.use_policy_gradient=false",
)


def groups_of_one_word_replies(model: Path, teacher: Path, n_groups: int) -> list[dict]:
    """n_groups groups of 4 replies to a question in the tiny model's chat template: even groups carry the teacher's
    top-2 fields, odd groups the env's token-level advantages (as the online env posts them)."""
    from transformers import AutoTokenizer

    from recipe.atropos.envs.one_word_env import group_normalised, one_word_score

    tok = AutoTokenizer.from_pretrained(model)
    groups = []
    for k in range(n_groups):
        messages = [{"role": "user", "content": f"Question {k}. Answer in exactly one word."}]
        prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        replies = REPLIES[k % 2 :] + REPLIES[: k % 2]
        completions = [tok.encode(r, add_special_tokens=False) + [tok.eos_token_id] for r in replies]
        tokens = [prompt + c for c in completions]
        group = {
            "tokens": tokens,
            "masks": [[-100] * len(prompt) + c for c in completions],
            "scores": [one_word_score(r) + k / 10 for r in replies],  # k / 10: each step's mean score is its own
            "inference_logprobs": [[1.0] * len(prompt) + [-2.0] * len(c) for c in completions],
        }
        if k % 2:
            adv = group_normalised(group["scores"])
            group["advantages"] = [[0.0] * len(prompt) + [a] * len(c) for a, c in zip(adv, completions, strict=True)]
        else:
            group |= teacher_fields(teacher, tokens, top_k=2)
        groups.append(group)
    return groups


def offline_trainer(tmp_path: Path, model: Path, data: Path, steps: int, log: str, *extra: str) -> ManagedProcess:
    argv = offline_trainer_argv(
        model, tmp_path, data, steps, "trainer.save_freq=1", "trainer.resume_mode=auto", *DISTILL, *extra
    )
    return ManagedProcess("trainer", argv, tmp_path / log)


@pytest.mark.timeout(900)
def test_offline_training_with_env_teacher_fields_resumes_at_the_next_unread_group(
    tmp_path: Path, tiny_model: Path, tiny_teacher: Path, no_leftovers: list[ManagedProcess]
) -> None:
    data = tmp_path / "groups.jsonl"
    groups = groups_of_one_word_replies(tiny_model, tiny_teacher, n_groups=2 * STEPS + 2)
    save_with_atroposlib(tiny_model, data, groups)
    scores = [g["scores"] for g in groups]

    first = offline_trainer(tmp_path, tiny_model, data, steps=1, log="trainer.log")
    no_leftovers.append(first.start())
    assert wait_exit(first, 420) == 0, tail(first.log_path, 80)
    # the resumed run also whitens and clips the advantages (atropos.advantage)
    advantage = ("atropos.advantage.normalize=batch", "atropos.advantage.clip=[-1.5,1.5]")
    second = offline_trainer(tmp_path, tiny_model, data, STEPS, "trainer_resumed.log", *advantage)
    no_leftovers.append(second.start())
    assert wait_exit(second, 420) == 0, tail(second.log_path, 80)

    rows = read_metrics(RunDir(tmp_path).metrics_file)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        step = int(row["step"])
        # file order, 2 groups of 4 per step: step s trains groups 2s-2 and 2s-1 (the resumed run included)
        expected = [s for g in scores[2 * step - 2 : 2 * step] for s in g]
        assert row["atropos/mean_score"] == pytest.approx(sum(expected) / 8)
        assert row["atropos/offline/groups_read"] == 2 * step
        assert row["atropos/sequences"] == 8 and row["atropos/env_advantage_fraction"] == 0.5
        assert row["atropos/offline/rejected_lines"] == 0.0 and row["atropos/truncated_responses"] == 0.0
        assert "atropos/policy_version" not in row  # no endpoint offline
        assert row["actor/pg_loss"] != 0.0 and math.isfinite(row["actor/pg_loss"])  # the RL loss trains every row
        assert ("atropos/advantage_clip_fraction" in row) == (step > 1)
        # the teacher's group: half the rows, and at most half the response tokens
        assert row["atropos/distill/rows_with_teacher"] == 0.5
        assert 0.0 < row["atropos/distill/teacher_token_share"] <= 0.5
        assert math.isfinite(row["atropos/distill/reverse_kl_sampled"])
        term = row["actor/distillation/loss"]
        assert math.isfinite(term) and term > 0.0, row  # the teacher is another model: the term is not zero
        assert 0.0 < row["actor/distillation/teacher_mass"] <= 1.0
    for row in rows[1:]:
        assert row["atropos/advantage_raw_std"] > 0 and 0 <= row["atropos/advantage_clip_fraction"] < 1
