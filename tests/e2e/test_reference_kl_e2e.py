"""The reference model and both of verl's KL terms end to end on CPU, in one launcher run (tiny config, 3 steps):
``actor_rollout_ref.actor.use_kl_loss`` (``low_var_kl``) and ``algorithm.use_kl_in_reward`` (verl's ``kl``, k1) at
once. verl builds the reference as a second engine in the actor's worker from the initial weights; the trainer
computes its log-probs every step (``timing_s/ref``); the actor's loss logs ``actor/kl_loss`` / ``actor/kl_coef`` and
the in-reward penalty ``actor/reward_kl_penalty`` / ``actor/reward_kl_penalty_coeff``. The KL values of a small batch
are checked by hand in tests/unit/test_reference_kl.py."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest

from recipe.atropos.metrics_file import read_metrics, trainer_rows
from tests.helpers import Launch

pytestmark = pytest.mark.timeout(600)
logger = logging.getLogger(__name__)

STEPS = 3
KL_METRICS = ("actor/kl_loss", "actor/kl_coef", "actor/reward_kl_penalty", "actor/reward_kl_penalty_coeff")


def test_kl_loss_and_kl_in_reward_against_the_initial_policy(launch: Callable[..., Launch]) -> None:
    run = launch(
        f"trainer.total_training_steps={STEPS}",
        "trainer.save_freq=-1",
        "actor_rollout_ref.actor.use_kl_loss=true",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        "actor_rollout_ref.actor.kl_loss_coef=0.001",
        "algorithm.use_kl_in_reward=true",
        # Only groups whose scores differ: every step has a learning signal, so step 1's update moves the policy away
        # from the reference (the KL term's own gradient is 0 there). With identical-score groups only, just AdamW's
        # weight decay would move it and step 2's KL could be ~1e-12.
        "atropos.launcher.envs.0.args={env.ensure_scores_are_not_same:true,env.max_new_tokens:16}",
        "atropos.launcher.envs.1.args={env.ensure_scores_are_not_same:true,env.max_new_tokens:16,env.seed:1}",
    )
    assert run.wait_exit(540) == 0, run.log_text()[-6000:]
    rows = trainer_rows(read_metrics(run.run_dir / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        logger.info("step %d: %s", row["step"], {k: row[k] for k in (*KL_METRICS, "timing_s/ref")})
        assert row["timing_s/ref"] > 0  # reference log-probs every step
        assert all(math.isfinite(row[k]) for k in KL_METRICS), row
        assert row["actor/kl_coef"] == pytest.approx(0.001)
        assert row["actor/reward_kl_penalty_coeff"] == pytest.approx(0.001)  # kl_ctrl: fixed, kl_coef 0.001
        assert row["atropos/identical_score_rate"] == 0.0

    first, later = rows[0], rows[1:]
    # Step 1: the reference is the initial policy (same weights, same fp32 forward): both KL terms are 0.
    assert abs(first["actor/kl_loss"]) < 1e-6 and abs(first["actor/reward_kl_penalty"]) < 1e-6, first
    # Then the actor has moved and the reference has not: low_var_kl is > 0, the k1 penalty non-zero.
    for row in later:
        assert row["actor/kl_loss"] > 1e-6, row
        assert abs(row["actor/reward_kl_penalty"]) > 1e-6, row
