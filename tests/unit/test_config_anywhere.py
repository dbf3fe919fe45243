"""A user's own config and env script, in a folder outside the repository, through both entry points: the launcher
(``--config my_configs/mine.yaml``, composed and its env entry turned into a command line; nothing started) and
``main_atropos`` (``--config-path my_configs --config-name mine``, composed by Hydra's own command line with
``--cfg job``: printed, not run). Both are given paths relative to the user's working directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra

from recipe.atropos.launcher.env_entries import EnvServers
from recipe.atropos.main_atropos import cli, config_path_from_cwd

MINE = {
    "defaults": ["atropos_grpo_cpu_demo", "_self_"],
    "trainer": {"total_training_steps": 4, "experiment_name": "mine"},
    "atropos": {"launcher": {"envs": [{"name": "mine", "script": "envs/my_env.py", "group_size": 8}]}},
}


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``<tmp>/my_configs/mine.yaml`` (extends the CPU demo, its own env script) as the working directory's."""
    (tmp_path / "my_configs").mkdir()
    (tmp_path / "my_configs" / "mine.yaml").write_text(yaml.safe_dump(MINE))
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "my_env.py").write_text("# the user's env (not run here)\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_launcher_composes_a_config_and_runs_an_env_script_from_the_users_folder(user_folder: Path) -> None:
    from recipe.atropos.launcher.supervisor import Launcher

    launcher = Launcher(Path("my_configs/mine.yaml"), [f"atropos.launcher.run_dir={user_folder / 'run'}"])
    assert int(launcher.config.trainer.total_training_steps) == 4  # mine
    assert launcher.config.actor_rollout_ref.model.path == "embedded:SmolLM2-135M-Instruct"  # the demo's
    assert int(launcher.config.trainer.save_freq) == 5  # the demo's
    assert list(launcher.envs) == ["mine"]  # mine replaces the demo's env list
    argv = launcher.trainer_argv()
    at = argv.index("--config-path")
    assert argv[at : at + 4] == ["--config-path", str(user_folder / "my_configs"), "--config-name", "mine"]
    launcher.env_servers = {"mine": EnvServers(servers=[{}])}  # as the preflight's probe would find (one server)
    env = launcher.env_argv("mine")
    assert env[1:3] == [str(user_folder / "envs" / "my_env.py"), "serve"]  # absolute: the env runs from anywhere


def test_main_atropos_composes_a_config_from_the_users_folder(
    user_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trainer's command line (``python -m recipe.atropos.main_atropos`` calls :func:`cli`) from the user's
    folder, with Hydra's ``--cfg job``: the composed config is printed, nothing runs."""
    argv = ["main_atropos.py", "--config-path", "my_configs", "--config-name", "mine", "--cfg", "job"]
    monkeypatch.setattr(sys, "argv", [*argv, "data.train_batch_size=16"])
    try:
        cli()
    finally:
        GlobalHydra.instance().clear()  # hydra.main leaves it set: later compose() calls would refuse to start
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["total_training_steps"] == 4 and config["trainer"]["experiment_name"] == "mine"
    assert config["data"]["train_batch_size"] == 16  # the command line's
    assert config["actor_rollout_ref"]["actor"]["optim"]["lr"] == 2.0e-5  # the demo's
    assert config["atropos"]["launcher"]["envs"][0]["script"] == "envs/my_env.py"
    assert sys.argv[2] == str(user_folder / "my_configs")  # Hydra alone looks in recipe/atropos/my_configs


def test_a_relative_config_path_is_taken_from_the_working_directory() -> None:
    cwd = "/home/me"
    assert config_path_from_cwd(["m", "--config-path", "cfg", "--config-name", "x"], cwd) == [
        "m",
        "--config-path",
        "/home/me/cfg",
        "--config-name",
        "x",
    ]
    assert config_path_from_cwd(["m", "--config-path=cfg"], cwd) == ["m", "--config-path=/home/me/cfg"]
    assert config_path_from_cwd(["m", "-cp", "../cfg"], cwd) == ["m", "-cp", "/home/me/../cfg"]
    same = ["m", "--config-path", "/abs/cfg", "-cp=pkg://recipe.atropos.config", "trainer.x=cfg"]
    assert config_path_from_cwd(same, cwd) == same
