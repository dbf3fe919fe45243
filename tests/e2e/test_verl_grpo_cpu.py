"""verl's own GRPO loop (`python -m verl.trainer.main_ppo`, RayPPOTrainer) on CPU through our runtime."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from recipe.atropos.setup.assets import build_tiny_model
from recipe.atropos.setup.cpu_runtime import cpu_runtime_env, cpu_runtime_overrides

REWARD_FN = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """Fraction of the letter 'a' in the reply: varies between samples of a random model."""
    return solution_str.count("a") / max(len(solution_str), 1)
'''


def make_parquet(path: Path, n: int) -> Path:
    rows = [
        {
            "data_source": "letters",
            "prompt": [{"role": "user", "content": f"say something {i}"}],
            "ability": "toy",
            "reward_model": {"style": "rule", "ground_truth": "a"},
            "extra_info": {"index": i},
        }
        for i in range(n)
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def numbers(log: str, key: str) -> list[float]:
    return [float(m) for m in re.findall(rf"{re.escape(key)}:([-\d.e+]+)", log)]


@pytest.mark.timeout(420)
def test_verl_grpo_loop_runs_on_cpu(tmp_path: Path, no_leftovers: list) -> None:
    model = build_tiny_model(tmp_path / "tiny")
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_FN)
    ckpt = tmp_path / "ckpt"
    # Ray's own temp dir (short: its socket paths must stay under 108 bytes), to find any Ray process left behind.
    ray_dir = Path(tempfile.mkdtemp(prefix="ray"))
    argv = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        *cpu_runtime_overrides(),
        "algorithm.adv_estimator=grpo",
        f"data.train_files={make_parquet(tmp_path / 'train.parquet', 16)}",
        f"data.val_files={make_parquet(tmp_path / 'val.parquet', 4)}",
        "data.train_batch_size=4",
        "data.max_prompt_length=48",
        "data.max_response_length=12",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        f"reward.custom_reward_function.path={reward}",
        "trainer.logger=[console]",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.total_training_steps=2",
        "trainer.save_freq=2",
        f"trainer.default_local_dir={ckpt}",
        f"++ray_kwargs.ray_init._temp_dir={ray_dir}",
    ]
    env = {**os.environ, **cpu_runtime_env(), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]

    assert numbers(log, "training/global_step") == [1.0, 2.0]
    # the rollout backend's log-probs agree with the trainer's recomputation of the same tokens
    diffs = numbers(log, "training/rollout_probs_diff_max")
    assert len(diffs) == 2 and max(diffs) < 1e-3, diffs
    # weights were pushed to the rollout server before step 1 and after each step: 3 loads, versions 0, 1, 2
    assert "hf_cpu rollout: policy version 2 (3 weight loads; full/base weights)" in log
    # the actor's weights changed
    saved = torch.load(ckpt / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt", weights_only=False)
    initial = AutoModelForCausalLM.from_pretrained(model).state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    trained = saved[name].full_tensor() if hasattr(saved[name], "full_tensor") else saved[name]
    assert not torch.allclose(trained.float(), initial[name].float())
    # nothing left behind: no new child process, no Ray process of that run (they name its temp dir)
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before
    cmdlines = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    ray_left = [c for c in cmdlines if str(ray_dir) in c]
    assert not ray_left, ray_left
    shutil.rmtree(ray_dir, ignore_errors=True)
