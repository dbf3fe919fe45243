"""The trainer alone end to end on CPU, every process real: run-api (the module's), the trainer (main_atropos, tiny
model, Ray, verl workers) with its inference endpoint, and the bundled environment in `serve` mode, started here
without the launcher: the trainer is killed after a checkpoint and resumed. The launcher's full online run is in
test_e2e_online.py.

The run also trains against the reference model with both of verl's KL terms: ``actor_rollout_ref.actor.use_kl_loss``
(``low_var_kl``) and ``algorithm.use_kl_in_reward`` (k1). verl builds the reference as a second engine in the actor's
worker from the initial weights (again on resume); the trainer computes its log-probs every step (``timing_s/ref``).
The KL values of a small batch are checked by hand in tests/unit/test_reference_kl.py.

And it distils verl's way: ``distillation.teacher_models.teacher_model.model_path`` = a second tiny model (seed 1, so
the KL is not zero); verl's teacher replica (the hf_cpu backend on CPU) answers for every row after conversion, with
``k3`` (verl 0.9.1 takes a teacher's top-k only from vLLM or SGLang, so ``forward_kl_topk`` is refused with an hf_cpu
teacher), before and after the resume. The environments' way trains in test_e2e_offline.py."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import requests

from recipe.atropos.launcher.processes import ManagedProcess, free_port, stop_process_tree, tail
from recipe.atropos.metrics_file import read_metrics
from recipe.atropos.rundir import RunDir
from tests.helpers import trainer_argv, wait_exit, wait_until

ENV_MODULE = "recipe.atropos.envs.one_word_env"
KL = (
    "actor_rollout_ref.actor.use_kl_loss=true",
    "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
    "actor_rollout_ref.actor.kl_loss_coef=0.001",
    "algorithm.use_kl_in_reward=true",
)
KL_METRICS = ("actor/kl_loss", "actor/kl_coef", "actor/reward_kl_penalty", "actor/reward_kl_penalty_coeff")
TEACHER_TIMES = ("timing_s/teacher", "timing_s/update_actor", "timing_s/old_log_prob", "timing_s/step")


def trainer_process(run_dir: Path, model: Path, api_url: str, port: int, *overrides: str) -> ManagedProcess:
    argv = trainer_argv(model, run_dir, f"atropos.api_url={api_url}", f"atropos.inference.port={port}", *overrides)
    return ManagedProcess("trainer", argv, RunDir(run_dir).trainer_log)


def env_process(run_dir: Path, model: Path, api_url: str, port: int, name: str = "env") -> ManagedProcess:
    argv = [
        sys.executable,
        "-m",
        ENV_MODULE,
        "serve",
        "--env.rollout_server_url",
        api_url,
        "--env.tokenizer_name",
        str(model),
        "--env.group_size",
        "4",
        # only groups whose scores differ: every step has a learning signal, so step 1's update moves the policy away
        # from the reference (the KL terms' own gradient is 0 there) and later steps' KL is measurably > 0
        "--env.ensure_scores_are_not_same",
        "true",
        "--env.use_wandb",
        "false",
        "--openai.server_type",
        "vllm",
        "--openai.base_url",
        f"http://127.0.0.1:{port}/v1",
        "--openai.model_name",
        str(model),
        "--openai.tokenizer_name",
        str(model),
    ]
    return ManagedProcess(name, argv, run_dir / f"{name}.log")


@pytest.mark.timeout(900)
def test_resume_after_kill_continues_from_the_checkpoint(
    run_api, tiny_model: Path, tiny_teacher: Path, tmp_path: Path, no_leftovers: list[ManagedProcess]
) -> None:
    port = free_port()
    common = (
        "trainer.total_training_steps=3",
        "trainer.save_freq=1",
        "trainer.resume_mode=auto",
        # the env's inference_logprobs feed verl's rollout correction (token-level importance weights)
        "algorithm.rollout_correction.rollout_is=token",
        *KL,
        "distillation.enabled=true",
        f"distillation.teacher_models.teacher_model.model_path={tiny_teacher}",
        "distillation.distillation_loss.loss_mode=k3",
    )

    def registered() -> bool:
        return requests.get(f"{run_api.url}/info", timeout=5).json()["batch_size"] != -1

    # The env starts once the trainer has registered (before its workers start, as the launcher starts envs): it waits
    # for the endpoint meanwhile.
    first = trainer_process(tmp_path, tiny_model, run_api.url, port, *common)
    no_leftovers.append(first.start())
    wait_until(registered, 400, "registration with the API", proc=first)
    env = env_process(tmp_path, tiny_model, run_api.url, port).start()
    no_leftovers.append(env)

    latest = RunDir(tmp_path).checkpoints / "latest_checkpointed_iteration.txt"
    metrics = RunDir(tmp_path).metrics_file

    def step_1_done() -> bool:  # its checkpoint, and its metrics row (written after the checkpoint and the push)
        return latest.exists() and int(latest.read_text() or 0) >= 1 and bool(read_metrics(metrics))

    wait_until(step_1_done, 400, "step 1's checkpoint and metrics row", proc=first)
    stop_process_tree(first.pid)
    env.stop()
    saved = int(latest.read_text())

    # A fresh API (its state is in memory); the resumed trainer registers at the checkpoint's step.
    run_api.stop()
    run_api.start()
    port = free_port()
    second = trainer_process(tmp_path, tiny_model, run_api.url, port, *common)
    second.log_path = tmp_path / "trainer_resumed.log"
    no_leftovers.append(second.start())
    wait_until(registered, 400, "registration with the API", proc=second)
    # No env is running yet, so no batch was built: the API's step is exactly the one the trainer registered.
    assert requests.get(f"{run_api.url}/status", timeout=5).json()["current_step"] == saved
    n_before = len(read_metrics(RunDir(tmp_path).metrics_file))
    no_leftovers.append(env_process(tmp_path, tiny_model, run_api.url, port, name="env2").start())
    assert wait_exit(second, timeout=400) == 0, tail(second.log_path, 80)

    rows_after = read_metrics(RunDir(tmp_path).metrics_file)[n_before:]
    assert [r["step"] for r in rows_after] == list(range(saved + 1, 4))
    assert all("rollout_corr/rollout_is_mean" in r for r in rows_after), sorted(rows_after[0])

    # The reference model and both KL terms, every step, before and after the resume.
    rows = read_metrics(RunDir(tmp_path).metrics_file)
    assert [r["step"] for r in rows][0] == 1
    for row in rows:
        assert row["timing_s/ref"] > 0  # reference log-probs every step
        assert all(math.isfinite(row[k]) for k in KL_METRICS), row
        assert row["actor/kl_coef"] == pytest.approx(0.001)
        assert row["actor/reward_kl_penalty_coeff"] == pytest.approx(0.001)  # kl_ctrl: fixed, kl_coef 0.001
    # Step 1: the reference is the initial policy (same weights, same fp32 forward): both KL terms are 0.
    first = rows[0]
    assert abs(first["actor/kl_loss"]) < 1e-6 and abs(first["actor/reward_kl_penalty"]) < 1e-6, first
    # Then the actor has moved and the reference has not (the resumed run rebuilt it from the initial weights).
    for row in rows[1:]:
        assert row["actor/kl_loss"] > 1e-6, row
        assert abs(row["actor/reward_kl_penalty"]) > 1e-6, row

    # verl's teacher replica, every step, before and after the resume (its time and memory printed beside the
    # student's in the test's output).
    for row in rows:
        print(f"step {row['step']}:", {k: v for k, v in row.items() if "teacher" in k or k in TEACHER_TIMES})
    for row in rows:
        assert row["atropos/distill/rows_with_teacher"] == 1.0  # verl's teacher answers for every row
        assert row["atropos/distill/teacher_token_share"] == 1.0
        assert row["atropos/distill/sampled_token_coverage"] == 1.0  # k3: the one id is the sampled token
        assert row["atropos/distill/env_field_rows_ignored"] == 0.0
        assert math.isfinite(row["atropos/distill/reverse_kl_sampled"]) and row["atropos/distill/reverse_kl_sampled"]
        term = row["actor/distillation/loss"]
        assert math.isfinite(term) and term > 0.0, row  # the teacher is another model: the term is not zero
        assert math.isfinite(row["actor/pg_loss"])
        assert row["timing_s/teacher"] > 0.0 and row["atropos/distill/teacher_rss_mb"] > 0.0
