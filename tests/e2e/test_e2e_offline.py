"""Offline training end to end: groups saved by atroposlib's own writer train the tiny model through main_atropos
(Ray, verl workers) with atropos.source=jsonl — no run-api, env or endpoint — and a resumed run continues at the
next unread group."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from recipe.atropos.launcher.processes import ManagedProcess, tail
from recipe.atropos.metrics_file import read_metrics
from recipe.atropos.rundir import RunDir
from tests.helpers import offline_trainer_argv, wait_exit

REPLIES = ("Blue", "It is blue", "Paris", "A cat")


def save_groups_with_atroposlib(model: Path, path: Path, n_groups: int) -> list[list[float]]:
    """n_groups groups of 4 written by BaseEnv.handle_send_to_api (data_path_to_save_groups); their scores."""
    from recipe.atropos.envs.one_word_env import OneWordEnv, group_normalised, one_word_score

    env_config, servers = OneWordEnv.config_init()
    env_config = env_config.model_copy(
        update={"tokenizer_name": str(model), "group_size": 4, "data_path_to_save_groups": str(path)}
    )
    env = OneWordEnv(env_config, servers, slurm=False, testing=True)
    tok = env.tokenizer
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
        if k % 2:  # every other group carries env token-level advantages, as the online env does
            adv = group_normalised(group["scores"])
            group["advantages"] = [[0.0] * len(prompt) + [a] * len(c) for a, c in zip(adv, completions, strict=True)]
        groups.append(group)
    asyncio.run(env.handle_send_to_api(groups, do_send_to_api=False, abort_on_any_max_length_exceeded=False))
    env.jsonl_writer.close()
    return [g["scores"] for g in groups]


def offline_trainer(tmp_path: Path, model: Path, data: Path, steps: int, log: str, *extra: str) -> ManagedProcess:
    argv = offline_trainer_argv(model, tmp_path, data, steps, "trainer.save_freq=1", "trainer.resume_mode=auto", *extra)
    return ManagedProcess("trainer", argv, tmp_path / log)


@pytest.mark.timeout(900)
def test_offline_training_from_atroposlib_jsonl_resumes_at_the_next_unread_group(
    tmp_path: Path, tiny_model: Path, no_leftovers: list[ManagedProcess]
) -> None:
    model = tiny_model
    data = tmp_path / "groups.jsonl"
    scores = save_groups_with_atroposlib(model, data, n_groups=10)

    first = offline_trainer(tmp_path, model, data, steps=1, log="trainer.log")
    no_leftovers.append(first.start())
    assert wait_exit(first, 420) == 0, tail(first.log_path, 80)
    # the resumed run also whitens and clips the advantages (atropos.advantage)
    advantage = ("atropos.advantage.normalize=batch", "atropos.advantage.clip=[-1.5,1.5]")
    second = offline_trainer(tmp_path, model, data, 2, "trainer_resumed.log", *advantage)
    no_leftovers.append(second.start())
    assert wait_exit(second, 420) == 0, tail(second.log_path, 80)

    rows = read_metrics(RunDir(tmp_path).metrics_file)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        step = int(row["step"])
        # file order, 2 groups of 4 per step: step s trains groups 2s-2 and 2s-1 (the resumed run included)
        expected = [s for g in scores[2 * step - 2 : 2 * step] for s in g]
        assert row["atropos/mean_score"] == pytest.approx(sum(expected) / 8)
        assert row["atropos/offline/groups_read"] == 2 * step
        assert row["atropos/sequences"] == 8 and row["atropos/env_advantage_fraction"] == 0.5
        assert row["atropos/offline/rejected_lines"] == 0.0 and row["atropos/truncated_responses"] == 0.0
        assert "atropos/policy_version" not in row  # no endpoint offline
        assert row["actor/pg_loss"] != 0.0
        assert ("atropos/advantage_clip_fraction" in row) == (step > 1)
    for row in rows[1:]:
        assert row["atropos/advantage_raw_std"] > 0 and 0 <= row["atropos/advantage_clip_fraction"] < 1
