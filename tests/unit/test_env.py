"""The bundled OneWordEnv: scoring and env-side advantages by hand, config, its seeded question stream and the
held-out set."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from recipe.atropos.envs.one_word_env import (
    HELD_OUT_SUBJECTS,
    INSTRUCTION,
    SUBJECTS,
    TEMPLATES,
    OneWordEnv,
    group_normalised,
    held_out_questions,
    one_word_score,
)


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("Paris", 1.0),
        ("  Paris. ", 1.0),
        ("don't", 1.0),
        ("42", 1.0),
        ("Paris, France", 0.0),
        ("The answer is blue", 0.0),
        ("", 0.0),
        ("...", 0.0),
    ],
)
def test_one_word_score(reply: str, score: float) -> None:
    assert one_word_score(reply) == score


def test_group_normalised_by_hand() -> None:
    # scores 1, 0, 0, 0: mean 0.25, population std sqrt(0.1875)
    std = math.sqrt(0.1875)
    assert group_normalised([1.0, 0.0, 0.0, 0.0], epsilon=0.0) == pytest.approx(
        [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std]
    )
    assert group_normalised([1.0, 1.0]) == [0.0, 0.0]


async def _items(env: OneWordEnv, n: int) -> list[str]:
    return [await env.get_next_item() for _ in range(n)]


@pytest.fixture(scope="module")
def question_stream(tiny_model: Path) -> Callable[..., list[str]]:
    """``question_stream(seed, n=200)``: the first ``n`` items the env asks with ``--env.seed seed``, built as
    atroposlib's CLI builds it (``config_init``, then the constructor; the tiny model's tokenizer, ``testing=True``: no
    server is contacted), through its own ``setup`` and ``get_next_item``."""

    def stream(seed: int, n: int = 200) -> list[str]:
        env_config, servers = OneWordEnv.config_init()
        assert env_config.steps_per_eval == 0  # setup then starts no evaluation
        env_config = env_config.model_copy(update={"seed": seed, "tokenizer_name": str(tiny_model)})
        env = OneWordEnv(env_config, servers, slurm=False, testing=True)
        asyncio.run(env.setup())
        return asyncio.run(_items(env, n))

    return stream


TRAINING_QUESTIONS = {f"{t.format(s)} {INSTRUCTION}" for t in TEMPLATES for s in SUBJECTS}


def test_same_seed_same_question_stream_and_other_seeds_other_streams(
    question_stream: Callable[..., list[str]],
) -> None:
    assert question_stream(0) == question_stream(0)  # a run's envs ask the same questions when restarted
    # the tiny config's two envs (seeds 0 and 1) ask different streams; so does any other seed
    streams = {seed: question_stream(seed) for seed in (0, 1, 7)}
    assert streams[0] != streams[1] and streams[0] != streams[7] and streams[1] != streams[7]
    assert streams[0][:20] != streams[1][:20]  # not merely the same stream shifted late


def test_questions_are_template_subject_pairs_ending_with_the_instruction_and_vary(
    question_stream: Callable[..., list[str]],
) -> None:
    stream = question_stream(0)
    assert all(q.endswith(" " + INSTRUCTION) for q in stream)
    assert set(stream) <= TRAINING_QUESTIONS
    # a stream of 200 reaches every template and nearly every subject, not one question over and over
    assert all(any(q.startswith(t.split("{}")[0]) for q in stream) for t in TEMPLATES)
    assert sum(any(s in q for q in stream) for s in SUBJECTS) >= len(SUBJECTS) - 2
    assert len(set(stream)) >= 40


def test_held_out_subjects_never_appear_in_training_questions(question_stream: Callable[..., list[str]]) -> None:
    asked = [q for seed in (0, 1, 7) for q in question_stream(seed)]
    assert not [q for q in asked if any(h in q for h in HELD_OUT_SUBJECTS)]
    assert not [q for q in TRAINING_QUESTIONS if any(h in q for h in HELD_OUT_SUBJECTS)]
    assert not set(SUBJECTS) & set(HELD_OUT_SUBJECTS)


def test_held_out_set_is_fixed_on_held_out_subjects_and_disjoint_from_training() -> None:
    full = held_out_questions(32)
    assert held_out_questions(32) == full and held_out_questions(8) == full[:8]  # the same set in every run
    assert len(set(full)) == 32 == len(HELD_OUT_SUBJECTS) * len(TEMPLATES)
    assert all(q.endswith(" " + INSTRUCTION) and sum(h in q for h in HELD_OUT_SUBJECTS) == 1 for q in full)
    assert not set(full) & TRAINING_QUESTIONS
    # the env's evaluation (8 questions by default) already spans several held-out subjects
    assert len({h for q in full[:8] for h in HELD_OUT_SUBJECTS if h in q}) >= 4


def test_config_init_points_at_the_vllm_server_type() -> None:
    env_config, servers = OneWordEnv.config_init()
    assert servers[0].server_type == "vllm"
    assert env_config.env_advantage_every == 2 and env_config.batch_size == -1


@pytest.mark.parametrize(("every", "evaluated"), [(1, [1, 2, 3, 4]), (2, [2, 4])])
def test_the_env_evaluates_after_every_api_step_with_steps_per_eval_1(
    tiny_model: Path, every: int, evaluated: list[int]
) -> None:
    """atroposlib's own schedule (``(old % k) > (new % k)``) never fires for k = 1; the env's does, once per new step
    (a repeated step evaluates nothing); k = 2 stays atroposlib's (steps 2 and 4, not doubled)."""
    from recipe.atropos.envs.one_word_env import OneWordEnv

    config, servers = OneWordEnv.config_init()
    config = config.model_copy(update={"tokenizer_name": str(tiny_model), "steps_per_eval": every})
    env = OneWordEnv(config, servers, slurm=False, testing=True)
    # Private: the final-policy check asks the trainer's endpoint (none here); no public switch turns it off.
    env._final_evaluated, env._next_final_check = True, float("inf")
    seen: list[int] = []

    async def evaluate(*args: object, **kwargs: object) -> dict:
        seen.append(env.status_dict["current_step"])
        return {}

    env.evaluate = evaluate

    async def steps() -> None:
        for step in (0, 1, 1, 2, 3, 4):
            env.status_dict = {"current_step": step}
            await env.env_step_checks()
            if env.eval_runner is not None:
                await env.eval_runner

    asyncio.run(steps())
    assert seen == evaluated
