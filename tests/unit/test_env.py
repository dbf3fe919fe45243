"""The bundled OneWordEnv: scoring and env-side advantages by hand, config, deterministic questions."""

from __future__ import annotations

import math
import random

import pytest

from recipe.atropos.envs.one_word_env import INSTRUCTION, OneWordEnv, group_normalised, one_word_score, question


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


def test_questions_are_seeded_and_carry_the_instruction() -> None:
    first = [question(random.Random(7)) for _ in range(3)]
    again = [question(random.Random(7)) for _ in range(3)]
    assert first == again and all(q.endswith(INSTRUCTION) for q in first)


def test_config_init_points_at_the_vllm_server_type() -> None:
    env_config, servers = OneWordEnv.config_init()
    assert servers[0].server_type == "vllm"
    assert env_config.env_advantage_every == 2 and env_config.batch_size == -1
