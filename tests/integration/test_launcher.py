"""The launcher: config checks (unit) and failure handling of whole runs with real processes (e2e, tiny config).

A run to completion through the launcher is tested in test_e2e_trainer.py."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from recipe.atropos.launch_atropos_verl_services import EnvSpec, LaunchError, env_specs, load_config
from recipe.atropos.launcher.report import read_metrics, step_line, summarize
from tests.helpers import launcher_argv, wait_for

CONFIGS = Path(__file__).resolve().parents[2] / "recipe" / "atropos" / "config"
TINY = CONFIGS / "atropos_grpo_tiny.yaml"


@pytest.mark.parametrize("name", ["atropos_grpo", "atropos_grpo_tiny", "atropos_grpo_cpu_demo", "atropos_grpo_gpu"])
def test_every_shipped_config_composes(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.yaml", [])
    assert config.algorithm.adv_estimator == "atropos"
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "advantage_weighted_ce"


def test_launcher_composes_the_trainers_config_without_importing_verl() -> None:
    """`pkg://verl.trainer.config` is read as its directory: same config as Hydra's pkg:// path, verl not imported."""
    code = f"""
import sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from recipe.atropos.launcher.config import load_config
fast = load_config({str(CONFIGS / "atropos_grpo_cpu_demo.yaml")!r}, ["data.train_batch_size=16"])
assert "verl" not in sys.modules and "torch" not in sys.modules, "composition imported verl"
with initialize_config_dir(config_dir={str(CONFIGS)!r}, version_base=None):
    slow = compose(config_name="atropos_grpo_cpu_demo", overrides=["data.train_batch_size=16"])
assert "verl" in sys.modules
assert OmegaConf.to_container(fast) == OmegaConf.to_container(slow)
print(fast.data.train_batch_size)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "16"


def test_batch_size_must_be_a_multiple_of_every_group_size() -> None:
    config = load_config(TINY, ["data.train_batch_size=6"])
    with pytest.raises(LaunchError, match="train_batch_size=6 is not a multiple of env 'one_word' group_size=4"):
        env_specs(config)


def test_env_entry_needs_exactly_one_of_module_or_script() -> None:
    config = load_config(TINY, ["+atropos.launcher.envs.0.script=x.py"])
    with pytest.raises(LaunchError, match="exactly one of `module` or `script`"):
        env_specs(config)


def test_env_command_line_fills_in_endpoints_and_lets_env_flags_win() -> None:
    spec = EnvSpec(name="gsm8k", script="/x/gsm8k_server.py", group_size=8, weight=2.0, args={"env.use_wandb": True})
    argv = spec.argv("http://127.0.0.1:1", "http://127.0.0.1:2", "/models/m", 640)
    assert argv[1:3] == ["/x/gsm8k_server.py", "serve"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags["--env.rollout_server_url"] == "http://127.0.0.1:1"
    assert flags["--openai.base_url"] == "http://127.0.0.1:2/v1"
    assert flags["--openai.server_type"] == "vllm"
    assert flags["--env.group_size"] == "8" and flags["--env.inference_weight"] == "2.0"
    assert flags["--env.max_token_length"] == "640"
    assert flags["--env.use_wandb"] == "true"  # the env's own flag overrides the launcher default (false)


def test_summary_and_step_line_from_a_metrics_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    scores = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    path.write_text("".join(f'{{"step": {i + 1}, "atropos/mean_score": {s}}}\n' for i, s in enumerate(scores)) + "{")
    rows = read_metrics(path)  # the half-written last line is skipped
    assert len(rows) == 7
    assert summarize(rows) == "mean score first 5 steps 0.200 -> last 5 steps 0.400 (7 steps)"
    assert step_line(rows[0], 7).startswith("step 1/7 | mean score 0.000")


# ---- whole runs -------------------------------------------------------------------------------------------
def launch(tmp_path: Path, model: Path, *overrides: str) -> subprocess.Popen:
    argv = launcher_argv(model, tmp_path / "run", *overrides)
    return subprocess.Popen(argv, stdout=open(tmp_path / "launcher.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_dying_env_stops_the_run_naming_it(tmp_path: Path, tiny_model: Path, no_leftovers) -> None:
    proc = launch(tmp_path, tiny_model, "trainer.total_training_steps=50", "atropos.launcher.restart_envs=false")
    log = tmp_path / "launcher.log"
    wait_for(lambda: "step 1/50" in log.read_text(), 480, "the first step", proc, log)
    children = psutil.Process(proc.pid).children(recursive=True)
    env = next(p for p in children if "recipe.atropos.envs.one_word_env" in p.cmdline())
    env.kill()
    assert proc.wait(timeout=120) == 1
    assert "one_word exited with code" in log.read_text()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_sigint_stops_everything_and_leaves_a_usable_checkpoint(tmp_path: Path, tiny_model: Path, no_leftovers) -> None:
    proc = launch(tmp_path, tiny_model, "trainer.total_training_steps=50", "trainer.save_freq=1")
    latest = tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt"
    wait_for(latest.exists, 480, "the first checkpoint", proc, tmp_path / "launcher.log")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    step = int(latest.read_text())
    actor = tmp_path / "run" / "checkpoints" / f"global_step_{step}" / "actor"
    assert any(actor.glob("model_world_size_*_rank_0.pt"))
    assert (actor / "huggingface" / "config.json").exists()


def test_trainer_without_total_steps_fails_fast_naming_the_key(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "recipe.atropos.main_atropos", "actor_rollout_ref.model.path=/nowhere"]
    argv.append(f"hydra.run.dir={tmp_path}")
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "trainer.total_training_steps is required" in run.stderr + run.stdout
