"""End to end on CPU, every process real: run-api, the trainer (main_atropos, tiny model, Ray, verl workers), its
inference endpoint, and the bundled environment in `serve` mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import requests

from recipe.atropos.launcher.report import read_metrics
from recipe.atropos.launcher.processes import ManagedProcess, free_port, stop_process_tree, tail
from tests.helpers import launcher_argv, trainer_argv, wait_exit

pytestmark = pytest.mark.e2e

ENV_MODULE = "recipe.atropos.envs.one_word_env"


def trainer_process(run_dir: Path, model: Path, api_url: str, port: int, *overrides: str) -> ManagedProcess:
    argv = trainer_argv(model, run_dir, f"atropos.api_url={api_url}", f"atropos.inference.port={port}", *overrides)
    return ManagedProcess("trainer", argv, run_dir / "trainer.log")


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
        "--env.ensure_scores_are_not_same",
        "false",
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


@pytest.mark.timeout(600)
def test_online_loop_trains_on_env_groups_with_both_advantage_paths(
    tiny_model: Path, tmp_path: Path, no_leftovers: list[ManagedProcess]
) -> None:
    """The launcher starts run-api, the trainer (and its endpoint), then two envs in serve mode; 3 steps."""
    run_dir = tmp_path / "run"
    # final_eval_wait_s: these envs never evaluate, so the trainer must not wait for an evaluation (else: timeout)
    argv = launcher_argv(tiny_model, run_dir, "trainer.total_training_steps=3", "atropos.final_eval_wait_s=900")
    launcher = ManagedProcess("launcher", argv, tmp_path / "launcher.log")
    no_leftovers.append(launcher.start())
    assert wait_exit(launcher, timeout=540) == 0, tail(launcher.log_path, 80)

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["atropos/sequences"] == 8 and 2 <= row["atropos/groups"] <= 4  # groups of 4 and of 2
        assert row["atropos/policy_version"] == row["step"]  # weights pushed to the endpoint every step
        assert row["atropos/policy_lag_unknown"] == 0 and row["atropos/policy_lag_max"] <= 2
        assert row["training/rollout_probs_diff_max"] < 1e-2  # the env's inference_logprobs match the trainer's
    fractions = [r["atropos/env_advantage_fraction"] for r in rows]
    # the env attaches token-level advantages to every other group: both paths ran
    assert 0.0 < sum(fractions) / len(fractions) < 1.0, fractions
    # the launcher's env weights 1.0 / 0.5 are held exactly: quotas 4+4, 8+0, 4+4 sequences (one_word + pairs)
    assert json.loads((run_dir / "env_ids.json").read_text()) == {"0": "one_word", "1": "one_word_pairs"}
    per_env = {n: sum(r[f"atropos/env/{n}/sequences"] for r in rows) for n in ("one_word", "one_word_pairs")}
    assert per_env == {"one_word": 16.0, "one_word_pairs": 8.0}, per_env
    assert rows[-1]["atropos/mixture/reassigned_sequences"] == 0.0
    assert "step 3/3 | mean score" in launcher.log_path.read_text()
    assert "mean score first 3 steps" in (run_dir / "summary.txt").read_text()
    assert (run_dir / "metrics.png").stat().st_size > 0
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert logs >= {"run-api.log", "trainer.log", "one_word.log", "one_word_pairs.log"}


@pytest.mark.timeout(900)
def test_resume_after_kill_continues_from_the_checkpoint(
    run_api, tiny_model: Path, tmp_path: Path, no_leftovers: list[ManagedProcess]
) -> None:
    port = free_port()
    common = (
        "trainer.total_training_steps=3",
        "trainer.save_freq=1",
        "trainer.resume_mode=auto",
        # the env's inference_logprobs feed verl's rollout correction (token-level importance weights)
        "algorithm.rollout_correction.rollout_is=token",
    )
    first = trainer_process(tmp_path, tiny_model, run_api.url, port, *common)
    no_leftovers.append(first.start())
    first.wait_http(f"http://127.0.0.1:{port}/health", timeout=400)
    env = env_process(tmp_path, tiny_model, run_api.url, port).start()
    no_leftovers.append(env)

    latest = tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt"
    first.wait_until(lambda: latest.exists() and int(latest.read_text() or 0) >= 1, 400, "checkpoint of step 1")
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
    second.wait_http(f"http://127.0.0.1:{port}/health", timeout=400)

    def registered() -> bool:
        return requests.get(f"{run_api.url}/info", timeout=5).json()["batch_size"] != -1

    second.wait_until(registered, 120, "registration with the API")
    # No env is running yet, so no batch was built: the API's step is exactly the one the trainer registered.
    assert requests.get(f"{run_api.url}/status", timeout=5).json()["current_step"] == saved
    n_before = len(read_metrics(tmp_path / "metrics.jsonl"))
    no_leftovers.append(env_process(tmp_path, tiny_model, run_api.url, port, name="env2").start())
    assert wait_exit(second, timeout=400) == 0, tail(second.log_path, 80)

    rows_after = read_metrics(tmp_path / "metrics.jsonl")[n_before:]
    assert [r["step"] for r in rows_after] == list(range(saved + 1, 4))
    assert all("rollout_corr/rollout_is_mean" in r for r in rows_after), sorted(rows_after[0])
