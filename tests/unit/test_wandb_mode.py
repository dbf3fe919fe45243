"""``atropos.wandb_mode`` sets the trainer's ``WANDB_MODE`` unless the environment sets it (the user's variable wins);
the console says where the run goes (``<run_dir>/wandb`` under the launcher), naming wandb's real run folder once it
exists. (``tests/unit/test_configs.py`` holds the key's YAML default equal to the dataclass's.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipe.atropos.config import atropos_config
from recipe.atropos.launcher.config import load_config
from recipe.atropos.setup.tracking import latest_wandb_run, wandb_base, wandb_line, wandb_mode
from tests.factories import CONFIG_DIR

DEMO = CONFIG_DIR / "atropos_grpo_cpu_demo.yaml"


def test_the_environment_wins_over_the_config_key() -> None:
    assert wandb_mode("offline", {}) == ("offline", "atropos.wandb_mode")
    assert wandb_mode("offline", {"WANDB_MODE": "online"}) == ("online", "WANDB_MODE")
    assert wandb_mode("online", {"WANDB_MODE": ""}) == ("online", "atropos.wandb_mode")  # empty = unset
    assert wandb_base("/runs/r", {}) == Path("/runs/r")
    assert wandb_base("/runs/r", {"WANDB_DIR": "/mine"}) == Path("/mine")


def test_the_key_takes_three_modes_and_names_itself_otherwise() -> None:
    config = load_config(DEMO, [])
    assert atropos_config(config).wandb_mode == "offline"
    config.atropos.wandb_mode = "online"
    assert atropos_config(config).wandb_mode == "online"
    config.atropos.wandb_mode = "cloud"
    with pytest.raises(ValueError, match=r"atropos.wandb_mode='cloud': use one of 'offline', 'online', 'disabled'"):
        atropos_config(config)


def test_the_console_line_per_mode(tmp_path: Path) -> None:
    wandb = ["console", "wandb"]
    assert wandb_line(["console"], "offline", "atropos.wandb_mode", tmp_path, "p", "n") is None
    assert wandb_line(wandb, "offline", "atropos.wandb_mode", tmp_path, "p", "n") == (
        f"wandb: offline (atropos.wandb_mode), runs in {tmp_path}/wandb; upload with "
        f"`wandb sync {tmp_path}/wandb/offline-run-*`"
    )
    assert wandb_line(wandb, "online", "WANDB_MODE", tmp_path, "atropos_verl", "grpo") == (
        f"wandb: online (WANDB_MODE), project atropos_verl, run grpo; local copy in {tmp_path}/wandb"
    )
    assert wandb_line(wandb, "disabled", "WANDB_MODE", tmp_path, "p", "n") == (
        "wandb: disabled (WANDB_MODE): nothing is logged to wandb"
    )
    for name in ("offline-run-20261207_050415-aaaa", "offline-run-20261207_061000-bbbb", "run-20261206_230000-cccc"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert latest_wandb_run(tmp_path) == tmp_path / "wandb" / "offline-run-20261207_061000-bbbb"  # by time, not name
    at_start = wandb_line(wandb, "offline", "atropos.wandb_mode", tmp_path, "p", "n", latest=False)
    assert at_start.endswith(f"`wandb sync {tmp_path}/wandb/offline-run-*`")  # not an earlier launch's run


def test_the_line_names_the_folder_wandb_really_writes(tmp_path: Path) -> None:
    """A real offline wandb run with WANDB_DIR set, as the launcher sets it for the trainer (~2 s)."""
    script = "import wandb; run = wandb.init(project='p', name='n'); run.log({'x': 1}); run.finish()"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, check=True, timeout=120)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert (run / f"run-{run.name.rsplit('-', 1)[1]}.wandb").exists()  # the run's data, for `wandb sync`
    line = wandb_line(["wandb"], "offline", "atropos.wandb_mode", tmp_path, "p", "n")
    assert line == f"wandb: offline (atropos.wandb_mode), runs in {tmp_path}/wandb; upload with `wandb sync {run}`"


def test_the_launcher_puts_the_trainers_wandb_run_in_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recipe.atropos.launcher.supervisor import Launcher

    monkeypatch.delenv("WANDB_MODE", raising=False)  # tests/conftest.py sets disabled
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = f"atropos.launcher.run_dir={tmp_path}"
    assert Launcher(DEMO, [run]).wandb_line() is None  # the demo logs to the console only
    launcher = Launcher(DEMO, [run, "trainer.logger=[console,wandb]"])
    assert launcher.wandb_dir == tmp_path
    assert launcher.wandb_line() == (
        f"wandb: offline (atropos.wandb_mode), runs in {tmp_path}/wandb; upload with "
        f"`wandb sync {tmp_path}/wandb/offline-run-*`"
    )
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    online = Launcher(DEMO, [run, "trainer.logger=[console,wandb]", "atropos.wandb_mode=disabled"])
    assert online.wandb_dir == tmp_path / "mine"  # the user's WANDB_DIR wins
    assert online.wandb_line() == (
        f"wandb: online (WANDB_MODE), project atropos_verl, run cpu-demo-one-word; local copy in {tmp_path}/mine/wandb"
    )


def test_main_atropos_sets_the_mode_unless_the_user_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recipe.atropos.main_atropos import wandb_environ

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    config = load_config(DEMO, [])
    assert wandb_environ(config, "online") == {"WANDB_MODE": "online", "WANDB_DIR": str(tmp_path)}
    assert os.environ["WANDB_MODE"] == "online" and os.environ["WANDB_DIR"] == str(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's variable
    assert wandb_environ(config, "online")["WANDB_MODE"] == "disabled"
